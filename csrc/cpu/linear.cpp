// linear_small_m: y (M, N) = x (M, K) @ weight (N, K)^T + bias for a few rows M, the batch-1
// decode GEMVs. Bound by reading the weights: rows of W are split over the threads in
// contiguous chunks, and each row is read once for up to 8 rows of x at a time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "float_vec.h"

namespace gptkern::cpu {
namespace {

constexpr int64_t kMaxM = 8;        // rows of x per pass over W
constexpr int64_t kGrainBytes = 1 << 18;  // weight bytes per parallel task (at least)

// fp32 lanes of w[k .. k + 2 * Vec::size()) as two vectors.
template <typename w_t>
inline void load2(const w_t* w, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<w_t, float>) {
    a = Vec::loadu(w);
    b = Vec::loadu(w + Vec::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<w_t>(at::vec::Vectorized<w_t>::loadu(w));
  }
}

inline float hsum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// out[m * ldo + n] = dot(w[n, :], x[m, :]) (+ bias[n]) for n in [n0, n1), m < M; x is fp32 (M, K).
template <int M, typename w_t>
void gemv_rows(const float* x, const w_t* w, const w_t* bias, float* out, int64_t ldo, int64_t n0,
               int64_t n1, int64_t k) {
  constexpr int64_t kW = Vec::size();
  constexpr int64_t kStep = 2 * kW;          // one load2
  constexpr int U = M <= 2 ? 2 : 1;          // load2 steps per iteration: 4+ accumulators for any M
  const int64_t k_main = k / (U * kStep) * (U * kStep);
  for (int64_t n = n0; n < n1; ++n) {
    const w_t* row = w + n * k;
    if (n + 2 < n1) {  // the row after next: the hardware prefetcher misses a new row's first lines
      const char* next = reinterpret_cast<const char*>(w + (n + 2) * k);
      for (int64_t off = 0; off < 256; off += 64) __builtin_prefetch(next + off, 0, 0);
    }
    Vec acc[M][2 * U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < 2 * U; ++u) acc[m][u] = Vec(0.0f);
    for (int64_t i = 0; i < k_main; i += U * kStep) {
      Vec wv[2 * U];
      for (int u = 0; u < U; ++u) load2(row + i + u * kStep, wv[2 * u], wv[2 * u + 1]);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * k + i;
        for (int u = 0; u < 2 * U; ++u) acc[m][u] = at::vec::fmadd(wv[u], Vec::loadu(xm + u * kW), acc[m][u]);
      }
    }
    for (int m = 0; m < M; ++m) {
      Vec total = acc[m][0];
      for (int u = 1; u < 2 * U; ++u) total = total + acc[m][u];
      float s = hsum(total);
      const float* xm = x + m * k;
      for (int64_t i = k_main; i < k; ++i) s += static_cast<float>(row[i]) * xm[i];
      if (bias != nullptr) s += static_cast<float>(bias[n]);
      out[m * ldo + n] = s;
    }
  }
}

template <typename w_t>
void gemv_dispatch(int64_t m, const float* x, const w_t* w, const w_t* bias, float* out, int64_t ldo,
                   int64_t n0, int64_t n1, int64_t k) {
  switch (m) {
#define GPTKERN_GEMV_CASE(R) \
  case R: return gemv_rows<R, w_t>(x, w, bias, out, ldo, n0, n1, k);
    GPTKERN_GEMV_CASE(1) GPTKERN_GEMV_CASE(2) GPTKERN_GEMV_CASE(3) GPTKERN_GEMV_CASE(4)
    GPTKERN_GEMV_CASE(5) GPTKERN_GEMV_CASE(6) GPTKERN_GEMV_CASE(7) GPTKERN_GEMV_CASE(8)
#undef GPTKERN_GEMV_CASE
    default: TORCH_INTERNAL_ASSERT(false, "gemv_dispatch: M out of range");
  }
}

at::Tensor linear_small_m(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(),
              "gptkern::linear_small_m: x and weight must be CPU tensors");
  TORCH_CHECK(x.dim() == 2, "gptkern::linear_small_m: x must be (M, K), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "gptkern::linear_small_m: weight must be (N, K), got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), "gptkern::linear_small_m: weight must be contiguous");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "gptkern::linear_small_m: weight must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(x.scalar_type() == dtype, "gptkern::linear_small_m: x (", x.scalar_type(),
              ") and weight (", dtype, ") must have the same dtype");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, "gptkern::linear_small_m: x has K = ", k, " but weight has ",
              weight.size(1), " columns (weight must be (N, K))");
  const at::Tensor* b = bias.has_value() && bias->defined() ? &*bias : nullptr;
  if (b != nullptr) {
    TORCH_CHECK(b->device().is_cpu(), "gptkern::linear_small_m: bias must be a CPU tensor");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == n, "gptkern::linear_small_m: bias must be (N,) = (", n,
                ",), got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == dtype, "gptkern::linear_small_m: bias (", b->scalar_type(),
                ") must have weight's dtype (", dtype, ")");
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor bc = b != nullptr ? b->contiguous() : at::Tensor();
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m > 0 && n > 0) {
    const int64_t grain = std::max<int64_t>(64, kGrainBytes / std::max<int64_t>(1, k * weight.element_size()));
    auto run = [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* w = weight.const_data_ptr<scalar_t>();
      const scalar_t* bp = b != nullptr ? bc.const_data_ptr<scalar_t>() : nullptr;
      const float* xp = xf.const_data_ptr<float>();
      float* op = out.mutable_data_ptr<float>();
      at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
        for (int64_t m0 = 0; m0 < m; m0 += kMaxM)  // M > 8: passes over the chunk, 8 rows of x each
          gemv_dispatch<scalar_t>(std::min(kMaxM, m - m0), xp + m0 * k, w, bp, op + m0 * n, n, n0, n1, k);
      });
    };
    if (dtype == at::kFloat) run(float{});
    else run(at::BFloat16{});
  }
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(gptkern, CPU, m) {
  m.impl("linear_small_m", &linear_small_m);
}

}  // namespace gptkern::cpu
