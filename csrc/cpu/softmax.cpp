// softmax / log_softmax forward and backward on CPU: one row at a time in fp32 (16-bit rows are
// converted in registers), rows in parallel (at::parallel_for), arithmetic vectorized with at::vec.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "float_vec.h"

namespace gptkern::cpu {
namespace {

// One row of x (fp32, bf16 or fp16) into y (x's dtype or fp32), converted in registers: a pass
// for the max, one for the sum of the exponentials (softmax keeps them in ``buf``, n floats;
// log_softmax needs no buffer), one for y.
// ATen's exp_u20 (a polynomial within 20 ulp, faster than Sleef's) is exact enough for x - max
// in [-inf, 0]; a row whose max is not finite uses Sleef's exp, which keeps std::exp's NaN / inf.
template <bool log, typename in_t, typename out_t>
void softmax_row(const in_t* x, out_t* y, float* buf, int64_t n) {
  using In = FloatPairs<in_t>;
  using Out = FloatPairs<out_t>;
  constexpr int64_t kStep = In::kStep;
  const int64_t vec_end = n - n % kStep;
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < vec_end; i += kStep) {
    auto [lo, hi] = In::load(x + i);
    vmax = at::vec::maximum(vmax, at::vec::maximum(lo, hi));  // propagates NaN, as torch.max
  }
  float m = -std::numeric_limits<float>::infinity();
  {
    float lanes[Vec::size()];
    vmax.store(lanes);
    for (float lane : lanes) m = std::isnan(lane) || std::isnan(m) ? NAN : std::max(m, lane);
    for (int64_t i = vec_end; i < n; ++i) {
      const float v = static_cast<float>(x[i]);
      m = std::isnan(v) || std::isnan(m) ? NAN : std::max(m, v);
    }
  }
  const bool fast = std::isfinite(m);
  const Vec vm(m);
  auto exp_shifted = [&](Vec v) { return fast ? (v - vm).exp_u20() : (v - vm).exp(); };
  Vec acc_lo(0.0f), acc_hi(0.0f);
  for (int64_t i = 0; i < vec_end; i += kStep) {
    auto [lo, hi] = In::load(x + i);
    const Vec e_lo = exp_shifted(lo), e_hi = exp_shifted(hi);
    if constexpr (!log) {
      e_lo.store(buf + i);
      e_hi.store(buf + i + Vec::size());
    }
    acc_lo = acc_lo + e_lo;
    acc_hi = acc_hi + e_hi;
  }
  float sum = lane_sum(acc_lo + acc_hi);
  for (int64_t i = vec_end; i < n; ++i) {
    const float e = std::exp(static_cast<float>(x[i]) - m);
    if constexpr (!log) buf[i] = e;
    sum += e;
  }
  if constexpr (log) {  // y = (x - m) - log(sum): m + log(sum) would round log(sum) away when |m| is large
    const float ls = std::log(sum);
    const Vec vls(ls);
    for (int64_t i = 0; i < vec_end; i += kStep) {
      auto [lo, hi] = In::load(x + i);
      Out::store(y + i, (lo - vm) - vls, (hi - vm) - vls);
    }
    for (int64_t i = vec_end; i < n; ++i) y[i] = static_cast<out_t>((static_cast<float>(x[i]) - m) - ls);
  } else {  // y = e / sum
    const float inv = 1.0f / sum;
    const Vec vi(inv);
    for (int64_t i = 0; i < vec_end; i += kStep) {
      Out::store(y + i, Vec::loadu(buf + i) * vi, Vec::loadu(buf + i + Vec::size()) * vi);
    }
    for (int64_t i = vec_end; i < n; ++i) y[i] = static_cast<out_t>(buf[i] * inv);
  }
}

template <typename in_t, typename out_t>
void softmax_rows(const in_t* x, out_t* y, int64_t rows, int64_t n, bool log) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    // softmax: the exponentials go straight into an fp32 output row, else through this buffer.
    std::vector<float> buf(std::is_same_v<out_t, float> || log ? 0 : n);
    for (int64_t r = begin; r < end; ++r) {
      float* exps = nullptr;
      if constexpr (std::is_same_v<out_t, float>) {
        exps = y + r * n;
      } else {
        exps = buf.data();
      }
      if (log) {
        softmax_row<true>(x + r * n, y + r * n, exps, n);
      } else {
        softmax_row<false>(x + r * n, y + r * n, exps, n);
      }
    }
  });
}

// The backward of one fp32, bf16 or fp16 row: a pass for the sum, a pass for dx.
template <bool log, typename scalar_t>
void softmax_bwd_row(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t n) {
  using Pairs = FloatPairs<scalar_t>;
  const int64_t vec_end = n - n % Pairs::kStep;
  Vec acc_lo(0.0f), acc_hi(0.0f);  // two chains: the row is in L1, so the add latency bounds the loop
  for (int64_t i = 0; i < vec_end; i += Pairs::kStep) {  // log: sum(dy); else sum(dy * y)
    auto [g_lo, g_hi] = Pairs::load(dy + i);
    if constexpr (log) {
      acc_lo = acc_lo + g_lo;
      acc_hi = acc_hi + g_hi;
    } else {
      auto [o_lo, o_hi] = Pairs::load(y + i);
      acc_lo = at::vec::fmadd(g_lo, o_lo, acc_lo);
      acc_hi = at::vec::fmadd(g_hi, o_hi, acc_hi);
    }
  }
  float total = lane_sum(acc_lo + acc_hi);
  for (int64_t i = vec_end; i < n; ++i) {
    total += log ? static_cast<float>(dy[i]) : static_cast<float>(dy[i]) * static_cast<float>(y[i]);
  }
  const Vec vt(total);
  auto grad = [&](Vec g, Vec o) {
    if constexpr (log) {
      return g - o.exp() * vt;
    } else {
      return o * (g - vt);
    }
  };
  for (int64_t i = 0; i < vec_end; i += Pairs::kStep) {
    auto [g_lo, g_hi] = Pairs::load(dy + i);
    auto [o_lo, o_hi] = Pairs::load(y + i);
    Pairs::store(dx + i, grad(g_lo, o_lo), grad(g_hi, o_hi));
  }
  for (int64_t i = vec_end; i < n; ++i) {
    const float g = static_cast<float>(dy[i]), o = static_cast<float>(y[i]);
    dx[i] = static_cast<scalar_t>(log ? g - std::exp(o) * total : o * (g - total));
  }
}

template <typename scalar_t>
void softmax_bwd_rows(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t rows, int64_t n,
                      bool log) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (log) {
        softmax_bwd_row<true>(dy + r * n, y + r * n, dx + r * n, n);
      } else {
        softmax_bwd_row<false>(dy + r * n, y + r * n, dx + r * n, n);
      }
    }
  });
}

// The result of a row op over `dim` of a tensor of `sizes` (a fresh tensor, never a view: a view
// would refuse in-place ops under autograd) and the (..., n) row buffer the kernel writes: the
// result itself, seen with dim last, when that view is contiguous (dim last, or size-1 dims
// around it), else a scratch copied back by finish().
struct RowsOutput {
  at::Tensor result, target, rows;  // target: result with dim moved last
  RowsOutput(at::IntArrayRef sizes, int64_t dim, const at::TensorOptions& options)
      : result(empty_output(sizes, options)),
        target((sizes.empty() ? result.view({1}) : result).movedim(dim, -1)),
        rows(target.is_contiguous() ? target : empty_output(target.sizes(), options)) {}
  at::Tensor finish() {
    if (!rows.is_same(target)) target.copy_(rows);
    return result;
  }
};

at::Tensor softmax_fwd(const at::Tensor& x, int64_t dim, bool log, at::ScalarType out_dtype) {
  TORCH_CHECK(x.device().is_cpu(), "gptkern::softmax_fwd: x must be a CPU tensor");
  const int64_t rank = std::max<int64_t>(x.dim(), 1);
  dim = at::maybe_wrap_dim(dim, rank);
  // As the CUDA kernel: the Python side casts first for any other pair (checked for empty x too).
  check_16_32(x.scalar_type(), "gptkern::softmax_fwd on CPU (x)");
  TORCH_CHECK_NOT_IMPLEMENTED(out_dtype == x.scalar_type() || out_dtype == at::kFloat,
                              "gptkern::softmax_fwd on CPU: out_dtype must be x's dtype or float32, got x ",
                              x.scalar_type(), " and out_dtype ", out_dtype);
  auto xt = (x.dim() == 0 ? x.reshape({1}) : x).movedim(dim, -1).contiguous();  // (..., n)
  RowsOutput output(x.sizes(), dim, xt.options().dtype(out_dtype));
  const at::Tensor& out = output.rows;  // (..., n)
  const int64_t n = xt.dim() ? xt.size(-1) : 1;
  if (xt.numel() > 0) {
    GPTKERN_DISPATCH_16_32(xt.scalar_type(), "gptkern::softmax_fwd on CPU (x)", [&] {
      const int64_t rows = xt.numel() / n;
      if (out_dtype == xt.scalar_type()) {
        softmax_rows<scalar_t, scalar_t>(xt.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, n,
                                         log);
      } else {
        softmax_rows<scalar_t, float>(xt.const_data_ptr<scalar_t>(), out.mutable_data_ptr<float>(), rows, n, log);
      }
    });
  }
  return output.finish();
}

at::Tensor softmax_bwd(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log) {
  TORCH_CHECK(out.device().is_cpu(), "gptkern::softmax_bwd: out must be a CPU tensor");
  const int64_t rank = std::max<int64_t>(out.dim(), 1);
  dim = at::maybe_wrap_dim(dim, rank);
  check_16_32(out.scalar_type(), "gptkern::softmax_bwd on CPU (out)");
  TORCH_CHECK(grad_out.device().is_cpu(), "gptkern::softmax_bwd: grad_out must be a CPU tensor");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "gptkern::softmax_bwd: grad_out must have out's shape ",
              out.sizes(), ", got ", grad_out.sizes());
  auto shape_1d = [&](const at::Tensor& t) { return t.dim() == 0 ? t.reshape({1}) : t; };
  auto yt = shape_1d(out).movedim(dim, -1).contiguous();
  auto gt = shape_1d(grad_out.to(out.scalar_type())).movedim(dim, -1).contiguous();
  RowsOutput output(out.sizes(), dim, yt.options());
  const at::Tensor& dx = output.rows;  // (..., n)
  const int64_t n = yt.dim() ? yt.size(-1) : 1;
  if (yt.numel() > 0) {
    GPTKERN_DISPATCH_16_32(yt.scalar_type(), "gptkern::softmax_bwd on CPU (out)", [&] {
      softmax_bwd_rows<scalar_t>(gt.const_data_ptr<scalar_t>(), yt.const_data_ptr<scalar_t>(),
                                 dx.mutable_data_ptr<scalar_t>(), yt.numel() / n, n, log);
    });
  }
  return output.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(gptkern, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

}  // namespace gptkern::cpu
