// Shared pieces of the native CPU kernels: dtype conversion of one strided row into an
// accumulation-dtype buffer (and back), per-thread scratch buffers, and the vector helpers.
//
// Every kernel works in the accumulation dtype A (float for fp16/bf16/fp32 operands, double
// when any operand is fp64): a row is converted once into a per-thread buffer, the vector
// passes run there (in L1/L2 for rows up to a few hundred thousand classes), and the result is
// rounded once at the store. This file is compiled once per CPU capability (see setup.py):
// at::vec::Vectorized's width is that of the capability the translation unit is built for.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fused_ce_native {

using at::vec::Vectorized;

// Rows are split over at::parallel_for's threads in grains of about this many elements: small
// problems (the lecture's 64 x 11 batches) then run on the calling thread, with no hand-off.
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row_elements, 1));
}

// x -> A for one strided row of n elements (unit stride gets its own loop, which the compiler
// vectorizes; c10::Half / c10::BFloat16 convert through their float operators).
template <typename T, typename A>
void load_row(const void* base, int64_t stride, int64_t n, A* out) {
  const T* in = static_cast<const T*>(base);
  if constexpr (at::vec::is_reduced_floating_point_v<T> && std::is_same_v<A, float>) {
    // fp16/bf16 rows with unit stride: ATen's vector conversion, two float vectors at a time
    // (the scalar loop below does not vectorize for them: 3.5 % of a bf16 call's profile,
    // half of the kernel's own 7 %).
    if (stride == 1) {
      constexpr int64_t W = Vectorized<float>::size();
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        auto [low, high] = at::vec::convert_to_float<T>(Vectorized<T>::loadu(in + i));
        low.store(out + i);
        high.store(out + i + W);
      }
      for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
      return;
    }
  }
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(static_cast<float>(in[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(static_cast<float>(in[i * stride]));
  }
}

template <typename T, typename A>
void store_row(const A* in, void* base, int64_t stride, int64_t n) {
  T* out = static_cast<T*>(base);
  if constexpr (at::vec::is_reduced_floating_point_v<T> && std::is_same_v<A, float>) {
    if (stride == 1) {  // as in load_row; the same rounding as the scalar conversion
      constexpr int64_t W = Vectorized<float>::size();
      int64_t i = 0;
      for (; i + 2 * W <= n; i += 2 * W) {
        at::vec::convert_from_float<T>(Vectorized<float>::loadu(in + i),
                                       Vectorized<float>::loadu(in + i + W))
            .store(out + i);
      }
      for (; i < n; ++i) out[i] = static_cast<T>(in[i]);
      return;
    }
  }
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(in[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i * stride] = static_cast<T>(in[i]);
  }
}

// The conversions above with T = double skip the float detour (it would round fp64).
template <>
inline void load_row<double, double>(const void* base, int64_t stride, int64_t n, double* out) {
  const double* in = static_cast<const double*>(base);
  for (int64_t i = 0; i < n; ++i) out[i] = in[i * stride];
}

template <typename A>
using LoadRow = void (*)(const void*, int64_t, int64_t, A*);
template <typename A>
using StoreRow = void (*)(const A*, void*, int64_t, int64_t);

// The loader/storer for a tensor's dtype, chosen once per call (not per element).
template <typename A>
LoadRow<A> row_loader(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return &load_row<float, A>;
    case at::kDouble: return &load_row<double, A>;
    case at::kHalf: return &load_row<c10::Half, A>;
    case at::kBFloat16: return &load_row<c10::BFloat16, A>;
    default: TORCH_CHECK(false, "fused_ce native: unsupported floating dtype ", dtype);
  }
}

template <typename A>
StoreRow<A> row_storer(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return &store_row<float, A>;
    case at::kDouble: return &store_row<double, A>;
    case at::kHalf: return &store_row<c10::Half, A>;
    case at::kBFloat16: return &store_row<c10::BFloat16, A>;
    default: TORCH_CHECK(false, "fused_ce native: unsupported floating dtype ", dtype);
  }
}

// The small-C layout: a block of up to `width` rows across the lanes of a vector, classes along
// the loop. load_block gathers out[c * width + lane] = x[offsets[lane] + c * stride] (offsets
// in elements) for lanes below `count` and zero-fills the other lanes, so every vector op of a
// partial block runs on finite values; store_block scatters the first `count` lanes back.
// `lane_step` is the distance between consecutive lanes' rows when it is the same for all
// (0 otherwise): then a row-contiguous fp32 block of at least `width` classes is moved by
// ATen's in-register transposes (transpose_mxn; measured at 1024 rows, 1 thread: 48 -> 29 ns
// a row at C 16, 89 -> 74 at C 64, but 25 -> 30 at C 11, whose partial tiles cost more than
// the scalar loop), and rows one element apart (NCHW: the inner dimension) are one vector per
// class (16 x 11 x 64: 32 -> 18 ns a row).
template <typename T, typename A>
void load_block(const void* base, const int64_t* offsets, int64_t count, int64_t lane_step,
                int64_t width, int64_t stride, int64_t n, A* out) {
  const T* in = static_cast<const T*>(base);
  if constexpr (std::is_same_v<T, A>) {
    if (lane_step == 1) {
      for (int64_t c = 0; c < n; ++c) {
        Vectorized<A>::loadu(in + offsets[0] + c * stride, count).store(out + c * width);
      }
      return;
    }
  }
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (lane_step != 0 && stride == 1 && n >= width) {
      at::vec::transpose_mxn<float>(in + offsets[0], lane_step, out, width,
                                    static_cast<int>(count), static_cast<int>(n));
      for (int64_t c = 0; c < n; ++c) {
        for (int64_t lane = count; lane < width; ++lane) out[c * width + lane] = 0.0f;
      }
      return;
    }
  }
  for (int64_t lane = 0; lane < count; ++lane) {
    const T* row = in + offsets[lane];
    for (int64_t c = 0; c < n; ++c) {
      if constexpr (std::is_same_v<T, double>) {
        out[c * width + lane] = row[c * stride];  // no float detour for fp64
      } else {
        out[c * width + lane] = static_cast<A>(static_cast<float>(row[c * stride]));
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t lane = count; lane < width; ++lane) out[c * width + lane] = A(0);
  }
}

template <typename T, typename A>
void store_block(const A* in, void* base, const int64_t* offsets, int64_t count,
                 int64_t lane_step, int64_t width, int64_t stride, int64_t n) {
  T* out = static_cast<T*>(base);
  if constexpr (std::is_same_v<T, A>) {
    if (lane_step == 1) {
      for (int64_t c = 0; c < n; ++c) {
        Vectorized<A>::loadu(in + c * width).store(out + offsets[0] + c * stride, count);
      }
      return;
    }
  }
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (lane_step != 0 && stride == 1 && n >= width) {
      at::vec::transpose_mxn<float>(in, width, out + offsets[0], lane_step,
                                    static_cast<int>(n), static_cast<int>(count));
      return;
    }
  }
  for (int64_t lane = 0; lane < count; ++lane) {
    T* row = out + offsets[lane];
    for (int64_t c = 0; c < n; ++c) row[c * stride] = static_cast<T>(in[c * width + lane]);
  }
}

template <typename A>
using LoadBlock =
    void (*)(const void*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, A*);
template <typename A>
using StoreBlock =
    void (*)(const A*, void*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t);

template <typename A>
LoadBlock<A> block_loader(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return &load_block<float, A>;
    case at::kDouble: return &load_block<double, A>;
    case at::kHalf: return &load_block<c10::Half, A>;
    case at::kBFloat16: return &load_block<c10::BFloat16, A>;
    default: TORCH_CHECK(false, "fused_ce native: unsupported floating dtype ", dtype);
  }
}

template <typename A>
StoreBlock<A> block_storer(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return &store_block<float, A>;
    case at::kDouble: return &store_block<double, A>;
    case at::kHalf: return &store_block<c10::Half, A>;
    case at::kBFloat16: return &store_block<c10::BFloat16, A>;
    default: TORCH_CHECK(false, "fused_ce native: unsupported floating dtype ", dtype);
  }
}

// Outputs at least this large are backed by 2 MB pages where the OS allows it.
constexpr size_t kHugePageMinBytes = size_t(32) << 20;

// Ask Linux to back a large, not yet written output with transparent huge pages
// (madvise(MADV_HUGEPAGE) on the 2 MB-aligned part of its memory), as torch's
// THP_MEM_ALLOC_ENABLE=1 does for all its allocations. The first write to a fresh buffer
// otherwise page-faults every 4 KB: measured on the 2-core box, 240-300 ms of faults for a
// fresh 537 MB buffer against 57-70 ms with 2 MB pages. Only the page size changes (every
// advised 2 MB page lies inside the tensor, which the kernel writes whole), pages already
// present stay as they are, and a refusal (THP disabled, other OS) only loses the speed-up.
inline void prefer_huge_pages(const at::Tensor& output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = static_cast<size_t>(output.numel()) * output.element_size();
  if (bytes < kHugePageMinBytes || !output.is_non_overlapping_and_dense()) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(output.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)output;
#endif
}

// Per-thread scratch: a worker thread runs one row at a time, so thread_local buffers make
// the kernels reentrant (several Python threads may call them at once) without locks.
template <typename A>
A* scratch(int slot, int64_t n) {
  thread_local std::vector<A> buffers[8];
  std::vector<A>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// exp for arguments in [-inf, 0] (and NaN, which callers handle per row): the fast
// polynomial for fp32 (ATen's exp_u20: within about 1e-6 relative, far below the fp32
// tolerance of a loss, and clamps rather than propagating NaN), Sleef's 1-ulp exp for fp64.
inline Vectorized<float> exp_nonpositive(const Vectorized<float>& v) { return v.exp_u20(); }
inline Vectorized<double> exp_nonpositive(const Vectorized<double>& v) { return v.exp(); }

template <typename A>
inline A reduce_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, v);
}

}  // namespace fused_ce_native
