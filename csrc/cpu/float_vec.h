// Shared by the CPU kernels: at::vec over fp32, with 16-bit rows converted to pairs of fp32
// vectors in registers (FloatPairs) and back; the dtype dispatch macros.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "huge_pages.h"

// fp32, fp64, bf16 and fp16 inputs (the Python side sends fp32, bf16 and fp16).
#define GPTKERN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
// fp32, bf16 and fp16 only; others raise NotImplementedError naming the dtype.
#define GPTKERN_DISPATCH_16_32(TYPE, NAME, ...) \
  AT_DISPATCH_V2(TYPE, NAME, AT_WRAP(__VA_ARGS__), at::kFloat, at::kBFloat16, at::kHalf)

namespace gptkern::cpu {

using Vec = at::vec::Vectorized<float>;

// The dtype rule of GPTKERN_DISPATCH_16_32, for calls that may skip the dispatch (empty inputs).
inline void check_16_32(at::ScalarType type, const char* what) {
  TORCH_CHECK_NOT_IMPLEMENTED(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, what,
                              ": not implemented for '", c10::toString(type), "' (float32, bfloat16, float16)");
}

// A row of fp32, bf16 or fp16 read and written as pairs of fp32 vectors, converted in registers:
// kStep = 2 * Vec::size() elements a step (one Vectorized<bf16 / fp16>).
template <typename scalar_t>
struct FloatPairs {
  static constexpr int64_t kStep = 2 * Vec::size();
  static_assert(std::is_same_v<scalar_t, float> || at::vec::Vectorized<scalar_t>::size() == kStep);

  static std::pair<Vec, Vec> load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return {Vec::loadu(p), Vec::loadu(p + Vec::size())};
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
      return {lo, hi};
    }
  }

  static void store(scalar_t* p, Vec lo, Vec hi) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      lo.store(p);
      hi.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    }
  }
};

inline float lane_sum(Vec v) {  // by shuffles, log2(lanes) steps
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

}  // namespace gptkern::cpu
