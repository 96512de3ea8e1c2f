// tests/cuda_emu: kernels with the bugs the emulator must expose (tests/test_cuda_emulated.py).
//   missing_wait:  shared memory read after cp.async without cp.async.wait (the copy may not have
//                  landed: under deferred copies it has not);
//   missing_sync:  each thread reads its neighbour's shared slot without a __syncthreads after the
//                  writes (under forward order the neighbour has not written yet);
//   deadlock:      lane 0 waits at __syncthreads while the other lanes of its warp wait at a shuffle;
//   unwritten_shared: threads 32-63 read shared slots nobody wrote in this block (the previous
//                  launch did: a plain static would still hold its values);
//   mismatched_shuffle: the lanes of a warp shuffle with different lane masks (undefined);
//   misaligned_copy: a 16-byte cp.async from an address that is not 16-byte aligned (faults);
//   too_much_shared: 64 KiB of static shared memory (the limit is 48 KiB);
//   throws:        device code that throws (an emulator error must not abort the process);
//   over_bounds:   64 threads for a kernel of __launch_bounds__(32) (a GPU refuses the launch).
// `out` (64,) fp32 gets what each thread read; the correct kernel would give 1, 2, ..., 64.
// Written as CUDA: emu_build.py rewrites its __shared__ declarations and kernel launches.
#include <torch/library.h>

#include <ATen/core/Tensor.h>

#include <stdexcept>

namespace gptkern::cuda {
namespace {

constexpr int kThreads = 64;

void missing_wait_kernel(const float* src, float* out) {
  __shared__ alignas(16) float tile[kThreads];
  if (threadIdx.x == 0) {
    for (int i = 0; i < kThreads; ++i) tile[i] = -1.0f;
  }
  __syncthreads();
  if (threadIdx.x % 4 == 0) cp_async_16(tile + threadIdx.x, src + threadIdx.x, 16);
  cp_async_commit();
  __syncthreads();  // the bug: no cp_async_wait_all() before it
  out[threadIdx.x] = tile[threadIdx.x];
  cp_async_wait_all();
}

void missing_sync_kernel(float* out) {
  __shared__ float slots[kThreads];
  if (threadIdx.x == 0) {
    for (int i = 0; i < kThreads; ++i) slots[i] = -1.0f;
  }
  __syncthreads();
  slots[threadIdx.x] = float(threadIdx.x + 1);
  // the bug: no __syncthreads() here
  const int next = (threadIdx.x + 1) % kThreads;
  out[next] = slots[next];
}

void unwritten_shared_kernel(float* out, bool write_all) {
  __shared__ float slots[kThreads];
  if (write_all || threadIdx.x < 32) slots[threadIdx.x] = float(threadIdx.x + 1);
  __syncthreads();
  out[threadIdx.x] = slots[threadIdx.x];
}

void mismatched_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), threadIdx.x % 2 ? 1 : 2);
}

void misaligned_copy_kernel(const float* src) {
  __shared__ alignas(16) float tile[kThreads];
  cp_async_16(tile, src + 1, 16);
  cp_async_wait_all();
}

void too_much_shared_kernel(float* out) {
  __shared__ float big[16384];
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

void throwing_kernel() {
  if (threadIdx.x == 5) throw std::runtime_error("thrown by thread 5");
}

__global__ void __launch_bounds__(32) over_bounds_kernel(float* out) { out[threadIdx.x] = 1.0f; }

void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
  }
}

void faulty(const std::string& which, const at::Tensor& src, const at::Tensor& out) {
  TORCH_CHECK(src.numel() == kThreads && out.numel() == kThreads && src.is_contiguous() && out.is_contiguous() &&
              src.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "gptkern_emu::faulty: src and out must be contiguous (64,) float32 tensors");
  const float* s = src.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (which == "missing_wait") {
    missing_wait_kernel<<<1, kThreads>>>(s, o);
  } else if (which == "missing_sync") {
    missing_sync_kernel<<<1, kThreads>>>(o);
  } else if (which == "deadlock") {
    deadlock_kernel<<<1, kThreads>>>(o);
  } else if (which == "mismatched_shuffle") {
    mismatched_shuffle_kernel<<<1, kThreads>>>(o);
  } else if (which == "misaligned_copy") {
    misaligned_copy_kernel<<<1, kThreads>>>(s);
  } else if (which == "too_much_shared") {
    too_much_shared_kernel<<<1, kThreads>>>(o);
  } else if (which == "over_bounds") {
    over_bounds_kernel<<<1, kThreads>>>(o);
  } else if (which == "throws") {
    throwing_kernel<<<1, kThreads>>>();
  } else if (which == "unwritten_shared") {
    unwritten_shared_kernel<<<1, kThreads>>>(o, true);  // fills every slot
    unwritten_shared_kernel<<<1, kThreads>>>(o, false);
  } else {
    TORCH_CHECK(false, "gptkern_emu::faulty: unknown kernel ", which);
  }
}

}  // namespace
}  // namespace gptkern::cuda

TORCH_LIBRARY_FRAGMENT(gptkern_emu, m) {
  m.def("faulty(str which, Tensor src, Tensor(a!) out) -> ()", &gptkern::cuda::faulty);
}
