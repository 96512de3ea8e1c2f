// CUDA implementations of the gptkern:: ops (TORCH_LIBRARY_IMPL(gptkern, CUDA)): input checks
// naming the argument, allocation of every output, then the launchers of csrc/cuda/*.cu.
// Host code only (no CUDA header), so that it compiles with the rest of the C++ sources.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "launchers.h"

namespace gptkern::cuda {
namespace {

constexpr int64_t kMaxAttentionKeys = (int64_t(1) << 31) - 1 - 2 * 64;  // gptkern/ops/cuda_attention.py: the same

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "gptkern::", op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "gptkern::", op, ": ", name, " is on ", t.device(),
              " but the first input is on ", ref.device());
}

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_kernel_dtype(at::ScalarType t, const char* op, const char* name) {
  TORCH_CHECK_NOT_IMPLEMENTED(kernel_dtype(t), "gptkern::", op, " on CUDA: ", name, " has dtype ", t,
                              " (supported: float32, float16, bfloat16)");
}

bool half_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// t itself when its last dim has unit stride, every other stride is a multiple of 8 elements and
// its data is 16-byte aligned (what the attention kernels' 16-byte copies need), else a copy: a
// fresh one, since contiguous() hands back a contiguous tensor whose data is misaligned as it is.
at::Tensor rows_16b(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.stride(i) % 8 == 0 || t.size(i) == 1);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// ------------------------------------------------------------------------------- softmax

// (outer, n, inner) of a contiguous tensor reduced over dim (a 0-d tensor is (1, 1, 1)).
std::tuple<int64_t, int64_t, int64_t> split_at(const at::Tensor& t, int64_t dim) {
  if (t.dim() == 0) return {1, 1, 1};
  const auto sizes = t.sizes();
  return {c10::multiply_integers(sizes.slice(0, dim)), sizes[dim], c10::multiply_integers(sizes.slice(dim + 1))};
}

at::Tensor softmax_fwd_op(const at::Tensor& x, int64_t dim, bool log, at::ScalarType out_dtype) {
  check_cuda(x, "softmax_fwd", "x");
  check_kernel_dtype(x.scalar_type(), "softmax_fwd", "x");
  TORCH_CHECK_NOT_IMPLEMENTED(out_dtype == x.scalar_type() || out_dtype == at::kFloat,
                              "gptkern::softmax_fwd on CUDA: out_dtype must be x's dtype or float32, got x ",
                              x.scalar_type(), " and out_dtype ", out_dtype);
  dim = at::maybe_wrap_dim(dim, std::max<int64_t>(x.dim(), 1));
  const c10::DeviceGuard guard(x.device());
  auto xc = x.contiguous();
  auto y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const auto [outer, n, inner] = split_at(xc, dim);
  cuda::softmax_fwd(xc, y, outer, n, inner, log);
  return y;
}

at::Tensor softmax_bwd_op(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log) {
  check_cuda(out, "softmax_bwd", "out");
  check_same_device(grad_out, out, "softmax_bwd", "grad_out");
  check_kernel_dtype(out.scalar_type(), "softmax_bwd", "out");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "gptkern::softmax_bwd: grad_out has shape ", grad_out.sizes(),
              " but out has shape ", out.sizes());
  dim = at::maybe_wrap_dim(dim, std::max<int64_t>(out.dim(), 1));
  const c10::DeviceGuard guard(out.device());
  auto yc = out.contiguous();
  auto gc = grad_out.to(out.scalar_type()).contiguous();
  auto dx = at::empty(out.sizes(), out.options());
  const auto [outer, n, inner] = split_at(yc, dim);
  cuda::softmax_bwd(gc, yc, dx, outer, n, inner, log);
  return dx;
}

// --------------------------------------------------------------------------------- norms

// weight / bias as fp32 (n,) contiguous, or an undefined tensor.
at::Tensor as_floats(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* op, const char* name) {
  if (!t.has_value()) return at::Tensor();
  check_same_device(*t, x, op, name);
  check_kernel_dtype(t->scalar_type(), op, name);
  return t->reshape({-1}).to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd_op(const at::Tensor& x, int64_t k,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias, double eps,
                                                           bool is_rms) {
  check_cuda(x, "norm_fwd", "x");
  check_kernel_dtype(x.scalar_type(), "norm_fwd", "x");
  TORCH_CHECK(k >= 1 && k <= x.dim(), "gptkern::norm_fwd: k must be in [1, x.dim()], got ", k);
  const c10::DeviceGuard guard(x.device());
  const auto lead = x.sizes().slice(0, x.dim() - k);
  const int64_t n = c10::multiply_integers(x.sizes().slice(x.dim() - k));
  auto w = as_floats(weight, x, "norm_fwd", "weight");
  auto b = as_floats(bias, x, "norm_fwd", "bias");
  for (const auto* p : {&w, &b}) {
    TORCH_CHECK(!p->defined() || p->numel() == n, "gptkern::norm_fwd: ", p == &w ? "weight" : "bias", " has ",
                p->numel(), " elements, the normalized shape ", n);
  }
  auto y = at::empty(x.sizes(), x.options());
  auto mean = at::zeros(lead, x.options().dtype(at::kFloat));
  auto rstd = at::empty(lead, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    rstd.fill_(1.0 / std::sqrt(eps));  // rows of no element: variance 0
    return {y, mean, rstd};
  }
  auto xc = x.contiguous();
  cuda::norm_fwd(xc, w, b, y, mean, rstd, x.numel() / n, n, static_cast<float>(eps), is_rms);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_op(const at::Tensor& grad_out, const at::Tensor& x,
                                                           int64_t k, const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& mean, const at::Tensor& rstd,
                                                           bool is_rms, bool need_dw, bool need_db) {
  check_cuda(x, "norm_bwd", "x");
  check_kernel_dtype(x.scalar_type(), "norm_bwd", "x");
  check_same_device(grad_out, x, "norm_bwd", "grad_out");
  check_same_device(mean, x, "norm_bwd", "mean");
  check_same_device(rstd, x, "norm_bwd", "rstd");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "gptkern::norm_bwd: grad_out has shape ", grad_out.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(k >= 1 && k <= x.dim(), "gptkern::norm_bwd: k must be in [1, x.dim()], got ", k);
  TORCH_CHECK(!need_dw || weight.has_value(), "gptkern::norm_bwd: need_dw without a weight");
  TORCH_CHECK(!need_db || bias.has_value(), "gptkern::norm_bwd: need_db without a bias");
  const c10::DeviceGuard guard(x.device());
  const int64_t n = c10::multiply_integers(x.sizes().slice(x.dim() - k));
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - k));
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows, "gptkern::norm_bwd: mean and rstd must have ", rows,
              " elements, got ", mean.numel(), " and ", rstd.numel());
  auto dx = at::empty(x.sizes(), x.options());
  auto w = as_floats(weight, x, "norm_bwd", "weight");
  if (need_db) as_floats(bias, x, "norm_bwd", "bias");  // checks only: the bias does not enter dx
  for (const auto* p : {&weight, &bias}) {  // dW / dB are written n elements long
    TORCH_CHECK(!p->has_value() || !(*p)->defined() || (*p)->numel() == n, "gptkern::norm_bwd: ",
                p == &weight ? "weight" : "bias", " has ", (*p)->numel(), " elements, the normalized shape ", n);
  }
  auto dw = need_dw ? at::empty(weight->sizes(), weight->options()) : at::empty({0}, x.options());
  auto db = need_db ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, x.options());
  if (x.numel() == 0) {  // sums over no row, or rows of no element
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  auto xc = x.contiguous();
  auto gc = grad_out.to(x.scalar_type()).contiguous();
  auto mean_c = mean.to(at::kFloat).contiguous(), rstd_c = rstd.to(at::kFloat).contiguous();
  cuda::norm_bwd_dx(gc, xc, w, mean_c, rstd_c, dx, rows, n, is_rms);
  if (need_dw || need_db) {
    const int64_t groups = norm_groups(rows);
    auto part = [&](bool need) {
      return need ? at::empty({groups, n}, x.options().dtype(at::kFloat)) : at::Tensor();
    };
    auto dw_part = part(need_dw), db_part = part(need_db);
    cuda::norm_bwd_partials(gc, xc, mean_c, rstd_c, dw_part, db_part, rows, n, is_rms);
    if (need_dw) cuda::sum_partials(dw_part, dw);
    if (need_db) cuda::sum_partials(db_part, db);
  }
  return {dx, dw, db};
}

// ----------------------------------------------------------------------------- attention

void check_attention_dtypes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "gptkern::", op,
              ": q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK_NOT_IMPLEMENTED(half_dtype(q.scalar_type()), "gptkern::", op, " on CUDA: q has dtype ",
                              q.scalar_type(), " (supported: float16, bfloat16)");
}

void check_head_dims(int64_t d, int64_t dv, bool supported, const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(d == dv && supported, "gptkern::", op, " on CUDA: head dims ", d, " (q, k) and ",
                              dv, " (v); supported: 64 or 128, the same for q, k and v");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& mask, bool causal,
                                                    double scale, double dropout_p,
                                                    const std::optional<at::Tensor>& /*seed*/) {
  const char* op = "attention_fwd";
  TORCH_CHECK_NOT_IMPLEMENTED(dropout_p == 0.0, "gptkern::attention_fwd on CUDA: dropout is not supported; the "
                              "triton and torch backends take it");
  check_cuda(q, op, "q");
  check_same_device(k, q, op, "k");
  check_same_device(v, q, op, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "gptkern::attention_fwd: q, k and v must be 4-D "
              "(B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, Dv), got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == S && k.size(3) == D,
              "gptkern::attention_fwd: shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(Hkv > 0 ? H % Hkv == 0 : H == 0, "gptkern::attention_fwd: the ", H,
              " query heads must be a multiple of the ", Hkv, " key/value heads");
  check_attention_dtypes(q, k, v, op);
  TORCH_CHECK_NOT_IMPLEMENTED(!mask.has_value(), "gptkern::attention_fwd on CUDA: attention masks are not "
                              "supported (causal is); the triton and torch backends take masks");
  check_head_dims(D, Dv, attention_head_dim_supported(D), op);
  TORCH_CHECK(L < (int64_t(1) << 31) && S < (int64_t(1) << 31) && B * H < (int64_t(1) << 31),
              "gptkern::attention_fwd: sizes beyond 2**31");
  TORCH_CHECK_NOT_IMPLEMENTED(L <= int64_t(65535) * 64, "gptkern::attention_fwd on CUDA: query length ", L,
                              " beyond 4194240 (65535 blocks of 64 rows); the triton and torch backends take it");
  // (the key loop's int32 tile arithmetic steps up to 2 tiles of 64 past S)
  TORCH_CHECK_NOT_IMPLEMENTED(S <= kMaxAttentionKeys, "gptkern::attention_fwd on CUDA: ", S, " keys, beyond ",
                              kMaxAttentionKeys, " (2**31 - 129); the torch backend takes it");
  const c10::DeviceGuard guard(q.device());
  auto out = at::empty({B, H, L, Dv}, q.options());
  auto lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || S == 0) {  // nothing attended: zeros, LSE -inf (the backward gives zeros)
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  cuda::attention_fwd(rows_16b(q), rows_16b(k), rows_16b(v), out, lse, causal, static_cast<float>(scale));
  return {out, lse};
}

at::Tensor decode_attention_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& cache_seqlens, double scale,
                               const std::optional<at::Tensor>& block_table) {
  const char* op = "decode_attention";
  check_cuda(q, op, "q");
  check_same_device(k_cache, q, op, "k_cache");
  check_same_device(v_cache, q, op, "v_cache");
  check_same_device(cache_seqlens, q, op, "cache_seqlens");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "gptkern::decode_attention: q, k_cache "
              "and v_cache must be 4-D, got ", q.sizes(), ", ", k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), Dv = v_cache.size(3);
  TORCH_CHECK(v_cache.sizes().slice(0, 3) == k_cache.sizes().slice(0, 3) && k_cache.size(3) == D,
              "gptkern::decode_attention: shapes do not match: q ", q.sizes(), ", k_cache ", k_cache.sizes(),
              ", v_cache ", v_cache.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "gptkern::decode_attention: the ", H,
              " query heads must be a multiple of the ", Hkv, " key/value heads");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B && cache_seqlens.scalar_type() == at::kInt,
              "gptkern::decode_attention: cache_seqlens must be a (", B, ",) int32 tensor, got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  at::Tensor table;
  if (block_table.has_value()) {
    check_same_device(*block_table, q, op, "block_table");
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == B && block_table->scalar_type() == at::kInt,
                "gptkern::decode_attention: block_table must be a (", B, ", max_blocks) int32 tensor, got ",
                block_table->scalar_type(), " ", block_table->sizes());
    TORCH_CHECK(k_cache.size(2) > 0, "gptkern::decode_attention: a paged k_cache needs blocks of at least one "
                "token, got shape ", k_cache.sizes());
    table = block_table->contiguous();
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "gptkern::decode_attention: k_cache has batch ", k_cache.size(0),
                " but q has ", B, " (without block_table the caches are (B, Hkv, S_max, D))");
  }
  check_attention_dtypes(q, k_cache, v_cache, op);
  check_head_dims(D, Dv, decode_head_dim_supported(D), op);
  const int64_t capacity = table.defined() ? k_cache.size(2) * table.size(1) : k_cache.size(2);
  // (the key loop's int32 positions step past a split's end by up to 64 splits x 32 keys)
  TORCH_CHECK(capacity <= (int64_t(1) << 31) - 1 - 64 * 64 && B * Hkv < (int64_t(1) << 31),
              "gptkern::decode_attention: a cache of ", capacity, " keys per sequence (at most 2**31 - 4097) or ",
              B * Hkv, " batch x KV heads (at most 2**31 - 1)");
  // Grid z: blocks of 32 query rows per KV head (at most 65535); the combine: one block per row.
  TORCH_CHECK_NOT_IMPLEMENTED(H / Hkv * Lq <= int64_t(65535) * 32 && B * H * Lq < (int64_t(1) << 31),
                              "gptkern::decode_attention on CUDA: ", H / Hkv * Lq,
                              " query rows per key/value head (or ", B * H * Lq, " in all) is beyond the kernel's "
                              "grid; the triton and torch backends take it");
  const c10::DeviceGuard guard(q.device());
  auto out = at::empty({B, H, Lq, Dv}, q.options());
  if (out.numel() == 0) return out;
  const int64_t num_splits =
      decode_num_splits(B * Hkv, decode_row_chunks(H / Hkv * Lq), capacity, q.device().index());
  at::Tensor o_part, lse_part;
  if (num_splits > 1) {
    o_part = at::empty({num_splits, B, H, Lq, Dv}, q.options().dtype(at::kFloat));
    lse_part = at::empty({num_splits, B, H, Lq}, q.options().dtype(at::kFloat));
  }
  cuda::decode_attention(rows_16b(q), rows_16b(k_cache), rows_16b(v_cache), cache_seqlens.contiguous(), table,
                         out, o_part, lse_part, static_cast<float>(scale), num_splits);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gptkern, CUDA, m) {
  m.impl("softmax_fwd", &softmax_fwd_op);
  m.impl("softmax_bwd", &softmax_bwd_op);
  m.impl("norm_fwd", &norm_fwd_op);
  m.impl("norm_bwd", &norm_bwd_op);
  m.impl("attention_fwd", &attention_fwd_op);
  m.impl("decode_attention", &decode_attention_op);
}

}  // namespace gptkern::cuda
