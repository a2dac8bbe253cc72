// K-quant matrix multiplication for x86-64 AVX2: y = x @ W.T with W kept in GGUF's own Q4_K, Q5_K
// or Q6_K super-blocks, bit for bit (formats: blocks.h).
//
// Activations are quantized per block of 32 as for the other formats (int8 or int16, `act_bits`),
// so every 32-element dot is exact integer arithmetic; what differs is where the scales come from.
// A sub-block's weight is d * scale_s * q - dmin * min_s (Q4_K, Q5_K) or d * scale_s * (q - 32)
// (Q6_K), so for activation block b with scale dx_b and code sum S_b:
//   sum_i w_i x_i = (d scale_s dx_b) * (q . xq)  -  dmin min_s (dx_b S_b)        (Q4_K, Q5_K)
//                 = sum over its two halves h: (d scale_h dx_b) * (q_h . xq_h) - 32 d scale_h (dx_b S_bh)   (Q6_K)
// The integer dot q . xq takes unsigned codes (0..63) against signed activations: maddubs + madd
// (no saturation: 2 * 63 * 127 < 32767), or one vpdpbusd where AVX512-VNNI is built in.
//
// Per super-block, the header's sub-block scales are unpacked once into floats and multiplied by the
// activation blocks' scales for every activation row of the tile; each block's codes are then
// unpacked once (mask, shift, or) and dotted with every row of the tile: TILE rows in prefill,
// one in decode. Min and offset terms collect in a second accumulator, from the same floats.
// Rows are split evenly between threads (at::parallel_for); decode prefetches 2 KiB ahead.
// Where AVX-512 (BW, VNNI) is built in, int8 decode rows take row_dot_512: pairs of blocks per
// instruction, activations laid out once per call to match the weight's own byte order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "blocks.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512DQ__)
#define EW_AVX512 1  // 512-bit decode path (kernels/__init__.py builds with it where the CPU has these)
#endif

namespace {

using ew::Activations;
using ew::fp16_at;
using ew::hsum;
using ew::QK;
using ew::QK_K;

constexpr int64_t TILE = 4;
// Weights stream from DRAM once per token: in decode each super-block asks for the bytes 2 KiB further
// on (rows are contiguous, so this runs on into the next rows). Measured on the 1.5B model's 28 down
// projections (Q6_K rows of 7350 B), weights cold in cache, 2 threads: 11-13 ms per token against
// 14-22 ms when each row prefetched the whole row two ahead (noisy machine; 1024 and 4096 no better).
constexpr int64_t kPrefetchAhead = 2048;
constexpr int64_t kBlocksPerSuper = QK_K / QK;  // 8 activation blocks per super-block

// 32 unsigned codes (element order) . 32 activation codes -> 8 int32 lanes; lanes 0-3 sum elements
// 0..15 and lanes 4-7 elements 16..31 (Q6_K gives each half its own scale).
EW_INLINE __m256i dot32(__m256i w, const int8_t* y) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
#endif
}

EW_INLINE __m256i dot32(__m256i w, const int16_t* y) {
  const __m256i lo = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(w)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y)));
  const __m256i hi = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(w, 1)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + 16)));
  // hadd pairs within 128-bit lanes -> [lo 0..7 | hi 0..7 | lo 8..15 | hi 8..15] as 64-bit quarters; reorder
  return _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xD8);
}

// The 8 (scale, min) pairs of a Q4_K/Q5_K super-block as bytes: scales 0-7, then mins 0-7.
// The 12 bytes after d and dmin, as three little-endian words A, B, C (blocks.h), unpack four at a
// time: scales 0-3 = A & 63, mins 0-3 = B & 63; scales 4-7 = C's low nibbles | A's top two bits
// moved to bits 4-5; mins 4-7 = C's high nibbles | B's top two bits moved to bits 4-5. One 16-byte
// load holds [d dmin | A | B | C]; both halves are computed side by side in 32-bit lanes.
EW_INLINE __m128i k4_scale_bytes(__m128i v) {
  const __m128i ab = _mm_shuffle_epi32(v, 0xF9);  // [A, B, C, C]
  const __m128i cc = _mm_shuffle_epi32(v, 0xFF);  // [C, C, C, C]
  const __m128i lo = _mm_and_si128(ab, _mm_set1_epi32(0x3f3f3f3f));  // [scales 0-3, mins 0-3, ..]
  const __m128i hi = _mm_or_si128(_mm_and_si128(_mm_srlv_epi32(cc, _mm_setr_epi32(0, 4, 0, 0)), _mm_set1_epi32(0x0f0f0f0f)),
                                  _mm_and_si128(_mm_srli_epi32(ab, 2), _mm_set1_epi32(0x30303030)));  // [scales 4-7, mins 4-7, ..]
  return _mm_unpacklo_epi32(lo, hi);
}

// As floats: d * scale_s and dmin * min_s.
EW_INLINE void k4_scales(const uint8_t* blk, __m256& scale, __m256& min) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
  const __m128i both = k4_scale_bytes(v);
  const __m256 dm = _mm256_cvtph_ps(v);  // lanes 0, 1: d, dmin
  scale = _mm256_mul_ps(_mm256_permutevar8x32_ps(dm, _mm256_setzero_si256()), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(both)));
  min = _mm256_mul_ps(_mm256_permutevar8x32_ps(dm, _mm256_set1_epi32(1)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(both, 8))));
}

// Each format: kBytes per super-block; kHalfScales (Q6_K: one scale per 16 elements); a Block view
// of one super-block that unpacks its scales and the codes of its 32-element block b (0..7).
// Q4_K/Q5_K low 4 bits: the 32 bytes at qs + 32 (b / 2) hold block b in their low nibbles (b even)
// or high nibbles (b odd), element l in byte l.
EW_INLINE __m256i k4_nibbles(const uint8_t* qs, int b) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (b / 2)));
  return _mm256_and_si256(b % 2 ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0F));
}

#ifdef EW_AVX512
// Pair j of 32-element blocks from one 64-byte load of nibbles (qs + 64 (j / 2)): its bytes 0..31 hold
// blocks 4h and 4h+1, bytes 32..63 blocks 4h+2 and 4h+3 (low, high nibbles), so the low nibbles are
// blocks (4h, 4h+2) and the high nibbles (4h+1, 4h+3): Format::kPairs.
EW_INLINE __m512i k4_nibbles_pair(const uint8_t* qs, int j) {
  const __m512i raw = _mm512_loadu_si512(qs + 64 * (j / 2));
  return _mm512_and_si512(j % 2 ? _mm512_srli_epi16(raw, 4) : raw, _mm512_set1_epi8(0x0F));
}

// k4_scales in one 512-bit vector: [d * scale_0..7 | dmin * min_0..7].
EW_INLINE __m512 k4_scales16(const uint8_t* blk) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
  const __m512 dm = _mm512_castps128_ps512(_mm_cvtph_ps(v));  // lanes 0, 1: d, dmin
  const __m512 d_dmin = _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), dm);
  return _mm512_mul_ps(d_dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(k4_scale_bytes(v))));
}
#endif

struct Q4K {
  static constexpr int64_t kBytes = ew::Q4_K_BYTES;
  static constexpr bool kHalfScales = false;
  struct Block {
    const uint8_t* p;
    explicit Block(const uint8_t* blk) : p(blk) {}
    EW_INLINE void scales(__m256& scale, __m256& min) const { k4_scales(p, scale, min); }
    EW_INLINE __m256i codes(int b) const { return k4_nibbles(p + 16, b); }
#ifdef EW_AVX512
    EW_INLINE __m512 scales16() const { return k4_scales16(p); }
    EW_INLINE __m512i pair(int j) const { return k4_nibbles_pair(p + 16, j); }
#endif
  };
#ifdef EW_AVX512
  static constexpr int kPairs[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};  // one 64-byte load of nibbles: low halves, then high
#endif
};

struct Q5K {
  static constexpr int64_t kBytes = ew::Q5_K_BYTES;
  static constexpr bool kHalfScales = false;
  struct Block {
    const uint8_t* p;
    __m256i qh;
    explicit Block(const uint8_t* blk) : p(blk), qh(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16))) {}
    EW_INLINE void scales(__m256& scale, __m256& min) const { k4_scales(p, scale, min); }
    EW_INLINE __m256i codes(int b) const {
      const __m256i low = k4_nibbles(p + 48, b);
      // bit b of each qh byte -> bit 4 (16-bit shifts: the masks drop what crosses from the other byte)
      const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(b)), _mm256_set1_epi8(1));
      return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
    }
#ifdef EW_AVX512
    EW_INLINE __m512 scales16() const { return k4_scales16(p); }
    EW_INLINE __m512i pair(int j) const {  // nibbles as Q4_K; 5th bits: bit A of qh's bytes for the low half, A + 2 for the high
      const int a = kPairs[j][0];
      const __m512i shift = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(a)), _mm256_set1_epi16(static_cast<int16_t>(a + 2)), 1);
      const __m512i high = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(qh), shift), _mm512_set1_epi8(1));
      return _mm512_or_si512(k4_nibbles_pair(p + 48, j), _mm512_slli_epi16(high, 4));
    }
#endif
  };
#ifdef EW_AVX512
  static constexpr auto& kPairs = Q4K::kPairs;  // the same nibble layout
#endif
};

struct Q6K {
  static constexpr int64_t kBytes = ew::Q6_K_BYTES;
  static constexpr bool kHalfScales = true;
  struct Block {
    const uint8_t* p;
    explicit Block(const uint8_t* blk) : p(blk) {}
    // d * scale for sub-blocks 0..7 and 8..15
    EW_INLINE void scales(__m256& lo, __m256& hi) const {
      const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192));
      const __m256 d = _mm256_set1_ps(fp16_at(p + 208));
      lo = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s)));
      hi = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s, 8))));
    }
    EW_INLINE __m256i codes(int b) const {
      const int half = b / 4, bb = b % 4;
      const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * half + 32 * (bb & 1)));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * half));
      const __m256i low = _mm256_and_si256(bb >= 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0F));
      const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * bb)), _mm256_set1_epi8(3));
      return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
    }
#ifdef EW_AVX512
    EW_INLINE __m512 scales16() const {  // d * scale for the 16 sub-blocks of 16
      const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192));
      return _mm512_mul_ps(_mm512_set1_ps(fp16_at(p + 208)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
    }
    EW_INLINE __m512i pair(int j) const {  // blocks 2j, 2j+1 (bb = 0, 1 or 2, 3 of half j / 2): 64 bytes of ql, qh twice
      const int half = j / 2, hi_nibble = j % 2;
      const __m512i ql = _mm512_loadu_si512(p + 64 * half);
      const __m512i low = _mm512_and_si512(hi_nibble ? _mm512_srli_epi16(ql, 4) : ql, _mm512_set1_epi8(0x0F));
      const __m512i qh2 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * half)));
      const int bb = 2 * hi_nibble;  // qh bits 2bb (first block) and 2bb + 2 (second)
      const __m512i shift = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(2 * bb)), _mm256_set1_epi16(static_cast<int16_t>(2 * bb + 2)), 1);
      const __m512i high = _mm512_and_si512(_mm512_srlv_epi16(qh2, shift), _mm512_set1_epi8(3));
      return _mm512_or_si512(low, _mm512_slli_epi16(high, 4));
    }
#endif
  };
#ifdef EW_AVX512
  static constexpr int kPairs[4][2] = {{0, 1}, {2, 3}, {4, 5}, {6, 7}};  // ql's low nibbles hold blocks 4h, 4h+1; high nibbles 4h+2, 4h+3
#endif
};

// One weight row against T activation rows (row0 ..): out[t * out_stride] = row . x_t.
template <typename Format, typename Q, int T>
inline void row_dot(const uint8_t* row, int64_t n_super, const Activations<Q>& a, int64_t row0, float* out, int64_t out_stride) {
  const int64_t nb = a.n_blocks;
  // A accumulators per row: in decode (T = 1) four independent FMA chains, so that the chain's
  // latency, not the loads, would bound a row (measured 1.5x faster than one chain); prefill's T
  // rows already interleave T chains.
  constexpr int A = T == 1 ? 4 : 1;
  __m256 acc[T][A], macc[T];
  for (int t = 0; t < T; ++t) {
    macc[t] = _mm256_setzero_ps();
    for (int i = 0; i < A; ++i) acc[t][i] = _mm256_setzero_ps();
  }
  const __m256i pair_lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  for (int64_t sb = 0; sb < n_super; ++sb) {
    const typename Format::Block blk(row + sb * Format::kBytes);
    if constexpr (T == 1) ew::prefetch_bytes(row + sb * Format::kBytes + kPrefetchAhead, Format::kBytes);
    __m256 s0, s1;  // Q4_K/Q5_K: scales, mins; Q6_K: scales of sub-blocks 0..7, 8..15
    blk.scales(s0, s1);
    alignas(32) float lane_scale[T][2 * kBlocksPerSuper];  // per (row, 32-block) or per (row, 16-half)
    for (int t = 0; t < T; ++t) {
      const int64_t x0 = (row0 + t) * nb + sb * kBlocksPerSuper;
      const __m256 dx = _mm256_loadu_ps(a.d.data() + x0);
      if constexpr (!Format::kHalfScales) {
        _mm256_store_ps(lane_scale[t], _mm256_mul_ps(s0, dx));
        macc[t] = _mm256_fmadd_ps(s1, _mm256_loadu_ps(a.s.data() + x0), macc[t]);
      } else {
        // each 32-block's dx serves both of its halves
        const __m256 dx_lo = _mm256_permutevar8x32_ps(dx, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
        const __m256 dx_hi = _mm256_permutevar8x32_ps(dx, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
        _mm256_store_ps(lane_scale[t], _mm256_mul_ps(s0, dx_lo));
        _mm256_store_ps(lane_scale[t] + 8, _mm256_mul_ps(s1, dx_hi));
        const float* h = a.s16.data() + 2 * x0;  // dx * (sum of 16 codes), per half
        macc[t] = _mm256_fmadd_ps(s0, _mm256_loadu_ps(h), macc[t]);
        macc[t] = _mm256_fmadd_ps(s1, _mm256_loadu_ps(h + 8), macc[t]);
      }
    }
    const Q* xq = a.q.data() + sb * QK_K;
#pragma GCC unroll 8
    for (int b = 0; b < kBlocksPerSuper; ++b) {
      const __m256i w = blk.codes(b);
      for (int t = 0; t < T; ++t) {
        const __m256 p = _mm256_cvtepi32_ps(dot32(w, xq + (row0 + t) * nb * QK + b * QK));
        __m256 s;
        if constexpr (Format::kHalfScales)  // lanes 0-3: half 2b's scale, lanes 4-7: half 2b+1's
          s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(lane_scale[t] + 2 * b)))), pair_lanes);
        else
          s = _mm256_broadcast_ss(lane_scale[t] + b);
        acc[t][b % A] = _mm256_fmadd_ps(s, p, acc[t][b % A]);
      }
    }
  }
  const float offset = Format::kHalfScales ? 32.f : 1.f;  // Q6_K: q - 32; Q4_K/Q5_K: the mins
  for (int t = 0; t < T; ++t) {
    __m256 sum = acc[t][0];
    for (int i = 1; i < A; ++i) sum = _mm256_add_ps(sum, acc[t][i]);
    out[t * out_stride] = hsum(sum) - offset * hsum(macc[t]);
  }
}

#ifdef EW_AVX512
// Decode (int8 activation rows left over from the tiles) with 512-bit vectors where the CPU has
// AVX-512 (BW, VNNI): two 32-element blocks per vpdpbusd, the pair Format::kPairs[j] that one load of
// the weight's codes yields. The activation codes are laid out once per call in the same pairs, and
// per super-block one 16-float vector of activation scales meets the weight's 16 scales in one
// multiply: t = [d scale_s dx_s | dmin min_s (dx S)_s] (Q4_K/Q5_K; the second half is the min term)
// or [d scale_h dx_h] per half of 16 (Q6_K). Each pair's lane scales are picked from t by one permute.
// Same arithmetic as row_dot; only the grouping of the float sums differs.
template <typename Format>
struct DecodeRows {
  std::vector<int8_t> q;  // codes, each super-block's blocks in pair order
  std::vector<float> t;   // per super-block 16 floats: dx per block then dx * sum (Q4_K/Q5_K), or dx per half (Q6_K)
  const Activations<int8_t>& a;
  int64_t first, n_super;
  __m512i pick[4];  // lane -> entry of t, per pair
  DecodeRows(const Activations<int8_t>& act, int64_t first_row, int64_t rows) : q(rows * act.n_blocks * QK), t(rows * act.n_blocks * 2), a(act), first(first_row), n_super(act.n_blocks / kBlocksPerSuper) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t sb = 0; sb < n_super; ++sb) {
        const int64_t x0 = (first_row + r) * act.n_blocks + sb * kBlocksPerSuper, y0 = r * act.n_blocks + sb * kBlocksPerSuper;
        for (int j = 0; j < 4; ++j)
          for (int h = 0; h < 2; ++h) std::memcpy(q.data() + (y0 + 2 * j + h) * QK, act.q.data() + (x0 + Format::kPairs[j][h]) * QK, QK);
        for (int i = 0; i < 16; ++i)
          t[2 * y0 + i] = Format::kHalfScales ? act.d[x0 + i / 2] : (i < 8 ? act.d[x0 + i] : act.s[x0 + i - 8]);
      }
    for (int j = 0; j < 4; ++j) {
      alignas(64) int32_t idx[16];
      for (int lane = 0; lane < 16; ++lane) {
        const int block = Format::kPairs[j][lane / 8];
        idx[lane] = Format::kHalfScales ? 2 * block + (lane % 8) / 4 : block;
      }
      pick[j] = _mm512_load_si512(idx);
    }
  }
  const int8_t* codes(int64_t row) const { return q.data() + (row - first) * n_super * QK_K; }
  const float* scales(int64_t row) const { return t.data() + (row - first) * n_super * 16; }
};

template <typename Format>
inline float row_dot_512(const uint8_t* row, const DecodeRows<Format>& x, int64_t r) {
  const int64_t n_super = x.n_super;
  const int8_t* xq = x.codes(r);
  const float* xt = x.scales(r);
  const float* s16 = x.a.s16.data() + r * x.a.n_blocks * 2;  // Q6_K: dx * (sum of 16 codes), per half
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512 macc = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < n_super; ++sb) {
    const typename Format::Block blk(row + sb * Format::kBytes);
    ew::prefetch_bytes(row + sb * Format::kBytes + kPrefetchAhead, Format::kBytes);
    const __m512 sc = blk.scales16();
    const __m512 t = _mm512_mul_ps(sc, _mm512_loadu_ps(xt + 16 * sb));
    if constexpr (Format::kHalfScales)
      macc = _mm512_fmadd_ps(sc, _mm512_loadu_ps(s16 + 16 * sb), macc);
    else
      macc = _mm512_add_ps(macc, t);  // only its upper half (the min terms) is used
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), blk.pair(j), _mm512_loadu_si512(xq + sb * QK_K + 64 * j));
      acc[j % 2] = _mm512_fmadd_ps(_mm512_permutexvar_ps(x.pick[j], t), _mm512_cvtepi32_ps(p), acc[j % 2]);
    }
  }
  const float dot = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
  if constexpr (Format::kHalfScales) return dot - 32.f * _mm512_reduce_add_ps(macc);  // Q6_K: q - 32
  return dot - hsum(_mm512_extractf32x8_ps(macc, 1));
}
#endif

template <typename Format, typename Q>
at::Tensor matmul(const at::Tensor& x_in, const at::Tensor& w, int64_t n, int64_t k) {
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), n_super = k / QK_K, row_bytes = n_super * Format::kBytes;
  const Activations<Q> act(x.data_ptr<float>(), m, k / QK, false, Format::kHalfScales);
  at::Tensor out = at::empty({m, n}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t tiled = m > ew::EXACT_ROWS ? m / TILE * TILE : 0;  // short batches row by row, as decode
#ifdef EW_AVX512
  std::optional<DecodeRows<Format>> rest;
  if constexpr (std::is_same_v<Q, int8_t>)
    if (tiled < m) rest.emplace(act, tiled, m - tiled);
#endif
  at::parallel_for(0, n, 4, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* row = wp + j * row_bytes;
      for (int64_t i = 0; i < tiled; i += TILE) row_dot<Format, Q, TILE>(row, n_super, act, i, op + i * n + j, n);
      for (int64_t i = tiled; i < m; ++i) {
#ifdef EW_AVX512
        if constexpr (std::is_same_v<Q, int8_t>) {
          op[i * n + j] = row_dot_512<Format>(row, *rest, i);
          continue;
        }
#endif
        row_dot<Format, Q, 1>(row, n_super, act, i, op + i * n + j, n);
      }
    }
  });
  return out;
}

template <typename Format>
at::Tensor dispatch_bits(const at::Tensor& x, const at::Tensor& w, int64_t n, int64_t k, int64_t act_bits) {
  return act_bits == 8 ? matmul<Format, int8_t>(x, w, n, k) : matmul<Format, int16_t>(x, w, n, k);
}

int64_t super_bytes(int64_t qtype) {
  switch (qtype) {
    case ew::GGML_Q4_K: return Q4K::kBytes;
    case ew::GGML_Q5_K: return Q5K::kBytes;
    case ew::GGML_Q6_K: return Q6K::kBytes;
    default: TORCH_CHECK(false, "kquant: ggml type ", qtype, " is not a K-quant edgewise runs (Q4_K = 12, Q5_K = 13, Q6_K = 14)");
  }
  return 0;
}

at::Tensor kquant_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n, int64_t k, int64_t act_bits) {
  const int64_t bytes = super_bytes(qtype);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "kquant_linear: x must be float32 [M, K]");
  TORCH_CHECK(x.size(1) == k && k % QK_K == 0, "kquant_linear: x has ", x.size(1), " columns, weights expect ", k, " (a multiple of 256)");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && w.size(0) == n && w.size(1) == k / QK_K * bytes,
              "kquant_linear: w must be the GGUF's uint8 rows [N, K/256 * ", bytes, "]");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "kquant_linear: act_bits must be 8 or 16, got ", act_bits);
  switch (qtype) {
    case ew::GGML_Q4_K: return dispatch_bits<Q4K>(x, w, n, k, act_bits);
    case ew::GGML_Q5_K: return dispatch_bits<Q5K>(x, w, n, k, act_bits);
    default: return dispatch_bits<Q6K>(x, w, n, k, act_bits);
  }
}

// Rows `ids` of a K-quant matrix, dequantized exactly (fp32 math on the stored integers): the
// embedding lookup of a K-quant token table, traceable into the compiled decode step.
template <typename Format>
void dequantize_row(const uint8_t* row, int64_t n_super, float* out) {
  for (int64_t sb = 0; sb < n_super; ++sb) {
    const typename Format::Block blk(row + sb * Format::kBytes);
    __m256 s0, s1;
    blk.scales(s0, s1);
    alignas(32) float a[8], c[8];
    _mm256_store_ps(a, s0);
    _mm256_store_ps(c, s1);
    for (int b = 0; b < kBlocksPerSuper; ++b) {
      alignas(32) uint8_t q[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), blk.codes(b));
      float* o = out + sb * QK_K + b * QK;
      for (int e = 0; e < QK; ++e) {
        if constexpr (Format::kHalfScales) {
          const int h = 2 * b + e / 16;
          const float s = h < 8 ? a[h] : c[h - 8];
          o[e] = s * static_cast<float>(static_cast<int>(q[e]) - 32);
        } else {
          o[e] = a[b] * static_cast<float>(q[e]) - c[b];
        }
      }
    }
  }
}

at::Tensor kquant_rows(const at::Tensor& w, const at::Tensor& ids, int64_t qtype, int64_t k) {
  const int64_t bytes = super_bytes(qtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && k % QK_K == 0 && w.size(1) == k / QK_K * bytes, "kquant_rows: bad weight layout");
  const at::Tensor idx = ids.contiguous();
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1, "kquant_rows: ids must be int64 [T]");
  at::Tensor out = at::empty({idx.size(0), k}, at::TensorOptions().dtype(at::kFloat));
  const int64_t* ip = idx.data_ptr<int64_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  for (int64_t t = 0; t < idx.size(0); ++t) {
    TORCH_CHECK(ip[t] >= 0 && ip[t] < w.size(0), "kquant_rows: id ", ip[t], " out of range [0, ", w.size(0), ")");
    const uint8_t* row = wp + ip[t] * w.size(1);
    float* o = out.data_ptr<float>() + t * k;
    switch (qtype) {
      case ew::GGML_Q4_K: dequantize_row<Q4K>(row, k / QK_K, o); break;
      case ew::GGML_Q5_K: dequantize_row<Q5K>(row, k / QK_K, o); break;
      default: dequantize_row<Q6K>(row, k / QK_K, o);
    }
  }
  return out;
}

at::Tensor kquant_linear_meta(const at::Tensor& x, const at::Tensor&, int64_t, int64_t n, int64_t, int64_t) { return at::empty({x.size(0), n}, x.options()); }

at::Tensor kquant_rows_meta(const at::Tensor&, const at::Tensor& ids, int64_t, int64_t k) {
  return at::empty({ids.size(0), k}, ids.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(edgewise, m) {
  m.def("kquant_linear(Tensor x, Tensor w, int qtype, int n, int k, int act_bits) -> Tensor");
  m.def("kquant_rows(Tensor w, Tensor ids, int qtype, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(edgewise, CPU, m) {
  m.impl("kquant_linear", &kquant_linear);
  m.impl("kquant_rows", &kquant_rows);
}

TORCH_LIBRARY_IMPL(edgewise, Meta, m) {
  m.impl("kquant_linear", &kquant_linear_meta);
  m.impl("kquant_rows", &kquant_rows_meta);
}
