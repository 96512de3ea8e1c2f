// tests/cuda_emu: the emulator's settings, as ops of the gptkern_emu library (whose other ops are
// csrc/ops.cpp's schemas with csrc/cuda/register.cpp's implementations, on CPU tensors).
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace {

void configure(const std::string& order, bool warps_run_ahead, bool deferred_copies, int64_t seed,
               int64_t multiprocessors) {
  using gptkern_emu::Order;
  if (order == "forward") {
    gptkern_emu::config.order = Order::kForward;
  } else if (order == "reverse") {
    gptkern_emu::config.order = Order::kReverse;
  } else if (order == "random") {
    gptkern_emu::config.order = Order::kRandom;
  } else {
    TORCH_CHECK(false, "gptkern_emu::configure: order must be forward, reverse or random, got ", order);
  }
  gptkern_emu::config.warps_run_ahead = warps_run_ahead;
  gptkern_emu::config.deferred_copies = deferred_copies;
  gptkern_emu::config.seed = static_cast<uint64_t>(seed);
  gptkern_emu::config.multiprocessors = static_cast<int>(multiprocessors);
}

// The launches since the last call, flattened: (grid x, y, z, block x, y, z) each.
std::vector<int64_t> take_launches() {
  std::vector<int64_t> flat;
  for (const auto& l : gptkern_emu::launches) flat.insert(flat.end(), l.begin(), l.end());
  gptkern_emu::launches.clear();
  return flat;
}

// Bytes cp.async read from global memory since the last call.
int64_t take_copied_bytes() {
  const int64_t bytes = gptkern_emu::copied_bytes;
  gptkern_emu::copied_bytes = 0;
  return bytes;
}

// (sectors touched, fewest possible) by warp-wide cp.async reads since the last call.
std::vector<int64_t> take_copy_sectors() {
  std::vector<int64_t> out{gptkern_emu::copy_sectors, gptkern_emu::copy_min_sectors};
  gptkern_emu::copy_sectors = gptkern_emu::copy_min_sectors = 0;
  return out;
}

// ldmatrix's extra wavefronts (bank conflicts) since the last call.
int64_t take_ldmatrix_conflicts() {
  const int64_t extra = gptkern_emu::ldmatrix_extra_wavefronts;
  gptkern_emu::ldmatrix_extra_wavefronts = 0;
  return extra;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptkern_emu, m) {
  m.def("configure(str order, bool warps_run_ahead, bool deferred_copies, int seed, int multiprocessors) -> ()",
        &configure);
  m.def("take_launches() -> int[]", &take_launches);
  m.def("take_copied_bytes() -> int", &take_copied_bytes);
  m.def("take_ldmatrix_conflicts() -> int", &take_ldmatrix_conflicts);
  m.def("take_copy_sectors() -> int[]", &take_copy_sectors);
}
