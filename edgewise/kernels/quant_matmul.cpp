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
//
// How the time goes down (each step measured on the 2-core AVX2 test machine, see the commit):
// - Q4_1 x int8 takes two blocks per step: GGUF's nibble packing already splits, by mask and
//   shift, into the halves of two blocks, so the activations are stored in that order instead.
// - Per weight row, the block scales (d_w * d_x) and the Q4_1 min term are computed first, a
//   few blocks at a time, so the inner loop is load, integer dot, one FMA.
// - In decode (one activation row) Q4 rows go four at a time: one reduction for four outputs.
//   Prefill tiles TILE activation rows against each weight row instead.
// - Rows are prefetched ahead; at::parallel_for splits them evenly between threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "blocks.h"

namespace {

using ew::Activations;
using ew::hsum;
using ew::prefetch_bytes;
using ew::QK;

constexpr int64_t TILE = 4;
constexpr int64_t MAX_BLOCKS = 512;  // K <= 16384

inline float half_to_float(const at::Half h) { return _cvtsh_ss(h.x); }  // F16C, not c10's software path

inline int load_u32(const at::Half* p) {
  int v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// scale[C*b .. C*b+C-1] = w_d[b] * x_d[b] for every block, C copies of each (C = 4: a pair of blocks'
// scales is then one 8-float load); returns sum_b w_m[b] * x_s[b] (0 when w_m is null).
template <int C>
__attribute__((always_inline)) inline float block_scales(const at::Half* w_d, const at::Half* w_m, const float* x_d, const float* x_s, int64_t n_blocks, float* scale) {
  static_assert(C == 1 || C == 4);
  const __m256i pair_idx[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                               _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
  __m256 mins = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= n_blocks; b += 8) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_d + b)));
    const __m256 s = _mm256_mul_ps(d, _mm256_loadu_ps(x_d + b));
    if constexpr (C == 4)
      for (int i = 0; i < 4; ++i) _mm256_store_ps(scale + 4 * b + 8 * i, _mm256_permutevar8x32_ps(s, pair_idx[i]));
    else
      _mm256_storeu_ps(scale + b, s);
    if (w_m) {
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_m + b)));
      mins = _mm256_fmadd_ps(m, _mm256_loadu_ps(x_s + b), mins);
    }
  }
  __m128 mins2 = _mm_setzero_ps();
  for (; b + 2 <= n_blocks; b += 2) {  // two blocks at a time: the rows of a 576-wide layer have 18
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128(load_u32(w_d + b)));  // [d_b, d_b+1, 0, 0]
    const __m128 s = _mm_mul_ps(d, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x_d + b))));
    if constexpr (C == 4)
      _mm256_store_ps(scale + 4 * b, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), pair_idx[0]));
    else
      _mm_storel_pi(reinterpret_cast<__m64*>(scale + b), s);
    if (w_m) mins2 = _mm_fmadd_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(load_u32(w_m + b))), _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x_s + b))), mins2);
  }
  float tail = _mm_cvtss_f32(_mm_add_ss(mins2, _mm_movehdup_ps(mins2)));
  for (; b < n_blocks; ++b) {
    const float s = half_to_float(w_d[b]) * x_d[b];
    for (int i = 0; i < C; ++i) scale[C * b + i] = s;
    if (w_m) tail += half_to_float(w_m[b]) * x_s[b];
  }
  return hsum(mins) + tail;
}

// Weight formats against one activation precision. Each gives, for a group of kGroup blocks starting
// at block b, the exact integer dot with the activation codes as 8 int32 lanes: one block's partial
// sums in all eight (kGroup 1), or block b's in lanes 0-3 and block b+1's in lanes 4-7 (kGroup 2).
// kPairedActivations: the codes of blocks 2p and 2p+1 are stored as [2p: 0..15 | 2p+1: 0..15 |
// 2p: 16..31 | 2p+1: 16..31] (an odd last block stays in order), to match Q4's packed nibbles.
// kTileRows: weight rows per decode tile, 4 for Q4 (short rows: one reduction serves four) and 1
// for Q8 (on the 30 MB output layer, four interleaved rows were measured slower than one).

template <typename A, int64_t Group, bool PairedActivations, int64_t TileRows>
struct FormatTraits {
  using Act = A;
  static constexpr int64_t kGroup = Group;
  static constexpr bool kPairedActivations = PairedActivations;
  static constexpr int64_t kTileRows = TileRows;
};

// Q4_1 with int8 activations, two blocks per step. GGUF packs block b as 16 bytes whose low nibbles
// are elements 0..15 and high nibbles 16..31, so one 32-byte load of blocks b and b+1 splits, by
// mask and shift, into exactly the two halves of the paired activation layout. maddubs (unsigned
// nibble x signed int8, pairs summed) cannot saturate: 4 * 15 * 127 < 32767 after the add.
struct Q4Int8Pairs : FormatTraits<int8_t, 2, true, 4> {
  const uint8_t* qs;
  explicit Q4Int8Pairs(const uint8_t* q = nullptr) : qs(q) {}
  struct Loaded { __m256i lo, hi; };
  Loaded load(int64_t b) const {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * 16));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(raw, low4), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)};
  }
  static __m256i dot(const Loaded& w, const int8_t* y) {
    const __m256i y_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y));
    const __m256i y_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + 32));
    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, y_lo), _mm256_maddubs_epi16(w.hi, y_hi));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
  }
};

// Q4_1 with int8 activations, one block (the odd last block after Q4Int8Pairs).
struct Q4Int8 : FormatTraits<int8_t, 1, false, 4> {
  const uint8_t* qs;
  explicit Q4Int8(const uint8_t* q = nullptr) : qs(q) {}
  __m256i load(int64_t b) const {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 16));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low4), _mm_and_si128(packed, low4));
  }
  static __m256i dot(__m256i w, const int8_t* y) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y))), _mm256_set1_epi16(1));
  }
};

// Both int16 formats widen the block's 32 weight codes to two int16 vectors (elements 0..15, 16..31).
template <int64_t TileRows>
struct Int16Dot : FormatTraits<int16_t, 1, false, TileRows> {
  struct Loaded { __m256i lo, hi; };
  static __m256i dot(const Loaded& w, const int16_t* y) {
    return _mm256_add_epi32(_mm256_madd_epi16(w.lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y))),
                            _mm256_madd_epi16(w.hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + 16))));
  }
};

// Q4_1 with int16 activations: the 16 bytes zero-extended to 16-bit lanes hold nibble pairs, so a
// mask gives elements 0..15 and a shift 16..31.
struct Q4Int16 : Int16Dot<4> {
  const uint8_t* qs;
  explicit Q4Int16(const uint8_t* q = nullptr) : qs(q) {}
  Loaded load(int64_t b) const {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 16)));
    return {_mm256_and_si256(bytes, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16(bytes, 4)};
  }
};

struct Q8Int16 : Int16Dot<1> {
  const int8_t* qs;
  explicit Q8Int16(const int8_t* q = nullptr) : qs(q) {}
  Loaded load(int64_t b) const {
    const int8_t* p = qs + b * QK;
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
  }
};

struct Q8Int8 : FormatTraits<int8_t, 1, false, 1> {
  const int8_t* qs;
  explicit Q8Int8(const int8_t* q = nullptr) : qs(q) {}
  __m256i load(int64_t b) const { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * QK)); }
  static __m256i dot(__m256i w, const int8_t* y8) {
    // maddubs multiplies unsigned by signed: move w's sign onto y
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y8));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)), _mm256_set1_epi16(1));
  }
};

// One weight row: where its codes are, its block scales and (Q4_1) mins.
template <typename Format, typename Tail>
struct WeightRow {
  Format codes;
  Tail tail;  // the last block when it does not fill a group of Format::kGroup (else unused)
  const at::Half* d;
  const at::Half* m;  // null for formats without a min term
};

// A tile of R weight rows x T activation rows: out[t * out_stride + r] = row r . activation row0 + t.
// Each (r, t) pair keeps its own FMA chain (two when the tile is a single pair, so that two chains
// are in flight); a 4-row tile reduces its four accumulators together and stores four floats at once.
template <int64_t R, int64_t T, typename Format, typename Tail>
inline void dot_tile(const WeightRow<Format, Tail>* rows, const Activations<typename Format::Act>& a, int64_t row0, float* out, int64_t out_stride) {
  using Q = typename Format::Act;
  constexpr int64_t G = Format::kGroup;
  constexpr int S = R * T >= 4 ? 1 : 2;  // accumulator slots per (r, t)
  const int64_t n_blocks = a.n_blocks;
  constexpr int C = G == 2 ? 4 : 1;  // copies of each block scale (see block_scales)
  alignas(32) float scale[R][T][MAX_BLOCKS * C];
  float mins[R][T];
  __m256 acc[R][T][S];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t x = (row0 + t) * n_blocks;
      mins[r][t] = block_scales<C>(rows[r].d, rows[r].m, a.d.data() + x, a.s.data() + x, n_blocks, scale[r][t]);
      for (int i = 0; i < S; ++i) acc[r][t][i] = _mm256_setzero_ps();
    }
  const Q* codes = a.row(row0);
  const auto step = [&](auto pick, int64_t b, int slot) {
    constexpr int64_t g = decltype(pick(rows[0]))::kGroup;
    for (int64_t r = 0; r < R; ++r) {
      const auto fmt = pick(rows[r]);
      const auto wb = fmt.load(b);
      for (int64_t t = 0; t < T; ++t) {
        const __m256i p = decltype(fmt)::dot(wb, codes + (t * n_blocks + b) * QK);
        const __m256 s = g == 2 ? _mm256_load_ps(&scale[r][t][C * b]) : _mm256_broadcast_ss(&scale[r][t][C * b]);
        acc[r][t][slot] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[r][t][slot]);
      }
    }
  };
  const auto main = [](const WeightRow<Format, Tail>& w) { return w.codes; };
  const auto last = [](const WeightRow<Format, Tail>& w) { return w.tail; };
  int64_t b = 0;
  for (; b + S * G <= n_blocks; b += S * G)
    for (int i = 0; i < S; ++i) step(main, b + i * G, i);
  for (; b + G <= n_blocks; b += G) step(main, b, 0);
  for (; b < n_blocks; ++b) step(last, b, S - 1);
  for (int64_t t = 0; t < T; ++t) {
    if constexpr (R == 4) {
      __m256 v[4];
      for (int r = 0; r < 4; ++r) v[r] = S == 1 ? acc[r][t][0] : _mm256_add_ps(acc[r][t][0], acc[r][t][S - 1]);
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // lane r: row r's halves
      const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storeu_ps(out + t * out_stride, _mm_add_ps(sums, _mm_setr_ps(mins[0][t], mins[1][t], mins[2][t], mins[3][t])));
    } else {
      for (int64_t r = 0; r < R; ++r)
        out[t * out_stride + r] = hsum(S == 1 ? acc[r][t][0] : _mm256_add_ps(acc[r][t][0], acc[r][t][S - 1])) + mins[r][t];
    }
  }
}

// Where a weight matrix's rows lie, for prefetching: codes_row_bytes per row of codes, k / 32 fp16
// scales (and mins, if any) per row.
struct WeightStream {
  const char* codes;
  int64_t codes_row_bytes;
  const at::Half* d;
  const at::Half* m;
  int64_t n_blocks;
};
constexpr int64_t kPrefetchRows = 8;
// Beyond this many blocks per row, decode tiles are single rows: at K = 1536, four interleaved
// rows streaming from memory were measured 1.4-1.6x slower than one at a time.
constexpr int64_t kMaxBlocksFor4Rows = 32;

// Ask for `count` rows from row j on before they are needed (measured 4% faster over a token's weights).
inline void prefetch(const WeightStream& w, int64_t j, int64_t count) {
  if (count <= 0) return;
  prefetch_bytes(w.codes + j * w.codes_row_bytes, count * w.codes_row_bytes);
  prefetch_bytes(w.d + j * w.n_blocks, count * w.n_blocks * 2);
  if (w.m) prefetch_bytes(w.m + j * w.n_blocks, count * w.n_blocks * 2);
}

// Quantize every activation row once, then stream the weight rows: each once per tile of TILE
// activation rows (prefill), or four at a time against each leftover activation row (decode).
template <typename Format, typename Tail, typename RowOf>
at::Tensor matmul_rows(const at::Tensor& x_in, int64_t n, int64_t k, RowOf row_of, const WeightStream& stream) {
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0);
  const Activations<typename Format::Act> act(x.data_ptr<float>(), m, k / QK, Format::kPairedActivations);
  at::Tensor out = at::empty({m, n}, x.options());
  float* op = out.data_ptr<float>();
  const int64_t n_quads = (n + 3) / 4;
  at::parallel_for(0, n_quads, 2, [&](int64_t q0, int64_t q1) {
    for (int64_t j = 4 * q0; j < std::min(4 * q1, n); j += 4) {
      const int64_t width = std::min<int64_t>(4, n - j);
      prefetch(stream, j + kPrefetchRows, std::min<int64_t>(4, n - j - kPrefetchRows));
      WeightRow<Format, Tail> rows[4];
      for (int64_t r = 0; r < width; ++r) rows[r] = row_of(j + r);
      int64_t i = 0;
      if (m > ew::EXACT_ROWS)  // short batches row by row, as decode (batch invariance, blocks.h)
        for (int64_t r = 0; r < width; ++r)
          for (i = 0; i + TILE <= m; i += TILE) dot_tile<1, TILE>(rows + r, act, i, op + i * n + j + r, n);
      for (; i < m; ++i) {
        if (width == 4 && Format::kTileRows == 4 && act.n_blocks <= kMaxBlocksFor4Rows) dot_tile<4, 1>(rows, act, i, op + i * n + j, n);
        else
          for (int64_t r = 0; r < width; ++r) dot_tile<1, 1>(rows + r, act, i, op + i * n + j + r, n);
      }
    }
  });
  return out;
}

void check_inputs(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t k, int64_t act_bits, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [M, K]");
  TORCH_CHECK(x.size(1) == k && k % QK == 0, op, ": x has ", x.size(1), " columns, weights expect ", k, " (a multiple of 32)");
  TORCH_CHECK(k <= QK * MAX_BLOCKS, op, ": K = ", k, " exceeds the kernels' limit of ", QK * MAX_BLOCKS);
  TORCH_CHECK(qs.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kHalf, op, ": bad weight layout");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, op, ": act_bits must be 8 or 16, got ", act_bits);
}

at::Tensor q4_1_impl(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t n, int64_t k, int64_t act_bits) {
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = m.data_ptr<at::Half>();
  const int64_t nb = k / QK;
  const WeightStream stream{reinterpret_cast<const char*>(q), k / 2, dp, mp, nb};
  if (act_bits == 8)
    return matmul_rows<Q4Int8Pairs, Q4Int8>(x, n, k, [&](int64_t j) {
      const uint8_t* row = q + j * (k / 2);
      return WeightRow<Q4Int8Pairs, Q4Int8>{Q4Int8Pairs{row}, Q4Int8{row}, dp + j * nb, mp + j * nb};
    }, stream);
  return matmul_rows<Q4Int16, Q4Int16>(x, n, k, [&](int64_t j) {
    const uint8_t* row = q + j * (k / 2);
    return WeightRow<Q4Int16, Q4Int16>{Q4Int16{row}, Q4Int16{row}, dp + j * nb, mp + j * nb};
  }, stream);
}

at::Tensor q8_0_impl(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t n, int64_t k, int64_t act_bits) {
  const int8_t* q = qs.data_ptr<int8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const int64_t nb = k / QK;
  const WeightStream stream{reinterpret_cast<const char*>(q), k, dp, nullptr, nb};
  if (act_bits == 8)
    return matmul_rows<Q8Int8, Q8Int8>(x, n, k, [&](int64_t j) { return WeightRow<Q8Int8, Q8Int8>{Q8Int8{q + j * k}, Q8Int8{q + j * k}, dp + j * nb, nullptr}; }, stream);
  return matmul_rows<Q8Int16, Q8Int16>(x, n, k, [&](int64_t j) {
    return WeightRow<Q8Int16, Q8Int16>{Q8Int16{q + j * k}, Q8Int16{q + j * k}, dp + j * nb, nullptr};
  }, stream);
}

at::Tensor q4_1_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m, int64_t n, int64_t k, int64_t act_bits) {
  check_inputs(x, qs, d, k, act_bits, "q4_1_linear");
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.size(0) == n && qs.size(1) == k / 2, "q4_1_linear: qs must be uint8 [N, K/2]");
  TORCH_CHECK(m.is_contiguous() && m.scalar_type() == at::kHalf && m.sizes() == d.sizes(), "q4_1_linear: m must be fp16 shaped like d");
  return q4_1_impl(x, qs, d, m, n, k, act_bits);
}

at::Tensor q8_0_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t n, int64_t k, int64_t act_bits) {
  check_inputs(x, qs, d, k, act_bits, "q8_0_linear");
  TORCH_CHECK(qs.scalar_type() == at::kChar && qs.size(0) == n && qs.size(1) == k, "q8_0_linear: qs must be int8 [N, K]");
  return q8_0_impl(x, qs, d, n, k, act_bits);
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
