// LayerNorm / RMSNorm forward and backward on CUDA, computed in fp32.
// Rows of up to kMaxWarpCols: a warp per row, held in registers (two-pass mean / variance);
// longer rows: a block per row, looped (Welford statistics, then a write pass).
// dW / dB in two deterministic stages: per group of rows, a column-tile kernel sums
// dy * xhat and dy into fp32 partials (no atomics); a second kernel adds the partials of each
// column in group order. The groups depend on the row count only: bit-reproducible results.
#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace gptkern::cuda {
namespace {

constexpr int kWarpRows = 4;
constexpr int kMaxWarpCols = 1024;

template <int kVec>
__device__ __forceinline__ void load_params(const float* p, int col, float fill, float (&out)[kVec]) {
  if (p) {
    load_floats<float, kVec>(p + col, out);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = fill;
  }
}

// ---------------------------------------------------------------------------------- forward

template <typename T, int kVec, int kPerLane>
__global__ void __launch_bounds__(32 * kWarpRows)
    norm_fwd_warp_kernel(const T* __restrict__ x,      // (rows, n)
                         const float* __restrict__ w,  // (n,) or null
                         const float* __restrict__ b,  // (n,) or null
                         T* __restrict__ y,            // (rows, n)
                         float* __restrict__ mean,     // (rows,)
                         float* __restrict__ rstd,     // (rows,)
                         int64_t rows, int n, float inv_n, float eps, bool is_rms) {
  constexpr int kIters = kPerLane / kVec;
  const int64_t row = int64_t(blockIdx.x) * kWarpRows + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const int64_t offset = row * n;
  float v[kIters][kVec];
  // the mean of x - x[0], plus x[0]: exact for a constant row (rstd ~ 1/sqrt(eps) would amplify
  // any rounding of its mean), close for a near-constant one
  const float x0 = is_rms ? 0.0f : to_float(x[offset]);
  float sum = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < n) {
      load_floats<T, kVec>(x + offset + col, v[it]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum += v[it][i] - x0;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[it][i] = 0.0f;
    }
  }
  const float mu = is_rms ? 0.0f : x0 + warp_reduce(sum, Sum()) * inv_n;
  float sq = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
#pragma unroll
    for (int i = 0; i < kVec; ++i) sq += col < n ? (v[it][i] - mu) * (v[it][i] - mu) : 0.0f;
  }
  const float rs = rsqrtf(warp_reduce(sq, Sum()) * inv_n + eps);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < n) {
      float wv[kVec], bv[kVec];
      load_params<kVec>(w, col, 1.0f, wv);
      load_params<kVec>(b, col, 0.0f, bv);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[it][i] = (v[it][i] - mu) * rs * wv[i] + bv[i];
      store_floats<T, kVec>(y + offset + col, v[it]);
    }
  }
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Welford state: count, mean and sum of squared deviations.
struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford merge(Welford a, Welford b) {
  const float count = a.n + b.n;
  if (count == 0.0f) return a;
  const float delta = b.mean - a.mean, frac = __fdividef(b.n, count);
  return {count, a.mean + delta * frac, a.m2 + b.m2 + delta * delta * a.n * frac};
}

__device__ __forceinline__ Welford warp_merge(Welford st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford o{__shfl_xor_sync(0xffffffffu, st.n, offset), __shfl_xor_sync(0xffffffffu, st.mean, offset),
              __shfl_xor_sync(0xffffffffu, st.m2, offset)};
    st = merge(st, o);
  }
  return st;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(1024)
    norm_fwd_block_kernel(const T* __restrict__ x,      // (rows, n)
                          const float* __restrict__ w,  // (n,) or null
                          const float* __restrict__ b,  // (n,) or null
                          T* __restrict__ y,            // (rows, n)
                          float* __restrict__ mean,     // (rows,)
                          float* __restrict__ rstd,     // (rows,)
                          int n, float inv_n, float eps, bool is_rms) {
  __shared__ float sn[32], smean[32], sm2[32];
  const int64_t row = blockIdx.x;
  const int64_t offset = row * n;
  const int step = blockDim.x * kVec;
  // RMSNorm: the Welford mean stays 0 and m2 sums x * x.
  Welford st{0.0f, 0.0f, 0.0f};
  for (int col = threadIdx.x * kVec; col < n; col += step) {
    float v[kVec];
    load_floats<T, kVec>(x + offset + col, v);
    float cm = 0.0f, cm2 = 0.0f;
    if (!is_rms) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) cm += v[i];
      cm *= 1.0f / kVec;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) cm2 += (v[i] - cm) * (v[i] - cm);
    st = merge(st, Welford{float(kVec), cm, cm2});
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  st = warp_merge(st);
  if (lane == 0) {
    sn[warp] = st.n;
    smean[warp] = st.mean;
    sm2[warp] = st.m2;
  }
  __syncthreads();
  Welford total{0.0f, 0.0f, 0.0f};
  for (int i = 0; i < int(blockDim.x >> 5); ++i) total = merge(total, Welford{sn[i], smean[i], sm2[i]});
  const float mu = total.mean, rs = rsqrtf(total.m2 * inv_n + eps);
  for (int col = threadIdx.x * kVec; col < n; col += step) {
    float v[kVec], wv[kVec], bv[kVec];
    load_floats<T, kVec>(x + offset + col, v);
    load_params<kVec>(w, col, 1.0f, wv);
    load_params<kVec>(b, col, 0.0f, bv);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = (v[i] - mu) * rs * wv[i] + bv[i];
    store_floats<T, kVec>(y + offset + col, v);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// --------------------------------------------------------------------------------- backward
// xhat = (x - mean) * rstd, g = w * dy, c1 = mean(xhat * g), c2 = mean(g) (0 for RMSNorm):
// dx = (g - (xhat * c1 + c2)) * rstd.

template <typename T, int kVec, int kPerLane>
__global__ void __launch_bounds__(32 * kWarpRows)
    norm_bwd_dx_warp_kernel(const T* __restrict__ dy,         // (rows, n)
                            const T* __restrict__ x,          // (rows, n)
                            const float* __restrict__ w,      // (n,) or null
                            const float* __restrict__ mean,   // (rows,)
                            const float* __restrict__ rstd,   // (rows,)
                            T* __restrict__ dx,               // (rows, n)
                            int64_t rows, int n, float inv_n, bool is_rms) {
  constexpr int kIters = kPerLane / kVec;
  const int64_t row = int64_t(blockIdx.x) * kWarpRows + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const int64_t offset = row * n;
  const float mu = mean[row], rs = rstd[row];
  float h[kIters][kVec], g[kIters][kVec];
  float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < n) {
      float wv[kVec];
      load_floats<T, kVec>(x + offset + col, h[it]);
      load_floats<T, kVec>(dy + offset + col, g[it]);
      load_params<kVec>(w, col, 1.0f, wv);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        h[it][i] = (h[it][i] - mu) * rs;
        g[it][i] *= wv[i];
        s1 += h[it][i] * g[it][i];
        s2 += g[it][i];
      }
    }
  }
  const float c1 = warp_reduce(s1, Sum()) * inv_n;
  const float c2 = is_rms ? 0.0f : warp_reduce(s2, Sum()) * inv_n;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < n) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) g[it][i] = (g[it][i] - (h[it][i] * c1 + c2)) * rs;
      store_floats<T, kVec>(dx + offset + col, g[it]);
    }
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(1024)
    norm_bwd_dx_block_kernel(const T* __restrict__ dy,        // (rows, n)
                             const T* __restrict__ x,         // (rows, n)
                             const float* __restrict__ w,     // (n,) or null
                             const float* __restrict__ mean,  // (rows,)
                             const float* __restrict__ rstd,  // (rows,)
                             T* __restrict__ dx,              // (rows, n)
                             int n, float inv_n, bool is_rms) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const int64_t offset = row * n;
  const int step = blockDim.x * kVec;
  const float mu = mean[row], rs = rstd[row];
  float s1 = 0.0f, s2 = 0.0f;
  for (int col = threadIdx.x * kVec; col < n; col += step) {
    float h[kVec], g[kVec], wv[kVec];
    load_floats<T, kVec>(x + offset + col, h);
    load_floats<T, kVec>(dy + offset + col, g);
    load_params<kVec>(w, col, 1.0f, wv);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      s1 += (h[i] - mu) * rs * g[i] * wv[i];
      s2 += g[i] * wv[i];
    }
  }
  const float c1 = block_reduce(s1, Sum(), scratch) * inv_n;
  const float c2 = is_rms ? 0.0f : block_reduce(s2, Sum(), scratch) * inv_n;
  for (int col = threadIdx.x * kVec; col < n; col += step) {
    float h[kVec], g[kVec], wv[kVec];
    load_floats<T, kVec>(x + offset + col, h);
    load_floats<T, kVec>(dy + offset + col, g);
    load_params<kVec>(w, col, 1.0f, wv);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float gw = g[i] * wv[i];
      g[i] = (gw - ((h[i] - mu) * rs * c1 + c2)) * rs;
    }
    store_floats<T, kVec>(dx + offset + col, g);
  }
}

// Stage 1 of dW / dB. Grid (column tiles of 32 * kCols, groups); block (32, kPartRows): thread
// (tx, ty) sums rows ty, ty + kPartRows, ... of its group for its kCols columns; the kPartRows
// sums are then added in ty order. With kVec > 1 (aligned rows) a thread's columns are kVec
// contiguous ones, read as one 16-byte vector of each tensor a row; else two columns 32 apart.
constexpr int kPartRows = 8;

template <int kVec>
constexpr int part_cols() { return kVec > 1 ? kVec : 2; }

template <typename T, int kVec>
__global__ void __launch_bounds__(32 * kPartRows)
    norm_bwd_partials_kernel(const T* __restrict__ dy,        // (rows, n)
                             const T* __restrict__ x,         // (rows, n)
                             const float* __restrict__ mean,  // (rows,)
                             const float* __restrict__ rstd,  // (rows,)
                             float* __restrict__ dw_part,     // (groups, n) or null
                             float* __restrict__ db_part,     // (groups, n) or null
                             int64_t rows, int n, int64_t rows_per_group) {
  constexpr int kCols = part_cols<kVec>();
  constexpr int kTile = 32 * kCols;
  __shared__ float sw[kPartRows][kTile + 1], sb[kPartRows][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t group = blockIdx.y;
  const int64_t r0 = group * rows_per_group, r1 = min(rows, r0 + rows_per_group);
  const int tile0 = blockIdx.x * kTile;
  // column c of this thread: its index in the tile
  auto slot = [&](int c) { return kVec > 1 ? tx * kVec + c : tx + 32 * c; };
  float accw[kCols] = {}, accb[kCols] = {};
  for (int64_t r = r0 + ty; r < r1; r += kPartRows) {
    const float mu = mean[r], rs = rstd[r];
    float g[kCols], h[kCols];
    if constexpr (kVec > 1) {
      const int col = tile0 + tx * kVec;
      if (col >= n) continue;  // n is a multiple of kVec: a vector is whole or out
      load_floats<T, kVec>(dy + r * n + col, g);
      load_floats<T, kVec>(x + r * n + col, h);
    } else {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = tile0 + slot(c);
        g[c] = col < n ? to_float(dy[r * n + col]) : 0.0f;
        h[c] = col < n ? to_float(x[r * n + col]) : 0.0f;
      }
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      accw[c] += g[c] * (h[c] - mu) * rs;
      accb[c] += g[c];
    }
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    sw[ty][slot(c)] = accw[c];
    sb[ty][slot(c)] = accb[c];
  }
  __syncthreads();
  // Thread (tx, ty) adds up the kPartRows sums of tile columns ty * 32 + tx, + 256, ...
  for (int t = ty * 32 + tx; t < kTile; t += 32 * kPartRows) {
    const int col = tile0 + t;
    if (col >= n) continue;
    float tw = 0.0f, tb = 0.0f;
#pragma unroll
    for (int i = 0; i < kPartRows; ++i) {
      tw += sw[i][t];
      tb += sb[i][t];
    }
    if (dw_part) dw_part[group * n + col] = tw;
    if (db_part) db_part[group * n + col] = tb;
  }
}

// Stage 2: block (32, kPartRows); thread (tx, ty) adds groups ty, ty + kPartRows, ... of column
// 32 * blockIdx.x + tx (kPartRows loads of a column in flight at once, not one), then the
// kPartRows sums are added in ty order.
template <typename T>
__global__ void __launch_bounds__(32 * kPartRows) sum_partials_kernel(const float* __restrict__ part,  // (groups, n)
                                                                      T* __restrict__ out,             // (n,)
                                                                      int64_t groups, int64_t n) {
  __shared__ float sums[kPartRows][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * 32 + tx;
  float acc = 0.0f;
  if (col < n) {
    for (int64_t g = ty; g < groups; g += kPartRows) acc += part[g * n + col];
  }
  sums[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < n) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kPartRows; ++i) total += sums[i][tx];
    out[col] = from_float<T>(total);
  }
}

// ---------------------------------------------------------------------------------- launch

bool vec_ok(const void* p, int64_t n, int vec, int64_t elem_size) {
  return p == nullptr || (n % vec == 0 && reinterpret_cast<uintptr_t>(p) % (vec * elem_size) == 0);
}

const float* float_ptr(const at::TensorBase& t) {
  return t.defined() ? static_cast<const float*>(t.const_data_ptr()) : nullptr;
}

void check_sizes(int64_t n) {
  TORCH_CHECK(n < (int64_t(1) << 30), "gptkern CUDA norms: the normalized shape has ", n,
              " elements; at most 2**30 are supported");
}

}  // namespace

void norm_fwd(const at::TensorBase& x, const at::TensorBase& w, const at::TensorBase& b, const at::TensorBase& y,
              const at::TensorBase& mean, const at::TensorBase& rstd, int64_t rows, int64_t n, float eps,
              bool is_rms) {
  if (rows * n == 0) return;
  check_sizes(n);
  const float inv_n = float(1.0 / double(n));
  GPTKERN_CUDA_DISPATCH(x.scalar_type(), "gptkern::norm_fwd (x)", [&] {
    const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    auto* yp = static_cast<scalar_t*>(y.data_ptr());
    const float *wp = float_ptr(w), *bp = float_ptr(b);
    auto* mp = static_cast<float*>(mean.data_ptr());
    auto* rp = static_cast<float*>(rstd.data_ptr());
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = vec_ok(xp, n, kVec, sizeof(scalar_t)) && vec_ok(yp, n, kVec, sizeof(scalar_t)) &&
                     vec_ok(wp, n, kVec, 4) && vec_ok(bp, n, kVec, 4);
    auto launch = [&](auto vec_c) {
      constexpr int V = decltype(vec_c)::value;
      if (n <= kMaxWarpCols) {
        with_per_lane<V>(int(n), [&](auto per) {
          norm_fwd_warp_kernel<scalar_t, V, decltype(per)::value>
              <<<ceil_div(rows, kWarpRows), dim3(32, kWarpRows), 0, stream()>>>(xp, wp, bp, yp, mp, rp, rows,
                                                                                int(n), inv_n, eps, is_rms);
        });
      } else {
        norm_fwd_block_kernel<scalar_t, V><<<static_cast<unsigned>(rows), block_threads(int(n), V), 0, stream()>>>(
            xp, wp, bp, yp, mp, rp, int(n), inv_n, eps, is_rms);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>());
    } else {
      launch(std::integral_constant<int, 1>());
    }
  });
}

void norm_bwd_dx(const at::TensorBase& dy, const at::TensorBase& x, const at::TensorBase& w,
                 const at::TensorBase& mean, const at::TensorBase& rstd, const at::TensorBase& dx, int64_t rows,
                 int64_t n, bool is_rms) {
  if (rows * n == 0) return;
  check_sizes(n);
  const float inv_n = float(1.0 / double(n));
  GPTKERN_CUDA_DISPATCH(x.scalar_type(), "gptkern::norm_bwd (x)", [&] {
    const auto* gp = static_cast<const scalar_t*>(dy.const_data_ptr());
    const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    auto* dxp = static_cast<scalar_t*>(dx.data_ptr());
    const float *wp = float_ptr(w), *mp = float_ptr(mean), *rp = float_ptr(rstd);
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = vec_ok(gp, n, kVec, sizeof(scalar_t)) && vec_ok(xp, n, kVec, sizeof(scalar_t)) &&
                     vec_ok(dxp, n, kVec, sizeof(scalar_t)) && vec_ok(wp, n, kVec, 4);
    auto launch = [&](auto vec_c) {
      constexpr int V = decltype(vec_c)::value;
      if (n <= kMaxWarpCols) {
        with_per_lane<V>(int(n), [&](auto per) {
          norm_bwd_dx_warp_kernel<scalar_t, V, decltype(per)::value>
              <<<ceil_div(rows, kWarpRows), dim3(32, kWarpRows), 0, stream()>>>(gp, xp, wp, mp, rp, dxp, rows,
                                                                                int(n), inv_n, is_rms);
        });
      } else {
        norm_bwd_dx_block_kernel<scalar_t, V><<<static_cast<unsigned>(rows), block_threads(int(n), V), 0,
                                                stream()>>>(gp, xp, wp, mp, rp, dxp, int(n), inv_n, is_rms);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>());
    } else {
      launch(std::integral_constant<int, 1>());
    }
  });
}

int64_t norm_groups(int64_t rows) { return std::clamp<int64_t>((rows + 31) / 32, 1, 128); }

void norm_bwd_partials(const at::TensorBase& dy, const at::TensorBase& x, const at::TensorBase& mean,
                       const at::TensorBase& rstd, const at::TensorBase& dw_part, const at::TensorBase& db_part,
                       int64_t rows, int64_t n, bool is_rms) {
  (void)is_rms;  // dw = sum dy * xhat with xhat = x * rstd (mean 0) for RMSNorm: the same formula
  if (rows * n == 0 || (!dw_part.defined() && !db_part.defined())) return;
  check_sizes(n);
  const int64_t groups = norm_groups(rows);
  const int64_t per_group = (rows + groups - 1) / groups;
  GPTKERN_CUDA_DISPATCH(x.scalar_type(), "gptkern::norm_bwd (x)", [&] {
    const auto* gp = static_cast<const scalar_t*>(dy.const_data_ptr());
    const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto launch = [&](auto vec_c) {
      constexpr int V = decltype(vec_c)::value;
      norm_bwd_partials_kernel<scalar_t, V><<<dim3(ceil_div(n, 32 * part_cols<V>()), unsigned(groups)),
                                              dim3(32, kPartRows), 0, stream()>>>(
          gp, xp, float_ptr(mean), float_ptr(rstd),
          dw_part.defined() ? static_cast<float*>(dw_part.data_ptr()) : nullptr,
          db_part.defined() ? static_cast<float*>(db_part.data_ptr()) : nullptr, rows, int(n), per_group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec_ok(gp, n, kVec, sizeof(scalar_t)) && vec_ok(xp, n, kVec, sizeof(scalar_t))) {
      launch(std::integral_constant<int, kVec>());
    } else {
      launch(std::integral_constant<int, 1>());
    }
  });
}

void sum_partials(const at::TensorBase& part, const at::TensorBase& out) {
  const int64_t groups = part.size(0), n = part.size(1);
  if (n == 0) return;
  GPTKERN_CUDA_DISPATCH(out.scalar_type(), "gptkern::norm_bwd (weight)", [&] {
    sum_partials_kernel<scalar_t><<<ceil_div(n, 32), dim3(32, kPartRows), 0, stream()>>>(
        static_cast<const float*>(part.const_data_ptr()), static_cast<scalar_t*>(out.data_ptr()), groups, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gptkern::cuda
