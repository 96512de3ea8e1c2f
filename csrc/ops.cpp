// The dispatcher boundary: one schema per op. Implementations register per device in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(gptkern, CPU, m)); the Python side adds the fake
// (meta) and autograd registrations (gptkern/ops/cpu_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(gptkern, m) {
  // softmax or log-softmax of x along dim, computed in fp32, returned in out_dtype.
  m.def("softmax_fwd(Tensor x, int dim, bool log, ScalarType out_dtype) -> Tensor");
  // gradient w.r.t. the input of softmax_fwd, in out's dtype.
  m.def("softmax_bwd(Tensor grad_out, Tensor out, int dim, bool log) -> Tensor");
  // layer/rms norm over the last k dims: (y, mean, rstd), mean/rstd fp32 of x.shape[:-k].
  m.def("norm_fwd(Tensor x, int k, Tensor? weight, Tensor? bias, float eps, bool is_rms)"
        " -> (Tensor, Tensor, Tensor)");
  // (dx, dw, db); dw / db are empty (0,) tensors when not asked for.
  m.def("norm_bwd(Tensor grad_out, Tensor x, int k, Tensor? weight, Tensor? bias, Tensor mean,"
        " Tensor rstd, bool is_rms, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
}
