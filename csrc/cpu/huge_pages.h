// Large CPU outputs on transparent huge pages, opt-in (GPTKERN_CPU_HUGE_PAGES=1). A tensor of
// 32 MiB or more from ATen's allocator is a new mapping (glibc maps such blocks and unmaps them on
// free), so its first write takes a page fault per 4 KiB: for a 128 MiB output about 35 ms on a
// 2-core VM, three times the kernel's own 11 ms. madvise(MADV_HUGEPAGE) before the first touch
// lets Linux fault it in 2 MiB at a time (what PyTorch does for every allocation under
// THP_MEM_ALLOC_ENABLE=1): 2.4-2.9x faster calls back to back. Not the default: on a VM whose
// balloon reports free pages to the host, a huge page freed for a few seconds goes back to the
// host and costs far more to fault in again (155 ms against PyTorch's 40 ms for 128 MiB, measured
// with 3 s between calls). A hint only: THP "never", another OS, or an error leave small pages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace gptkern::cpu {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
// glibc maps blocks from 32 MiB (its largest mmap threshold) and may serve smaller ones from its
// heap, already faulted in: advising those would only put the heap's regrowth on huge pages.
constexpr size_t kHugePagesFrom = 16 * kHugePage;

inline bool huge_pages_enabled() {  // read once, at the first large output
  static const bool enabled = [] {
    const char* v = std::getenv("GPTKERN_CPU_HUGE_PAGES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return enabled;
}

// Advises the whole 2 MiB-aligned pages inside [p, p + bytes); returns whether madvise was called
// and succeeded (tests read the mapping's flags).
inline bool advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugePagesFrom || !huge_pages_enabled()) return false;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHugePage - 1);
  return end > begin && madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

// at::empty for a tensor the caller writes in full before reading (uninitialized, as at::empty).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
  advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

// at::zeros with the same hint: the zeros are the first touch.
inline at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options).zero_();
}

}  // namespace gptkern::cpu
