// tests/cuda_emu: CUDA's __half on the CPU, converted through c10::Half (round to nearest even).
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

struct __half {
  uint16_t x;
};
struct __half2 {
  __half x, y;  // x in the low 16 bits, as in a register
};

inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }
inline __half __float2half_rn(float f) { return __half{c10::Half(f).x}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
