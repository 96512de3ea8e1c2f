// softmax / log_softmax forward and backward on CPU: one row at a time in fp32, rows in
// parallel (at::parallel_for), arithmetic vectorized with at::vec.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "row_buffer.h"

namespace gptkern::cpu {
namespace {

template <typename in_t, typename out_t>
void softmax_rows(const in_t* x, out_t* y, int64_t rows, int64_t n, bool log) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    // fp32 rows are read and written in place; other dtypes go through these fp32 buffers.
    std::vector<float> buf((std::is_same_v<in_t, float> ? 0 : n) + (std::is_same_v<out_t, float> ? 0 : n));
    float* in_buf = buf.data();
    float* out_buf = buf.data() + (std::is_same_v<in_t, float> ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = float_row(x + r * n, in_buf, n);
      float* dst = float_out(y + r * n, out_buf);
      const float m = vec_max(row, n);  // a row of -inf gives NaN, as torch
      if (log) {
        const float shift = m + std::log(exp_shifted_sum(row, nullptr, n, m));
        at::vec::map([shift](Vec v) { return v - Vec(shift); }, dst, row, n);
      } else {
        const float inv = 1.0f / exp_shifted_sum(row, dst, n, m);
        at::vec::map([inv](Vec v) { return v * Vec(inv); }, dst, dst, n);
      }
      finish_row(dst, y + r * n, n);
    }
  });
}

template <typename scalar_t>
void softmax_bwd_rows(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t rows, int64_t n,
                      bool log) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : 3 * n);
    auto part = [&](int64_t k) { return buf.empty() ? nullptr : buf.data() + k * n; };
    for (int64_t r = begin; r < end; ++r) {
      const float* g = float_row(dy + r * n, part(0), n);
      const float* o = float_row(y + r * n, part(1), n);
      float* d = float_out(dx + r * n, part(2));
      if (log) {  // dx = dy - exp(y) * sum(dy)
        const float total = vec_sum(g, n);
        at::vec::map2([total](Vec gv, Vec ov) { return gv - ov.exp() * Vec(total); }, d, g, o, n);
      } else {  // dx = y * (dy - sum(dy * y))
        const float total = at::vec::map2_reduce_all<float>(
            [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, g, o, n);
        at::vec::map2([total](Vec gv, Vec ov) { return ov * (gv - Vec(total)); }, d, g, o, n);
      }
      finish_row(d, dx + r * n, n);
    }
  });
}

at::Tensor softmax_fwd(const at::Tensor& x, int64_t dim, bool log, at::ScalarType out_dtype) {
  TORCH_CHECK(x.device().is_cpu(), "gptkern::softmax_fwd: x must be a CPU tensor");
  const int64_t rank = std::max<int64_t>(x.dim(), 1);
  dim = at::maybe_wrap_dim(dim, rank);
  auto xt = (x.dim() == 0 ? x.reshape({1}) : x).movedim(dim, -1).contiguous();  // (..., n)
  auto out = at::empty(xt.sizes(), xt.options().dtype(out_dtype));
  const int64_t n = xt.dim() ? xt.size(-1) : 1;
  if (xt.numel() > 0) {
    GPTKERN_DISPATCH(xt.scalar_type(), "softmax_fwd_in", [&] {
      using in_t = scalar_t;
      GPTKERN_DISPATCH(out_dtype, "softmax_fwd_out", [&] {
        softmax_rows<in_t, scalar_t>(xt.const_data_ptr<in_t>(), out.mutable_data_ptr<scalar_t>(),
                                     xt.numel() / n, n, log);
      });
    });
  }
  out = out.movedim(-1, dim).contiguous();
  return x.dim() == 0 ? out.reshape({}) : out;
}

at::Tensor softmax_bwd(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log) {
  TORCH_CHECK(out.device().is_cpu(), "gptkern::softmax_bwd: out must be a CPU tensor");
  const int64_t rank = std::max<int64_t>(out.dim(), 1);
  dim = at::maybe_wrap_dim(dim, rank);
  auto shape_1d = [&](const at::Tensor& t) { return t.dim() == 0 ? t.reshape({1}) : t; };
  auto yt = shape_1d(out).movedim(dim, -1).contiguous();
  auto gt = shape_1d(grad_out.to(out.scalar_type())).movedim(dim, -1).contiguous();
  auto dx = at::empty(yt.sizes(), yt.options());
  const int64_t n = yt.dim() ? yt.size(-1) : 1;
  if (yt.numel() > 0) {
    GPTKERN_DISPATCH(yt.scalar_type(), "softmax_bwd", [&] {
      softmax_bwd_rows<scalar_t>(gt.const_data_ptr<scalar_t>(), yt.const_data_ptr<scalar_t>(),
                                 dx.mutable_data_ptr<scalar_t>(), yt.numel() / n, n, log);
    });
  }
  dx = dx.movedim(-1, dim).contiguous();
  return out.dim() == 0 ? dx.reshape({}) : dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(gptkern, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace gptkern::cpu
