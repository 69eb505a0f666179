// Triton-compiled kernels launched from C++ through the CUDA driver API, with no CUDA at build
// time: the driver (libcuda.so.1) is opened at run time with dlopen and its entry points taken
// from cuGetProcAddress; the few types and constants used are declared here. The device is set
// through c10's DeviceGuard (the CUDA implementation torch's CUDA library registers) and the
// stream is the caller's (torch's current raw stream), so nothing here includes a CUDA header or
// links against CUDA, and the file compiles on a CPU-only machine.
//
// What it does (docs/gpu.md):
// * cuda_load_kernel: a cubin (Triton's compiled.asm["cubin"]) loaded into the device's primary
//   context (cuModuleLoadData, cuModuleGetFunction), with the dynamic shared memory above 48 KiB
//   opted into (cuFuncSetAttribute) as Triton's own loader does;
// * cuda_launch: the kernel launched on the stream it is given (cuLaunchKernel): the caller's
//   current stream (torch._C._cuda_getCurrentRawStream; c10::Stream::native_handle would give it
//   in C++, but only torch releases after 2026-02 have it), its parameters packed as Triton
//   compiled them: one parameter per non-constexpr argument in
//   signature order (pointers 8 bytes, integers and floats by their type), then the scratch
//   pointers recent Triton appends (global, profile), passed as null;
// * cuda_param_layout: the byte offset and size of each packed parameter, so the packing can be
//   checked on a machine without a GPU against what Triton compiled (tests/test_cuda_launch.py).
//
// Parameter types are one character each, as torch's static Triton launcher spells them:
// 'O' pointer, 'b'/'B' 8-bit, 'h'/'H' 16-bit, 'i'/'I' 32-bit, 'l'/'K' 64-bit integers, 'f' fp32,
// 'd' fp64. Integers and pointers come in one int list, floats in another, in parameter order.
#if !defined(_WIN32)
#include <dlfcn.h>
#endif

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace fused_ce_native {
namespace {

// --- the driver API, declared here -----------------------------------------------------------

using CUresult = int;  // CUDA_SUCCESS is 0
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;

constexpr int kFuncSharedSizeBytes = 1;               // CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
constexpr int kFuncMaxDynamicSharedSizeBytes = 8;     // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
constexpr int kDeviceMaxSharedPerBlockOptin = 97;     // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
constexpr int kDriverApiVersion = 12000;              // the ABI of the signatures below
constexpr int kStaticSharedLimit = 48 * 1024;         // above it, dynamic shared memory is opt-in

struct Driver {
  CUresult (*get_error_string)(CUresult, const char**) = nullptr;
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*device_get)(CUdevice*, int) = nullptr;
  CUresult (*device_get_attribute)(int*, int, CUdevice) = nullptr;
  CUresult (*primary_ctx_retain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*module_load_data)(CUmodule*, const void*) = nullptr;
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*func_get_attribute)(int*, int, CUfunction) = nullptr;
  CUresult (*func_set_attribute)(CUfunction, int, int) = nullptr;
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                            unsigned, unsigned, CUstream, void**, void**) = nullptr;
  std::string error;  // why the driver is unusable ("" when it is usable)
};

// Opened once per process. cuGetProcAddress (CUDA >= 11.3) hands out the entry point of each
// function for the ABI version asked for; the _v2 symbol (CUDA 12) takes one more argument.
const Driver& driver() {
  static const Driver* const opened = [] {
    auto* d = new Driver();
#if defined(_WIN32)
    // nvcuda.dll would need LoadLibrary: not written (and not tested) here.
    d->error = "the C++ launcher opens the driver on Linux only";
    return d;
#else
    void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (library == nullptr) {
      const char* why = dlerror();
      d->error = std::string("libcuda.so.1 could not be opened (") + (why ? why : "no reason") +
                 "): no NVIDIA driver on this machine";
      return d;
    }
    using GetProcV2 = CUresult (*)(const char*, void**, int, uint64_t, int*);
    using GetProcV1 = CUresult (*)(const char*, void**, int, uint64_t);
    auto v2 = reinterpret_cast<GetProcV2>(dlsym(library, "cuGetProcAddress_v2"));
    auto v1 = reinterpret_cast<GetProcV1>(dlsym(library, "cuGetProcAddress"));
    if (v2 == nullptr && v1 == nullptr) {
      d->error = "the NVIDIA driver has no cuGetProcAddress (older than CUDA 11.3)";
      return d;
    }
    auto get = [&](const char* name, auto& slot) {
      void* entry = nullptr;
      const CUresult status = v2 != nullptr ? v2(name, &entry, kDriverApiVersion, 0, nullptr)
                                            : v1(name, &entry, kDriverApiVersion, 0);
      if (status != 0 || entry == nullptr) {
        if (d->error.empty()) d->error = std::string("the NVIDIA driver has no ") + name;
        return;
      }
      slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(entry);
    };
    get("cuGetErrorString", d->get_error_string);
    get("cuCtxGetCurrent", d->ctx_get_current);
    get("cuCtxSetCurrent", d->ctx_set_current);
    get("cuDeviceGet", d->device_get);
    get("cuDeviceGetAttribute", d->device_get_attribute);
    get("cuDevicePrimaryCtxRetain", d->primary_ctx_retain);
    get("cuModuleLoadData", d->module_load_data);
    get("cuModuleGetFunction", d->module_get_function);
    get("cuFuncGetAttribute", d->func_get_attribute);
    get("cuFuncSetAttribute", d->func_set_attribute);
    get("cuLaunchKernel", d->launch_kernel);
    return d;
#endif
  }();
  return *opened;
}

const Driver& usable_driver() {
  const Driver& d = driver();
  TORCH_CHECK(d.error.empty(), "fused_ce: the CUDA driver is unavailable: ", d.error);
  return d;
}

void check(CUresult status, const char* what) {
  if (status == 0) return;
  const char* text = nullptr;
  if (driver().get_error_string != nullptr) driver().get_error_string(status, &text);
  TORCH_CHECK(false, "fused_ce: ", what, " failed: CUDA driver error ", status, " (",
              text != nullptr ? text : "unknown", ")");
}

// The calling thread's context is the device's primary one (torch's runtime calls make it
// current; a thread that made none gets it here, as Triton's launcher does).
void make_context_current(int64_t device) {
  const Driver& d = usable_driver();
  CUcontext current = nullptr;
  check(d.ctx_get_current(&current), "cuCtxGetCurrent");
  if (current != nullptr) return;
  CUdevice handle = 0;
  check(d.device_get(&handle, static_cast<int>(device)), "cuDeviceGet");
  check(d.primary_ctx_retain(&current, handle), "cuDevicePrimaryCtxRetain");
  check(d.ctx_set_current(current), "cuCtxSetCurrent");
}

// --- the parameter layout --------------------------------------------------------------------

struct Param {
  char type;
  int64_t size;
  int64_t offset;
  bool is_float;
};

int64_t param_size(char type) {
  switch (type) {
    case 'b': case 'B': return 1;
    case 'h': case 'H': return 2;
    case 'i': case 'I': case 'f': return 4;
    case 'O': case 'l': case 'K': case 'd': return 8;
    default:
      TORCH_CHECK_VALUE(false, "fused_ce: unknown kernel parameter type '", type,
                        "' (expected one of O b B h H i I l K f d)");
  }
}

// Each parameter at the next offset aligned to its own size (as a C struct would lay them out):
// the bytes cuLaunchKernel reads through the kernelParams pointers into one buffer.
std::vector<Param> layout(const std::string& types) {
  std::vector<Param> params;
  params.reserve(types.size());
  int64_t offset = 0;
  for (const char type : types) {
    const int64_t size = param_size(type);
    offset = (offset + size - 1) / size * size;
    params.push_back({type, size, offset, type == 'f' || type == 'd'});
    offset += size;
  }
  return params;
}

// [offset_0, size_0, offset_1, size_1, ..., total bytes]: what cuda_launch packs for `types`.
std::vector<int64_t> cuda_param_layout(const std::string& types) {
  std::vector<int64_t> out;
  int64_t end = 0;
  for (const Param& p : layout(types)) {
    out.push_back(p.offset);
    out.push_back(p.size);
    end = p.offset + p.size;
  }
  out.push_back(end);
  return out;
}

std::string cuda_driver_error() { return driver().error; }

// --- loading and launching -------------------------------------------------------------------

struct Loaded {
  CUfunction function;
  int64_t device;
  int64_t shared;
};

std::mutex loaded_mutex;
std::vector<Loaded>& loaded() {
  static auto* const kernels = new std::vector<Loaded>();  // modules live as long as the process
  return *kernels;
}

// Loads `cubin` (a CPU uint8 tensor of its bytes) on `device` and returns a handle for
// cuda_launch. `shared` is Triton's metadata.shared, the dynamic shared memory of each launch.
int64_t cuda_load_kernel(const at::Tensor& cubin, const std::string& name, int64_t shared,
                         int64_t device) {
  TORCH_CHECK_VALUE(cubin.device().is_cpu() && cubin.scalar_type() == at::kByte &&
                        cubin.dim() == 1 && cubin.is_contiguous(),
                    "cubin: expected a contiguous 1-D uint8 CPU tensor of the cubin's bytes");
  const Driver& d = usable_driver();
  const c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, device));
  make_context_current(device);
  CUmodule module = nullptr;
  check(d.module_load_data(&module, cubin.const_data_ptr<uint8_t>()), "cuModuleLoadData");
  CUfunction function = nullptr;
  check(d.module_get_function(&function, module, name.c_str()), "cuModuleGetFunction");
  if (shared > kStaticSharedLimit) {
    CUdevice handle = 0;
    check(d.device_get(&handle, static_cast<int>(device)), "cuDeviceGet");
    int optin = 0, static_shared = 0;
    check(d.device_get_attribute(&optin, kDeviceMaxSharedPerBlockOptin, handle),
          "cuDeviceGetAttribute");
    TORCH_CHECK(shared <= optin, "fused_ce: kernel ", name, " needs ", shared,
                " bytes of shared memory, the device allows ", optin);
    check(d.func_get_attribute(&static_shared, kFuncSharedSizeBytes, function),
          "cuFuncGetAttribute");
    check(d.func_set_attribute(function, kFuncMaxDynamicSharedSizeBytes, optin - static_shared),
          "cuFuncSetAttribute");
  }
  const std::lock_guard<std::mutex> lock(loaded_mutex);
  loaded().push_back({function, device, shared});
  return static_cast<int64_t>(loaded().size()) - 1;
}

// Launches a loaded kernel on `stream` (a cudaStream_t as an integer: the caller passes torch's
// current stream of the kernel's device, so a launch inside torch.cuda.graph is captured like
// torch's own kernels): a (grid_x, grid_y, grid_z) grid of num_warps * 32 threads, parameters
// of `types` from `ints` and `floats` in order.
void cuda_launch(int64_t kernel, int64_t grid_x, int64_t grid_y, int64_t grid_z,
                 int64_t num_warps, int64_t stream, const std::string& types,
                 at::IntArrayRef ints, at::ArrayRef<double> floats) {
  Loaded target{};
  {
    const std::lock_guard<std::mutex> lock(loaded_mutex);
    TORCH_CHECK_INDEX(kernel >= 0 && kernel < static_cast<int64_t>(loaded().size()),
                      "kernel: no loaded kernel ", kernel);
    target = loaded()[kernel];
  }
  const Driver& d = usable_driver();
  const std::vector<Param> params = layout(types);
  // Eight-byte aligned storage for the packed values, and one pointer to each.
  std::vector<uint64_t> storage((params.empty() ? 0 : params.back().offset + 8) / 8 + 1);
  std::vector<void*> pointers(params.size());
  auto* bytes = reinterpret_cast<char*>(storage.data());
  size_t next_int = 0, next_float = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const Param& p = params[i];
    char* slot = bytes + p.offset;
    pointers[i] = slot;
    if (p.is_float) {
      TORCH_CHECK_VALUE(next_float < floats.size(), "floats: fewer values than types needs");
      const double value = floats[next_float++];
      if (p.type == 'f') {
        const float narrow = static_cast<float>(value);
        std::memcpy(slot, &narrow, 4);
      } else {
        std::memcpy(slot, &value, 8);
      }
    } else {
      TORCH_CHECK_VALUE(next_int < ints.size(), "ints: fewer values than types needs");
      const int64_t value = ints[next_int++];
      // Little-endian: the low bytes of the 64-bit value are the narrower integer's bytes.
      std::memcpy(slot, &value, static_cast<size_t>(p.size));
    }
  }
  TORCH_CHECK_VALUE(next_int == ints.size() && next_float == floats.size(),
                    "ints, floats: more values than the types ", types, " take");
  const c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, target.device));
  make_context_current(target.device);
  check(d.launch_kernel(target.function, static_cast<unsigned>(grid_x),
                        static_cast<unsigned>(grid_y), static_cast<unsigned>(grid_z),
                        static_cast<unsigned>(32 * num_warps), 1, 1,
                        static_cast<unsigned>(target.shared),
                        reinterpret_cast<CUstream>(stream), pointers.data(), nullptr),
        "cuLaunchKernel");
}

}  // namespace
}  // namespace fused_ce_native

// Schemas and kernels together: these ops take no tensor to dispatch on (or only a CPU byte
// tensor), so each is one catch-all function, and only this library defines them.
TORCH_LIBRARY_FRAGMENT(fused_ce_native, m) {
  m.def("cuda_driver_error() -> str", &fused_ce_native::cuda_driver_error);
  m.def("cuda_param_layout(str types) -> int[]", &fused_ce_native::cuda_param_layout);
  m.def("cuda_load_kernel(Tensor cubin, str name, int shared, int device) -> int",
        &fused_ce_native::cuda_load_kernel);
  m.def(
      "cuda_launch(int kernel, int grid_x, int grid_y, int grid_z, int num_warps, int stream, "
      "str types, int[] ints, float[] floats) -> ()",
      &fused_ce_native::cuda_launch);
}
