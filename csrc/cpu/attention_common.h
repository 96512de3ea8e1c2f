// Shared pieces of the CPU attention kernels (attention.cpp, decode.cpp): input checks, strided
// operand views, fp32 conversion, a register-blocked fp32 GEMM micro-kernel on at::vec, and a
// dynamically scheduled parallel loop.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "float_vec.h"

namespace gptkern::cpu::attn {

constexpr int64_t kW = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;  // the LSE is stored in the log2 domain, as Triton's
constexpr float kLn2 = 0.6931471805599453f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ------------------------------------------------------------------------------- input checks

inline void check_float_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "gptkern::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "gptkern::", op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

// q, k, v of one op: CPU, one supported dtype, the given rank, H a multiple of Hkv, equal head dims,
// k and v with the same leading dims. head_dim is the index of the head dim (1 dense, 1 varlen).
inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      int64_t rank, int64_t head_dim) {
  check_float_cpu(op, q, "q");
  check_float_cpu(op, k, "k");
  check_float_cpu(op, v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "gptkern::", op,
              ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(t->dim() == rank, "gptkern::", op, ": ", name, " must have ", rank, " dims, got shape ",
                t->sizes());
  }
  const int64_t h = q.size(head_dim), hkv = k.size(head_dim);
  TORCH_CHECK(hkv > 0 && h % hkv == 0, "gptkern::", op, ": the ", h, " heads of q must be a multiple of the ",
              hkv, " heads of k");
  TORCH_CHECK(v.size(head_dim) == hkv, "gptkern::", op, ": v must have the ", hkv, " heads of k, got ",
              v.size(head_dim));
  TORCH_CHECK(k.size(-1) == q.size(-1), "gptkern::", op, ": k must have q's head dim ", q.size(-1), ", got ",
              k.size(-1));
  for (int64_t i = 0; i < rank - 1; ++i) {
    if (i == head_dim) continue;
    TORCH_CHECK(v.size(i) == k.size(i), "gptkern::", op, ": k ", k.sizes(), " and v ", v.sizes(),
                " must match in every dim but the last");
  }
}

inline void check_int32_vector(const char* op, const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), "gptkern::", op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.numel() == numel, "gptkern::", op, ": ", name,
              " must be a 1-D int32 tensor of ", numel, " elements, got ", t.scalar_type(), " ", t.sizes());
}

// -------------------------------------------------------------------------------- operand views

// Element (b, h, row, col) of a 4-D (B, H, rows, cols) or packed 3-D (total, H, cols) tensor at
// data + b * sb + h * sh + row * sr + col * sc (packed: sb = 0 and row counts from the start of
// the packed tensor).
template <typename T>
struct Operand {
  T* data;
  int64_t sb, sh, sr, sc;
  T* row(int64_t b, int64_t h, int64_t r) const { return data + b * sb + h * sh + r * sr; }
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  T* data = static_cast<T*>(t.data_ptr());
  if (t.dim() == 4) return {data, t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
  return {data, 0, t.stride(1), t.stride(0), t.stride(2)};  // (total, H, cols)
}

// fp32 row statistics (LSE, delta): (B, H, L) dense, (H, total) packed.
struct Stats {
  float* data;
  int64_t sb, sh, sr;
  float& at(int64_t b, int64_t h, int64_t r) const { return data[b * sb + h * sh + r * sr]; }
};

inline Stats stats(const at::Tensor& t) {
  float* data = t.data_ptr<float>();
  if (t.dim() == 3) return {data, t.stride(0), t.stride(1), t.stride(2)};
  return {data, 0, t.stride(0), t.stride(1)};
}

// --------------------------------------------------------------------------------- conversions

// dst[i] = src[i * stride] * scale for i < n, then zeros up to n_pad.
template <typename T>
inline void load_f32(const T* src, int64_t stride, float* dst, int64_t n, int64_t n_pad, float scale = 1.0f) {
  int64_t i = 0;
  if (stride == 1) {
    if constexpr (std::is_same_v<T, float>) {
      const Vec vs(scale);
      for (; i + kW <= n; i += kW) (Vec::loadu(src + i) * vs).store(dst + i);
    } else {
      using RVec = at::vec::Vectorized<T>;
      const Vec vs(scale);
      for (; i + RVec::size() <= n; i += RVec::size()) {
        auto [lo, hi] = at::vec::convert_to_float<T>(RVec::loadu(src + i));
        (lo * vs).store(dst + i);
        (hi * vs).store(dst + i + kW);
      }
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]) * scale;
  for (; i < n_pad; ++i) dst[i] = 0.0f;
}

// dst[i * stride] = src[i] * scale for i < n.
template <typename T>
inline void store_f32(const float* src, T* dst, int64_t stride, int64_t n, float scale = 1.0f) {
  int64_t i = 0;
  if (stride == 1) {
    const Vec vs(scale);
    if constexpr (std::is_same_v<T, float>) {
      for (; i + kW <= n; i += kW) (Vec::loadu(src + i) * vs).store(dst + i);
    } else {
      using RVec = at::vec::Vectorized<T>;
      for (; i + RVec::size() <= n; i += RVec::size()) {
        at::vec::convert_from_float<T>(Vec::loadu(src + i) * vs, Vec::loadu(src + i + kW) * vs).store(dst + i);
      }
    }
  }
  for (; i < n; ++i) dst[i * stride] = static_cast<T>(src[i] * scale);
}

// ---------------------------------------------------------------------------- GEMM micro-kernel

// Rows of C per register tile: R rows x 2 vectors of accumulators, plus 2 B vectors and one
// broadcast A value, fit the 16 AVX2 registers (AVX-512 has 32: room for a taller tile).
constexpr int kTileRows = 6;

template <int R, int NV, bool kAcc>
inline void gemm_tile(int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                      float* c, int64_t ldc) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < NV; ++x) acc[r][x] = kAcc ? Vec::loadu(c + r * ldc + x * kW) : Vec(0.0f);
  for (int64_t p = 0; p < k; ++p) {
    Vec bv[NV];
    for (int x = 0; x < NV; ++x) bv[x] = Vec::loadu(b + p * ldb + x * kW);
    const float* ap = a + p * a_cs;
    for (int r = 0; r < R; ++r) {
      const Vec av(ap[r * a_rs]);
      for (int x = 0; x < NV; ++x) acc[r][x] = at::vec::fmadd(av, bv[x], acc[r][x]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < NV; ++x) acc[r][x].store(c + r * ldc + x * kW);
}

template <int NV, bool kAcc>
inline void gemm_panel(int64_t m, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                       int64_t ldb, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    gemm_tile<kTileRows, NV, kAcc>(k, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc);
  }
  const float* ai = a + i * a_rs;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 1: gemm_tile<1, NV, kAcc>(k, ai, a_rs, a_cs, b, ldb, ci, ldc); break;
    case 2: gemm_tile<2, NV, kAcc>(k, ai, a_rs, a_cs, b, ldb, ci, ldc); break;
    case 3: gemm_tile<3, NV, kAcc>(k, ai, a_rs, a_cs, b, ldb, ci, ldc); break;
    case 4: gemm_tile<4, NV, kAcc>(k, ai, a_rs, a_cs, b, ldb, ci, ldc); break;
    case 5: gemm_tile<5, NV, kAcc>(k, ai, a_rs, a_cs, b, ldb, ci, ldc); break;
    default: break;
  }
}

// C (m x n) = A (m x k) . B (k x n), or += when kAcc. A is read through strides (a_rs, a_cs), so a
// transposed operand needs no copy; B and C are row-major and n is a multiple of kW.
template <bool kAcc>
inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                 int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) gemm_panel<2, kAcc>(m, k, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
  if (j < n) gemm_panel<1, kAcc>(m, k, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
}

// ------------------------------------------------------------------------------- row reductions

inline float row_max(const float* x, int64_t n) {  // n a multiple of kW
  Vec vm(kNegInf);
  for (int64_t i = 0; i < n; i += kW) vm = at::vec::maximum(vm, Vec::loadu(x + i));
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
}

// The running max of an online softmax: a NaN maximum stays NaN (std::max(a, NaN) returns a, so a
// NaN score after the first block would otherwise be dropped and its row's LSE come out +inf).
inline float running_max(float m, float block_max) {
  return std::isnan(block_max) ? block_max : std::max(m, block_max);
}

// x[i] = exp(x[i] - m) for i < n (a multiple of kW); returns the sum. ATen's exp_u20 turns NaN
// into inf: a row whose m is not finite (NaN from a NaN score, +inf for a row that saw nothing)
// uses Sleef's exp, which keeps NaN.
inline float exp_sub_sum(float* x, int64_t n, float m) {
  const Vec vm(m);
  const bool fast = std::isfinite(m);
  Vec acc(0.0f);
  for (int64_t i = 0; i < n; i += kW) {
    const Vec d = Vec::loadu(x + i) - vm;
    const Vec e = fast ? d.exp_u20() : d.exp();  // exp(-inf) = 0
    e.store(x + i);
    acc = acc + e;
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// x[i] = exp(x[i] - lse) for i < n (a multiple of kW), with lse2 = lse * log2(e) as the forward
// stores it: computed as 2^(x[i] * log2(e) - lse2), so that a score equal to the row's max, which
// the forward rounded to lse2 the same way, gives exactly 1 however large it is (converting lse2
// back to the natural domain first would be off by about |lse| * 1e-7: at scores of 1e4 to 1e8,
// weights off by 0.1% to a factor of 1e7). The product is rounded in a pass of its own: fused
// into the subtraction (an FMA, which GCC forms by default, -ffp-contract=fast) it would keep that
// error; the empty asm keeps the compiler from fusing the two passes.
inline void exp2_sub(float* x, int64_t n, float lse2) {
  const Vec vm(lse2), vlog2e(kLog2e), vln2(kLn2);
  for (int64_t i = 0; i < n; i += kW) (Vec::loadu(x + i) * vlog2e).store(x + i);
#if defined(__GNUC__)
  asm volatile("" ::: "memory");
#endif
  const bool fast = std::isfinite(lse2);  // (as exp_sub_sum: NaN stays NaN; +inf, no key seen, gives 0)
  for (int64_t i = 0; i < n; i += kW) {
    const Vec d = (Vec::loadu(x + i) - vm) * vln2;
    (fast ? d.exp_u20() : d.exp()).store(x + i);
  }
}

inline void scale_row(float* x, int64_t n, float s) {
  const Vec vs(s);
  for (int64_t i = 0; i < n; i += kW) (Vec::loadu(x + i) * vs).store(x + i);
}

// --------------------------------------------------------------------------------- parallelism

// Runs fn(task, scratch) for every task in [0, n), handing tasks out one at a time to the
// threads of at::parallel_for (dynamic scheduling: tasks of unequal cost stay balanced). Each
// thread makes its own Scratch once.
template <typename Scratch, typename MakeScratch, typename Fn>
void parallel_tasks(int64_t n, const MakeScratch& make_scratch, const Fn& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t, scratch);
  });
}

}  // namespace gptkern::cpu::attn
