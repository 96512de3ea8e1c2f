// softmax / log_softmax forward and backward on CUDA, computed in fp32.
// Contiguous rows (inner == 1): a warp per row up to kMaxWarpCols columns, the row held in
// registers; a block per row beyond, looped (an online (max, sum) pass, then a write pass).
// A reduced dim with inner > 1: a thread per (outer, inner) column, coalesced along inner.
// 16-byte vector loads when the rows allow them. NaN and +-inf propagate as in torch.
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace gptkern::cuda {
namespace {

constexpr int kWarpRows = 4;  // rows (one per warp) in a block of the warp kernels
constexpr int kMaxWarpCols = 1024;

// Online softmax state: running max m and sum of exp(x - m).
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ float rescale(float s, float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : s * expf(m_old - m_new);
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = nan_max(a.m, b.m);
  return {m, rescale(a.s, a.m, m) + rescale(b.s, b.m, m)};
}

template <int kVec>
__device__ __forceinline__ void online_add(MaxSum& st, const float (&v)[kVec]) {
  float mx = st.m;
#pragma unroll
  for (int i = 0; i < kVec; ++i) mx = nan_max(mx, v[i]);
  if (mx != st.m) st.s = rescale(st.s, st.m, mx);
  st.m = mx;
  if (mx != -INFINITY) {  // all -inf so far: nothing to add (the row's result is decided at the end)
#pragma unroll
    for (int i = 0; i < kVec; ++i) st.s += expf(v[i] - mx);
  }
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset)};
    st = combine(st, other);
  }
  return st;
}

__device__ __forceinline__ MaxSum block_combine(MaxSum st, float* sm, float* ss) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  st = warp_combine(st);
  if (lane == 0) {
    sm[warp] = st.m;
    ss[warp] = st.s;
  }
  __syncthreads();
  if (warp == 0) {
    MaxSum w = lane < warps ? MaxSum{sm[lane], ss[lane]} : MaxSum{-INFINITY, 0.0f};
    w = warp_combine(w);
    if (lane == 0) {
      sm[32] = w.m;
      ss[32] = w.s;
    }
  }
  __syncthreads();
  return {sm[32], ss[32]};
}

// y = softmax(v) or log_softmax(v) given the row's max m and sum s of exp(v - m).
// log_softmax as (v - m) - log(s): v - (m + log(s)) would round log(s) away when |m| is large.
__device__ __forceinline__ float softmax_value(float v, float m, float inv_s, float log_s, bool log) {
  return log ? (v - m) - log_s : expf(v - m) * inv_s;
}

// ---------------------------------------------------------------------------------- forward

template <typename in_t, typename out_t, int kVec, int kPerLane>
__global__ void __launch_bounds__(32 * kWarpRows)
    softmax_fwd_warp_kernel(const in_t* __restrict__ x,  // (rows, n)
                            out_t* __restrict__ y,       // (rows, n)
                            int64_t rows, int n, bool log) {
  constexpr int kIters = kPerLane / kVec;
  const int64_t row = int64_t(blockIdx.x) * kWarpRows + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  x += row * n;
  y += row * n;
  float v[kIters][kVec];
  float m = -INFINITY;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < n) {
      load_floats<in_t, kVec>(x + col, v[it]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[it][i] = -INFINITY;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) m = nan_max(m, v[it][i]);
  }
  m = warp_reduce(m, Max());
  float s = 0.0f;  // padding is -inf: exp gives 0 unless the row is all -inf (then NaN, as torch)
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) s += expf(v[it][i] - m);
  }
  s = warp_reduce(s, Sum());
  const float inv_s = __fdividef(1.0f, s), log_s = logf(s);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < n) {
      float out[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = softmax_value(v[it][i], m, inv_s, log_s, log);
      store_floats<out_t, kVec>(y + col, out);
    }
  }
}

template <typename in_t, typename out_t, int kVec>
__global__ void __launch_bounds__(1024)
    softmax_fwd_block_kernel(const in_t* __restrict__ x,  // (rows, n)
                             out_t* __restrict__ y,       // (rows, n)
                             int n, bool log) {
  __shared__ float sm[33], ss[33];
  const int64_t row = blockIdx.x;
  x += row * n;
  y += row * n;
  const int step = blockDim.x * kVec;
  MaxSum st{-INFINITY, 0.0f};
  for (int col = threadIdx.x * kVec; col < n; col += step) {
    float v[kVec];
    load_floats<in_t, kVec>(x + col, v);
    online_add(st, v);
  }
  st = block_combine(st, sm, ss);
  const float inv_s = __fdividef(1.0f, st.s), log_s = logf(st.s);
  for (int col = threadIdx.x * kVec; col < n; col += step) {
    float v[kVec];
    load_floats<in_t, kVec>(x + col, v);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = softmax_value(v[i], st.m, inv_s, log_s, log);
    store_floats<out_t, kVec>(y + col, v);
  }
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(256)
    softmax_fwd_strided_kernel(const in_t* __restrict__ x,  // (outer, n, inner)
                               out_t* __restrict__ y,       // (outer, n, inner)
                               int64_t outer, int64_t n, int64_t inner, bool log) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= outer * inner) return;
  const int64_t base = (idx / inner) * n * inner + idx % inner;
  MaxSum st{-INFINITY, 0.0f};
  for (int64_t j = 0; j < n; ++j) {
    const float v[1] = {to_float(x[base + j * inner])};
    online_add(st, v);
  }
  const float inv_s = __fdividef(1.0f, st.s), log_s = logf(st.s);
  for (int64_t j = 0; j < n; ++j) {
    y[base + j * inner] = from_float<out_t>(softmax_value(to_float(x[base + j * inner]), st.m, inv_s, log_s, log));
  }
}

// --------------------------------------------------------------------------------- backward
// softmax: dx = y * (g - sum(g * y)); log_softmax: dx = g - exp(y) * sum(g).

__device__ __forceinline__ float bwd_term(float g, float y, bool log) { return log ? g : g * y; }
__device__ __forceinline__ float bwd_value(float g, float y, float total, bool log) {
  return log ? g - expf(y) * total : y * (g - total);
}

template <typename T, int kVec, int kPerLane>
__global__ void __launch_bounds__(32 * kWarpRows)
    softmax_bwd_warp_kernel(const T* __restrict__ dy,  // (rows, n)
                            const T* __restrict__ y,   // (rows, n)
                            T* __restrict__ dx,        // (rows, n)
                            int64_t rows, int n, bool log) {
  constexpr int kIters = kPerLane / kVec;
  const int64_t row = int64_t(blockIdx.x) * kWarpRows + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const int64_t offset = row * n;
  float g[kIters][kVec], o[kIters][kVec];
  float total = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < n) {
      load_floats<T, kVec>(dy + offset + col, g[it]);
      load_floats<T, kVec>(y + offset + col, o[it]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) total += bwd_term(g[it][i], o[it][i], log);
    }
  }
  total = warp_reduce(total, Sum());
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * 32 + lane) * kVec;
    if (col < n) {
      float out[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = bwd_value(g[it][i], o[it][i], total, log);
      store_floats<T, kVec>(dx + offset + col, out);
    }
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(1024)
    softmax_bwd_block_kernel(const T* __restrict__ dy,  // (rows, n)
                             const T* __restrict__ y,   // (rows, n)
                             T* __restrict__ dx,        // (rows, n)
                             int n, bool log) {
  __shared__ float scratch[33];
  const int64_t offset = int64_t(blockIdx.x) * n;
  const int step = blockDim.x * kVec;
  float total = 0.0f;
  for (int col = threadIdx.x * kVec; col < n; col += step) {
    float g[kVec], o[kVec];
    load_floats<T, kVec>(dy + offset + col, g);
    load_floats<T, kVec>(y + offset + col, o);
#pragma unroll
    for (int i = 0; i < kVec; ++i) total += bwd_term(g[i], o[i], log);
  }
  total = block_reduce(total, Sum(), scratch);
  for (int col = threadIdx.x * kVec; col < n; col += step) {
    float g[kVec], o[kVec];
    load_floats<T, kVec>(dy + offset + col, g);
    load_floats<T, kVec>(y + offset + col, o);
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[i] = bwd_value(g[i], o[i], total, log);
    store_floats<T, kVec>(dx + offset + col, g);
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    softmax_bwd_strided_kernel(const T* __restrict__ dy,  // (outer, n, inner)
                               const T* __restrict__ y,   // (outer, n, inner)
                               T* __restrict__ dx,        // (outer, n, inner)
                               int64_t outer, int64_t n, int64_t inner, bool log) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= outer * inner) return;
  const int64_t base = (idx / inner) * n * inner + idx % inner;
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) total += bwd_term(to_float(dy[base + j * inner]), to_float(y[base + j * inner]), log);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t at = base + j * inner;
    dx[at] = from_float<T>(bwd_value(to_float(dy[at]), to_float(y[at]), total, log));
  }
}

// ---------------------------------------------------------------------------------- launch

template <typename in_t, typename out_t, int kVec>
void launch_fwd_rows(const in_t* x, out_t* y, int64_t rows, int n, bool log) {
  if (n <= kMaxWarpCols) {
    with_per_lane<kVec>(n, [&](auto per) {
      softmax_fwd_warp_kernel<in_t, out_t, kVec, decltype(per)::value>
          <<<ceil_div(rows, kWarpRows), dim3(32, kWarpRows), 0, stream()>>>(x, y, rows, n, log);
    });
  } else {
    const unsigned grid = static_cast<unsigned>(rows);
    softmax_fwd_block_kernel<in_t, out_t, kVec><<<grid, block_threads(n, kVec), 0, stream()>>>(x, y, n, log);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kVec>
void launch_bwd_rows(const T* dy, const T* y, T* dx, int64_t rows, int n, bool log) {
  if (n <= kMaxWarpCols) {
    with_per_lane<kVec>(n, [&](auto per) {
      softmax_bwd_warp_kernel<T, kVec, decltype(per)::value>
          <<<ceil_div(rows, kWarpRows), dim3(32, kWarpRows), 0, stream()>>>(dy, y, dx, rows, n, log);
    });
  } else {
    const unsigned grid = static_cast<unsigned>(rows);
    softmax_bwd_block_kernel<T, kVec><<<grid, block_threads(n, kVec), 0, stream()>>>(dy, y, dx, n, log);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool vec_ok(const void* p, int64_t n, int vec, int64_t elem_size) {
  return n % vec == 0 && reinterpret_cast<uintptr_t>(p) % (vec * elem_size) == 0;
}

void check_sizes(int64_t n) {
  TORCH_CHECK(n < (int64_t(1) << 30), "gptkern CUDA softmax: the reduced dim has ", n,
              " elements; at most 2**30 are supported");
}

template <typename in_t, typename out_t>
void fwd_typed(const at::TensorBase& x, const at::TensorBase& y, int64_t outer, int64_t n, int64_t inner,
               bool log) {
  if constexpr (std::is_same_v<in_t, out_t> || std::is_same_v<out_t, float>) {
    const auto* xp = static_cast<const in_t*>(x.const_data_ptr());
    auto* yp = static_cast<out_t*>(y.data_ptr());
    if (inner == 1) {
      constexpr int kVec = 16 / sizeof(in_t);
      if (vec_ok(xp, n, kVec, sizeof(in_t)) && vec_ok(yp, n, kVec, sizeof(out_t))) {
        launch_fwd_rows<in_t, out_t, kVec>(xp, yp, outer, int(n), log);
      } else {
        launch_fwd_rows<in_t, out_t, 1>(xp, yp, outer, int(n), log);
      }
    } else {
      softmax_fwd_strided_kernel<in_t, out_t>
          <<<ceil_div(outer * inner, 256), 256, 0, stream()>>>(xp, yp, outer, n, inner, log);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "gptkern::softmax_fwd on CUDA: out_dtype must be x's dtype or float32, "
                                "got x ", x.scalar_type(), " and out_dtype ", y.scalar_type());
  }
}

}  // namespace

void softmax_fwd(const at::TensorBase& x, const at::TensorBase& y, int64_t outer, int64_t n, int64_t inner,
                 bool log) {
  if (outer * n * inner == 0) return;
  check_sizes(n);
  GPTKERN_CUDA_DISPATCH(x.scalar_type(), "gptkern::softmax_fwd (x)", [&] {
    using in_t = scalar_t;
    GPTKERN_CUDA_DISPATCH(y.scalar_type(), "gptkern::softmax_fwd (out_dtype)",
                          [&] { fwd_typed<in_t, scalar_t>(x, y, outer, n, inner, log); });
  });
}

void softmax_bwd(const at::TensorBase& dy, const at::TensorBase& y, const at::TensorBase& dx, int64_t outer,
                 int64_t n, int64_t inner, bool log) {
  if (outer * n * inner == 0) return;
  check_sizes(n);
  GPTKERN_CUDA_DISPATCH(y.scalar_type(), "gptkern::softmax_bwd (out)", [&] {
    const auto* gp = static_cast<const scalar_t*>(dy.const_data_ptr());
    const auto* yp = static_cast<const scalar_t*>(y.const_data_ptr());
    auto* dxp = static_cast<scalar_t*>(dx.data_ptr());
    if (inner == 1) {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = vec_ok(gp, n, kVec, sizeof(scalar_t)) && vec_ok(yp, n, kVec, sizeof(scalar_t)) &&
                       vec_ok(dxp, n, kVec, sizeof(scalar_t));
      if (vec) {
        launch_bwd_rows<scalar_t, kVec>(gp, yp, dxp, outer, int(n), log);
      } else {
        launch_bwd_rows<scalar_t, 1>(gp, yp, dxp, outer, int(n), log);
      }
    } else {
      softmax_bwd_strided_kernel<scalar_t>
          <<<ceil_div(outer * inner, 256), 256, 0, stream()>>>(gp, yp, dxp, outer, n, inner, log);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace gptkern::cuda
