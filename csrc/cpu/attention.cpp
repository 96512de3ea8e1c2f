// Flash attention on CPU, dense (B, H, L, D) and varlen (packed (total, H, D)), forward and
// backward. Tiled with an online softmax: per thread a (BM x BN) score tile, never an L x S
// matrix. K and V are first packed into fp32 blocks (K transposed, so a score tile is one GEMM
// of register tiles). Forward tasks: (batch, head, query block), scheduled dynamically. Backward
// tasks: (batch, KV head, chunk of query blocks), recomputing P from the LSE; dQ is written per
// query block, dK / dV go to the task's own fp32 partial (summed over the GQA group), and a last
// pass adds the partials in a fixed order: no races, no dependence on the thread count.
//
// Visibility of key j to query i of a sequence (L queries, S keys): j < S, causal: j <= i + diag,
// window (left, right), -1 unbounded: i + diag - left <= j <= i + diag + right; diag = 0 dense
// (PyTorch's top-left causal mask), S - L varlen (flash-attn's bottom-right). Scores are
// q.k * scale (+ a float mask, or -inf where a bool mask is False). A row that sees no key gives
// 0 and LSE -inf (torch's SDPA gives 0 there too). The LSE is log2-domain, as the Triton op's.
#include <torch/library.h>

#include <vector>

#include "attention_common.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace gptkern::cpu::attn {
namespace {

constexpr int64_t kBM = 64;  // queries per tile
constexpr int64_t kBN = 64;  // keys per tile (a multiple of 2 * kW)
constexpr float kMinBias = -2.0e38f;  // the lowest finite float mask value used (see Mask)

// Philox4x32-10 as triton.language.philox: the first output word for counters c0..c3 and a
// 64-bit key (its low and high words). The attention seed is the low 32 bits of the seed tensor
// (high key word 0), as the Triton kernels read it: both draw the same stream.
inline uint32_t philox_first(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t a = uint64_t{0xD2511F53u} * c0, b = uint64_t{0xCD9E8D57u} * c2;
    c0 = static_cast<uint32_t>(b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(b);
    c3 = static_cast<uint32_t>(a);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

#if defined(CPU_CAPABILITY_AVX512)
using U32x = __m512i;  // 16 lanes of uint32
constexpr int kLanes = 16;
inline U32x splat(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
// High and low 32 bits of the lane-wise 32 x 32 -> 64-bit products a * x.
inline U32x mulhi(U32x a, U32x x) {
  const __m512i even = _mm512_mul_epu32(x, a), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), a);
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
inline U32x mullo(U32x a, U32x x) { return _mm512_mullo_epi32(a, x); }
inline U32x xor3(U32x a, U32x b, U32x c) { return _mm512_xor_si512(_mm512_xor_si512(a, b), c); }
inline U32x add32(U32x a, U32x b) { return _mm512_add_epi32(a, b); }
inline U32x lane_ids() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
// inv_keep where (r >> 1) >= threshold, else 0.
inline void store_factors(float* z, U32x r, int32_t threshold, float inv_keep) {
  const __mmask16 keep = _mm512_cmpge_epi32_mask(_mm512_srli_epi32(r, 1), _mm512_set1_epi32(threshold));
  _mm512_storeu_ps(z, _mm512_maskz_mov_ps(keep, _mm512_set1_ps(inv_keep)));
}
#elif defined(CPU_CAPABILITY_AVX2)
using U32x = __m256i;  // 8 lanes of uint32
constexpr int kLanes = 8;
inline U32x splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline U32x mulhi(U32x a, U32x x) {
  const __m256i even = _mm256_mul_epu32(x, a), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
inline U32x mullo(U32x a, U32x x) { return _mm256_mullo_epi32(a, x); }
inline U32x xor3(U32x a, U32x b, U32x c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline U32x add32(U32x a, U32x b) { return _mm256_add_epi32(a, b); }
inline U32x lane_ids() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline void store_factors(float* z, U32x r, int32_t threshold, float inv_keep) {
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_srli_epi32(r, 1), _mm256_set1_epi32(threshold - 1));
  _mm256_storeu_ps(z, _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_set1_ps(inv_keep)));
}
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// philox_first for kLanes consecutive first counters c0 .. c0 + kLanes - 1.
inline U32x philox_first_lanes(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  U32x x0 = add32(splat(c0), lane_ids()), x1 = splat(c1), x2 = splat(c2), x3 = splat(c3);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const U32x a = splat(0xD2511F53u), b = splat(0xCD9E8D57u);
  for (int round = 0; round < 10; ++round) {
    const U32x n0 = xor3(mulhi(b, x2), x1, splat(k0)), n2 = xor3(mulhi(a, x0), x3, splat(k1));
    x1 = mullo(b, x2);
    x3 = mullo(a, x0);
    x0 = n0;
    x2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return x0;
}
#endif

// Dropout on the attention weights, the Triton kernels' rule: weight (query i, key j, both counted
// in their sequence; batch-head bh = b * H + h) is dropped when the top 31 bits of
// philox(seed, j, i, bh, 0) fall below threshold = p * 2**31; kept ones are scaled by 1 / (1 - p).
struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  int32_t threshold = 0;
  float inv_keep = 1.0f;

  // z[j] for keys n0 + j: the factor for j < n, 0 from n to width (SIMD lanes where built for them).
  void row(float* z, int64_t bh, int64_t i, int64_t n0, int64_t n, int64_t width) const {
    const uint32_t key0 = static_cast<uint32_t>(n0), query = static_cast<uint32_t>(i), head = static_cast<uint32_t>(bh);
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    for (; j + kLanes <= width; j += kLanes)
      store_factors(z + j, philox_first_lanes(seed, key0 + static_cast<uint32_t>(j), query, head, 0u), threshold,
                    inv_keep);
#endif
    for (; j < width; ++j) {
      const uint32_t r = philox_first(seed, key0 + static_cast<uint32_t>(j), query, head, 0u);
      z[j] = static_cast<int32_t>(r >> 1) >= threshold ? inv_keep : 0.0f;
    }
    std::fill(z + std::min(n, width), z + width, 0.0f);
  }
};

Dropout make_dropout(const char* op, double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "gptkern::", op, ": dropout_p must be in [0, 1), got ", p);
  Dropout d;
  if (p == 0.0) return d;
  TORCH_CHECK(seed.has_value() && seed->device().is_cpu() && at::isIntegralType(seed->scalar_type(), false) &&
                  seed->numel() == 1,
              "gptkern::", op, ": dropout_p > 0 needs seed, a one-element integer CPU tensor");
  d.on = true;
  d.seed = static_cast<uint32_t>(seed->item<int64_t>());  // the low 32 bits, as the Triton kernels
  d.threshold = static_cast<int32_t>(std::min<double>(std::floor(p * 2147483648.0), 2147483647.0));
  d.inv_keep = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

struct Problem {
  int64_t batch, heads, kv_heads, group, d, dv, dp, dvp;  // dp, dvp: head dims padded to kW
  Dropout dropout;
  int64_t max_l, max_s;
  float scale;
  bool causal = false;
  int64_t left = -1, right = -1;
  const int32_t* cu_q = nullptr;  // varlen: (batch + 1,) offsets
  const int32_t* cu_k = nullptr;

  int64_t q_start(int64_t b) const { return cu_q ? cu_q[b] : 0; }
  int64_t k_start(int64_t b) const { return cu_k ? cu_k[b] : 0; }
  int64_t len_q(int64_t b) const { return cu_q ? cu_q[b + 1] - cu_q[b] : max_l; }
  int64_t len_k(int64_t b) const { return cu_k ? cu_k[b + 1] - cu_k[b] : max_s; }
  int64_t diag(int64_t b) const { return cu_q ? len_k(b) - len_q(b) : 0; }
  // Keys [key_lo, key_hi) are visible to query i (key_hi <= key_lo: none).
  int64_t key_lo(int64_t i, int64_t dg) const { return left < 0 ? 0 : std::max<int64_t>(0, i + dg - left); }
  int64_t key_hi(int64_t i, int64_t dg, int64_t s) const {
    int64_t hi = s;
    if (causal) hi = std::min(hi, i + dg + 1);
    if (right >= 0) hi = std::min(hi, i + dg + right + 1);
    return hi;
  }
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool varlen, double scale) {
  Problem p;
  p.heads = q.size(1);  // (B, H, L, D) and (total, H, D) alike
  p.kv_heads = k.size(1);
  p.group = p.heads / p.kv_heads;
  p.d = q.size(-1);
  p.dv = v.size(-1);
  p.dp = round_up(p.d, kW);
  p.dvp = round_up(p.dv, kW);
  p.scale = static_cast<float>(scale);
  if (!varlen) {
    p.batch = q.size(0);
    p.max_l = q.size(2);
    p.max_s = k.size(2);
  }
  return p;
}

// Optional (B, H, L, S) mask read through its strides (broadcast dims have stride 0).
template <typename M>
struct Mask {
  const M* data = nullptr;
  int64_t sb = 0, sh = 0, sm = 0, sn = 0;

  // s[j] for keys n0 + j, j < n: -inf where a bool mask is False, + the value of a float mask,
  // finite values clamped at -2e38 (as the Triton kernel does) so that a row seeing only finfo.min
  // keys keeps a finite log2-domain LSE (m * log2(e) would overflow) and attends uniformly, as torch.
  void apply(float* s, int64_t b, int64_t h, int64_t i, int64_t n0, int64_t n) const {
    if constexpr (!std::is_same_v<M, std::nullptr_t>) {
      const M* m = data + b * sb + h * sh + i * sm + n0 * sn;
      if constexpr (std::is_same_v<M, bool>) {
        for (int64_t j = 0; j < n; ++j) s[j] = m[j * sn] ? s[j] : kNegInf;
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const float bias = static_cast<float>(m[j * sn]);
          s[j] += bias == kNegInf ? bias : std::max(bias, kMinBias);
        }
      }
    }
  }
};

// Calls fn(Mask<M>) with the mask's element type (nullptr_t when there is none).
template <typename Fn>
void with_mask(const std::optional<at::Tensor>& mask, const Fn& fn) {
  if (!mask.has_value()) return fn(Mask<std::nullptr_t>{});
  const auto& m = *mask;
  auto view = [&](auto* data) {
    using M = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
    fn(Mask<M>{data, m.stride(0), m.stride(1), m.stride(2), m.stride(3)});
  };
  switch (m.scalar_type()) {
    case at::kBool: return view(m.const_data_ptr<bool>());
    case at::kFloat: return view(m.const_data_ptr<float>());
    case at::kBFloat16: return view(m.const_data_ptr<at::BFloat16>());
    case at::kHalf: return view(m.const_data_ptr<at::Half>());
    default: TORCH_CHECK(false, "gptkern::attention: mask must be bool, float32, bfloat16 or float16, got ",
                         m.scalar_type());
  }
}

// Scores of the query row i (sequence-relative) for keys n0 .. n0 + kBN: -inf outside the
// visible range (causal, window, sequence end), then the mask.
template <typename M>
inline void mask_row(float* s, const Problem& p, const Mask<M>& mask, int64_t b, int64_t h, int64_t i,
                     int64_t dg, int64_t n0, int64_t len_k) {
  const int64_t lo = std::clamp<int64_t>(p.key_lo(i, dg) - n0, 0, kBN);
  const int64_t hi = std::clamp<int64_t>(p.key_hi(i, dg, len_k) - n0, lo, kBN);
  std::fill(s, s + lo, kNegInf);
  std::fill(s + hi, s + kBN, kNegInf);
  if (hi > lo) mask.apply(s + lo, b, h, i, n0 + lo, hi - lo);
}

// ------------------------------------------------------------------------------ packing of K, V

// fp32 copies of K and V per (batch, KV head), key rows padded to a multiple of kBN:
//   kt: blocks of kBN keys transposed, (d x kBN) each, for the score GEMM (B operand);
//   vt: the same for V (backward: dP = dO . V^T);
//   v / k rows: (rows x dvp / dp) row-major, for P . V and dS . K; fp32 inputs with unit
//   last stride and a head dim that is a multiple of kW are read in place instead.
struct Packed {
  std::vector<int64_t> start;  // (batch * kv_heads + 1) first padded row of each (b, hkv)
  at::Tensor kt, vt, v_rows, k_rows;
  bool v_in_place = false, k_in_place = false;
  const float* v_direct = nullptr;
  const float* k_direct = nullptr;
  int64_t v_sb = 0, v_sh = 0, v_sr = 0, k_sb = 0, k_sh = 0, k_sr = 0;

  int64_t region(const Problem& p, int64_t b, int64_t hkv) const { return start[b * p.kv_heads + hkv]; }
  const float* kt_block(const Problem& p, int64_t b, int64_t hkv, int64_t n0) const {
    return kt.const_data_ptr<float>() + (region(p, b, hkv) + n0) * p.d;
  }
  const float* vt_block(const Problem& p, int64_t b, int64_t hkv, int64_t n0) const {
    return vt.const_data_ptr<float>() + (region(p, b, hkv) + n0) * p.dv;
  }
  // (pointer, row stride) of V's key row n0 of (b, hkv).
  std::pair<const float*, int64_t> v_block(const Problem& p, int64_t b, int64_t hkv, int64_t n0) const {
    if (v_in_place) return {v_direct + b * v_sb + hkv * v_sh + (p.k_start(b) + n0) * v_sr, v_sr};
    return {v_rows.const_data_ptr<float>() + (region(p, b, hkv) + n0) * p.dvp, p.dvp};
  }
  std::pair<const float*, int64_t> k_block(const Problem& p, int64_t b, int64_t hkv, int64_t n0) const {
    if (k_in_place) return {k_direct + b * k_sb + hkv * k_sh + (p.k_start(b) + n0) * k_sr, k_sr};
    return {k_rows.const_data_ptr<float>() + (region(p, b, hkv) + n0) * p.dp, p.dp};
  }
};

template <typename T>
bool readable_in_place(const at::Tensor& t, int64_t width) {
  return std::is_same_v<T, float> && t.stride(-1) == 1 && width % kW == 0;
}

// (kt and v rows) for the forward, (kt, vt, k rows) for the backward.
template <typename T>
Packed pack(const Problem& p, const at::Tensor& k, const at::Tensor& v, bool backward) {
  Packed pk;
  pk.start.resize(p.batch * p.kv_heads + 1, 0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.kv_heads; ++h)
      pk.start[b * p.kv_heads + h + 1] = pk.start[b * p.kv_heads + h] + round_up(p.len_k(b), kBN);
  const int64_t rows = pk.start.back();
  auto opts = k.options().dtype(at::kFloat);
  const bool pack_v_rows = !backward && !readable_in_place<T>(v, p.dv);
  const bool pack_k_rows = backward && !readable_in_place<T>(k, p.d);
  pk.kt = empty_output({rows * p.d}, opts);
  if (backward) pk.vt = empty_output({rows * p.dv}, opts);
  if (pack_v_rows) pk.v_rows = empty_output({rows * p.dvp}, opts);
  if (pack_k_rows) pk.k_rows = empty_output({rows * p.dp}, opts);
  const auto ko = operand<T>(k), vo = operand<T>(v);
  if (!backward && !pack_v_rows) {
    pk.v_in_place = true;
    pk.v_direct = reinterpret_cast<const float*>(vo.data);
    pk.v_sb = vo.sb, pk.v_sh = vo.sh, pk.v_sr = vo.sr;
  }
  if (backward && !pack_k_rows) {
    pk.k_in_place = true;
    pk.k_direct = reinterpret_cast<const float*>(ko.data);
    pk.k_sb = ko.sb, pk.k_sh = ko.sh, pk.k_sr = ko.sr;
  }
  // One task per (b, hkv, key block).
  const int64_t blocks = ceil_div(p.max_s, kBN);
  at::parallel_for(0, p.batch * p.kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t wp = std::max(p.dp, p.dvp);
    std::vector<float> stage(kBN * wp);  // the block's rows in fp32, (kBN x wp)
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.kv_heads * blocks), h = t / blocks % p.kv_heads, n0 = t % blocks * kBN;
      const int64_t len = p.len_k(b);
      if (n0 >= len) continue;
      const int64_t n = std::min(kBN, len - n0), base = pk.region(p, b, h) + n0, ks = p.k_start(b) + n0;
      auto transpose_into = [&](const Operand<T>& src, int64_t width, float* dst) {  // (width x kBN)
        float* st = stage.data();
        for (int64_t j = 0; j < kBN; ++j) {
          if (j < n) load_f32(src.row(b, h, ks + j), src.sc, st + j * wp, width, width);
          else std::fill(st + j * wp, st + j * wp + width, 0.0f);
        }
        int64_t c0 = 0;
        for (; c0 + 8 <= width; c0 += 8)
          for (int64_t j0 = 0; j0 < kBN; j0 += 8)
            at::vec::transpose_mxn<float, 8, 8>(st + j0 * wp + c0, wp, dst + c0 * kBN + j0, kBN);
        for (int64_t c = c0; c < width; ++c)
          for (int64_t j = 0; j < kBN; ++j) dst[c * kBN + j] = st[j * wp + c];
      };
      transpose_into(ko, p.d, pk.kt.mutable_data_ptr<float>() + base * p.d);
      if (backward) transpose_into(vo, p.dv, pk.vt.mutable_data_ptr<float>() + base * p.dv);
      if (pack_v_rows) {
        float* dst = pk.v_rows.mutable_data_ptr<float>() + base * p.dvp;
        for (int64_t j = 0; j < n; ++j) load_f32(vo.row(b, h, ks + j), vo.sc, dst + j * p.dvp, p.dv, p.dvp);
      }
      if (pack_k_rows) {
        float* dst = pk.k_rows.mutable_data_ptr<float>() + base * p.dp;
        for (int64_t j = 0; j < n; ++j) load_f32(ko.row(b, h, ks + j), ko.sc, dst + j * p.dp, p.d, p.dp);
      }
    }
  });
  return pk;
}

// The query blocks of every (b, h), heaviest first within a head (causal: the last block),
// so that dynamic scheduling ends balanced; heads stay in order, keeping K and V in cache.
struct QueryBlock {
  int64_t b, h, i0;
};

std::vector<QueryBlock> query_blocks(const Problem& p) {
  std::vector<QueryBlock> tasks;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t i0 = round_up(p.len_q(b), kBM) - kBM; i0 >= 0; i0 -= kBM) tasks.push_back({b, h, i0});
  return tasks;
}

// [lo, hi) keys that some query of rows [i0, i1) may see.
std::pair<int64_t, int64_t> key_range(const Problem& p, int64_t i0, int64_t i1, int64_t dg, int64_t len_k) {
  const int64_t lo = p.key_lo(i0, dg), hi = p.key_hi(i1 - 1, dg, len_k);
  return {lo / kBN * kBN, std::max(hi, lo / kBN * kBN)};
}

// -------------------------------------------------------------------------------------- forward

struct FwdScratch {
  std::vector<float> q, s, acc, m, l, z;  // z: dropout factors of a row of keys
};

template <typename T, typename M>
void forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Mask<M>& mask,
             at::Tensor& out, at::Tensor& lse) {
  const Packed pk = pack<T>(p, k, v, false);
  const auto qo = operand<T>(q), oo = operand<T>(out);
  const Stats st = stats(lse);
  const auto tasks = query_blocks(p);
  auto make = [&] {
    return FwdScratch{std::vector<float>(kBM * p.dp), std::vector<float>(kBM * kBN),
                      std::vector<float>(kBM * p.dvp), std::vector<float>(kBM), std::vector<float>(kBM),
                      std::vector<float>(p.dropout.on ? kBN : 0)};
  };
  parallel_tasks<FwdScratch>(static_cast<int64_t>(tasks.size()), make, [&](int64_t t, FwdScratch& w) {
    const auto [b, h, i0] = tasks[t];
    const int64_t hkv = h / p.group, len_q = p.len_q(b), len_k = p.len_k(b), dg = p.diag(b);
    const int64_t rows = std::min(kBM, len_q - i0), q0 = p.q_start(b) + i0;
    for (int64_t r = 0; r < rows; ++r)  // scale folded into q
      load_f32(qo.row(b, h, q0 + r), qo.sc, w.q.data() + r * p.dp, p.d, p.dp, p.scale);
    std::fill(w.acc.begin(), w.acc.begin() + rows * p.dvp, 0.0f);
    std::fill(w.m.begin(), w.m.end(), kNegInf);
    std::fill(w.l.begin(), w.l.end(), 0.0f);
    const auto [lo, hi] = key_range(p, i0, i0 + rows, dg, len_k);
    for (int64_t n0 = lo; n0 < hi; n0 += kBN) {
      const int64_t n = std::min(kBN, len_k - n0);
      float* s = w.s.data();
      gemm<false>(rows, kBN, p.d, w.q.data(), p.dp, 1, pk.kt_block(p, b, hkv, n0), kBN, s, kBN);
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s + r * kBN;
        mask_row(sr, p, mask, b, h, i0 + r, dg, n0, len_k);
        const float m_new = running_max(w.m[r], row_max(sr, kBN));
        const float m_ref = m_new == kNegInf ? 0.0f : m_new;  // nothing visible yet: p = 0
        const float alpha = std::exp(w.m[r] - m_ref);
        w.l[r] = w.l[r] * alpha + exp_sub_sum(sr, kBN, m_ref);
        if (alpha != 1.0f) scale_row(w.acc.data() + r * p.dvp, p.dvp, alpha);
        w.m[r] = m_new;
        if (p.dropout.on) {  // the normalizer counts every weight; only the weighted sum is dropped
          p.dropout.row(w.z.data(), b * p.heads + h, i0 + r, n0, n, kBN);
          for (int64_t j = 0; j < kBN; j += kW) (Vec::loadu(sr + j) * Vec::loadu(w.z.data() + j)).store(sr + j);
        }
      }
      const auto [vb, ldv] = pk.v_block(p, b, hkv, n0);
      gemm<true>(rows, p.dvp, n, s, kBN, 1, vb, ldv, w.acc.data(), p.dvp);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float l = w.l[r];
      // l == 0: no key seen (0 and an LSE of -inf); a NaN score makes l, the row and its LSE NaN
      store_f32(w.acc.data() + r * p.dvp, oo.row(b, h, q0 + r), oo.sc, p.dv, l == 0.0f ? 0.0f : 1.0f / l);
      st.at(b, h, q0 + r) = l == 0.0f ? kNegInf : (w.m[r] + std::log(l)) * kLog2e;
    }
  });
}

// ------------------------------------------------------------------------------------- backward

struct BwdScratch {
  std::vector<float> q, dout, p, ds, dq, lse, delta, z, pz;  // z, pz: dropout factors, P * Z (kBM x kBN)
};

// delta = rowsum(dO * O) per query row, laid out as the LSE.
template <typename T>
void row_dots(const Problem& p, const at::Tensor& dout, const at::Tensor& out, const Stats& delta) {
  const auto go = operand<T>(dout), oo = operand<T>(out);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(p.dvp), c(p.dvp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      for (int64_t i = p.q_start(b); i < p.q_start(b) + p.len_q(b); ++i) {
        load_f32(go.row(b, h, i), go.sc, a.data(), p.dv, p.dvp);
        load_f32(oo.row(b, h, i), oo.sc, c.data(), p.dv, p.dvp);
        Vec acc(0.0f);
        for (int64_t x = 0; x < p.dvp; x += kW) acc = at::vec::fmadd(Vec::loadu(a.data() + x), Vec::loadu(c.data() + x), acc);
        delta.at(b, h, i) = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
      }
    }
  });
}

// dK / dV are summed in fp32 partials, one per (b, hkv, chunk of query blocks), over the query
// heads of the GQA group; a final pass adds the chunks in order (the result does not depend on
// the thread count).
int64_t query_chunks(const Problem& p) {
  return std::clamp<int64_t>(ceil_div(32, std::max<int64_t>(1, p.batch * p.kv_heads)), 1,
                             std::max<int64_t>(1, ceil_div(p.max_l, kBM)));
}

template <typename T, typename M>
void backward(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const Mask<M>& mask,
              at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, float* dmask = nullptr) {
  // dmask: dense (B, H, L, S) fp32 for dS, the gradient of a float mask, or null (causal: the
  // caller zeroes it, as the tiles above the diagonal are skipped; no window comes with a mask).
  auto delta_t = at::empty_like(lse);
  const Stats delta = stats(delta_t), ls = stats(lse);
  row_dots<T>(p, dout, out, delta);
  const Packed pk = pack<T>(p, k, v, true);
  const int64_t chunks = query_chunks(p), rows_total = pk.start.back();
  auto opts = q.options().dtype(at::kFloat);
  auto dk_part = zeros_output({rows_total * chunks * p.dp}, opts);
  auto dv_part = zeros_output({rows_total * chunks * p.dvp}, opts);
  const auto qo = operand<T>(q), go = operand<T>(dout), dqo = operand<T>(dq);
  auto make = [&] {
    return BwdScratch{std::vector<float>(kBM * p.dp), std::vector<float>(kBM * p.dvp),
                      std::vector<float>(kBM * kBN), std::vector<float>(kBM * kBN),
                      std::vector<float>(kBM * p.dp), std::vector<float>(kBM), std::vector<float>(kBM),
                      std::vector<float>(p.dropout.on ? kBM * kBN : 0), std::vector<float>(p.dropout.on ? kBM * kBN : 0)};
  };
  const int64_t n_tasks = p.batch * p.kv_heads * chunks;
  parallel_tasks<BwdScratch>(n_tasks, make, [&](int64_t t, BwdScratch& w) {
    const int64_t b = t / (p.kv_heads * chunks), hkv = t / chunks % p.kv_heads;
    const int64_t chunk = chunks - 1 - t % chunks;  // causal: the last chunk is the heaviest
    const int64_t len_q = p.len_q(b), len_k = p.len_k(b), dg = p.diag(b), pad_k = round_up(len_k, kBN);
    const int64_t per = ceil_div(ceil_div(len_q, kBM), chunks);
    const int64_t part_row = pk.region(p, b, hkv) * chunks + chunk * pad_k;
    float* dk_acc = dk_part.mutable_data_ptr<float>() + part_row * p.dp;
    float* dv_acc = dv_part.mutable_data_ptr<float>() + part_row * p.dvp;
    for (int64_t g = 0; g < p.group; ++g) {
      const int64_t h = hkv * p.group + g;
      for (int64_t i0 = chunk * per * kBM; i0 < std::min(len_q, (chunk + 1) * per * kBM); i0 += kBM) {
        const int64_t rows = std::min(kBM, len_q - i0), q0 = p.q_start(b) + i0;
        for (int64_t r = 0; r < rows; ++r) {
          load_f32(qo.row(b, h, q0 + r), qo.sc, w.q.data() + r * p.dp, p.d, p.dp, p.scale);
          load_f32(go.row(b, h, q0 + r), go.sc, w.dout.data() + r * p.dvp, p.dv, p.dvp);
          const float l2 = ls.at(b, h, q0 + r);
          w.lse[r] = l2 == kNegInf ? std::numeric_limits<float>::infinity() : l2;  // saw nothing: p = 0
          w.delta[r] = delta.at(b, h, q0 + r);
        }
        std::fill(w.dq.begin(), w.dq.begin() + rows * p.dp, 0.0f);
        const auto [lo, hi] = key_range(p, i0, i0 + rows, dg, len_k);
        for (int64_t n0 = lo; n0 < hi; n0 += kBN) {
          const int64_t n = std::min(kBN, len_k - n0);
          float* pr = w.p.data();
          float* ds = w.ds.data();
          gemm<false>(rows, kBN, p.d, w.q.data(), p.dp, 1, pk.kt_block(p, b, hkv, n0), kBN, pr, kBN);
          for (int64_t r = 0; r < rows; ++r) {
            mask_row(pr + r * kBN, p, mask, b, h, i0 + r, dg, n0, len_k);
            exp2_sub(pr + r * kBN, kBN, w.lse[r]);
          }
          // dV += (P Z)^T dO;  dP = (dO V^T) Z;  dS = P * (dP - delta);  dK += dS^T (scale q);  dQ += dS K
          // (Z: the dropout factors, 1 without dropout)
          const float* pv_rows = pr;
          if (p.dropout.on) {
            for (int64_t r = 0; r < rows; ++r) {
              float* z = w.z.data() + r * kBN;
              p.dropout.row(z, b * p.heads + h, i0 + r, n0, n, kBN);
              for (int64_t j = 0; j < kBN; j += kW)
                (Vec::loadu(pr + r * kBN + j) * Vec::loadu(z + j)).store(w.pz.data() + r * kBN + j);
            }
            pv_rows = w.pz.data();
          }
          gemm<true>(n, p.dvp, rows, pv_rows, 1, kBN, w.dout.data(), p.dvp, dv_acc + n0 * p.dvp, p.dvp);
          gemm<false>(rows, kBN, p.dv, w.dout.data(), p.dvp, 1, pk.vt_block(p, b, hkv, n0), kBN, ds, kBN);
          for (int64_t r = 0; r < rows; ++r) {
            const Vec dl(w.delta[r]);
            for (int64_t j = 0; j < kBN; j += kW) {
              const Vec pv = Vec::loadu(pr + r * kBN + j);
              Vec dp = Vec::loadu(ds + r * kBN + j);
              if (p.dropout.on) dp = dp * Vec::loadu(w.z.data() + r * kBN + j);
              (pv * (dp - dl)).store(ds + r * kBN + j);
            }
          }
          if (dmask) {
            for (int64_t r = 0; r < rows; ++r)
              std::copy(ds + r * kBN, ds + r * kBN + n, dmask + ((b * p.heads + h) * p.max_l + i0 + r) * p.max_s + n0);
          }
          gemm<true>(n, p.dp, rows, ds, 1, kBN, w.q.data(), p.dp, dk_acc + n0 * p.dp, p.dp);
          const auto [kb, ldk] = pk.k_block(p, b, hkv, n0);
          gemm<true>(rows, p.dp, n, ds, kBN, 1, kb, ldk, w.dq.data(), p.dp);
        }
        for (int64_t r = 0; r < rows; ++r) store_f32(w.dq.data() + r * p.dp, dqo.row(b, h, q0 + r), dqo.sc, p.d, p.scale);
      }
    }
  });
  // dK, dV = the sum of the chunks' partials, in chunk order.
  const auto dko = operand<T>(dk), dvo = operand<T>(dv);
  const float* dk_src = dk_part.const_data_ptr<float>();
  const float* dv_src = dv_part.const_data_ptr<float>();
  const int64_t blocks = ceil_div(p.max_s, kBN);
  at::parallel_for(0, p.batch * p.kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(std::max(p.dp, p.dvp));
    // row j of (b, hkv): the chunks' rows j (pad_k rows apart) summed, stored in dst's dtype
    auto sum_chunks = [&](const float* src, int64_t pad_k, int64_t width, int64_t real, T* dst, int64_t sc) {
      std::copy(src, src + width, a.begin());
      for (int64_t c = 1; c < chunks; ++c) {
        const float* pc = src + c * pad_k * width;
        for (int64_t x = 0; x < width; x += kW) (Vec::loadu(a.data() + x) + Vec::loadu(pc + x)).store(a.data() + x);
      }
      store_f32(a.data(), dst, sc, real);
    };
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.kv_heads * blocks), hkv = t / blocks % p.kv_heads, n0 = t % blocks * kBN;
      const int64_t len_k = p.len_k(b), pad_k = round_up(len_k, kBN);
      const int64_t part_row = pk.region(p, b, hkv) * chunks;
      for (int64_t j = n0; j < std::min(len_k, n0 + kBN); ++j) {
        const int64_t row = p.k_start(b) + j;
        sum_chunks(dk_src + (part_row + j) * p.dp, pad_k, p.dp, p.d, dko.row(b, hkv, row), dko.sc);
        sum_chunks(dv_src + (part_row + j) * p.dvp, pad_k, p.dvp, p.dv, dvo.row(b, hkv, row), dvo.sc);
      }
    }
  });
}

// ------------------------------------------------------------------------------------ op entries

void check_mask(const at::Tensor& mask, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(mask.device().is_cpu(), "gptkern::attention_fwd: mask must be a CPU tensor, got ", mask.device());
  const std::vector<int64_t> want{q.size(0), q.size(1), q.size(2), k.size(2)};
  TORCH_CHECK(mask.sizes() == at::IntArrayRef(want), "gptkern::attention: mask must have shape (B, H, L, S) = ",
              want, " (a broadcast view is fine), got ", mask.sizes());
}

template <typename Fn>
void dispatch(const at::Tensor& q, const std::optional<at::Tensor>& mask, const Fn& fn) {
  GPTKERN_DISPATCH(q.scalar_type(), "gptkern_attention", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      using T = scalar_t;
      with_mask(mask, [&](auto m) { fn(T{}, m); });
    }
  });
}

void check_dense(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& mask) {
  check_qkv(op, q, k, v, 4, 1);
  TORCH_CHECK(k.size(0) == q.size(0), "gptkern::", op, ": k must have q's batch size ", q.size(0), ", got ",
              k.size(0));
  if (mask.has_value()) check_mask(*mask, q, k);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask, bool causal, double scale,
                                                 double dropout_p, const std::optional<at::Tensor>& seed) {
  check_dense("attention_fwd", q, k, v, mask);
  Problem p = make_problem(q, k, v, false, scale);
  p.causal = causal;
  p.dropout = make_dropout("attention_fwd", dropout_p, seed);
  auto out = empty_output({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  dispatch(q, mask, [&](auto t, const auto& m) { forward<decltype(t)>(p, q, k, v, m, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool causal, double scale, bool mask_grad,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  check_dense("attention_bwd", q, k, v, mask);
  const std::vector<int64_t> o_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(o_shape) && out.sizes() == at::IntArrayRef(o_shape),
              "gptkern::attention_bwd: grad_out and out must have shape ", o_shape, ", got ", grad_out.sizes(),
              " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3),
              "gptkern::attention_bwd: lse must be float32 of shape (B, H, L), got ", lse.scalar_type(), " ",
              lse.sizes());
  Problem p = make_problem(q, k, v, false, scale);
  p.causal = causal;
  p.dropout = make_dropout("attention_bwd", dropout_p, seed);
  auto dq = empty_output(q.sizes(), q.options()), dk = empty_output(k.sizes(), k.options());
  auto dv = empty_output(v.sizes(), v.options());
  auto go = grad_out.to(q.scalar_type()), o = out.to(q.scalar_type());
  at::Tensor dmask = at::empty({0}, q.options());
  if (mask_grad) {
    TORCH_CHECK(mask.has_value() && mask->is_floating_point(), "gptkern::attention_bwd: mask_grad needs a float mask");
    const std::vector<int64_t> shape{q.size(0), q.size(1), q.size(2), k.size(2)};
    const auto opts = q.options().dtype(at::kFloat);
    dmask = causal ? zeros_output(shape, opts) : empty_output(shape, opts);
  }
  dispatch(q, mask, [&](auto t, const auto& m) {
    backward<decltype(t)>(p, go, q, k, v, o, lse, m, dq, dk, dv, mask_grad ? dmask.mutable_data_ptr<float>() : nullptr);
  });
  if (mask_grad) dmask = dmask.to(mask->scalar_type());
  return {dq, dk, dv, dmask};
}

Problem varlen_problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k, bool causal,
                       double scale, int64_t left, int64_t right) {
  check_qkv(op, q, k, v, 3, 1);
  TORCH_CHECK(cu_q.dim() == 1 && cu_q.numel() >= 1, "gptkern::", op,
              ": cu_seqlens_q must be a 1-D int32 tensor of batch + 1 offsets, got ", cu_q.sizes());
  check_int32_vector(op, cu_q, "cu_seqlens_q", cu_q.numel());
  check_int32_vector(op, cu_k, "cu_seqlens_k", cu_q.numel());
  TORCH_CHECK(left >= -1 && right >= -1, "gptkern::", op, ": window_left and window_right must be >= -1, got ",
              left, ", ", right);
  Problem p = make_problem(q, k, v, true, scale);
  p.batch = cu_q.numel() - 1;
  p.cu_q = cu_q.const_data_ptr<int32_t>();
  p.cu_k = cu_k.const_data_ptr<int32_t>();
  p.causal = causal;
  // a side past every key is unbounded (it is added to positions: 2**63 - 1 would wrap around)
  p.left = left >= k.size(0) ? -1 : left;
  p.right = right >= q.size(0) ? -1 : right;
  for (const auto& [cu, name, total, mx] : {std::tuple{p.cu_q, "cu_seqlens_q", q.size(0), max_q},
                                            {p.cu_k, "cu_seqlens_k", k.size(0), max_k}}) {
    TORCH_CHECK(cu[0] == 0, "gptkern::", op, ": ", name, " must start at 0, got ", cu[0]);
    for (int64_t b = 0; b < p.batch; ++b) {
      TORCH_CHECK(cu[b + 1] >= cu[b], "gptkern::", op, ": ", name, " must be non-decreasing");
      TORCH_CHECK(cu[b + 1] - cu[b] <= mx, "gptkern::", op, ": a sequence of ", name, " is longer than its max_seqlen ",
                  mx);
    }
    TORCH_CHECK(cu[p.batch] == total, "gptkern::", op, ": ", name, " ends at ", cu[p.batch], " but the tensor has ",
                total, " rows");
  }
  p.max_l = p.max_s = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    p.max_l = std::max(p.max_l, p.len_q(b));
    p.max_s = std::max(p.max_s, p.len_k(b));
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                        int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                        double scale, int64_t window_left, int64_t window_right,
                                                        double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  Problem p = varlen_problem("attention_varlen_fwd", q, k, v, cu_q, cu_k, max_seqlen_q,
                             max_seqlen_k, causal, scale, window_left, window_right);
  p.dropout = make_dropout("attention_varlen_fwd", dropout_p, seed);
  auto out = empty_output({q.size(0), q.size(1), v.size(2)}, q.options());
  auto lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  dispatch(q, std::nullopt, [&](auto t, const auto& m) { forward<decltype(t)>(p, q, k, v, m, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, int64_t window_left, int64_t window_right, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  Problem p = varlen_problem("attention_varlen_bwd", q, k, v, cu_q, cu_k, max_seqlen_q,
                             max_seqlen_k, causal, scale, window_left, window_right);
  p.dropout = make_dropout("attention_varlen_bwd", dropout_p, seed);
  const std::vector<int64_t> o_shape{q.size(0), q.size(1), v.size(2)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(o_shape) && out.sizes() == at::IntArrayRef(o_shape),
              "gptkern::attention_varlen_bwd: grad_out and out must have shape ", o_shape, ", got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == q.size(1) &&
                  lse.size(1) == q.size(0),
              "gptkern::attention_varlen_bwd: lse must be float32 of shape (H, total_q), got ", lse.scalar_type(),
              " ", lse.sizes());
  auto dq = empty_output(q.sizes(), q.options()), dk = empty_output(k.sizes(), k.options());
  auto dv = empty_output(v.sizes(), v.options());
  auto go = grad_out.to(q.scalar_type()), o = out.to(q.scalar_type());
  dispatch(q, std::nullopt, [&](auto t, const auto& m) {
    backward<decltype(t)>(p, go, q, k, v, o, lse, m, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

// Z[bh, i, j], the dropout factor of query i and key j of batch-head first_batch_head + bh (0 or
// 1 / (1 - p); all 1 without dropout): what the kernels draw, for compositions that need it
// (double backward; varlen asks for one sequence's heads at a time).
at::Tensor attention_dropout_factors(const std::optional<at::Tensor>& seed, double dropout_p, int64_t batch_heads,
                                     int64_t rows, int64_t cols, int64_t first_batch_head) {
  const Dropout d = make_dropout("attention_dropout_factors", dropout_p, seed);
  TORCH_CHECK(batch_heads >= 0 && rows >= 0 && cols >= 0 && first_batch_head >= 0,
              "gptkern::attention_dropout_factors: sizes and first_batch_head must be >= 0, got ", batch_heads, ", ",
              rows, ", ", cols, ", ", first_batch_head);
  auto z = empty_output({batch_heads, rows, cols}, at::TensorOptions().dtype(at::kFloat));
  if (!d.on) return z.fill_(1.0f);
  float* out = z.mutable_data_ptr<float>();
  at::parallel_for(0, batch_heads * rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) d.row(out + t * cols, first_batch_head + t / rows, t % rows, 0, cols, cols);
  });
  return z;
}

TORCH_LIBRARY_IMPL(gptkern, CPU, m) {
  m.impl("attention_dropout_factors", &attention_dropout_factors);
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
}

}  // namespace gptkern::cpu::attn
