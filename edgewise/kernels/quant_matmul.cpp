// Quantized matrix multiplication for x86-64 AVX2: y = x @ W.T with W kept in GGUF's own blocks.
//
//   Q4_1: per block of 32 weights, fp16 d and m, 4-bit q in 0..15; w = q * d + m.
//         qs [N, K/2] uint8 (GGUF nibble order: low nibbles are elements 0..15, high 16..31),
//         d [N, K/32] fp16, m [N, K/32] fp16.
//   Q8_0: per block of 32 weights, fp16 d, int8 q; w = q * d.   qs [N, K] int8, d [N, K/32] fp16.
//
// Each activation row is first quantized per block of 32 with an fp32 scale (and the scaled sum,
// for Q4_1's m term), to int8 or int16 (`act_bits`); every block dot is then exact integer
// arithmetic (int8: maddubs + madd, as llama.cpp's Q8_1; int16: weights widened, two madd),
// scaled in fp32. int8 is faster; int16 makes activation rounding negligible where a layer's
// inputs have outliers (the caller chooses per layer, by measured perplexity).
// Rows of W are split across threads with at::parallel_for; up to TILE activation rows share
// each unpacked weight block. Per weight row, the block scales (d_w * d_x) and the Q4_1 min term
// are computed eight blocks at a time first, so the inner loop is unpack, integer dot, one FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t QK = 32;
constexpr int64_t TILE = 4;
constexpr int64_t MAX_BLOCKS = 512;  // K <= 16384

// Activation rows quantized per block of 32: codes, scale d (x ~= d * q) and d * sum(q) (for Q4_1's min term).
template <typename Q>
struct Activations {
  std::vector<Q> q;
  std::vector<float> d, s;
  Activations(int64_t rows, int64_t n_blocks) : q(rows * n_blocks * QK), d(rows * n_blocks), s(rows * n_blocks) {}
};

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// One block of 32 floats -> Q codes, round half to even (the MXCSR default, as numpy's rint).
template <typename Q>
inline void quantize_block(const float* x, Q* out_q, float* out_d, float* out_s) {
  constexpr float qmax = std::is_same_v<Q, int8_t> ? 127.f : 32767.f;
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float d = _mm_cvtss_f32(m) / qmax;
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
  const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  // packs interleave 128-bit lanes; the permutes restore element order
  const __m256i w01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
  const __m256i w23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
  if constexpr (std::is_same_v<Q, int8_t>) {
    const __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi16(w01, w23), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_q), b);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_q), w01);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_q + 16), w23);
  }
  *out_d = d;
  *out_s = d * static_cast<float>(sum);
}

inline float half_to_float(const at::Half h) { return _cvtsh_ss(h.x); }  // F16C, not c10's software path

// Integer dot of one block: 32 weight codes (as unsigned nibbles or signed bytes) with 32 activation codes.
template <typename Q, bool kUnsignedWeights>
struct BlockDot;

template <bool kUnsigned>
struct BlockDot<int8_t, kUnsigned> {
  // w: 32 codes in one register (0..15 for Q4, signed for Q8)
  static inline __m256i dot(__m256i w, const int8_t* y8) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y8));
    if constexpr (kUnsigned) return _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), ones);
    // maddubs multiplies unsigned by signed: move w's sign onto y
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)), ones);
  }
};

template <bool kUnsigned>
struct BlockDot<int16_t, kUnsigned> {
  static inline __m256i widen(__m128i half) { return kUnsigned ? _mm256_cvtepu8_epi16(half) : _mm256_cvtepi8_epi16(half); }
  static inline __m256i dot(__m256i w, const int16_t* y16) {
    const __m256i y_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y16));
    const __m256i y_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y16 + 16));
    return _mm256_add_epi32(_mm256_madd_epi16(widen(_mm256_castsi256_si128(w)), y_lo),
                            _mm256_madd_epi16(widen(_mm256_extracti128_si256(w, 1)), y_hi));
  }
};

inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low4), _mm_and_si128(packed, low4));
}

// scale[b] = w_d[b] * x_d[b] for every block; returns sum_b w_m[b] * x_s[b] (0 when w_m is null).
inline float block_scales(const at::Half* w_d, const at::Half* w_m, const float* x_d, const float* x_s, int64_t n_blocks, float* scale) {
  __m256 mins = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= n_blocks; b += 8) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_d + b)));
    _mm256_storeu_ps(scale + b, _mm256_mul_ps(d, _mm256_loadu_ps(x_d + b)));
    if (w_m) {
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_m + b)));
      mins = _mm256_fmadd_ps(m, _mm256_loadu_ps(x_s + b), mins);
    }
  }
  float tail = 0.f;
  for (; b < n_blocks; ++b) {
    scale[b] = half_to_float(w_d[b]) * x_d[b];
    if (w_m) tail += half_to_float(w_m[b]) * x_s[b];
  }
  return hsum(mins) + tail;
}

// Weight formats: where block b's 32 codes come from, and whether they are unsigned.
struct Q4_1Codes {
  static constexpr bool kUnsigned = true;  // nibbles 0..15; the min term carries the offset
  const uint8_t* qs;
  __m256i load(int64_t b) const { return unpack_nibbles(qs + b * 16); }
};

struct Q8_0Codes {
  static constexpr bool kUnsigned = false;
  const int8_t* qs;
  __m256i load(int64_t b) const { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * QK)); }
};

// T activation rows against one weight row (block scales w_d, mins w_m or null); two accumulators
// per activation row keep two FMA chains in flight.
template <int64_t T, typename Q, typename Codes>
inline void dot_row(Codes w, const at::Half* w_d, const at::Half* w_m, const Activations<Q>& a, int64_t row0, int64_t n_blocks, float* out) {
  alignas(32) float scale[T][MAX_BLOCKS];
  float mins[T];
  __m256 acc[T][2];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t r = (row0 + t) * n_blocks;
    mins[t] = block_scales(w_d, w_m, a.d.data() + r, a.s.data() + r, n_blocks, scale[t]);
    acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  }
  const Q* codes = a.q.data() + row0 * n_blocks * QK;
  // Two blocks per step, into accumulators 0 and 1: compile-time indices keep them in registers.
  const auto step = [&](int64_t b, int slot) {
    const __m256i wb = w.load(b);
    for (int64_t t = 0; t < T; ++t) {
      const __m256i p = BlockDot<Q, Codes::kUnsigned>::dot(wb, codes + (t * n_blocks + b) * QK);
      acc[t][slot] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scale[t][b]), _mm256_cvtepi32_ps(p), acc[t][slot]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= n_blocks; b += 2) step(b, 0), step(b + 1, 1);
  if (b < n_blocks) step(b, 0);
  for (int64_t t = 0; t < T; ++t) out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + mins[t];
}

void check_inputs(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t k, int64_t act_bits, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [M, K]");
  TORCH_CHECK(x.size(1) == k && k % QK == 0, op, ": x has ", x.size(1), " columns, weights expect ", k, " (a multiple of 32)");
  TORCH_CHECK(k <= QK * MAX_BLOCKS, op, ": K = ", k, " exceeds the kernels' limit of ", QK * MAX_BLOCKS);
  TORCH_CHECK(qs.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kHalf, op, ": bad weight layout");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, op, ": act_bits must be 8 or 16, got ", act_bits);
}

// Quantize every activation row once, then stream each weight row once per tile of activation rows.
template <typename Q, typename RowDot>
at::Tensor matmul_rows(const at::Tensor& x_in, int64_t n, int64_t k, RowDot row_dot) {
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), n_blocks = k / QK;
  Activations<Q> act(m, n_blocks);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < m * n_blocks; ++i) quantize_block(xp + i * QK, act.q.data() + i * QK, &act.d[i], &act.s[i]);
  at::Tensor out = at::empty({m, n}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t n0, int64_t n1) {
    float tile[TILE];
    for (int64_t j = n0; j < n1; ++j) {
      int64_t r = 0;
      for (; r + TILE <= m; r += TILE) {
        row_dot(std::integral_constant<int64_t, TILE>{}, j, act, r, n_blocks, tile);
        for (int64_t t = 0; t < TILE; ++t) op[(r + t) * n + j] = tile[t];
      }
      for (; r < m; ++r) row_dot(std::integral_constant<int64_t, 1>{}, j, act, r, n_blocks, op + r * n + j);
    }
  });
  return out;
}

template <typename Q>
at::Tensor q4_1_impl(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t n, int64_t k) {
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  return matmul_rows<Q>(x, n, k, [&](auto tile, int64_t j, const Activations<Q>& a, int64_t r, int64_t nb, float* out) {
    dot_row<decltype(tile)::value>(Q4_1Codes{q + j * (k / 2)}, dp + j * nb, mp + j * nb, a, r, nb, out);
  });
}

template <typename Q>
at::Tensor q8_0_impl(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t n, int64_t k) {
  const int8_t* q = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  return matmul_rows<Q>(x, n, k, [&](auto tile, int64_t j, const Activations<Q>& a, int64_t r, int64_t nb, float* out) {
    dot_row<decltype(tile)::value>(Q8_0Codes{q + j * k}, dp + j * nb, nullptr, a, r, nb, out);
  });
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t n, int64_t k, int64_t act_bits) {
  check_inputs(x, qs, d, k, act_bits, "q4_1_linear");
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.size(0) == n && qs.size(1) == k / 2, "q4_1_linear: qs must be uint8 [N, K/2]");
  TORCH_CHECK(m.is_contiguous() && m.scalar_type() == at::kHalf && m.sizes() == d.sizes(), "q4_1_linear: m must be fp16 shaped like d");
  return act_bits == 8 ? q4_1_impl<int8_t>(x, qs, d, m, n, k) : q4_1_impl<int16_t>(x, qs, d, m, n, k);
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t n, int64_t k, int64_t act_bits) {
  check_inputs(x, qs, d, k, act_bits, "q8_0_linear");
  TORCH_CHECK(qs.scalar_type() == at::kChar && qs.size(0) == n && qs.size(1) == k, "q8_0_linear: qs must be int8 [N, K]");
  return act_bits == 8 ? q8_0_impl<int8_t>(x, qs, d, n, k) : q8_0_impl<int16_t>(x, qs, d, n, k);
}

at::Tensor q4_1_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t n, int64_t, int64_t) {
  return at::empty({x.size(0), n}, x.options());
}

at::Tensor q8_0_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, int64_t n, int64_t, int64_t) {
  return at::empty({x.size(0), n}, x.options());
}

}  // namespace

TORCH_LIBRARY(edgewise, m) {
  m.def("q4_1_linear(Tensor x, Tensor qs, Tensor d, Tensor m, int n, int k, int act_bits) -> Tensor");
  m.def("q8_0_linear(Tensor x, Tensor qs, Tensor d, int n, int k, int act_bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(edgewise, CPU, m) {
  m.impl("q4_1_linear", &q4_1_linear);
  m.impl("q8_0_linear", &q8_0_linear);
}

TORCH_LIBRARY_IMPL(edgewise, Meta, m) {
  m.impl("q4_1_linear", &q4_1_meta);
  m.impl("q8_0_linear", &q8_0_meta);
}
