// gptkern._C: loading it registers the kernels (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); the module
// itself only reports how it was built.
#include <dlfcn.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <locale>
#include <string>

#ifdef GPTKERN_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define GPTKERN_STRINGIFY(...) #__VA_ARGS__
#define GPTKERN_STR(...) GPTKERN_STRINGIFY(__VA_ARGS__)

namespace py = pybind11;

#if defined(CPU_CAPABILITY_AVX512)
#define GPTKERN_CPU_CAPABILITY_NAME "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#define GPTKERN_CPU_CAPABILITY_NAME "avx2"
#else
#define GPTKERN_CPU_CAPABILITY_NAME "default"
#endif

// Read from the file before it is loaded (gptkern._build.built_capability): loading a build for SIMD
// the CPU lacks would die of SIGILL in its static initializers.
extern "C" __attribute__((used, visibility("default"))) const char gptkern_cpu_capability_tag[] =
    "gptkern-cpu-capability=" GPTKERN_CPU_CAPABILITY_NAME;

// The file holding the code at addr ("" if unknown).
static std::string file_of(const void* addr) {
  Dl_info info{};
  return dladdr(addr, &info) && info.dli_fname ? info.dli_fname : "";
}

// Whether the file `self` defines `symbol` itself: dlsym on its own handle looks there first,
// whatever was loaded into the global scope before it.
static bool defines(const std::string& self, const char* symbol) {
  void* handle = dlopen(self.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return false;
  const void* addr = dlsym(handle, symbol);
  const bool own = addr != nullptr && file_of(addr) == self;
  dlclose(handle);
  return own;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The C++ runtime this module calls: the shared libstdc++ torch uses, or this file itself when
  // the compiler linked libstdc++ statically. Such a second runtime mixes with torch's and crashed
  // formatting a number into an error message (an H200 image whose CXX linked it so).
  // Both ways: the address this module calls (bound to its own copy under -Bsymbolic-functions),
  // and the definition its own handle finds (a copy that a libstdc++ already loaded globally
  // shadows in the first check).
  const std::string runtime = file_of(reinterpret_cast<const void*>(&std::locale::classic));
  const std::string self = file_of(gptkern_cpu_capability_tag);
  m.attr("cxx_runtime") = runtime;
  m.attr("cxx_runtime_private") =
      !self.empty() && (runtime == self || defines(self, "_ZNSt6locale7classicEv"));
#ifdef GPTKERN_WITH_CUDA
  m.attr("devices") = py::make_tuple("cpu", "cuda");
  m.attr("cuda_version") = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  py::list archs;  // GPTKERN_CUDA_ARCHS: the -gencode targets, e.g. sm_80,sm_90
  std::string names = GPTKERN_STR(GPTKERN_CUDA_ARCHS);
  for (size_t start = 0; start <= names.size();) {
    const size_t end = std::min(names.find(',', start), names.size());
    if (end > start) archs.append(names.substr(start, end - start));
    start = end + 1;
  }
  m.attr("cuda_archs") = py::tuple(archs);
#else
  m.attr("devices") = py::make_tuple("cpu");
  m.attr("cuda_version") = py::none();
  m.attr("cuda_archs") = py::tuple();
#endif
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
  m.attr("simd") = simd;  // compile-time flags: at::vec is compiled for one capability
  m.attr("cpu_capability") = GPTKERN_CPU_CAPABILITY_NAME;
}
