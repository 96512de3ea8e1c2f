// The dispatcher boundary: one schema per op. Implementations register per device in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(gptkern, CPU, m)) and csrc/cuda/register.cpp (CUDA); the
// Python side adds the fake (meta) and autograd registrations (gptkern/ops/).
#include <torch/library.h>

TORCH_LIBRARY(gptkern, m) {
  // softmax or log-softmax of x along dim, computed in fp32, returned in out_dtype.
  m.def("softmax_fwd(Tensor x, int dim, bool log, ScalarType out_dtype) -> Tensor");
  // gradient w.r.t. the input of softmax_fwd, in out's dtype.
  m.def("softmax_bwd(Tensor grad_out, Tensor out, int dim, bool log) -> Tensor");
  // layer/rms norm over the last k dims: (y, mean, rstd), mean/rstd fp32 of x.shape[:-k].
  m.def("norm_fwd(Tensor x, int k, Tensor? weight, Tensor? bias, float eps, bool is_rms)"
        " -> (Tensor, Tensor, Tensor)");
  // (dx, dw, db); dw / db are empty (0,) tensors when not asked for.
  m.def("norm_bwd(Tensor grad_out, Tensor x, int k, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd, bool is_rms, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
  // Attention: q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); mask None or (B, H, L, S)
  // bool (True = attend) or additive float, read through its strides. Returns out (B, H, L, Dv)
  // and the log2-domain LSE (B, H, L) fp32; a row that sees no key gives 0 and LSE -inf.
  // dropout_p > 0: the Triton kernels' Philox stream from seed, a (1,) int64 tensor (its low 32 bits key it).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale, float dropout_p=0., "
        "Tensor? seed=None) -> (Tensor, Tensor)");
  // mask_grad: the fourth output is the (B, H, L, S) gradient of a float mask in its dtype (else empty).
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
        "bool causal, float scale, bool mask_grad=False, float dropout_p=0., Tensor? seed=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Packed q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), int32 offsets; causal and
  // windows bottom-right aligned (flash-attn), window sides -1 = unbounded. LSE (H, total_q).
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left, int window_right, "
        "float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor)");
  m.def("attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
        "int window_left, int window_right, float dropout_p=0., Tensor? seed=None) -> (Tensor, Tensor, Tensor)");
  // q (B, H, Lq, D) against a KV cache (B, Hkv, S_max, D) or, with block_table (B, max_blocks),
  // a paged one (num_blocks, Hkv, block_size, D); cache_seqlens (B,) int32. Returns (B, H, Lq, Dv).
  // The dropout factors the attention kernels draw, (batch_heads, rows, cols) fp32.
  m.def("attention_dropout_factors(Tensor? seed, float dropout_p, int batch_heads, int rows, int cols, "
        "int first_batch_head=0) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale, "
        "Tensor? block_table) -> Tensor");
  // y (M, N) = x (M, K) @ weight (N, K)^T + bias, for small M (decode GEMVs); fp32 or bf16, fp32 sums.
  m.def("linear_small_m(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}
