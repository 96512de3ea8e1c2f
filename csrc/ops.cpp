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
  // q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), mask None or bool / additive float
  // (B, H, L, S) (a broadcast view); causal: key j visible to query i iff j <= i.
  // (out (B, H, L, Dv) in q's dtype, LSE (B, H, L) fp32 in the log2 domain).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float scale) -> (Tensor, Tensor)");
  // q (B, H, Lq, D); caches (B, Hkv, S_max, D), or paged (num_blocks, Hkv, block_size, D) with
  // block_table (B, max_blocks) int32; cache_seqlens (B,) int32 counts the Lq new tokens; query i
  // sees keys j <= cache_seqlens[b] - Lq + i. Returns (B, H, Lq, Dv) in q's dtype.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale, Tensor? block_table) -> Tensor");
}
