// Runs the CUDA kernels of csrc/cuda on the CPU, for tests on machines without a GPU.
//
// Force-included (g++ -include) before the .cu sources, which tests/cuda_emu/emu_build.py
// compiles as C++ with GPTKERN_CUDA_EMU defined and each `kernel<<<grid, block, smem, stream>>>(args)`
// rewritten as a call of `gptkern_emu::launch(grid, block, smem, body)`, body calling the kernel.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling thread; blocks run one after
// another. A fiber runs until it reaches a barrier: __syncthreads waits for every live thread of
// the block, and the warp-level operations (__shfl_xor_sync, __syncwarp, ldmatrix, mma.sync)
// for every lane of the warp, exchanging values through per-warp slots. `__shared__` variables
// are function statics, one copy for the block that runs, filled with 0xff bytes (NaN) when the
// block starts. A barrier no thread can pass is a deadlock: launch() throws instead of hanging.
//
// What a scheduling order hides, another may show: `config.order` runs the threads released by a
// barrier lowest first, highest first, or shuffled; with `config.warps_run_ahead` (the default) a
// warp that passes a warp-level barrier goes on at once, so it runs up to the next __syncthreads
// before the other warps move (otherwise the warps advance in lockstep, which hides missing
// __syncthreads between warps); `config.deferred_copies` (the default) performs each cp.async at
// the issuing thread's cp.async.wait (a missing wait reads stale shared memory) instead of at once
// (a missing barrier before the copy overwrites data other warps still read).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_set>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// The built-in variables: the scheduler sets threadIdx before it resumes a fiber.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace gptkern_emu {

enum class Order { kForward, kReverse, kRandom };

struct Config {
  Order order = Order::kForward;
  bool warps_run_ahead = true;
  bool deferred_copies = true;
  uint64_t seed = 0;
  int multiprocessors = 132;  // what cudaDevAttrMultiProcessorCount reports (an H200's)
};
inline Config config;

// (grid x, y, z, block x, y, z) of every launch since the harness last cleared the list.
inline std::vector<std::array<unsigned, 6>> launches;
// Bytes read from global memory by cp.async (zero-filled bytes not counted), since last cleared.
inline int64_t copied_bytes = 0;
// Coalescing of those reads: the 32-byte sectors each warp-wide cp.async touched (the lanes'
// n-th copies together, as one instruction of the warp), and the fewest that could hold its bytes.
inline int64_t copy_sectors = 0, copy_min_sectors = 0;
// Shared-memory bank conflicts of ldmatrix since last cleared: the wavefronts beyond one per
// 8x8 matrix. Its 8 rows of 16 bytes fill the 32 four-byte banks once when their addresses fall
// in 8 distinct 16-byte bank groups ((address / 16) % 8); n rows in one group take n wavefronts.
inline int64_t ldmatrix_extra_wavefronts = 0;

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  ucontext_t context;
  uint3 tid;
  int warp = 0;
  bool done = false;
  const char* waiting_at = nullptr;  // the barrier it waits at, for the deadlock message
  std::vector<Copy> pending;         // cp.async not performed yet
  int copies_issued = 0;             // cp.async calls of this thread in this block
};

struct Warp {
  int live = 0, arrived = 0;
  const char* op = nullptr;  // the warp operation the waiting lanes are at, and its argument
  int64_t arg = 0;
  std::vector<int> waiters;
  alignas(16) unsigned char slots[32][64];  // one value per lane, exchanged at a warp barrier
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, arrived = 0;
  std::vector<int> waiters;  // at __syncthreads
  std::deque<int> runnable;
  ucontext_t scheduler;
  int current = -1;
  std::string error;
  const std::function<void()>* body = nullptr;
  std::mt19937_64 rng;
  std::unordered_set<void*> shared;  // __shared__ variables filled with garbage in this block
  size_t shared_bytes = 0;
  std::map<std::pair<int, int>, std::vector<uintptr_t>> warp_copies;  // (warp, n-th copy) -> sources
};

// Sectors of each warp-wide copy of the block that ran, added to the counters.
inline void count_sectors(const Block& b) {
  for (const auto& [key, sources] : b.warp_copies) {
    std::vector<uintptr_t> sectors;
    for (uintptr_t a : sources) sectors.push_back(a / 32);  // a 16-byte aligned copy is in one sector
    std::sort(sectors.begin(), sectors.end());
    copy_sectors += std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    copy_min_sectors += (int64_t(sources.size()) * 16 + 31) / 32;
  }
}
inline Block* block = nullptr;

inline Fiber& current() { return block->fibers[block->current]; }

inline void set_block_indices(const uint3& b, const dim3& grid, const dim3& threads) {
  ::blockIdx = b;
  ::gridDim = grid;
  ::blockDim = threads;
}

inline void set_thread_index(const uint3& t) { ::threadIdx = t; }

// Stops the current fiber for good; launch() throws `message`.
[[noreturn]] inline void fail(const std::string& message) {
  block->error = message;
  setcontext(&block->scheduler);
  std::abort();  // unreachable
}

// The first thread of a block to pass a __shared__ declaration fills the variable with 0xff
// bytes (NaN as fp32, fp16 or bf16), so that reading what no thread of this block wrote shows.
// A block has at most 48 KiB of static shared memory.
inline void shared_memory(void* p, size_t bytes) {
  if (block->shared.insert(p).second) {
    std::memset(p, 0xff, bytes);
    block->shared_bytes += bytes;
    if (block->shared_bytes > 48 * 1024) {
      fail("static shared memory of " + std::to_string(block->shared_bytes) + " bytes, more than 48 KiB");
    }
  }
}

inline void release(std::vector<int>& ids, bool first = false) {
  std::sort(ids.begin(), ids.end());
  if (config.order == Order::kReverse) std::reverse(ids.begin(), ids.end());
  if (config.order == Order::kRandom) std::shuffle(ids.begin(), ids.end(), block->rng);
  for (int id : ids) block->fibers[id].waiting_at = nullptr;
  block->runnable.insert(first ? block->runnable.begin() : block->runnable.end(), ids.begin(), ids.end());
  ids.clear();
}

inline void maybe_release_block() {
  if (block->arrived > 0 && block->arrived == block->live) {
    block->arrived = 0;
    release(block->waiters);
  }
}

// A kernel compiled for at most `bound` threads per block cannot be launched with more.
inline void check_launch_bounds(int64_t bound) {
  const int64_t threads = int64_t(::blockDim.x) * ::blockDim.y * ::blockDim.z;
  if (threads > bound) {
    fail("a block of " + std::to_string(threads) + " threads for a kernel of __launch_bounds__(" +
         std::to_string(bound) + ")");
  }
}

// The .sync warp operations here take all 32 lanes: one that exited makes the operation undefined.
inline void maybe_release_warp(Warp& w) {
  if (w.arrived > 0 && w.arrived == w.live) {
    if (w.live != 32) fail(std::string(w.op) + " with " + std::to_string(w.live) + " live lanes in the warp");
    w.arrived = 0;
    release(w.waiters, config.warps_run_ahead);
  }
}

inline void wait_here(const char* what) {
  Fiber& f = current();
  f.waiting_at = what;
  swapcontext(&f.context, &block->scheduler);
}

inline void sync_block() {
  block->waiters.push_back(block->current);
  ++block->arrived;
  maybe_release_block();
  wait_here("__syncthreads");
}

inline Warp& my_warp() { return block->warps[current().warp]; }

inline int lane_id() {
  const Fiber& f = current();
  return static_cast<int>(f.tid.x + ::blockDim.x * (f.tid.y + f.tid.z * ::blockDim.y)) & 31;
}

// Every lane of the warp reaches the same warp operation (`what`, with the same `arg`) before
// any goes on.
inline void sync_warp(const char* what, int64_t arg = 0) {
  Warp& w = my_warp();
  if (w.arrived == 0) {
    w.op = what;
    w.arg = arg;
  } else if (std::strcmp(w.op, what) != 0 || w.arg != arg) {
    fail("lanes of warp " + std::to_string(current().warp) + " at different warp operations: " + w.op + " (" +
         std::to_string(w.arg) + ") and " + what + " (" + std::to_string(arg) + ")");
  }
  w.waiters.push_back(block->current);
  ++w.arrived;
  maybe_release_warp(w);
  wait_here(what);
}

// Each lane publishes `mine`; returns what `pick(lane)` says to read, as T, from the slots.
template <typename Out, typename In, typename Pick>
inline Out exchange(const In& mine, const char* what, Pick pick, int64_t arg = 0) {
  static_assert(sizeof(In) <= 64, "a warp slot holds 64 bytes");
  Warp& w = my_warp();
  const int lane = lane_id();
  std::memcpy(w.slots[lane], &mine, sizeof(In));
  sync_warp(what, arg);
  Out out = pick(w.slots, lane);
  sync_warp(what, arg);  // every lane has read before the slots are written again
  return out;
}

inline void perform(const Copy& c) {
  if (c.bytes) std::memcpy(c.dst, c.src, c.bytes);
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
}

inline void run_fiber();

template <typename F>
void launch(dim3 grid, dim3 threads, size_t dynamic_smem, F&& body) {
  const int64_t n_threads = int64_t(threads.x) * threads.y * threads.z;
  if (n_threads < 1 || n_threads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 ||
      grid.z > 65535) {
    throw std::runtime_error("invalid configuration argument: grid (" + std::to_string(grid.x) + ", " +
                             std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                             std::to_string(threads.x) + ", " + std::to_string(threads.y) + ", " +
                             std::to_string(threads.z) + ")");
  }
  if (dynamic_smem) throw std::runtime_error("the emulator has no dynamic shared memory");
  launches.push_back({grid.x, grid.y, grid.z, threads.x, threads.y, threads.z});
  const std::function<void()> fn(body);
  constexpr size_t kStack = 256 * 1024;
  std::unique_ptr<char[]> stacks(new char[kStack * n_threads]);
  std::vector<uint3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.push_back({x, y, z});
  std::mt19937_64 rng(config.seed);
  if (config.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (config.order == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);

  for (const uint3& b : order) {
    Block state;
    state.body = &fn;
    state.rng.seed(rng());
    state.fibers.resize(n_threads);
    state.warps.resize((n_threads + 31) / 32);
    state.live = static_cast<int>(n_threads);
    std::vector<int> all;
    for (int64_t i = 0; i < n_threads; ++i) {
      Fiber& f = state.fibers[i];
      f.tid = {static_cast<unsigned>(i % threads.x), static_cast<unsigned>(i / threads.x % threads.y),
               static_cast<unsigned>(i / (int64_t(threads.x) * threads.y))};
      f.warp = static_cast<int>(i / 32);
      ++state.warps[f.warp].live;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = stacks.get() + kStack * i;
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = &state.scheduler;
      makecontext(&f.context, run_fiber, 0);
      all.push_back(static_cast<int>(i));
    }
    block = &state;
    set_block_indices(b, grid, threads);
    release(all);
    while (!state.runnable.empty() && state.error.empty()) {
      state.current = state.runnable.front();
      state.runnable.pop_front();
      set_thread_index(state.fibers[state.current].tid);
      swapcontext(&state.scheduler, &state.fibers[state.current].context);
    }
    block = nullptr;
    count_sectors(state);
    if (!state.error.empty()) throw std::runtime_error("emulated kernel: " + state.error);
    if (state.live > 0) {
      std::string where;
      for (size_t i = 0; i < state.fibers.size(); ++i) {
        if (!state.fibers[i].done) {
          const char* at = state.fibers[i].waiting_at;
          where = "thread " + std::to_string(i) + " waits at " + (at ? at : "no barrier");
          break;
        }
      }
      throw std::runtime_error("emulated kernel deadlocked in block (" + std::to_string(b.x) + ", " +
                               std::to_string(b.y) + ", " + std::to_string(b.z) + "): " +
                               std::to_string(state.live) + " threads cannot pass a barrier; " + where);
    }
  }
}

// The body of every fiber: the kernel, then the exit of the thread (its pending copies land;
// barriers stop counting it).
inline void run_fiber() {
  std::string thrown;
  try {
    (*block->body)();
  } catch (const std::exception& e) {  // leave the handler before leaving the fiber for good
    thrown = e.what();
  } catch (...) {
    thrown = "an unknown exception";
  }
  if (!thrown.empty()) fail("a thread threw: " + thrown);
  Fiber& f = current();
  for (const Copy& c : f.pending) perform(c);
  f.pending.clear();
  f.done = true;
  --block->live;
  maybe_release_block();
  Warp& w = my_warp();
  --w.live;
  maybe_release_warp(w);
}  // returns to the scheduler (uc_link)

// What device code calls, seen from namespace gptkern::cuda (see the end of this file).
namespace device {

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }

inline void __syncthreads() { sync_block(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) fail("__syncwarp with a partial mask");
  sync_warp("__syncwarp");
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) fail("__shfl_xor_sync with a partial mask or width");
  return exchange<T>(v, "__shfl_xor_sync", [&](auto& slots, int lane) {
    const int source = lane ^ lane_mask;  // out of the warp: the lane's own value (PTX shfl.bfly)
    T out;
    std::memcpy(&out, slots[source >= 0 && source < 32 ? source : lane], sizeof(T));
    return out;
  }, lane_mask);
}

}  // namespace device

// A 16-bit element of a fragment register (lo: bits 0-15) as float.
template <typename T>
inline float b16_to_float(uint16_t bits);

}  // namespace gptkern_emu

#include <cuda_bf16.h>  // tests/cuda_emu/shim: __half and __nv_bfloat16 through c10
#include <cuda_fp16.h>

namespace gptkern_emu {

template <>
inline float b16_to_float<__half>(uint16_t bits) {
  return __half2float(__half{bits});
}
template <>
inline float b16_to_float<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__nv_bfloat16{bits});
}

inline uint32_t pair(uint16_t lo, uint16_t hi) { return lo | (uint32_t(hi) << 16); }

}  // namespace gptkern_emu

// The warp-level operations of csrc/cuda/mma.cuh (its PTX is compiled out under
// GPTKERN_CUDA_EMU), with the PTX ISA's semantics. g = lane / 4, t = lane % 4.
namespace gptkern::cuda {
using namespace ::gptkern_emu::device;

// cp.async.cg.shared.global, 16 bytes; bytes past src_bytes (0 or 16) are zero-filled.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (src_bytes != 0 && src_bytes != 16) ::gptkern_emu::fail("cp.async of " + std::to_string(src_bytes) + " bytes");
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16) {
    ::gptkern_emu::fail("cp.async of 16 bytes at an address not 16-byte aligned");
  }
  ::gptkern_emu::copied_bytes += src_bytes;
  auto& f = ::gptkern_emu::current();
  const int nth = f.copies_issued++;
  if (src_bytes) ::gptkern_emu::block->warp_copies[{f.warp, nth}].push_back(reinterpret_cast<uintptr_t>(src));
  const ::gptkern_emu::Copy copy{dst, src, src_bytes};
  if (::gptkern_emu::config.deferred_copies) {
    ::gptkern_emu::current().pending.push_back(copy);
  } else {
    ::gptkern_emu::perform(copy);
  }
}

inline void cp_async_commit() {}

inline void cp_async_wait_all() {
  auto& pending = ::gptkern_emu::current().pending;
  for (const auto& copy : pending) ::gptkern_emu::perform(copy);
  pending.clear();
}

// ldmatrix .m8n8.x4.b16: lanes 8i .. 8i + 7 give the row addresses of matrix i; lane L gets,
// in r[i], the elements (L / 4, 2 (L % 4)) and (L / 4, 2 (L % 4) + 1) of matrix i, or, with
// .trans, the elements (2 (L % 4), L / 4) and (2 (L % 4) + 1, L / 4).
inline void ldmatrix_emulated(uint32_t (&r)[4], const void* p, bool trans) {
  if (reinterpret_cast<uintptr_t>(p) % 16) ::gptkern_emu::fail("ldmatrix row address not 16-byte aligned");
  struct Regs {
    uint32_t r[4];
  };
  const Regs out = ::gptkern_emu::exchange<Regs>(p, trans ? "ldmatrix.trans" : "ldmatrix", [&](auto& slots, int lane) {
    auto row = [&](int i) {
      const uint16_t* address;
      std::memcpy(&address, slots[i], sizeof(address));
      return address;
    };
    if (lane == 0) {  // once per warp
      for (int i = 0; i < 4; ++i) {
        int rows_in_group[8] = {};
        for (int j = 0; j < 8; ++j) ++rows_in_group[(reinterpret_cast<uintptr_t>(row(8 * i + j)) >> 4) & 7];
        ::gptkern_emu::ldmatrix_extra_wavefronts += *std::max_element(rows_in_group, rows_in_group + 8) - 1;
      }
    }
    Regs regs;
    for (int i = 0; i < 4; ++i) {
      const int g = lane / 4, t = lane % 4;
      regs.r[i] = trans ? ::gptkern_emu::pair(row(8 * i + 2 * t)[g], row(8 * i + 2 * t + 1)[g])
                        : ::gptkern_emu::pair(row(8 * i + g)[2 * t], row(8 * i + g)[2 * t + 1]);
    }
    return regs;
  });
  for (int i = 0; i < 4; ++i) r[i] = out.r[i];
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_emulated(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_emulated(r, p, true); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d (16x8 fp32) += a (16x16) b (16x8). Lane L
// holds a0 = A(g, 2t..2t+1), a1 = A(g+8, 2t..), a2 = A(g, 2t+8..), a3 = A(g+8, 2t+8..),
// b0 = B(2t..2t+1, g), b1 = B(2t+8..2t+9, g), and d0 d1 = D(g, 2t..2t+1), d2 d3 = D(g+8, 2t..).
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_16816 takes 16-bit types");
  struct Fragments {
    uint32_t a[4], b[2];
  };
  struct Sums {
    double v[4];
  };
  const Fragments mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const Sums sums = ::gptkern_emu::exchange<Sums>(mine, "mma.sync", [](auto& slots, int lane) {
    float A[16][16], B[16][8];
    auto lo = [](uint32_t reg) { return ::gptkern_emu::b16_to_float<T>(uint16_t(reg & 0xffff)); };
    auto hi = [](uint32_t reg) { return ::gptkern_emu::b16_to_float<T>(uint16_t(reg >> 16)); };
    for (int l = 0; l < 32; ++l) {
      Fragments f;
      std::memcpy(&f, slots[l], sizeof(f));
      const int g = l / 4, t = l % 4;
      const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int i = 0; i < 4; ++i) {
        A[rows[i]][cols[i]] = lo(f.a[i]);
        A[rows[i]][cols[i] + 1] = hi(f.a[i]);
      }
      B[2 * t][g] = lo(f.b[0]);
      B[2 * t + 1][g] = hi(f.b[0]);
      B[2 * t + 8][g] = lo(f.b[1]);
      B[2 * t + 9][g] = hi(f.b[1]);
    }
    Sums s;
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
      s.v[e] = 0.0;
      for (int k = 0; k < 16; ++k) s.v[e] += double(A[row][k]) * B[k][col];
    }
    return s;
  });
  for (int e = 0; e < 4; ++e) d[e] = static_cast<float>(d[e] + sums.v[e]);
}

}  // namespace gptkern::cuda
