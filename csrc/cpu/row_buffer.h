// Row-wise CPU kernels work in fp32: a row is converted into a float buffer, processed with
// at::vec::Vectorized<float>, and converted back.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <vector>

// fp32, fp64, bf16 and fp16 inputs (the Python side sends fp32, bf16 and fp16).
#define GPTKERN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace gptkern::cpu {

using Vec = at::vec::Vectorized<float>;

template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void load_row<float>(const float* src, float* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

template <typename scalar_t>
inline void store_row(const float* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

template <>
inline void store_row<float>(const float* src, float* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

inline float vec_sum(const float* x, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x, n);
}

inline float vec_max(const float* x, int64_t n) {
  // NaN-propagating, as torch.max: a NaN anywhere gives NaN (at::vec::maximum propagates it).
  constexpr int64_t kW = Vec::size();
  Vec vm(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vm = at::vec::maximum(vm, Vec::loadu(x + i));
  float lanes[kW];
  vm.store(lanes);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < kW; ++j) {
    if (std::isnan(lanes[j])) return lanes[j];
    m = std::max(m, lanes[j]);
  }
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return x[i];
    m = std::max(m, x[i]);
  }
  return m;
}

// y[i] = exp(x[i] - m) for every i; returns the sum of y. x and y may alias.
inline float exp_shifted_sum(const float* x, float* y, int64_t n, float m) {
  constexpr int64_t kW = Vec::size();
  const Vec vm(m);
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    Vec e = (Vec::loadu(x + i) - vm).exp();  // Sleef: NaN and inf as std::exp
    e.store(y + i);
    acc = acc + e;
  }
  float lanes[kW];
  acc.store(lanes);
  float s = 0.0f;
  for (int64_t j = 0; j < kW; ++j) s += lanes[j];
  for (; i < n; ++i) {
    y[i] = std::exp(x[i] - m);
    s += y[i];
  }
  return s;
}

}  // namespace gptkern::cpu
