// Flash attention forward on tensor cores (mma.sync m16n8k16, fp32 accumulation), fp16 / bf16,
// head dims 64 and 128. A block of 4 warps takes kBlockM = 64 query rows (16 per warp), walks
// the keys in tiles of kBlockN = 64 with an online softmax in fp32 (log2 domain, exp2), and
// skips the key tiles a causal (top-left aligned) block cannot see. Q, K, V tiles go through
// XOR-swizzled shared memory with cp.async: V_j loads while S = Q K_j^T is computed, K_{j+1}
// while O += P V_j is; Q's fragments stay in registers. Query head h reads key/value head
// h / (H / Hkv) (GQA).
// Writes O (B, H, L, D) and the log2-domain log-sum-exp (B, H, L) of the Triton kernels.
#include "common.cuh"
#include "launchers.h"
#include "mma.cuh"

namespace gptkern::cuda {
namespace {

constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kThreads = 32 * kWarps;

struct AttnParams {
  const void* q;  // (B, H, L, D), strides sq*, unit stride on D
  const void* k;  // (B, Hkv, S, D)
  const void* v;  // (B, Hkv, S, D)
  void* out;      // (B, H, L, D) contiguous
  float* lse;     // (B, H, L) contiguous, log2 domain
  int64_t sqb, sqh, sqm, skb, skh, skn, svb, svh, svn;
  int heads, group, L, S;
  float scale_log2;  // scale * log2(e)
  bool causal;
};

// Copies rows [row0, row0 + 64) of a (rows, D) slab with row stride `stride` into a swizzled
// tile; rows past `rows` are zero-filled. A thread copies chunk c of rows r, r + kStep, ...:
// kStep is a multiple of 8, so the swizzle (and the shared offset's lane part) is the same for
// all of them and one pointer per tile suffices.
template <int D, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t stride, int row0, int rows) {
  constexpr int kChunks = D / 8, kStep = kThreads / kChunks, kPerThread = kBlockN / kStep;
  static_assert(kStep % 8 == 0, "rows of one thread must share a swizzle");
  const int r = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
  T* dst = tile + swizzle<kChunks>(r, c);
  const T* from = src + int64_t(row0 + r) * stride + c * 8;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const bool ok = row0 + r + i * kStep < rows;
    cp_async_16(dst + i * kStep * D, ok ? from + i * kStep * stride : src, ok ? 16 : 0);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttnParams p) {
  constexpr int kChunks = D / 8;
  __shared__ alignas(128) T smem[3 * kBlockM * D];
  T* sQ = smem;
  T* sK = smem + kBlockM * D;
  T* sV = smem + 2 * kBlockM * D;

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, hk = h / p.group;
  // Causal blocks near the diagonal's end do the most work: run them first.
  const int m_block = p.causal ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  const int m0 = m_block * kBlockM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int mi = lane >> 3, rr = lane & 7;  // ldmatrix: matrix and row this lane addresses

  const T* q = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh;
  const T* k = static_cast<const T*>(p.k) + b * p.skb + hk * p.skh;
  const T* v = static_cast<const T*>(p.v) + b * p.svb + hk * p.svh;
  const int n_end = p.causal ? min(p.S, m0 + kBlockM) : p.S;  // keys any row of the block sees
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;

  load_tile<D>(sQ, q, p.sqm, m0, p.L);
  load_tile<D>(sK, k, p.skn, 0, p.S);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t qf[D / 16][4];  // A fragments of this warp's 16 query rows
  const int q_row = warp * 16 + (mi & 1) * 8 + rr;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], sQ + swizzle<kChunks>(q_row, kk * 2 + (mi >> 1)));

  float o[D / 8][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};  // rows g and g + 8
  const int row_a = m0 + warp * 16 + g;                                // row g; row g + 8 is row_a + 8

  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kBlockN;
    load_tile<D>(sV, v, p.svn, n0, p.S);
    cp_async_commit();

    float s[kBlockN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK + swizzle<kChunks>(np * 16 + (mi >> 1) * 8 + rr, kk * 2 + (mi & 1)));
        mma_16816<T>(s[2 * np], qf[kk], kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // Scores in the log2 domain; keys past S or (causal) after the query are -inf.
    const bool edge = n0 + kBlockN > p.S || (p.causal && n0 + kBlockN - 1 > m0);
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (edge) {
          const int key = n0 + nt * 8 + 2 * t + (e & 1), row = row_a + (e >> 1) * 8;
          if (key >= p.S || (p.causal && key > row)) x = -INFINITY;
        }
        s[nt][e] = x;
      }
    }

    // Online softmax per row; a row's values are spread over the 4 lanes of a quad.
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float ref = mx == -INFINITY ? 0.0f : mx;  // nothing visible yet: keep p and alpha at 0
      alpha[r] = exp2f(m_run[r] - ref);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - ref);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - ref);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;  // this lane's part of the row sum
      m_run[r] = mx;
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    cp_async_wait_all();  // V_j
    __syncthreads();      // every warp is done with K_j
    if (j + 1 < n_blocks) {
      load_tile<D>(sK, k, p.skn, n0 + kBlockN, p.S);
      cp_async_commit();
    }

    // O += P V_j: the C fragments of S are the A fragments of P.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV + swizzle<kChunks>(kk * 16 + (mi & 1) * 8 + rr, dp * 2 + (mi >> 1)));
        mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
        mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
    cp_async_wait_all();  // K_{j+1}
    __syncthreads();      // every warp is done with V_j
  }

  // Normalize, stage O in shared memory (sQ), write 16-byte rows; LSE from lane t == 0.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l == 0.0f ? 0.0f : __fdividef(1.0f, l);  // a row that saw no key gives 0, as torch; NaN stays
    const int row = row_a + r * 8;
    if (t == 0 && row < p.L) {
      p.lse[int64_t(bh) * p.L + row] = l == 0.0f ? -INFINITY : m_run[r] + log2f(l);
    }
  }
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp * 16 + g + r * 8;
      *reinterpret_cast<uint32_t*>(sQ + swizzle<kChunks>(row, dt) + 2 * t) =
          pack2<T>(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
    }
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + (int64_t(bh) * p.L + m0) * D;
#pragma unroll
  for (int i = 0; i < kBlockM * kChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    if (m0 + r < p.L) {
      *reinterpret_cast<uint4*>(out + int64_t(r) * D + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swizzle<kChunks>(r, c));
    }
  }
}

template <typename T, int D>
void launch(const AttnParams& p, int64_t batch_heads) {
  const dim3 grid(static_cast<unsigned>(batch_heads), ceil_div(p.L, kBlockM));
  attention_fwd_kernel<T, D><<<grid, kThreads, 0, stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool attention_head_dim_supported(int64_t d) { return d == 64 || d == 128; }

void attention_fwd(const at::TensorBase& q, const at::TensorBase& k, const at::TensorBase& v,
                   const at::TensorBase& out, const at::TensorBase& lse, bool causal, float scale) {
  AttnParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.data_ptr();
  p.lse = static_cast<float*>(lse.data_ptr());
  p.sqb = q.stride(0), p.sqh = q.stride(1), p.sqm = q.stride(2);
  p.skb = k.stride(0), p.skh = k.stride(1), p.skn = k.stride(2);
  p.svb = v.stride(0), p.svh = v.stride(1), p.svn = v.stride(2);
  p.heads = static_cast<int>(q.size(1));
  p.group = static_cast<int>(q.size(1) / k.size(1));
  p.L = static_cast<int>(q.size(2));
  p.S = static_cast<int>(k.size(2));
  p.scale_log2 = scale * kLog2e;
  p.causal = causal;
  const int64_t batch_heads = q.size(0) * q.size(1);
  const int64_t d = q.size(3);
  TORCH_CHECK(attention_head_dim_supported(d), "gptkern::attention_fwd on CUDA: head dim ", d);
  if (q.scalar_type() == at::ScalarType::BFloat16) {
    d == 64 ? launch<__nv_bfloat16, 64>(p, batch_heads) : launch<__nv_bfloat16, 128>(p, batch_heads);
  } else {
    TORCH_CHECK(q.scalar_type() == at::ScalarType::Half, "gptkern::attention_fwd on CUDA: dtype ",
                q.scalar_type());
    d == 64 ? launch<__half, 64>(p, batch_heads) : launch<__half, 128>(p, batch_heads);
  }
}

}  // namespace gptkern::cuda
