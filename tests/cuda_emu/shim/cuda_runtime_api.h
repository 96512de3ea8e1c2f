// tests/cuda_emu: the few CUDA runtime names the launchers use.
#pragma once

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = gptkern_emu::config.multiprocessors;
  return cudaSuccess;
}
