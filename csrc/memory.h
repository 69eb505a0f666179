// Output buffers backed by 2 MiB pages, for the large outputs of the native ops.
//
// A fresh buffer's first touch costs a page fault per 4 KiB page. On the 2-core VM this was
// measured on (2026-11-29), writing a fresh 16 MiB buffer took 10.1 ms in 4 KiB faults, 1.4 ms
// when the range was advised MADV_HUGEPAGE first, against 0.24 ms for an already-touched buffer:
// the faults cost more than the BCE kernel that fills the buffer. torch's CPU allocator takes
// 2 MiB pages only under THP_MEM_ALLOC_ENABLE=1, and its glibc heap gives back (and faults
// again) a freed 16 MiB gradient every few calls. So outputs of at least kHugeBytes are mapped
// here: a 2 MiB-aligned anonymous mapping advised MADV_HUGEPAGE, unmapped when freed (no
// memory is kept after the tensor dies). Where transparent huge pages are off ("never") or the
// platform is not Linux, outputs come from torch's allocator as usual.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <algorithm>
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
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(start, static_cast<int64_t>(length), 0, 0,
                                       c10::Device(c10::kCPU));
    }
    // The context carries the length for the deleter; the data pointer is the mapping.
    return {start, new Mapping{start, length}, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Mapping {
    char* start;
    size_t length;
  };

  static void release(void* context) {
    const Mapping* mapping = static_cast<const Mapping*>(context);
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(mapping->start, -static_cast<int64_t>(mapping->length),
                                       0, 0, c10::Device(c10::kCPU));
    }
    munmap(mapping->start, mapping->length);
    delete mapping;
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
