// Decode attention against a KV cache (static or paged), split-KV, on CUDA cores in fp32.
// A block takes one (batch, KV head) and up to kRows query rows: the H / Hkv query heads of
// the KV head times the Lq new queries, so every K / V tile is loaded once per GQA group. The
// filled keys of each sequence are cut into num_splits ranges (grid axis 1); each block walks its range in tiles of
// kTileN keys (cp.async into padded shared rows) with an online softmax (log2 domain). With one
// split the block writes the output; otherwise it writes its normalized partial output and
// log-sum-exp, and a combine kernel merges the splits.
// Query i of Lq sees keys j <= cache_seqlens[b] - Lq + i; a row that sees none gives 0.
#include <algorithm>

#include "common.cuh"
#include "launchers.h"
#include "mma.cuh"

namespace gptkern::cuda {
namespace {

constexpr int kThreads = 128, kWarps = kThreads / 32, kTileN = 32;

struct DecodeParams {
  const void* q;          // (B, H, Lq, D), strides sq*, unit stride on D
  const void* k;          // (B, Hkv, S_max, D) or paged (num_blocks, Hkv, block_size, D)
  const void* v;          // as k
  const int* seqlens;     // (B,)
  const int* block_table; // (B, max_blocks) or null
  void* out;              // (B, H, Lq, D) contiguous
  float* o_part;          // (num_splits, B, H, Lq, D) fp32, when num_splits > 1
  float* lse_part;        // (num_splits, B, H, Lq) fp32, when num_splits > 1
  int64_t sqb, sqh, sqm, skb, skh, skn, svb, svh, svn;
  int batch, heads, kv_heads, lq, capacity, block_size, max_blocks, num_splits;
  float scale_log2;
};

// Copies keys [j0, j0 + kTileN) of (batch b, KV head hk) into rows of kPitch elements;
// keys at or past `end` are zero-filled.
template <typename T, int D, int kPitch>
__device__ __forceinline__ void load_kv_tile(T* tile, const T* base, int64_t sb, int64_t sh, int64_t sn,
                                             const DecodeParams& p, int b, int hk, int j0, int end) {
  constexpr int kChunks = D / 8, kPerThread = kTileN * kChunks / kThreads;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks, j = j0 + r;
    const T* from = base;
    if (j < end) {
      int64_t slab = b, pos = j;
      if (p.block_table) {
        slab = p.block_table[int64_t(b) * p.max_blocks + j / p.block_size];
        pos = j % p.block_size;
      }
      from = base + slab * sb + hk * sh + pos * sn + c * 8;
    }
    cp_async_16(tile + r * kPitch + c * 8, from, j < end ? 16 : 0);
  }
}

template <typename T, int D, int kRows>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  constexpr int kPitch = D + 8;              // padded K / V rows: conflict-free 16-byte reads
  constexpr int kRowsPerWarp = kRows / kWarps;  // dot products: rows of a warp, keys on lanes
  constexpr int kColGroups = kThreads / D;      // P V: a thread owns one column, kRows / kColGroups rows
  constexpr int kOutRows = kRows / kColGroups;
  __shared__ alignas(16) float sQ[kRows][D];
  __shared__ alignas(16) T sK[kTileN * kPitch];
  __shared__ alignas(16) T sV[kTileN * kPitch];
  __shared__ float sP[kRows][kTileN + 1];
  __shared__ float sM[kRows], sL[kRows], sAlpha[kRows];

  const int b = blockIdx.x / p.kv_heads, hk = blockIdx.x % p.kv_heads, split = blockIdx.y;
  const int group = p.heads / p.kv_heads, rows = group * p.lq, row0 = blockIdx.z * kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int seqlen = max(0, min(p.seqlens[b], p.capacity));
  // Each split takes an equal run of tiles of this sequence's filled length (not of the capacity:
  // a mostly empty cache still spreads over every split).
  const int split_keys = ((seqlen + p.num_splits - 1) / p.num_splits + kTileN - 1) / kTileN * kTileN;
  const int lo = split * split_keys, hi = min(seqlen, lo + split_keys);

  // Row r of the block is query i = (row0 + r) % Lq of head hk * group + (row0 + r) / Lq.
  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D, row = row0 + r;
    float val = 0.0f;
    if (row < rows) {
      const int h = hk * group + row / p.lq, i = row % p.lq;
      val = to_float(static_cast<const T*>(p.q)[b * p.sqb + h * p.sqh + i * p.sqm + d]);
    }
    sQ[r][d] = val;
  }
  if (threadIdx.x < kRows) {
    sM[threadIdx.x] = -INFINITY;
    sL[threadIdx.x] = 0.0f;
  }
  float o[kOutRows] = {};
  const int col = threadIdx.x % D, col_group = threadIdx.x / D;

  for (int j0 = lo; j0 < hi; j0 += kTileN) {
    load_kv_tile<T, D, kPitch>(sK, static_cast<const T*>(p.k), p.skb, p.skh, p.skn, p, b, hk, j0, hi);
    load_kv_tile<T, D, kPitch>(sV, static_cast<const T*>(p.v), p.svb, p.svh, p.svn, p, b, hk, j0, hi);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();  // also: sQ / sM / sL written, previous tile's sP / sV consumed

    // Scores: lane = key, rows warp, warp + kWarps, ...
    float acc[kRowsPerWarp] = {};
#pragma unroll 4
    for (int d0 = 0; d0 < D; d0 += 8) {
      float kv[8];
      load_floats<T, 8>(sK + lane * kPitch + d0, kv);
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const float4 qa = *reinterpret_cast<const float4*>(&sQ[warp + i * kWarps][d0]);
        const float4 qb = *reinterpret_cast<const float4*>(&sQ[warp + i * kWarps][d0 + 4]);
        acc[i] += qa.x * kv[0] + qa.y * kv[1] + qa.z * kv[2] + qa.w * kv[3] + qb.x * kv[4] + qb.y * kv[5] +
                  qb.z * kv[6] + qb.w * kv[7];
      }
    }
    // Online softmax of each of the warp's rows over this tile (lane = key).
    const int j = j0 + lane;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + i * kWarps, row = row0 + r;
      const int limit = seqlen - p.lq + row % p.lq;  // last key this query sees
      const float s = (row < rows && j < hi && j <= limit) ? acc[i] * p.scale_log2 : -INFINITY;
      const float m_old = sM[r];
      const float m_new = fmaxf(m_old, warp_reduce(s, Max()));
      const float ref = m_new == -INFINITY ? 0.0f : m_new;
      const float e = exp2f(s - ref);
      const float sum = warp_reduce(e, Sum());
      sP[r][lane] = e;
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(m_old - ref);
        sAlpha[r] = alpha;
        sL[r] = sL[r] * alpha + sum;
        sM[r] = m_new;
      }
    }
    __syncthreads();

    // O = O * alpha + P V (thread: column col, rows col_group, col_group + kColGroups, ...).
#pragma unroll
    for (int i = 0; i < kOutRows; ++i) o[i] *= sAlpha[col_group + i * kColGroups];
#pragma unroll 8
    for (int jj = 0; jj < kTileN; ++jj) {
      const float vv = to_float(sV[jj * kPitch + col]);
#pragma unroll
      for (int i = 0; i < kOutRows; ++i) o[i] += sP[col_group + i * kColGroups][jj] * vv;
    }
    __syncthreads();  // before the next tile overwrites sK / sV / sP
  }
  __syncthreads();  // sM / sL final (also when this split had no key)

#pragma unroll
  for (int i = 0; i < kOutRows; ++i) {
    const int r = col_group + i * kColGroups, row = row0 + r;
    if (row >= rows) continue;
    const int h = hk * group + row / p.lq, qi = row % p.lq;
    const int64_t out_row = (int64_t(b) * p.heads + h) * p.lq + qi;  // row of (B, H, Lq)
    const float l = sL[r];
    const float val = l == 0.0f ? 0.0f : o[i] * __fdividef(1.0f, l);  // a NaN score or value stays NaN
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[out_row * D + col] = from_float<T>(val);
    } else {
      const int64_t part_row = int64_t(split) * p.batch * p.heads * p.lq + out_row;
      p.o_part[part_row * D + col] = val;
      if (col == 0) p.lse_part[part_row] = l == 0.0f ? -INFINITY : sM[r] + log2f(l);
    }
  }
}

// out[row, c] = sum_s w_s o_part[s, row, c] / sum_s w_s with w_s = exp2(lse_s - max lse).
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(const float* __restrict__ o_part,    // (splits, rows, D)
                                                           const float* __restrict__ lse_part,  // (splits, rows)
                                                           T* __restrict__ out,                 // (rows, D)
                                                           int64_t rows, int splits) {
  const int64_t row = blockIdx.x;
  float m = -INFINITY;  // a NaN LSE (a split saw a NaN score) makes m, and so the row, NaN
  for (int s = 0; s < splits; ++s) {
    const float lse = lse_part[s * rows + row];
    m = lse != lse ? lse : fmaxf(m, lse);  // x != x: x is NaN (fmaxf would drop it)
    if (m != m) break;
  }
  float num = 0.0f, den = 0.0f;
  if (m != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float w = exp2f(lse_part[s * rows + row] - m);
      num += w * o_part[(s * rows + row) * D + threadIdx.x];
      den += w;
    }
  }
  out[row * D + threadIdx.x] = from_float<T>(den == 0.0f ? 0.0f : __fdividef(num, den));
}

template <typename T, int D, int kRows>
void launch(const DecodeParams& p, int row_chunks) {
  const dim3 grid(p.batch * p.kv_heads, p.num_splits, row_chunks);
  decode_kernel<T, D, kRows><<<grid, kThreads, 0, stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.batch) * p.heads * p.lq;
    decode_combine_kernel<T, D><<<static_cast<unsigned>(rows), D, 0, stream()>>>(
        p.o_part, p.lse_part, static_cast<T*>(p.out), rows, p.num_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void launch_rows(const DecodeParams& p) {
  const int rows = p.heads / p.kv_heads * p.lq;
  if (rows <= 8) {
    launch<T, D, 8>(p, 1);
  } else {
    launch<T, D, 32>(p, int(ceil_div(rows, 32)));
  }
}

}  // namespace

bool decode_head_dim_supported(int64_t d) { return d == 64 || d == 128; }

int64_t decode_row_chunks(int64_t rows) { return rows <= 8 ? 1 : (rows + 31) / 32; }

int64_t decode_num_splits(int64_t batch_kv_heads, int64_t row_chunks, int64_t max_keys, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::max<int64_t>(1, batch_kv_heads * row_chunks);
  const int64_t want = (2 * int64_t(sms) + blocks - 1) / blocks;  // about two waves
  const int64_t most = std::max<int64_t>(1, (max_keys + 127) / 128);  // at least 128 keys a split
  return std::clamp<int64_t>(std::min(want, most), 1, 64);
}

void decode_attention(const at::TensorBase& q, const at::TensorBase& k_cache, const at::TensorBase& v_cache,
                      const at::TensorBase& cache_seqlens, const at::TensorBase& block_table,
                      const at::TensorBase& out, const at::TensorBase& o_part, const at::TensorBase& lse_part,
                      float scale, int64_t num_splits) {
  DecodeParams p;
  const bool paged = block_table.defined();
  p.q = q.const_data_ptr();
  p.k = k_cache.const_data_ptr();
  p.v = v_cache.const_data_ptr();
  p.seqlens = static_cast<const int*>(cache_seqlens.const_data_ptr());
  p.block_table = paged ? static_cast<const int*>(block_table.const_data_ptr()) : nullptr;
  p.out = out.data_ptr();
  p.o_part = num_splits > 1 ? static_cast<float*>(o_part.data_ptr()) : nullptr;
  p.lse_part = num_splits > 1 ? static_cast<float*>(lse_part.data_ptr()) : nullptr;
  p.sqb = q.stride(0), p.sqh = q.stride(1), p.sqm = q.stride(2);
  p.skb = k_cache.stride(0), p.skh = k_cache.stride(1), p.skn = k_cache.stride(2);
  p.svb = v_cache.stride(0), p.svh = v_cache.stride(1), p.svn = v_cache.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.lq = static_cast<int>(q.size(2));
  p.kv_heads = static_cast<int>(k_cache.size(1));
  p.block_size = paged ? static_cast<int>(k_cache.size(2)) : 1;
  p.max_blocks = paged ? static_cast<int>(block_table.size(1)) : 0;
  p.capacity = paged ? p.block_size * p.max_blocks : static_cast<int>(k_cache.size(2));
  p.num_splits = static_cast<int>(num_splits);
  p.scale_log2 = scale * kLog2e;
  const int64_t d = q.size(3);
  TORCH_CHECK(decode_head_dim_supported(d), "gptkern::decode_attention on CUDA: head dim ", d);
  if (q.scalar_type() == at::ScalarType::BFloat16) {
    d == 64 ? launch_rows<__nv_bfloat16, 64>(p) : launch_rows<__nv_bfloat16, 128>(p);
  } else {
    TORCH_CHECK(q.scalar_type() == at::ScalarType::Half, "gptkern::decode_attention on CUDA: dtype ",
                q.scalar_type());
    d == 64 ? launch_rows<__half, 64>(p) : launch_rows<__half, 128>(p);
  }
}

}  // namespace gptkern::cuda
