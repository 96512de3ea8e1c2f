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
    std::vector<float> buf(n);
    float* v = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      load_row(x + r * n, v, n);
      const float mu = is_rms ? 0.0f : vec_sum(v, n) / n;
      const float var = at::vec::map_reduce_all<float>(
          [mu](Vec a) { return (a - Vec(mu)) * (a - Vec(mu)); }, [](Vec a, Vec c) { return a + c; }, v, n) / n;
      const float rs = 1.0f / std::sqrt(var + eps);
      at::vec::map3([mu, rs](Vec a, Vec wv, Vec bv) { return (a - Vec(mu)) * Vec(rs) * wv + bv; }, v, v, w, b, n);
      store_row(v, y + r * n, n);
      mean[r] = mu;
      rstd[r] = rs;
    }
  });
}

template <typename scalar_t>
void norm_bwd_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const float* mean, const float* rstd,
                   const float* w, float* dw_part, float* db_part, int64_t rows, int64_t n, bool is_rms) {
  const int64_t groups = std::min(rows, kGroups);
  const int64_t per_group = (rows + groups - 1) / groups;
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    std::vector<float> buf(3 * n);
    float* xh = buf.data();
    float* g = buf.data() + n;
    float* wg = buf.data() + 2 * n;
    for (int64_t grp = g_begin; grp < g_end; ++grp) {
      float* dw = dw_part ? dw_part + grp * n : nullptr;
      float* db = db_part ? db_part + grp * n : nullptr;
      for (int64_t r = grp * per_group; r < std::min(rows, (grp + 1) * per_group); ++r) {
        load_row(x + r * n, xh, n);
        load_row(dy + r * n, g, n);
        const float mu = mean[r], rs = rstd[r];
        at::vec::map([mu, rs](Vec a) { return (a - Vec(mu)) * Vec(rs); }, xh, xh, n);  // xhat
        at::vec::map2([](Vec gv, Vec wv) { return gv * wv; }, wg, g, w, n);             // w * dy
        const float c1 = at::vec::map2_reduce_all<float>(
            [](Vec a, Vec c) { return a * c; }, [](Vec a, Vec c) { return a + c; }, xh, wg, n) / n;
        const float c2 = is_rms ? 0.0f : vec_sum(wg, n) / n;
        if (dw) at::vec::map3([](Vec acc, Vec gv, Vec h) { return acc + gv * h; }, dw, dw, g, xh, n);
        if (db) at::vec::map2([](Vec acc, Vec gv) { return acc + gv; }, db, db, g, n);
        at::vec::map2([c1, c2, rs](Vec wv, Vec h) { return (wv - (h * Vec(c1) + Vec(c2))) * Vec(rs); },
                      wg, wg, xh, n);
        store_row(wg, dx + r * n, n);
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
