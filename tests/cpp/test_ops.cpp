// C++ unit tests of the gptkern:: ops through the dispatcher, against ATen on float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>
#include <string>

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const bool ok = got.sizes() == want.sizes() && err <= tol;
  std::printf("%s %s: max |error| %.3g\n", ok ? "ok  " : "FAIL", what.c_str(), err);
  failures += ok ? 0 : 1;
}

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

void test_softmax() {
  auto fwd = op("gptkern::softmax_fwd").typed<at::Tensor(const at::Tensor&, int64_t, bool, at::ScalarType)>();
  auto bwd = op("gptkern::softmax_bwd").typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  for (int64_t n : {1, 7, 1023, 40000}) {
    auto x = at::randn({5, n}) * 3;
    auto x64 = x.to(at::kDouble);
    for (int64_t dim : {-1, 0}) {
      expect_close(fwd.call(x, dim, false, at::kFloat), at::softmax(x64, dim), 1e-6,
                   "softmax n=" + std::to_string(n) + " dim=" + std::to_string(dim));
      expect_close(fwd.call(x, dim, true, at::kFloat), at::log_softmax(x64, dim), 1e-5,
                   "log_softmax n=" + std::to_string(n) + " dim=" + std::to_string(dim));
    }
    auto y = at::softmax(x64, -1);
    auto g = at::randn({5, n}, at::kDouble);
    auto want = y * (g - (g * y).sum(-1, true));
    expect_close(bwd.call(g.to(at::kFloat), y.to(at::kFloat), -1, false), want, 1e-5,
                 "softmax backward n=" + std::to_string(n));
  }
  auto xb = at::randn({3, 100}).to(at::kBFloat16);
  expect_close(fwd.call(xb, -1, false, at::kFloat), at::softmax(xb.to(at::kDouble), -1), 1e-6,
               "softmax bf16 in, fp32 out");
}

void test_norms() {
  using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                             const std::optional<at::Tensor>&,
                                                             const std::optional<at::Tensor>&, double, bool);
  auto fwd = op("gptkern::norm_fwd").typed<Fwd>();
  for (int64_t n : {1, 7, 1023}) {
    auto x = at::randn({9, n}) * 2 + 1;
    auto w = at::randn({n});
    auto b = at::randn({n});
    auto ln = std::get<0>(fwd.call(x, 1, w, b, 1e-5, false));
    expect_close(ln, at::layer_norm(x.to(at::kDouble), {n}, w.to(at::kDouble), b.to(at::kDouble), 1e-5), 2e-5,
                 "layer_norm n=" + std::to_string(n));
    auto rms = std::get<0>(fwd.call(x, 1, w, std::nullopt, 1e-6, true));
    auto x64 = x.to(at::kDouble);
    auto want = x64 * at::rsqrt((x64 * x64).mean(-1, true) + 1e-6) * w.to(at::kDouble);
    expect_close(rms, want, 2e-5, "rms_norm n=" + std::to_string(n));
  }
}

void test_attention() {
  using Fwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, bool, double, double,
                                                 const std::optional<at::Tensor>&);  // ..., dropout_p, seed
  auto fwd = op("gptkern::attention_fwd").typed<Fwd>();
  using Decode = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                            const std::optional<at::Tensor>&);
  auto decode = op("gptkern::decode_attention").typed<Decode>();
  for (bool causal : {false, true}) {
    auto q = at::randn({2, 4, 70, 48}), k = at::randn({2, 4, 90, 48}), v = at::randn({2, 4, 90, 40});
    auto want = at::scaled_dot_product_attention(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), {}, 0.0,
                                                 causal);
    const auto out = std::get<0>(fwd.call(q, k, v, std::nullopt, causal, 1.0 / std::sqrt(48.0), 0.0, std::nullopt));
    expect_close(out, want, 2e-5, std::string("attention_fwd causal=") + (causal ? "1" : "0"));
  }
  auto q = at::randn({3, 4, 1, 64}), k = at::randn({3, 4, 300, 64}), v = at::randn({3, 4, 300, 64});
  auto want = at::scaled_dot_product_attention(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble));
  auto lengths = at::full({3}, 300, at::kInt);
  expect_close(decode.call(q, k, v, lengths, 0.125, std::nullopt), want, 2e-5, "decode_attention");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_softmax();
  test_norms();
  test_attention();
  std::printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
