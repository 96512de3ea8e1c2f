// Device helpers shared by the CUDA kernels: native 16-bit types, fp32 conversion, 16-byte
// vectors, NaN-propagating max, warp and block reductions, the dtype switch of the launchers.
#pragma once

#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace gptkern::cuda {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// kVec elements of T in one 16-byte (or smaller, for kVec == 1) load / store.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[kVec]) {
  const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int i = 0; i < kVec; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
}

// max that returns NaN when either side is NaN (torch.max semantics; fmaxf drops NaN).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

struct Sum {
  static constexpr float kIdentity = 0.0f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  static constexpr float kIdentity = -INFINITY;
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
};

// Reduce v over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. ``scratch`` holds 33 floats; the block must not be using it concurrently.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? scratch[lane] : Op::kIdentity;  // lanes past the last warp add nothing
    w = warp_reduce(w, op);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  const float out = scratch[32];
  __syncthreads();  // scratch may be reused right after
  return out;
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Grid sizes: a count of blocks that would not fit grid x (2**31 - 1) raises instead of wrapping.
inline unsigned int ceil_div(int64_t a, int64_t b) {
  const int64_t blocks = (a + b - 1) / b;
  TORCH_CHECK(blocks <= INT32_MAX, "gptkern CUDA launch: ", blocks, " blocks is beyond the grid's 2**31 - 1");
  return static_cast<unsigned int>(blocks);
}

// Row-kernel launch shapes shared by the norm and softmax launchers.
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Calls f(std::integral_constant<int, P>) with P the register row chunk per lane for n columns.
template <int kVec, typename F>
void with_per_lane(int n, F&& f) {
  const int per = std::max<int>(kVec, next_pow2((n + 31) / 32));
  if (per <= 4) {
    f(std::integral_constant<int, (kVec > 4 ? kVec : 4)>());
  } else if (per <= 8) {
    f(std::integral_constant<int, (kVec > 8 ? kVec : 8)>());
  } else if (per <= 16) {
    f(std::integral_constant<int, 16>());
  } else {
    f(std::integral_constant<int, 32>());
  }
}

// Threads per block for a one-block-per-row kernel: about four vectors per thread.
inline int block_threads(int n, int vec) { return std::clamp(next_pow2((n + 4 * vec - 1) / (4 * vec)), 128, 1024); }

}  // namespace gptkern::cuda

// Runs the lambda with `scalar_t` bound to the native CUDA type of TYPE (fp32, fp16, bf16).
#define GPTKERN_CUDA_DISPATCH(TYPE, NAME, ...)                                                   \
  [&] {                                                                                          \
    switch (TYPE) {                                                                              \
      case at::ScalarType::Float: {                                                              \
        using scalar_t = float;                                                                  \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case at::ScalarType::Half: {                                                               \
        using scalar_t = __half;                                                                 \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case at::ScalarType::BFloat16: {                                                           \
        using scalar_t = __nv_bfloat16;                                                          \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      default:                                                                                   \
        TORCH_CHECK_NOT_IMPLEMENTED(false, NAME, ": dtype ", TYPE, " (CUDA kernels take float32, " \
                                    "float16, bfloat16)");                                        \
    }                                                                                            \
  }()
