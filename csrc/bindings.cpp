// gptkern._C: loading it registers the CPU kernels (TORCH_LIBRARY / TORCH_LIBRARY_IMPL);
// the module itself only reports how it was built.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.attr("devices") = py::make_tuple("cpu");
#ifdef __VERSION__
  m.attr("compiler") = __VERSION__;
#else
  m.attr("compiler") = "unknown";
#endif
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  py::list simd;
#ifdef __AVX2__
  simd.append("avx2");
#endif
#ifdef __AVX512F__
  simd.append("avx512f");
#endif
  m.attr("simd") = simd;  // compile-time flags; at::vec also dispatches at run time
}
