// Row-wise CPU kernels work in fp32: a row is converted into a float buffer, processed with
// at::vec::Vectorized<float>, and converted back.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

// fp32, fp64, bf16 and fp16 inputs (the Python side sends fp32, bf16 and fp16).
#define GPTKERN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace gptkern::cpu {

using Vec = at::vec::Vectorized<float>;

template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {  // bf16 / fp16: 2 float vectors at a time
    using VecR = at::vec::Vectorized<scalar_t>;
    for (; i + VecR::size() <= n; i += VecR::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecR::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + Vec::size());
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void load_row<float>(const float* src, float* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

template <typename scalar_t>
inline void store_row(const float* src, scalar_t* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {  // rounds to nearest even, as static_cast
    using VecR = at::vec::Vectorized<scalar_t>;
    for (; i + VecR::size() <= n; i += VecR::size()) {
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size()))
          .store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

template <>
inline void store_row<float>(const float* src, float* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

// An fp32 view of row ``src``: the row itself when it is fp32, else ``buf`` filled from it.
template <typename scalar_t>
inline const float* float_row(const scalar_t* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    load_row(src, buf, n);
    return buf;
  }
}

// Where to write an fp32 result for row ``dst``: the row itself when it is fp32, else ``buf``
// (then store_row(buf, dst, n)).
template <typename scalar_t>
inline float* float_out(scalar_t* dst, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename scalar_t>
inline void finish_row(const float* buf, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, float>) store_row(buf, dst, n);
}

inline float lane_sum(Vec v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.0f;
  for (int64_t j = 0; j < Vec::size(); ++j) s += lanes[j];
  return s;
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

// y[i] = exp(x[i] - m) for every i (y may be null: only the sum); returns the sum. x and y may alias.
// With m the row's finite max, every x[i] - m lies in [-inf, 0], where ATen's exp_u20 (a polynomial
// within 20 ulp, faster than Sleef's) is exact enough; otherwise Sleef's exp keeps std::exp's NaN and inf.
inline float exp_shifted_sum(const float* x, float* y, int64_t n, float m) {
  constexpr int64_t kW = Vec::size();
  const bool fast = std::isfinite(m);
  const Vec vm(m);
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec shifted = Vec::loadu(x + i) - vm;
    const Vec e = fast ? shifted.exp_u20() : shifted.exp();
    if (y) e.store(y + i);
    acc = acc + e;
  }
  float s = lane_sum(acc);
  for (; i < n; ++i) {
    const float e = std::exp(x[i] - m);
    if (y) y[i] = e;
    s += e;
  }
  return s;
}

}  // namespace gptkern::cpu
