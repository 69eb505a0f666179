// Output buffers backed by 2 MiB pages, for the large outputs of the native ops.
//
// A fresh buffer's first touch costs a page fault per 4 KiB page. On the 2-core VM this was
// measured on (2026-11-29), writing a fresh 16 MiB buffer took 10.1 ms in 4 KiB faults, 1.4 ms
// when the range was advised MADV_HUGEPAGE first, against 0.24 ms for an already-touched buffer:
// the faults cost more than the BCE kernel that fills the buffer. torch's CPU allocator takes
// 2 MiB pages only under THP_MEM_ALLOC_ENABLE=1, and its glibc heap gives back (and faults
// again) a freed 16 MiB gradient every few calls. So outputs of at least kHugeBytes are mapped
// here: a 2 MiB-aligned anonymous mapping advised MADV_HUGEPAGE. A freed mapping of at most
// kKeptBytes is kept (one, the last freed) for the next output of the same length: a training
// step frees last step's gradient before making the next one, which then costs neither faults
// nor the kernel's zeroing of fresh pages (1.4 ms per 16 MiB here); anything else is unmapped.
// Where transparent huge pages are off ("never") or the platform is not Linux, outputs come
// from torch's allocator as usual.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fused_ce_native {

// Smallest output mapped with 2 MiB pages: below it the faults are few and the heap may
// already hold touched memory.
constexpr size_t kHugeBytes = size_t(4) << 20;
constexpr size_t kHugePage = size_t(2) << 20;
// Largest freed mapping kept for reuse (one at most: the memory held after its tensor died).
constexpr size_t kKeptBytes = size_t(64) << 20;

#ifdef __linux__
inline bool transparent_huge_pages_usable() {
  static const bool usable = [] {
    std::ifstream file("/sys/kernel/mm/transparent_hugepage/enabled");
    const std::string modes((std::istreambuf_iterator<char>(file)),
                            std::istreambuf_iterator<char>());
    return modes.find("[always]") != std::string::npos ||
           modes.find("[madvise]") != std::string::npos;
  }();
  return usable;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t length = (std::max<size_t>(nbytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
    if (Mapping* kept = kept_.exchange(nullptr)) {
      if (kept->length == length) return data_ptr(kept);
      unmap(kept);
    }
    // Over-map by one huge page and trim, so the range starts on a 2 MiB boundary and every
    // 2 MiB of it can be one huge page.
    char* raw = static_cast<char*>(mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (raw == MAP_FAILED) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, "fused_ce native: cannot map ", nbytes,
                       " bytes for an output");
    }
    const uintptr_t aligned =
        (reinterpret_cast<uintptr_t>(raw) + kHugePage - 1) & ~(uintptr_t(kHugePage) - 1);
    char* start = reinterpret_cast<char*>(aligned);
    if (start > raw) munmap(raw, start - raw);
    const size_t tail = (raw + length + kHugePage) - (start + length);
    if (tail > 0) munmap(start + length, tail);
    madvise(start, length, MADV_HUGEPAGE);  // advice: failure only means 4 KiB pages
    return data_ptr(new Mapping{start, length});
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Mapping {
    char* start;
    size_t length;
  };

  // The last freed mapping of at most kKeptBytes, or null. Atomic: tensors die on any thread.
  static inline std::atomic<Mapping*> kept_{nullptr};

  // The context carries the length for the deleter; the data pointer is the mapping.
  static c10::DataPtr data_ptr(Mapping* mapping) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(mapping->start, static_cast<int64_t>(mapping->length), 0,
                                       0, c10::Device(c10::kCPU));
    }
    return {mapping->start, mapping, &release, c10::Device(c10::kCPU)};
  }

  static void unmap(Mapping* mapping) {
    munmap(mapping->start, mapping->length);
    delete mapping;
  }

  static void release(void* context) {
    Mapping* mapping = static_cast<Mapping*>(context);
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(mapping->start, -static_cast<int64_t>(mapping->length),
                                       0, 0, c10::Device(c10::kCPU));
    }
    if (mapping->length <= kKeptBytes) {
      if (Mapping* previous = kept_.exchange(mapping)) unmap(previous);
      return;
    }
    unmap(mapping);
  }
};
#endif

// A new contiguous tensor of `like`'s shape and dtype on the CPU, uninitialised: huge-page
// backed when it is at least kHugeBytes and transparent huge pages are available, else from
// torch's allocator (at::empty).
inline at::Tensor empty_output(const at::Tensor& like) {
  TORCH_CHECK(like.device().is_cpu(), "fused_ce native: empty_output makes CPU tensors");
#ifdef __linux__
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (nbytes >= kHugeBytes && transparent_huge_pages_usable()) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(like.sizes(), &allocator,
                                     c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     like.scalar_type(), c10::MemoryFormat::Contiguous);
  }
#endif
  return at::empty(like.sizes(), like.options().memory_format(c10::MemoryFormat::Contiguous));
}

}  // namespace fused_ce_native
