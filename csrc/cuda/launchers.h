// Launchers of the CUDA kernels (csrc/cuda/*.cu), called by register.cpp after it has checked
// the inputs and allocated every output: the launchers only read and write the tensors given.
// Host-only header: at::TensorBase and plain types, so that register.cpp needs no CUDA header.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>

namespace gptkern::cuda {

// softmax.cu. x, y, dy, dx contiguous, viewed as (outer, n, inner), reduced over n. y has the
// output dtype (fp32, or x's dtype); the backward works in y's dtype.
void softmax_fwd(const at::TensorBase& x, const at::TensorBase& y, int64_t outer, int64_t n, int64_t inner,
                 bool log);
void softmax_bwd(const at::TensorBase& dy, const at::TensorBase& y, const at::TensorBase& dx, int64_t outer,
                 int64_t n, int64_t inner, bool log);

// norms.cu. x, y, dy, dx contiguous (rows, n); w, b fp32 (n,) or undefined (weight 1, bias 0);
// mean, rstd fp32 (rows,).
void norm_fwd(const at::TensorBase& x, const at::TensorBase& w, const at::TensorBase& b, const at::TensorBase& y,
              const at::TensorBase& mean, const at::TensorBase& rstd, int64_t rows, int64_t n, float eps,
              bool is_rms);
void norm_bwd_dx(const at::TensorBase& dy, const at::TensorBase& x, const at::TensorBase& w,
                 const at::TensorBase& mean, const at::TensorBase& rstd, const at::TensorBase& dx, int64_t rows,
                 int64_t n, bool is_rms);
// Stage 1 of dW / dB: dw_part[g, j] = sum of dy * xhat, db_part[g, j] = sum of dy over the rows
// of group g (fp32 (groups, n), either undefined when not asked for). Rows are cut into
// norm_groups(rows) groups: a function of the row count only, so results are bit-reproducible.
int64_t norm_groups(int64_t rows);
void norm_bwd_partials(const at::TensorBase& dy, const at::TensorBase& x, const at::TensorBase& mean,
                       const at::TensorBase& rstd, const at::TensorBase& dw_part, const at::TensorBase& db_part,
                       int64_t rows, int64_t n, bool is_rms);
// Stage 2: out[j] = sum over g (in order) of part[g, j]; out (n,) contiguous in any kernel dtype.
void sum_partials(const at::TensorBase& part, const at::TensorBase& out);

// attention.cu. q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, D) fp16/bf16 with unit stride
// on D and 16-byte aligned rows; out (B, H, L, D) contiguous; lse (B, H, L) fp32 contiguous,
// log2 domain. D in {64, 128}; L, S >= 1.
bool attention_head_dim_supported(int64_t d);
void attention_fwd(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& v,
                   const at::TensorBase& out, const at::TensorBase& lse, bool causal, float scale);

// decode.cu. q (B, H, Lq, D) with unit stride on D; k_cache, v_cache (B, Hkv, S_max, D) or,
// with a block table (B, max_blocks) int32, paged (num_blocks, Hkv, block_size, D), unit
// stride on D; cache_seqlens (B,) int32; out (B, H, Lq, D) contiguous. With num_splits > 1,
// o_part fp32 (num_splits, B, H, Lq, D) and lse_part fp32 (num_splits, B, H, Lq) are the
// workspace of the split-KV pass, combined into out.
// fp16 / bf16, D in {64, 128}. A block takes up to 32 of the (H / Hkv) * Lq query rows of a KV
// head: decode_row_chunks blocks per KV head and split.
bool decode_head_dim_supported(int64_t d);
int64_t decode_row_chunks(int64_t rows);
int64_t decode_num_splits(int64_t batch_kv_heads, int64_t row_chunks, int64_t max_keys, int device);
void decode_attention(const at::TensorBase& q, const at::TensorBase& k_cache, const at::TensorBase& v_cache,
                      const at::TensorBase& cache_seqlens, const at::TensorBase& block_table,
                      const at::TensorBase& out, const at::TensorBase& o_part, const at::TensorBase& lse_part,
                      float scale, int64_t num_splits);

}  // namespace gptkern::cuda
