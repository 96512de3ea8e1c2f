// LayerNorm / RMSNorm forward and backward on CPU, in fp32, rows in parallel.
// dW / dB: the rows are cut into a fixed number of groups (independent of the thread
// count); each group sums its rows into its own fp32 partial, and the partials are added
// in group order, so the result is bit-reproducible on any number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "row_buffer.h"

namespace gptkern::cpu {
namespace {

constexpr int64_t kGroups = 32;

std::vector<float> as_floats(const std::optional<at::Tensor>& t, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (t.has_value()) {
    auto f = t->reshape({-1}).to(at::kFloat).contiguous();
    std::copy(f.const_data_ptr<float>(), f.const_data_ptr<float>() + n, out.begin());
  }
  return out;
}

template <typename scalar_t>
void norm_fwd_rows(const scalar_t* x, scalar_t* y, float* mean, float* rstd, const float* w,
                   const float* b, int64_t rows, int64_t n, float eps, bool is_rms) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    // fp32 rows are read and written in place; other dtypes go through these fp32 buffers.
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : 2 * n);
    auto part = [&](int64_t k) { return buf.empty() ? nullptr : buf.data() + k * n; };
    for (int64_t r = begin; r < end; ++r) {
      const float* v = float_row(x + r * n, part(0), n);
      float* out = float_out(y + r * n, part(1));
      const float mu = is_rms ? 0.0f : vec_sum(v, n) / n;  // two passes: the row stays in cache
      const float var = at::vec::map_reduce_all<float>(
          [mu](Vec a) { return (a - Vec(mu)) * (a - Vec(mu)); }, [](Vec a, Vec c) { return a + c; }, v, n) / n;
      const float rs = 1.0f / std::sqrt(var + eps);
      at::vec::map3([mu, rs](Vec a, Vec wv, Vec bv) { return (a - Vec(mu)) * Vec(rs) * wv + bv; }, out, v, w, b, n);
      finish_row(out, y + r * n, n);
      mean[r] = mu;
      rstd[r] = rs;
    }
  });
}

// One row of the backward, in two passes over cache-resident rows (xhat and w * dy are recomputed
// rather than stored):
//   1. c1 = mean(xhat * w * dy), c2 = mean(w * dy); dw += dy * xhat and db += dy;
//   2. dx = (w * dy - (xhat * c1 + c2)) * rstd, with xhat = (x - mean) * rstd.
inline void norm_bwd_row(const float* x, const float* g, float* dx, const float* w, float mu, float rs,
                         float* dw, float* db, int64_t n, bool is_rms) {
  constexpr int64_t kW = Vec::size();
  const Vec vmu(mu), vrs(rs);
  Vec acc1(0.0f), acc2(0.0f);
  auto step1 = [&](int64_t i, int64_t count) {
    Vec h = (Vec::loadu(x + i, count) - vmu) * vrs;
    if (count < kW) h = Vec::set(Vec(0.0f), h, count);  // past count: (0 - mean) * rstd, maybe inf
    const Vec gv = Vec::loadu(g + i, count);  // zero past count, as w * dy below
    const Vec wgv = gv * Vec::loadu(w + i, count);
    acc1 = at::vec::fmadd(h, wgv, acc1);
    acc2 = acc2 + wgv;
    if (dw) at::vec::fmadd(gv, h, Vec::loadu(dw + i, count)).store(dw + i, count);
    if (db) (Vec::loadu(db + i, count) + gv).store(db + i, count);
  };
  int64_t i = 0;
  for (; i + kW <= n; i += kW) step1(i, kW);
  if (i < n) step1(i, n - i);
  const Vec c1(lane_sum(acc1) / n);
  const Vec c2(is_rms ? 0.0f : lane_sum(acc2) / n);
  auto step2 = [&](int64_t i, int64_t count) {
    const Vec h = (Vec::loadu(x + i, count) - vmu) * vrs;
    const Vec wgv = Vec::loadu(g + i, count) * Vec::loadu(w + i, count);
    ((wgv - at::vec::fmadd(h, c1, c2)) * vrs).store(dx + i, count);
  };
  for (i = 0; i + kW <= n; i += kW) step2(i, kW);
  if (i < n) step2(i, n - i);
}

template <typename scalar_t>
void norm_bwd_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const float* mean, const float* rstd,
                   const float* w, float* dw_part, float* db_part, int64_t rows, int64_t n, bool is_rms) {
  const int64_t groups = std::min(rows, kGroups);
  const int64_t per_group = (rows + groups - 1) / groups;
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    // fp32 rows are read and written in place; other dtypes go through these fp32 buffers.
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : 3 * n);
    auto part = [&](int64_t k) { return buf.empty() ? nullptr : buf.data() + k * n; };
    for (int64_t grp = g_begin; grp < g_end; ++grp) {
      float* dw = dw_part ? dw_part + grp * n : nullptr;
      float* db = db_part ? db_part + grp * n : nullptr;
      for (int64_t r = grp * per_group; r < std::min(rows, (grp + 1) * per_group); ++r) {
        const float* xr = float_row(x + r * n, part(0), n);
        const float* gr = float_row(dy + r * n, part(1), n);
        float* out = float_out(dx + r * n, part(2));
        norm_bwd_row(xr, gr, out, w, mean[r], rstd[r], dw, db, n, is_rms);
        finish_row(out, dx + r * n, n);
      }
    }
  });
}

at::Tensor sum_groups(const at::Tensor& partial, const at::Tensor& like) {
  // (groups, n) fp32 -> (n,) in like's dtype and shape, adding groups in order.
  auto acc = partial.select(0, 0).clone();
  for (int64_t grp = 1; grp < partial.size(0); ++grp) acc.add_(partial.select(0, grp));
  return acc.to(like.scalar_type()).reshape(like.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd(const at::Tensor& x, int64_t k,
                                                        const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias, double eps,
                                                        bool is_rms) {
  TORCH_CHECK(x.device().is_cpu(), "gptkern::norm_fwd: x must be a CPU tensor");
  auto lead = x.sizes().slice(0, x.dim() - k);
  const int64_t n = c10::multiply_integers(x.sizes().slice(x.dim() - k));
  auto y = at::empty(x.sizes(), x.options());
  auto mean = at::zeros(lead, x.options().dtype(at::kFloat));
  auto rstd = at::empty(lead, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    rstd.fill_(1.0f / std::sqrt(static_cast<float>(eps)));  // rows of no element: variance 0
  } else {
    auto x2 = x.reshape({-1, n}).contiguous();
    auto w = as_floats(weight, n, 1.0f);
    auto b = as_floats(bias, n, 0.0f);
    GPTKERN_DISPATCH(x.scalar_type(), "norm_fwd", [&] {
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
  const int64_t n = c10::multiply_integers(x.sizes().slice(x.dim() - k));
  const int64_t rows = n ? x.numel() / n : 0;
  auto dx = at::empty(x.sizes(), x.options());
  auto empty = [&] { return at::empty({0}, x.options()); };
  const int64_t groups = std::max<int64_t>(1, std::min(rows, kGroups));
  auto part = [&](bool need) {
    return need ? at::zeros({groups, n}, x.options().dtype(at::kFloat)) : at::Tensor();
  };
  auto dw_part = part(need_dw), db_part = part(need_db);
  if (rows > 0) {
    auto x2 = x.reshape({-1, n}).contiguous();
    auto dy2 = grad_out.to(x.scalar_type()).reshape({-1, n}).contiguous();
    auto w = as_floats(weight, n, 1.0f);
    auto mean_c = mean.to(at::kFloat).contiguous(), rstd_c = rstd.to(at::kFloat).contiguous();
    GPTKERN_DISPATCH(x.scalar_type(), "norm_bwd", [&] {
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
