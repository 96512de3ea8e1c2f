// tests/cuda_emu: an emulated launch throws on failure, so there is nothing left to check.
#pragma once

#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(EXPR) TORCH_CHECK((EXPR) == cudaSuccess, #EXPR " failed")
