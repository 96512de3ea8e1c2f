// LayerNorm / RMSNorm forward and backward on CPU, in fp32, rows in parallel.
// dW / dB: the rows are cut into a fixed number of groups (independent of the thread
// count); each group sums its rows into its own fp32 partial, and the partials are added
// in group order, so the result is bit-reproducible on any number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "float_vec.h"

namespace gptkern::cpu {
namespace {

constexpr int64_t kGroups = 32;
constexpr int64_t kMinRowsPerGroup = 4;  // short, wide inputs: fewer (groups, n) partials to zero and add

int64_t num_groups(int64_t rows) { return std::clamp<int64_t>(rows / kMinRowsPerGroup, 1, kGroups); }

// An affine parameter as n contiguous floats: the tensor itself when it is already that (no copy
// of a wide weight on the serial path), else a converted copy, or ``fill`` when it is absent.
class FloatParam {
 public:
  FloatParam(const std::optional<at::Tensor>& t, int64_t n, float fill, const char* name) {
    if (t.has_value()) {
      TORCH_CHECK(t->numel() == n, "gptkern::norm: ", name, " must have the normalized shape's ", n,
                  " elements, got ", t->numel());
      tensor_ = t->reshape({-1}).to(at::kFloat).contiguous();
      data_ = tensor_.const_data_ptr<float>();
    } else {
      filled_.assign(n, fill);
      data_ = filled_.data();
    }
  }
  FloatParam(const FloatParam&) = delete;  // data_ may point into filled_
  FloatParam& operator=(const FloatParam&) = delete;
  const float* data() const { return data_; }

 private:
  at::Tensor tensor_;
  std::vector<float> filled_;
  const float* data_ = nullptr;
};

// Row sums over [0, vec_end) in steps of `step`: `body(i, acc)` adds into kAcc fp32 vector
// accumulators, which restart every kChunk elements; the chunks' totals are added in double.
// (fp32 accumulators over a whole row drift by about sqrt(n / lanes) ulps: 2e-4 relative at 4M.)
constexpr int64_t kChunk = 4096;  // a multiple of every FloatPairs step

template <int kAcc, typename Body>
std::array<double, kAcc> chunked_sums(int64_t vec_end, int64_t step, Body body) {
  std::array<double, kAcc> total{};
  for (int64_t begin = 0; begin < vec_end; begin += kChunk) {
    std::array<Vec, kAcc> acc;
    acc.fill(Vec(0.0f));
    const int64_t end = std::min(vec_end, begin + kChunk);
    for (int64_t i = begin; i < end; i += step) body(i, acc);
    for (int k = 0; k < kAcc; ++k) total[k] += lane_sum(acc[k]);
  }
  return total;
}

// One row of x (fp32, bf16 or fp16), converted in registers: a pass for the mean, one for the
// variance (two passes over a cache-resident row, more exact than one), one for
// y = (x - mean) * rstd * w + b. Returns {mean, rstd}.
template <typename scalar_t>
std::pair<float, float> norm_fwd_row(const scalar_t* x, scalar_t* y, const float* w, const float* b, int64_t n,
                                     float eps, bool is_rms) {
  using Pairs = FloatPairs<scalar_t>;
  constexpr int64_t kStep = Pairs::kStep, kW = Vec::size();
  const int64_t vec_end = n - n % kStep;
  float mu = 0.0f;
  if (!is_rms) {  // the mean of x - x[0], plus x[0]: exact for a constant row, close for a near-constant one
    const float x0 = n > 0 ? static_cast<float>(x[0]) : 0.0f;
    const Vec vx0(x0);
    const auto sums = chunked_sums<2>(vec_end, kStep, [&](int64_t i, std::array<Vec, 2>& acc) {
      auto [lo, hi] = Pairs::load(x + i);
      acc[0] = acc[0] + (lo - vx0);
      acc[1] = acc[1] + (hi - vx0);
    });
    double sum = sums[0] + sums[1];
    for (int64_t i = vec_end; i < n; ++i) sum += static_cast<float>(x[i]) - x0;
    mu = static_cast<float>(x0 + sum / n);
  }
  // variance about mu, corrected by the mean of the deviations (mu's own rounding; zero for RMS)
  Vec vmu(mu);
  // acc: squares (lo, hi), deviations (lo, hi)
  const auto sums = chunked_sums<4>(vec_end, kStep, [&](int64_t i, std::array<Vec, 4>& acc) {
    auto [lo, hi] = Pairs::load(x + i);
    const Vec d_lo = lo - vmu, d_hi = hi - vmu;
    acc[0] = at::vec::fmadd(d_lo, d_lo, acc[0]);
    acc[1] = at::vec::fmadd(d_hi, d_hi, acc[1]);
    if (!is_rms) {
      acc[2] = acc[2] + d_lo;
      acc[3] = acc[3] + d_hi;
    }
  });
  double sq = sums[0] + sums[1], dev = sums[2] + sums[3];
  for (int64_t i = vec_end; i < n; ++i) {
    const float d = static_cast<float>(x[i]) - mu;
    sq += d * d;
    if (!is_rms) dev += d;
  }
  const double shift = dev / n;
  mu = static_cast<float>(mu + shift);
  vmu = Vec(mu);
  const float rs = static_cast<float>(1.0 / std::sqrt(std::max(sq / n - shift * shift, 0.0) + eps));
  const Vec vrs(rs);
  for (int64_t i = 0; i < vec_end; i += kStep) {
    auto [lo, hi] = Pairs::load(x + i);
    Pairs::store(y + i, at::vec::fmadd((lo - vmu) * vrs, Vec::loadu(w + i), Vec::loadu(b + i)),
                 at::vec::fmadd((hi - vmu) * vrs, Vec::loadu(w + i + kW), Vec::loadu(b + i + kW)));
  }
  for (int64_t i = vec_end; i < n; ++i) y[i] = static_cast<scalar_t>((static_cast<float>(x[i]) - mu) * rs * w[i] + b[i]);
  return {mu, rs};
}

template <typename scalar_t>
void norm_fwd_rows(const scalar_t* x, scalar_t* y, float* mean, float* rstd, const float* w,
                   const float* b, int64_t rows, int64_t n, float eps, bool is_rms) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::tie(mean[r], rstd[r]) = norm_fwd_row(x + r * n, y + r * n, w, b, n, eps, is_rms);
    }
  });
}

// One row of the backward (x, dy, dx fp32, bf16 or fp16, converted in registers), in two passes
// over cache-resident rows (xhat and w * dy are recomputed rather than stored):
//   1. c1 = mean(xhat * w * dy), c2 = mean(w * dy); dw += dy * xhat and db += dy;
//   2. dx = (w * dy - (xhat * c1 + c2)) * rstd, with xhat = (x - mean) * rstd.
template <typename scalar_t>
void norm_bwd_row(const scalar_t* x, const scalar_t* g, scalar_t* dx, const float* w, float mu, float rs,
                  float* dw, float* db, int64_t n, bool is_rms) {
  using Pairs = FloatPairs<scalar_t>;
  constexpr int64_t kStep = Pairs::kStep, kW = Vec::size();
  const int64_t vec_end = n - n % kStep;
  const Vec vmu(mu), vrs(rs);
  // pass 1 on the fp32 vector at i (h = xhat, gv = dy) into the accumulators a1, a2
  auto step1 = [&](int64_t i, Vec xv, Vec gv, Vec& a1, Vec& a2) {
    const Vec h = (xv - vmu) * vrs;
    const Vec wgv = gv * Vec::loadu(w + i);
    a1 = at::vec::fmadd(h, wgv, a1);
    a2 = a2 + wgv;
    if (dw) at::vec::fmadd(gv, h, Vec::loadu(dw + i)).store(dw + i);
    if (db) (Vec::loadu(db + i) + gv).store(db + i);
  };
  // acc: xhat * w * dy (lo, hi), w * dy (lo, hi)
  const auto sums = chunked_sums<4>(vec_end, kStep, [&](int64_t i, std::array<Vec, 4>& acc) {
    auto [x_lo, x_hi] = Pairs::load(x + i);
    auto [g_lo, g_hi] = Pairs::load(g + i);
    step1(i, x_lo, g_lo, acc[0], acc[2]);
    step1(i + kW, x_hi, g_hi, acc[1], acc[3]);
  });
  double sum1 = sums[0] + sums[1], sum2 = sums[2] + sums[3];
  for (int64_t i = vec_end; i < n; ++i) {
    const float h = (static_cast<float>(x[i]) - mu) * rs, gv = static_cast<float>(g[i]);
    sum1 += h * gv * w[i];
    sum2 += gv * w[i];
    if (dw) dw[i] += gv * h;
    if (db) db[i] += gv;
  }
  const float c1 = static_cast<float>(sum1 / n), c2 = is_rms ? 0.0f : static_cast<float>(sum2 / n);
  const Vec vc1(c1), vc2(c2);
  auto step2 = [&](int64_t i, Vec xv, Vec gv) {
    return (gv * Vec::loadu(w + i) - at::vec::fmadd((xv - vmu) * vrs, vc1, vc2)) * vrs;
  };
  for (int64_t i = 0; i < vec_end; i += kStep) {
    auto [x_lo, x_hi] = Pairs::load(x + i);
    auto [g_lo, g_hi] = Pairs::load(g + i);
    Pairs::store(dx + i, step2(i, x_lo, g_lo), step2(i + kW, x_hi, g_hi));
  }
  for (int64_t i = vec_end; i < n; ++i) {
    const float h = (static_cast<float>(x[i]) - mu) * rs;
    dx[i] = static_cast<scalar_t>((static_cast<float>(g[i]) * w[i] - (h * c1 + c2)) * rs);
  }
}

template <typename scalar_t>
void norm_bwd_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const float* mean, const float* rstd,
                   const float* w, float* dw_part, float* db_part, int64_t rows, int64_t n, bool is_rms) {
  const int64_t groups = num_groups(rows);
  const int64_t per_group = (rows + groups - 1) / groups;
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    for (int64_t grp = g_begin; grp < g_end; ++grp) {
      float* dw = dw_part ? dw_part + grp * n : nullptr;
      float* db = db_part ? db_part + grp * n : nullptr;
      for (int64_t r = grp * per_group; r < std::min(rows, (grp + 1) * per_group); ++r) {
        norm_bwd_row(x + r * n, dy + r * n, dx + r * n, w, mean[r], rstd[r], dw, db, n, is_rms);
      }
    }
  });
}

at::Tensor sum_groups(const at::Tensor& partial, const at::Tensor& like) {
  // (groups, n) fp32 -> (n,) in like's dtype and shape: each column adds the groups in order.
  // One pass over the partials here, not an ATen add per group (30 us of a 64x64 backward).
  const int64_t groups = partial.size(0), n = partial.size(1);
  auto acc = at::empty({n}, partial.options());
  const float* part = partial.const_data_ptr<float>();
  float* out = acc.mutable_data_ptr<float>();
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    std::copy(part + begin, part + end, out + begin);
    for (int64_t grp = 1; grp < groups; ++grp) {
      const float* row = part + grp * n;
      for (int64_t i = begin; i < end; ++i) out[i] += row[i];
    }
  });
  return acc.to(like.scalar_type()).reshape(like.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd(const at::Tensor& x, int64_t k,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias, double eps,
                                                        bool is_rms) {
  TORCH_CHECK(x.device().is_cpu(), "gptkern::norm_fwd: x must be a CPU tensor");
  check_16_32(x.scalar_type(), "gptkern::norm_fwd on CPU (x)");
  TORCH_CHECK(k >= 0 && k <= x.dim(), "gptkern::norm_fwd: k (the normalized dims) must be in [0, ", x.dim(),
              "], got ", k);
  auto lead = x.sizes().slice(0, x.dim() - k);
  const int64_t n = c10::multiply_integers(x.sizes().slice(x.dim() - k));
  auto y = empty_output(x.sizes(), x.options());
  auto mean = at::zeros(lead, x.options().dtype(at::kFloat));
  auto rstd = at::empty(lead, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    rstd.fill_(1.0f / std::sqrt(static_cast<float>(eps)));  // rows of no element: variance 0
  } else {
    auto x2 = x.reshape({-1, n}).contiguous();
    const FloatParam w(weight, n, 1.0f, "weight"), b(bias, n, 0.0f, "bias");
    GPTKERN_DISPATCH_16_32(x.scalar_type(), "gptkern::norm_fwd on CPU (x)", [&] {
      norm_fwd_rows<scalar_t>(x2.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                              mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), w.data(),
                              b.data(), x2.size(0), n, static_cast<float>(eps), is_rms);
    });
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                        int64_t k, const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        bool is_rms, bool need_dw, bool need_db) {
  TORCH_CHECK(x.device().is_cpu(), "gptkern::norm_bwd: x must be a CPU tensor");
  check_16_32(x.scalar_type(), "gptkern::norm_bwd on CPU (x)");
  TORCH_CHECK(k >= 0 && k <= x.dim(), "gptkern::norm_bwd: k (the normalized dims) must be in [0, ", x.dim(),
              "], got ", k);
  TORCH_CHECK(grad_out.device().is_cpu() && mean.device().is_cpu() && rstd.device().is_cpu(),
              "gptkern::norm_bwd: grad_out, mean and rstd must be CPU tensors");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "gptkern::norm_bwd: grad_out must have x's shape ", x.sizes(),
              ", got ", grad_out.sizes());
  const int64_t n = c10::multiply_integers(x.sizes().slice(x.dim() - k));
  const int64_t rows = n ? x.numel() / n : 0;
  const int64_t lead = c10::multiply_integers(x.sizes().slice(0, x.dim() - k));  // rows, also when n == 0
  TORCH_CHECK(mean.numel() == lead && rstd.numel() == lead, "gptkern::norm_bwd: mean and rstd must hold one value "
              "per row of x (", lead, "), got ", mean.numel(), " and ", rstd.numel());
  auto dx = empty_output(x.sizes(), x.options());
  auto empty = [&] { return at::empty({0}, x.options()); };
  const int64_t groups = num_groups(rows);
  auto part = [&](bool need) {
    return need ? zeros_output({groups, n}, x.options().dtype(at::kFloat)) : at::Tensor();
  };
  TORCH_CHECK(!need_dw || weight.has_value(), "gptkern::norm_bwd: need_dw without a weight");
  TORCH_CHECK(!need_db || bias.has_value(), "gptkern::norm_bwd: need_db without a bias");
  auto dw_part = part(need_dw), db_part = part(need_db);
  if (rows > 0) {
    auto x2 = x.reshape({-1, n}).contiguous();
    auto dy2 = grad_out.to(x.scalar_type()).reshape({-1, n}).contiguous();
    const FloatParam w(weight, n, 1.0f, "weight");
    auto mean_c = mean.to(at::kFloat).contiguous(), rstd_c = rstd.to(at::kFloat).contiguous();
    GPTKERN_DISPATCH_16_32(x.scalar_type(), "gptkern::norm_bwd on CPU (x)", [&] {
      norm_bwd_rows<scalar_t>(dy2.const_data_ptr<scalar_t>(), x2.const_data_ptr<scalar_t>(),
                              dx.mutable_data_ptr<scalar_t>(), mean_c.const_data_ptr<float>(),
                              rstd_c.const_data_ptr<float>(), w.data(),
                              need_dw ? dw_part.mutable_data_ptr<float>() : nullptr,
                              need_db ? db_part.mutable_data_ptr<float>() : nullptr, rows, n, is_rms);
    });
  }
  auto dw = need_dw ? sum_groups(dw_part, *weight) : empty();
  auto db = need_db ? sum_groups(db_part, *bias) : empty();
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(gptkern, CPU, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
}

}  // namespace gptkern::cpu
