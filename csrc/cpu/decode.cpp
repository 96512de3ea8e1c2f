// Decode attention on CPU (flash-decoding): a few new queries per sequence against a KV cache.
//
// q (B, H, Lq, D); k_cache / v_cache (B, Hkv, S_max, D / Dv), or paged (num_blocks, Hkv,
// block_size, D / Dv) with block_table (B, max_blocks) int32; cache_seqlens (B,) int32 counts
// the valid cache tokens of each sequence, the Lq new ones included: query i sits at position
// seqlen - Lq + i and sees keys j <= seqlen - Lq + i. A query that sees no key (seqlen 0, or
// seqlen < Lq for the first queries) gives zeros.
//
// Tasks are (batch, KV head, split of the cache): each reads its keys and values once for the
// whole GQA group of query heads (rows = group x Lq), keeps a partial (max, sum, acc) per row;
// a combine step merges the splits (with one split per sequence, each task writes its output).
#include <torch/library.h>

#include <vector>

#include "attention_common.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace gptkern::cpu::attn {
namespace {

constexpr int64_t kKeys = 8;     // keys scored together (one vector of scores)
constexpr int64_t kChunk = 512;  // keys per online-softmax step (long runs of each stream)
constexpr int64_t kSub = 64;     // keys per pass over the rows: their K / V rows stay in L1
constexpr int64_t kSRow = kChunk + kKeys;  // score row stride (a run's scores may spill kKeys - 1)
constexpr int64_t kMinSplit = 512;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;  // AVX2 (the scalar fallback does not care)
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// out[c] = sum of the 8 lanes of v[c], c < 8: horizontal adds, then one cross-half add.
inline void sum_8x8(const __m256* v, float* out) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}
#endif

// out[c] = sum of the lanes of a[c], c < kKeys.
inline void sum_lanes(const Vec* a, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kW == 16 && kKeys == 8);
  __m256 v[kKeys];  // fold each 16-lane vector to 8 lanes
  for (int64_t c = 0; c < kKeys; ++c) {
    const __m512 x = a[c];
    v[c] = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  }
  sum_8x8(v, out);
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(kW == 8 && kKeys == 8);
  __m256 v[kKeys];
  for (int64_t c = 0; c < kKeys; ++c) v[c] = a[c];
  sum_8x8(v, out);
#else
  for (int64_t c = 0; c < kKeys; ++c)
    out[c] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, a[c]);
#endif
}

// Prefetch n rows of `width` elements, `stride` apart (one range when they are contiguous).
template <typename T>
inline void prefetch_rows(const T* first, int64_t n, int64_t stride, int64_t width) {
  const char* p = reinterpret_cast<const char*>(first);
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(T));
  if (stride == width) {
    for (int64_t off = 0; off < n * row_bytes; off += 64) __builtin_prefetch(p + off);
    return;
  }
  for (int64_t r = 0; r < n; ++r)
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(p + r * stride * sizeof(T) + off);
}

struct Cache {  // key / value rows of one cache, static or paged
  const void* data;
  int64_t sb, sh, sr;            // static: (B, Hkv, S_max, .); paged: (num_blocks, Hkv, block_size, .)
  const int32_t* table = nullptr;  // (B, max_blocks), or null for a static cache
  int64_t table_stride = 0, block_size = 0;

  template <typename T>
  const T* row(int64_t b, int64_t h, int64_t j) const {
    const T* base = static_cast<const T*>(data);
    if (!table) return base + b * sb + h * sh + j * sr;
    return base + table[b * table_stride + j / block_size] * sb + h * sh + j % block_size * sr;
  }
  // Keys from j on that lie in j's page (a static cache is one page).
  int64_t run(int64_t j, int64_t limit) const { return table ? std::min(limit, block_size - j % block_size) : limit; }
};

// Elements per load of a cache row: one vector of fp32, or 2 * kW 16-bit values converted to two.
template <typename T>
constexpr int64_t kStep = std::is_same_v<T, float> ? kW : 2 * kW;

// The steps below load kStep<T> cache elements (one fp32 vector, or two converted from 16-bit
// values) and use them at once: loads staged in arrays filled through a pointer kept GCC 12 from
// holding the callers' accumulators in registers (the fp32 decode ran at 60% of its speed).

// acc + the lane-wise products of q[0 .. kStep<T>) and k[0 .. kStep<T>), folded onto one vector.
template <typename T>
inline Vec dot_step(const Vec* q, const T* k, const Vec& acc) {
  if constexpr (std::is_same_v<T, float>) {
    return at::vec::fmadd(q[0], Vec::loadu(k), acc);
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(k));
    return at::vec::fmadd(q[1], hi, at::vec::fmadd(q[0], lo, acc));
  }
}

// acc[y] += p * v[y * kW .. (y + 1) * kW) for y < kStep<T> / kW.
template <typename T>
inline void axpy_step(const Vec& p, const T* v, Vec* acc) {
  if constexpr (std::is_same_v<T, float>) {
    acc[0] = at::vec::fmadd(p, Vec::loadu(v), acc[0]);
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(v));
    acc[0] = at::vec::fmadd(p, lo, acc[0]);
    acc[1] = at::vec::fmadd(p, hi, acc[1]);
  }
}

// s[c] = q . k[c] for c < round_up(n, kKeys); key rows of NE * kStep<T> elements `ks` apart;
// rows >= n repeat row n - 1. The query's vectors stay in registers.
template <int NE, typename T>
inline void score_keys_fixed(const float* q, const T* k, int64_t ks, int64_t n, float* s) {
  constexpr int64_t kV = kStep<T> / kW;
  Vec qv[NE * kV];
  for (int64_t y = 0; y < NE * kV; ++y) qv[y] = Vec::loadu(q + y * kW);
  for (int64_t c = 0; c < n; c += kKeys) {
    const T* kr[kKeys];
    for (int64_t x = 0; x < kKeys; ++x) kr[x] = k + std::min(c + x, n - 1) * ks;
    Vec a[kKeys];
    for (int64_t x = 0; x < kKeys; ++x) a[x] = Vec(0.0f);
    for (int e = 0; e < NE; ++e)
      for (int64_t x = 0; x < kKeys; ++x) a[x] = dot_step(qv + e * kV, kr[x] + e * kStep<T>, a[x]);
    sum_lanes(a, s + c);
  }
}

// Whether NE steps of query vectors, the kKeys accumulators and two loads fit the vector
// registers: more would spill inside the loop.
template <int NE, typename T>
constexpr bool query_fits = NE * (kStep<T> / kW) + kKeys + 2 <= kVecRegs;

// The same for rows of any `width` (a multiple of kStep<T>).
template <typename T>
inline void score_keys(const float* q, int64_t width, const T* k, int64_t ks, int64_t n, float* s) {
  constexpr int64_t kV = kStep<T> / kW;
  switch (width / kStep<T>) {  // the common head dims, where the query fits in registers
    case 1: if constexpr (query_fits<1, T>) return score_keys_fixed<1>(q, k, ks, n, s); break;
    case 2: if constexpr (query_fits<2, T>) return score_keys_fixed<2>(q, k, ks, n, s); break;
    case 4: if constexpr (query_fits<4, T>) return score_keys_fixed<4>(q, k, ks, n, s); break;
    case 8: if constexpr (query_fits<8, T>) return score_keys_fixed<8>(q, k, ks, n, s); break;
    default: break;
  }
  for (int64_t c = 0; c < n; c += kKeys) {
    const T* kr[kKeys];
    for (int64_t x = 0; x < kKeys; ++x) kr[x] = k + std::min(c + x, n - 1) * ks;
    Vec a[kKeys];
    for (int64_t x = 0; x < kKeys; ++x) a[x] = Vec(0.0f);
    for (int64_t e = 0; e < width; e += kStep<T>) {
      Vec qv[kV];
      for (int64_t y = 0; y < kV; ++y) qv[y] = Vec::loadu(q + e + y * kW);
      for (int64_t x = 0; x < kKeys; ++x) a[x] = dot_step(qv, kr[x] + e, a[x]);
    }
    sum_lanes(a, s + c);
  }
}

// acc[0 .. NV * kW) += sum over keys c < n of p[c] * v[c][0 ..], v rows `vs` apart.
template <int NV, typename T>
inline void add_pv_tile(float* acc, const float* p, const T* v, int64_t vs, int64_t n) {
  constexpr int kV = kStep<T> / kW;
  static_assert(NV % kV == 0);
  // Two sets of accumulators (even and odd keys) where they fit the registers: with 4 or fewer
  // chains the FMA units would wait on their latency. AVX2's wide tiles (8 chains) use one set:
  // two would spill. (Measured: AVX-512 D=128 is faster with two sets, AVX2 with one.)
  constexpr bool kPair = 2 * NV + 4 <= kVecRegs;
  Vec a[NV], b[NV];
  for (int x = 0; x < NV; ++x) {
    a[x] = Vec::loadu(acc + x * kW);
    b[x] = Vec(0.0f);
  }
  int64_t c = 0;
  for (; c + 2 <= n; c += 2) {
    const Vec p0(p[c]), p1(p[c + 1]);
    for (int x = 0; x < NV; x += kV) {
      axpy_step(p0, v + c * vs + x * kW, a + x);
      axpy_step(p1, v + (c + 1) * vs + x * kW, kPair ? b + x : a + x);
    }
  }
  if (c < n) {
    const Vec p0(p[c]);
    for (int x = 0; x < NV; x += kV) {
      axpy_step(p0, v + c * vs + x * kW, a + x);
    }
  }
  for (int x = 0; x < NV; ++x) (a[x] + b[x]).store(acc + x * kW);
}

// Vectors of acc per pass over the value rows (D = 128 in one pass with AVX-512, 64 with AVX2).
constexpr int kPV = 8;
static_assert(kPV % 2 == 0, "16-bit rows take two vectors per load: an odd tile would be skipped");

// add_pv_tile<nv> for the first nv <= NV vectors, nv a multiple of kStep<T> / kW.
template <int NV, typename T>
inline void add_pv_upto(int64_t nv, float* acc, const float* p, const T* v, int64_t vs, int64_t n) {
  if constexpr (NV > 0) {
    if (nv == NV) return add_pv_tile<NV>(acc, p, v, vs, n);
    add_pv_upto<NV - kStep<T> / kW>(nv, acc, p, v, vs, n);
  } else {
    TORCH_INTERNAL_ASSERT(false, "gptkern::decode_attention: no P.V tile of ", nv, " vectors");
  }
}

// acc[0 .. width) += P v over n keys; width a multiple of kStep<T>.
template <typename T>
inline void add_pv(float* acc, const float* p, const T* v, int64_t vs, int64_t n, int64_t width) {
  for (int64_t e = 0; e < width; e += kPV * kW)
    add_pv_upto<kPV>(std::min<int64_t>(kPV, (width - e) / kW), acc + e, p, v + e, vs, n);
}

struct Split {
  int64_t count, len;  // splits per sequence, keys per split
};

// Enough (batch, KV head, split) tasks to keep the threads busy, splits of at least kMinSplit
// keys; chosen from the shape only, so the result does not depend on the thread count.
Split choose_split(int64_t tasks, int64_t max_len) {
  const int64_t count = std::clamp<int64_t>(ceil_div(64, std::max<int64_t>(tasks, 1)), 1,
                                            std::max<int64_t>(1, ceil_div(max_len, kMinSplit)));
  return {count, round_up(ceil_div(std::max<int64_t>(max_len, 1), count), kChunk)};
}

struct Scratch {
  std::vector<float> q, s, acc, m, l, kbuf, vbuf;
  std::vector<int64_t> visible;
};

template <typename T>
void decode(const at::Tensor& q, const Cache& kc, const Cache& vc, const int32_t* seqlens, float scale,
            int64_t hkv_count, int64_t dv, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), lq = q.size(2), d = q.size(3);
  const int64_t group = heads / hkv_count, rows = group * lq, dp = round_up(d, kW), dvp = round_up(dv, kW);
  int64_t max_len = 0;
  for (int64_t b = 0; b < batch; ++b) max_len = std::max<int64_t>(max_len, seqlens[b]);
  const Split split = choose_split(batch * hkv_count, max_len);
  // Partials per (b, hkv, split, row): m, l, then dvp accumulators.
  const int64_t part_width = dvp + 2;
  auto part_t = empty_output({split.count > 1 ? batch * hkv_count * split.count * rows * part_width : 0},
                          q.options().dtype(at::kFloat));
  float* part = part_t.mutable_data_ptr<float>();
  const auto qo = operand<T>(q);
  const auto oo = operand<T>(out);
  // Cache rows whose width is a multiple of kStep<T> are read in place (16-bit values converted
  // in registers); others are copied into fp32 buffers per chunk.
  const bool k_direct = d % kStep<T> == 0, v_direct = dv % kStep<T> == 0;
  auto make = [&] {
    return Scratch{std::vector<float>(rows * dp), std::vector<float>(rows * kSRow), std::vector<float>(rows * dvp),
                   std::vector<float>(rows), std::vector<float>(rows),
                   std::vector<float>(k_direct ? 0 : kSub * dp), std::vector<float>(v_direct ? 0 : kChunk * dvp),
                   std::vector<int64_t>(rows)};
  };
  parallel_tasks<Scratch>(batch * hkv_count * split.count, make, [&](int64_t t, Scratch& w) {
    const int64_t b = t / (hkv_count * split.count), hkv = t / split.count % hkv_count, sp = t % split.count;
    const int64_t len = seqlens[b], first = sp * split.len, last = std::min(len, first + split.len);
    for (int64_t r = 0; r < rows; ++r)  // row r: query head hkv * group + r / lq, query r % lq
      load_f32(qo.row(b, hkv * group + r / lq, r % lq), qo.sc, w.q.data() + r * dp, d, dp, scale);
    std::fill(w.acc.begin(), w.acc.end(), 0.0f);
    std::fill(w.m.begin(), w.m.end(), kNegInf);
    std::fill(w.l.begin(), w.l.end(), 0.0f);
    // Chunks of up to kChunk keys, walked in runs of up to kSub keys inside one page (rows
    // kc.sr / vc.sr apart); fn(c0, m, k rows, v rows) for the run of keys j0 + c0 .. + m.
    auto for_runs = [&](int64_t j0, int64_t n, const auto& fn) {
      for (int64_t c0 = 0, m = 0; c0 < n; c0 += m) {
        m = kc.run(j0 + c0, std::min(kSub, n - c0));
        fn(c0, m, kc.row<T>(b, hkv, j0 + c0), vc.row<T>(b, hkv, j0 + c0));
      }
    };
    for (int64_t j0 = first, n = 0; j0 < last; j0 += n) {
      n = std::min(kChunk, last - j0);
      const int64_t n_pad = round_up(n, kW);
      // Scores (rows x n), a run of keys for every row at a time.
      for_runs(j0, n, [&](int64_t c0, int64_t m, const T* k, const T* v) {
        if (kc.table && j0 + c0 + m < last) {  // a paged cache: the next run starts a new page
          const int64_t m1 = kc.run(j0 + c0 + m, std::min(kSub, last - j0 - c0 - m));
          prefetch_rows(kc.row<T>(b, hkv, j0 + c0 + m), m1, kc.sr, d);
          prefetch_rows(vc.row<T>(b, hkv, j0 + c0 + m), m1, vc.sr, dv);
        }
        if (!k_direct)
          for (int64_t c = 0; c < m; ++c) load_f32(k + c * kc.sr, 1, w.kbuf.data() + c * dp, d, dp);
        if (!v_direct)
          for (int64_t c = 0; c < m; ++c) load_f32(v + c * vc.sr, 1, w.vbuf.data() + (c0 + c) * dvp, dv, dvp);
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = w.s.data() + r * kSRow + c0;  // writes up to round_up(m, kKeys) scores
          if (k_direct) score_keys(w.q.data() + r * dp, d, k, kc.sr, m, sr);
          else score_keys(w.q.data() + r * dp, dp, w.kbuf.data(), dp, m, sr);
        }
      });
      // Online softmax per row; keys past the chunk or the query's causal limit are not visible.
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = w.s.data() + r * kSRow;
        w.visible[r] = std::clamp<int64_t>(len - lq + r % lq + 1 - j0, 0, n);
        std::fill(sr + w.visible[r], sr + n_pad, kNegInf);
        const float m_new = running_max(w.m[r], row_max(sr, n_pad));
        const float m_ref = m_new == kNegInf ? 0.0f : m_new;
        const float alpha = std::exp(w.m[r] - m_ref);
        w.l[r] = w.l[r] * alpha + exp_sub_sum(sr, n_pad, m_ref);
        w.m[r] = m_new;
        if (alpha != 1.0f) scale_row(w.acc.data() + r * dvp, dvp, alpha);
      }
      // acc += P V, a run of keys for every row at a time.
      for_runs(j0, n, [&](int64_t c0, int64_t m, const T*, const T* v) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t seen = std::clamp<int64_t>(w.visible[r] - c0, 0, m);
          const float* pr = w.s.data() + r * kSRow + c0;
          float* acc = w.acc.data() + r * dvp;
          if (v_direct) add_pv(acc, pr, v, vc.sr, seen, dv);
          else add_pv(acc, pr, w.vbuf.data() + c0 * dvp, dvp, seen, dvp);
        }
      });
    }
    if (split.count == 1) {  // the whole cache: normalize and write the output
      for (int64_t r = 0; r < rows; ++r) {
        store_f32(w.acc.data() + r * dvp, oo.row(b, hkv * group + r / lq, r % lq), oo.sc, dv,
                  w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f);
      }
      return;
    }
    float* dst = part + t * rows * part_width;
    for (int64_t r = 0; r < rows; ++r) {
      dst[r * part_width] = w.m[r];
      dst[r * part_width + 1] = w.l[r];
      std::copy(w.acc.begin() + r * dvp, w.acc.begin() + (r + 1) * dvp, dst + r * part_width + 2);
    }
  });
  if (split.count == 1) return;
  // Combine the splits of each (b, hkv, row); small problems inline (no second parallel region).
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (split.count * part_width));
  at::parallel_for(0, batch * hkv_count * rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dvp);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bk = i / rows, r = i % rows;
      const float* src = part + (bk * split.count * rows + r) * part_width;
      float m = kNegInf;
      for (int64_t s = 0; s < split.count; ++s) m = running_max(m, src[s * rows * part_width]);
      const float m_ref = m == kNegInf ? 0.0f : m;
      float l = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < split.count; ++s) {
        const float* ps = src + s * rows * part_width;
        const float f = std::exp(ps[0] - m_ref);
        l += ps[1] * f;
        const Vec vf(f);
        for (int64_t e = 0; e < dvp; e += kW) at::vec::fmadd(vf, Vec::loadu(ps + 2 + e), Vec::loadu(acc.data() + e)).store(acc.data() + e);
      }
      const int64_t b = bk / hkv_count, h = bk % hkv_count * group + r / lq;
      store_f32(acc.data(), oo.row(b, h, r % lq), oo.sc, dv, l > 0.0f ? 1.0f / l : 0.0f);
    }
  });
}

void check_seqlens(const int32_t* seqlens, int64_t batch, int64_t capacity) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(seqlens[b] >= 0 && seqlens[b] <= capacity, "gptkern::decode_attention: cache_seqlens[", b, "] = ",
                seqlens[b], " is outside [0, ", capacity, "]");
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& cache_seqlens, double scale, const std::optional<at::Tensor>& block_table) {
  const char* op = "decode_attention";
  check_float_cpu(op, q, "q");
  check_float_cpu(op, k_cache, "k_cache");
  check_float_cpu(op, v_cache, "v_cache");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "gptkern::decode_attention: q, k_cache and v_cache must have one dtype, got ", q.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(q.dim() == 4, "gptkern::decode_attention: q must be (B, H, Lq, D), got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "gptkern::decode_attention: k_cache and v_cache must have 4 dims, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t batch = q.size(0), heads = q.size(1), hkv = k_cache.size(1);
  TORCH_CHECK(hkv > 0 && heads % hkv == 0 && v_cache.size(1) == hkv, "gptkern::decode_attention: the ", heads,
              " heads of q must be a multiple of the heads of k_cache (", hkv, ") and v_cache (", v_cache.size(1), ")");
  TORCH_CHECK(k_cache.size(3) == q.size(3), "gptkern::decode_attention: k_cache must have q's head dim ", q.size(3),
              ", got ", k_cache.size(3));
  TORCH_CHECK(k_cache.size(0) == v_cache.size(0) && k_cache.size(2) == v_cache.size(2),
              "gptkern::decode_attention: k_cache ", k_cache.sizes(), " and v_cache ", v_cache.sizes(),
              " must match in every dim but the last");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "gptkern::decode_attention: k_cache and v_cache must be contiguous in the head dim");
  check_int32_vector(op, cache_seqlens, "cache_seqlens", batch);
  auto seqlens_c = cache_seqlens.contiguous();
  const int32_t* seqlens = seqlens_c.const_data_ptr<int32_t>();
  Cache kc{k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  Cache vc{v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  int64_t capacity = k_cache.size(2);
  at::Tensor table;
  if (block_table.has_value()) {
    table = block_table->contiguous();
    TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kInt && table.dim() == 2 &&
                    table.size(0) == batch,
                "gptkern::decode_attention: block_table must be a (B, max_blocks) int32 CPU tensor, got ",
                table.scalar_type(), " ", table.sizes());
    TORCH_CHECK(k_cache.size(2) > 0, "gptkern::decode_attention: a paged k_cache needs blocks of at least one "
                "token, got shape ", k_cache.sizes());
    capacity = table.size(1) * k_cache.size(2);
    check_seqlens(seqlens, batch, capacity);  // before the table is read up to each length
    const int32_t* t = table.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < ceil_div(seqlens[b], k_cache.size(2)); ++i) {
        const int32_t blk = t[b * table.size(1) + i];
        TORCH_CHECK(blk >= 0 && blk < k_cache.size(0), "gptkern::decode_attention: block_table[", b, ", ", i,
                    "] = ", blk, " is not a block of k_cache (", k_cache.size(0), " blocks)");
      }
    }
    for (Cache* c : {&kc, &vc}) {
      c->table = t;
      c->table_stride = table.size(1);
      c->block_size = k_cache.size(2);
    }
  } else {
    TORCH_CHECK(k_cache.size(0) == batch, "gptkern::decode_attention: k_cache must have q's batch size ", batch,
                ", got ", k_cache.size(0));
  }
  check_seqlens(seqlens, batch, capacity);
  const int64_t dv = v_cache.size(3);
  auto out = empty_output({batch, heads, q.size(2), dv}, q.options());
  if (out.numel() == 0) return out;
  GPTKERN_DISPATCH(q.scalar_type(), "gptkern_decode_attention", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      decode<scalar_t>(q, kc, vc, seqlens, static_cast<float>(scale), hkv, dv, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gptkern, CPU, m) { m.impl("decode_attention", &decode_attention); }

}  // namespace gptkern::cpu::attn
