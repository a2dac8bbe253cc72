// K-quant matrix multiplication for x86-64 AVX2: y = x @ W.T with W kept in GGUF's own Q2_K, Q3_K,
// Q4_K, Q5_K or Q6_K super-blocks, bit for bit (formats: blocks.h).
//
// A sub-block's weight is d * scale_s * q - dmin * min_s (Q4_K, Q5_K; Q2_K per 16) or d * scale_s * (q - offset)
// (Q6_K: offset 32; Q3_K: offset 4, scale_s signed), so for an activation block b with step dx_b and code sum S_b, every 32-element dot is exact
// integer arithmetic and only the scales differ:
//   sum_i w_i x_i = (d scale_s dx_b) * (q . xq)  -  dmin min_s (dx_b S_b)        (Q4_K, Q5_K)
//                 = sum over its two halves h: (d scale_h dx_b) * (q_h . xq_h) - offset d scale_h (dx_b S_bh)   (Q6_K, Q3_K)
// The integer dot q . xq takes unsigned codes (0..63) against signed activations: maddubs, then madd
// (no saturation: 2 * 63 * 127 < 32767).
//
// Two activation precisions (`act_bits`):
// - int8 (rows_dot_k8): dx_b = D * e_b, one float D per super-block and a 5-bit integer e_b per block
//   (blocks.h, ActivationsK). scale_s * e_b is then an int16, the madd applies it, a super-block sums
//   exactly in int32 lanes, and d * D applies once per super-block. Up to 4 activation rows share each
//   unpacked weight block, at any batch size, with each row's arithmetic unchanged (batch invariance).
// - int16 (row_dot): dx_b per block of 32 as for the other formats; per super-block the sub-block
//   scales are unpacked into floats and multiplied by the activation blocks' scales, each block's dot
//   converted and accumulated in float (TILE rows in prefill, one in decode); min and offset terms
//   collect in a second accumulator.
// Rows are split evenly between threads (at::parallel_for); each super-block prefetches 2 KiB ahead.
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

// 32 unsigned codes (element order) . 32 int16 activation codes -> 8 int32 lanes; lanes 0-3 sum
// elements 0..15 and lanes 4-7 elements 16..31 (Q6_K gives each half its own scale).
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

// A super-block's scales for the int8 kernel (rows_dot_k8): the integer sub-block scales, which an
// activation row's sub-scales e (blocks.h, ActivationsK) multiply (Q4_K/Q5_K: sc8, one per block of
// 32; Q6_K/Q3_K/Q2_K: sc16, one per half-block of 16); d, the fp16 super-scale widened; minf, dmin * min
// per block of 32 as floats (Q4_K/Q5_K); mn16 and dmin, the integer min per half-block and its fp16
// super-scale (Q2_K).
struct IntScales {
  __m128i sc8;
  __m256i sc16;
  __m256 minf;
  float d;
  __m256i mn16 = _mm256_setzero_si256();
  float dmin = 0.f;
};

EW_INLINE IntScales k4_int_scales(const uint8_t* blk) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
  const __m128i both = k4_scale_bytes(v);
  IntScales k;
  k.sc8 = _mm_cvtepu8_epi16(both);
  k.sc16 = _mm256_setzero_si256();
  k.minf = _mm256_mul_ps(_mm256_set1_ps(fp16_at(blk + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(both, 8))));
  k.d = fp16_at(blk);
  return k;
}

// Q4_K/Q5_K block b: sub-block b's scale in every lane, picked from a vector holding the 8 in both 128-bit lanes.
EW_INLINE __m256i k4_pick(int b) { return _mm256_set1_epi16(static_cast<int16_t>(((2 * b + 1) << 8) | (2 * b))); }

// Each format: kBytes per super-block; kHalfScales (Q6_K: one scale per 16 elements); a Block view
// of one super-block that unpacks its scales and the codes of its 32-element block b (0..7).
// Q4_K/Q5_K low 4 bits: the 32 bytes at qs + 32 (b / 2) hold block b in their low nibbles (b even)
// or high nibbles (b odd), element l in byte l.
EW_INLINE __m256i k4_nibbles(const uint8_t* qs, int b) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (b / 2)));
  return _mm256_and_si256(b % 2 ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0F));
}


// Each format also states kOffset (what its codes have subtracted, with per-16 scales: the half-scale
// formats) and kOffsetShift = log2(kOffset), by which the int8 kernel multiplies in integers; and
// kHalfMins, a min per 16 elements instead (Q2_K: its Block gives them as half_mins and in int_scales).
struct Q4K {
  static constexpr int64_t kBytes = ew::Q4_K_BYTES;
  static constexpr bool kHalfScales = false, kHalfMins = false;
  static constexpr int kOffset = 0, kOffsetShift = 0;
  static EW_INLINE __m256i pick(int b) { return k4_pick(b); }
  struct Block {
    const uint8_t* p;
    explicit Block(const uint8_t* blk) : p(blk) {}
    EW_INLINE void scales(__m256& scale, __m256& min) const { k4_scales(p, scale, min); }
    EW_INLINE IntScales int_scales() const { return k4_int_scales(p); }
    EW_INLINE __m256i codes(int b) const { return k4_nibbles(p + 16, b); }
  };
};

struct Q5K {
  static constexpr int64_t kBytes = ew::Q5_K_BYTES;
  static constexpr bool kHalfScales = false, kHalfMins = false;
  static constexpr int kOffset = 0, kOffsetShift = 0;
  static EW_INLINE __m256i pick(int b) { return k4_pick(b); }
  struct Block {
    const uint8_t* p;
    __m256i qh;
    explicit Block(const uint8_t* blk) : p(blk), qh(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16))) {}
    EW_INLINE void scales(__m256& scale, __m256& min) const { k4_scales(p, scale, min); }
    EW_INLINE IntScales int_scales() const { return k4_int_scales(p); }
    EW_INLINE __m256i codes(int b) const {
      const __m256i low = k4_nibbles(p + 48, b);
      // bit b of each qh byte -> bit 4 (16-bit shifts: the masks drop what crosses from the other byte)
      const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(b)), _mm256_set1_epi8(1));
      return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
    }
  };
};

// Q6_K/Q3_K: 16 signed int8 sub-block scales under one fp16 d, as floats (d * scale, sub-blocks 0-7 in lo,
// 8-15 in hi) and as the int8 path takes them (int16 scales, d applied once per super-block, no mins).
EW_INLINE void signed_scales(__m128i s, float d, __m256& lo, __m256& hi) {
  const __m256 dv = _mm256_set1_ps(d);
  lo = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s)));
  hi = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s, 8))));
}
EW_INLINE IntScales signed_int_scales(__m128i s, float d) {
  IntScales k;
  k.sc8 = _mm_setzero_si128();
  k.sc16 = _mm256_cvtepi8_epi16(s);
  k.minf = _mm256_setzero_ps();
  k.d = d;
  return k;
}

struct Q6K {
  static constexpr int64_t kBytes = ew::Q6_K_BYTES;
  static constexpr bool kHalfScales = true, kHalfMins = false;
  static constexpr int kOffset = 32, kOffsetShift = 5;
  // block b = 4 h + c: half-block 2b's scale in lanes 0-7, 2b+1's in lanes 8-15, picked from a vector
  // holding the scales of half-blocks 8h..8h+7 in both 128-bit lanes
  static EW_INLINE __m256i pick(int b) {
    const int c = b % 4;
    return _mm256_setr_m128i(_mm_set1_epi16(static_cast<int16_t>(((4 * c + 1) << 8) | (4 * c))), _mm_set1_epi16(static_cast<int16_t>(((4 * c + 3) << 8) | (4 * c + 2))));
  }
  struct Block {
    const uint8_t* p;
    explicit Block(const uint8_t* blk) : p(blk) {}
    // d * scale for sub-blocks 0..7 and 8..15
    EW_INLINE void scales(__m256& lo, __m256& hi) const { signed_scales(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)), fp16_at(p + 208), lo, hi); }
    EW_INLINE IntScales int_scales() const { return signed_int_scales(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)), fp16_at(p + 208)); }
    EW_INLINE __m256i codes(int b) const {
      const int half = b / 4, bb = b % 4;
      const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * half + 32 * (bb & 1)));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * half));
      const __m256i low = _mm256_and_si256(bb >= 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0F));
      const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * bb)), _mm256_set1_epi8(3));
      return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
    }
  };
};

// Q3_K's 12 scale bytes as 16 signed int8 scales (blocks.h): the low nibbles of words 0-1 are scales
// 0-7, their high nibbles 8-15; word 2's bit pairs 0-1, 2-3, 4-5, 6-7 of each byte are the top bits of
// scales 0-3, 4-7, 8-11, 12-15.
EW_INLINE __m128i k3_scales(const uint8_t* sc) {
  // [w0, w1, w0, w1] >> [0, 0, 4, 4] & low nibbles | ([w2, w2, w2, w2] >> [0, 2, 4, 6] & 3s) << 4
  uint32_t w[3];
  std::memcpy(w, sc, 12);
  const __m128i v = _mm_setr_epi32(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[0]), static_cast<int>(w[1]));
  const __m128i low = _mm_and_si128(_mm_srlv_epi32(v, _mm_setr_epi32(0, 0, 4, 4)), _mm_set1_epi8(0x0f));
  const __m128i top = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(static_cast<int>(w[2])), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
  return _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi32(top, 4)), _mm_set1_epi8(32));
}

// Q2_K/Q3_K: block b's 2 low bits of element l are bits 2 (b % 4), 2 (b % 4) + 1 of byte l of the
// 32 pair bytes of half b / 4 (16-bit shifts: the mask drops what crosses from the neighbouring byte).
EW_INLINE __m256i k3_pairs(const uint8_t* pairs, int b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs + 32 * (b / 4)));
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * (b % 4))), _mm256_set1_epi8(3));
}

struct Q3K {
  static constexpr int64_t kBytes = ew::Q3_K_BYTES;
  static constexpr bool kHalfScales = true, kHalfMins = false;
  static constexpr int kOffset = 4, kOffsetShift = 2;
  static EW_INLINE __m256i pick(int b) { return Q6K::pick(b); }  // the same order of 16 scales
  struct Block {
    const uint8_t* p;
    __m256i hm;  // the 32 high-bit bytes: bit c of byte l is element l of block c's bit 2
    explicit Block(const uint8_t* blk) : p(blk), hm(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk))) {}
    EW_INLINE void scales(__m256& lo, __m256& hi) const { signed_scales(k3_scales(p + 96), fp16_at(p + 108), lo, hi); }
    EW_INLINE IntScales int_scales() const { return signed_int_scales(k3_scales(p + 96), fp16_at(p + 108)); }
    EW_INLINE __m256i codes(int b) const {
      const __m256i high = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(b)), _mm256_set1_epi8(1));
      return _mm256_or_si256(k3_pairs(p + 32, b), _mm256_slli_epi16(high, 2));
    }
  };
};

struct Q2K {
  static constexpr int64_t kBytes = ew::Q2_K_BYTES;
  static constexpr bool kHalfScales = true, kHalfMins = true;
  static constexpr int kOffset = 0, kOffsetShift = 0;
  static EW_INLINE __m256i pick(int b) { return Q6K::pick(b); }
  struct Block {
    const uint8_t* p;
    __m128i sc, mn;  // the 16 scales and mins, one byte each
    explicit Block(const uint8_t* blk) : p(blk) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
      sc = _mm_and_si128(v, _mm_set1_epi8(0x0f));
      mn = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0f));
    }
    static EW_INLINE void widen(__m128i bytes, float by, __m256& lo, __m256& hi) {
      lo = _mm256_mul_ps(_mm256_set1_ps(by), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
      hi = _mm256_mul_ps(_mm256_set1_ps(by), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))));
    }
    EW_INLINE void scales(__m256& lo, __m256& hi) const { widen(sc, fp16_at(p + 80), lo, hi); }
    EW_INLINE void half_mins(__m256& lo, __m256& hi) const { widen(mn, fp16_at(p + 82), lo, hi); }
    EW_INLINE IntScales int_scales() const {
      IntScales k;
      k.sc8 = _mm_setzero_si128();
      k.sc16 = _mm256_cvtepu8_epi16(sc);
      k.minf = _mm256_setzero_ps();
      k.d = fp16_at(p + 80);
      k.mn16 = _mm256_cvtepu8_epi16(mn);
      k.dmin = fp16_at(p + 82);
      return k;
    }
    EW_INLINE __m256i codes(int b) const { return k3_pairs(p + 16, b); }
  };
};

// One weight row against T int16 activation rows (row0 ..): out[t * out_stride] = row . x_t.
template <typename Format, int T>
inline void row_dot(const uint8_t* row, int64_t n_super, const Activations<int16_t>& a, int64_t row0, float* out, int64_t out_stride) {
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
        if constexpr (Format::kHalfMins) {  // Q2_K: dmin * min per half
          __m256 m0, m1;
          blk.half_mins(m0, m1);
          macc[t] = _mm256_fmadd_ps(m0, _mm256_loadu_ps(h), macc[t]);
          macc[t] = _mm256_fmadd_ps(m1, _mm256_loadu_ps(h + 8), macc[t]);
        } else {  // the offset times d * scale, per half
          macc[t] = _mm256_fmadd_ps(s0, _mm256_loadu_ps(h), macc[t]);
          macc[t] = _mm256_fmadd_ps(s1, _mm256_loadu_ps(h + 8), macc[t]);
        }
      }
    }
    const int16_t* xq = a.q.data() + sb * QK_K;
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
  const float offset = Format::kHalfScales && !Format::kHalfMins ? static_cast<float>(Format::kOffset) : 1.f;  // Q6_K, Q3_K: q - offset; else the mins
  for (int t = 0; t < T; ++t) {
    __m256 sum = acc[t][0];
    for (int i = 1; i < A; ++i) sum = _mm256_add_ps(sum, acc[t][i]);
    out[t * out_stride] = hsum(sum) - offset * hsum(macc[t]);
  }
}


// The int8 path: one weight row against R activation rows (first ..) quantized per super-block with
// sub-scales (ActivationsK): out[r * out_stride] = row . x_r. Per row and super-block, one 16-bit
// multiply folds the row's sub-scales e into the weight's integer sub-block scales (sc * e <= 63 * 31
// or 128 * 31, within int16); each block's 32 products then sum exactly in int32 lanes (maddubs, then
// madd with that block's sc * e), and one float multiply-add per super-block applies d * D (and the
// mins' term, or Q6_K's offset of 32 in integers). Bounds: a lane takes at most 8 blocks of
// 2 * 63 * 127 * 128 * 31 < 2^31. Each row's arithmetic is the same whatever R is and whichever rows
// share the tile, so a batch of any size computes each row bit for bit as decode does (batch
// invariance), and the R rows share each block's unpacking. Per 32 products and row: maddubs, madd,
// a shuffle (the scale) and an add; the int16 path's per-block float scaling costs more.
template <typename Format, int R>
inline void rows_dot_k8(const uint8_t* row, int64_t n_super, const ew::ActivationsK& a, int64_t first, float* out, int64_t out_stride) {
  __m256 acc[R], macc[R];
  for (int r = 0; r < R; ++r) acc[r] = macc[r] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < n_super; ++sb) {
    const uint8_t* p = row + sb * Format::kBytes;
    ew::prefetch_bytes(p + kPrefetchAhead, Format::kBytes);
    const typename Format::Block blk(p);
    const IntScales ks = blk.int_scales();
    __m256i src[R][2], isum[R];
    for (int r = 0; r < R; ++r) {
      const int64_t i = (first + r) * n_super + sb;
      if constexpr (Format::kHalfScales) {
        const __m256i se = _mm256_mullo_epi16(ks.sc16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.e16.data() + 16 * i)));
        src[r][0] = _mm256_permute2x128_si256(se, se, 0x00);
        src[r][1] = _mm256_permute2x128_si256(se, se, 0x11);
        const __m256i sum16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.sum16.data() + 16 * i));
        if constexpr (Format::kHalfMins) {  // Q2_K: dmin * D * sum over half-blocks of min * e * (sum of x's codes)
          const __m256i me = _mm256_mullo_epi16(ks.mn16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.e16.data() + 16 * i)));
          macc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ks.dmin * a.d[i]), _mm256_cvtepi32_ps(_mm256_madd_epi16(me, sum16)), macc[r]);
          isum[r] = _mm256_setzero_si256();
        } else {  // Q6_K's q - 32 (Q3_K's q - 4): start from -offset * sum over half-blocks of sc * e * (sum of x's codes)
          isum[r] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(se, sum16), Format::kOffsetShift));
        }
      } else {
        src[r][0] = src[r][1] = _mm256_broadcastsi128_si256(_mm_mullo_epi16(ks.sc8, _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.e8.data() + 8 * i))));
        isum[r] = _mm256_setzero_si256();
      }
    }
#pragma GCC unroll 8
    for (int b = 0; b < kBlocksPerSuper; ++b) {
      const __m256i w = blk.codes(b);
      const __m256i pick = Format::pick(b);
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.codes(first + r, sb) + b * QK));
        isum[r] = ew::add_madd(isum[r], _mm256_maddubs_epi16(w, x), _mm256_shuffle_epi8(src[r][b / 4], pick));
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t i = (first + r) * n_super + sb;
      if constexpr (!Format::kHalfScales)  // Q4_K/Q5_K: sum over blocks of dmin * min * D * e * (sum of x's codes)
        macc[r] = _mm256_fmadd_ps(ks.minf, _mm256_loadu_ps(a.min32.data() + 8 * i), macc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(ks.d * a.d[i]), _mm256_cvtepi32_ps(isum[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = hsum(acc[r]) - hsum(macc[r]);
}

template <typename Format>
at::Tensor matmul_int8(const at::Tensor& x_in, const at::Tensor& w, int64_t n, int64_t k) {
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), n_super = k / QK_K, row_bytes = n_super * Format::kBytes;
  const ew::ActivationsK act(x.data_ptr<float>(), m, n_super);
  at::Tensor out = at::empty({m, n}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, n, 4, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* row = wp + j * row_bytes;
      int64_t i = 0;
      for (; i + TILE <= m; i += TILE) rows_dot_k8<Format, TILE>(row, n_super, act, i, op + i * n + j, n);
      switch (m - i) {
        case 3: rows_dot_k8<Format, 3>(row, n_super, act, i, op + i * n + j, n); break;
        case 2: rows_dot_k8<Format, 2>(row, n_super, act, i, op + i * n + j, n); break;
        case 1: rows_dot_k8<Format, 1>(row, n_super, act, i, op + i * n + j, n); break;
        default: break;
      }
    }
  });
  return out;
}

// The int16 path: activations per block of 32, float scales per block; batches of up to EXACT_ROWS
// rows row by row, as decode (batch invariance, blocks.h), longer ones in tiles of TILE rows.
template <typename Format>
at::Tensor matmul_int16(const at::Tensor& x_in, const at::Tensor& w, int64_t n, int64_t k) {
  const at::Tensor x = x_in.contiguous();
  const int64_t m = x.size(0), n_super = k / QK_K, row_bytes = n_super * Format::kBytes;
  const Activations<int16_t> act(x.data_ptr<float>(), m, k / QK, false, Format::kHalfScales);
  at::Tensor out = at::empty({m, n}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t tiled = m > ew::EXACT_ROWS ? m / TILE * TILE : 0;
  at::parallel_for(0, n, 4, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* row = wp + j * row_bytes;
      for (int64_t i = 0; i < tiled; i += TILE) row_dot<Format, TILE>(row, n_super, act, i, op + i * n + j, n);
      for (int64_t i = tiled; i < m; ++i) row_dot<Format, 1>(row, n_super, act, i, op + i * n + j, n);
    }
  });
  return out;
}

template <typename Format>
at::Tensor dispatch_bits(const at::Tensor& x, const at::Tensor& w, int64_t n, int64_t k, int64_t act_bits) {
  return act_bits == 8 ? matmul_int8<Format>(x, w, n, k) : matmul_int16<Format>(x, w, n, k);
}

int64_t super_bytes(int64_t qtype) {
  switch (qtype) {
    case ew::GGML_Q2_K: return Q2K::kBytes;
    case ew::GGML_Q3_K: return Q3K::kBytes;
    case ew::GGML_Q4_K: return Q4K::kBytes;
    case ew::GGML_Q5_K: return Q5K::kBytes;
    case ew::GGML_Q6_K: return Q6K::kBytes;
    default: TORCH_CHECK(false, "kquant: ggml type ", qtype, " is not a K-quant edgewise runs (Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14)");
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
    case ew::GGML_Q2_K: return dispatch_bits<Q2K>(x, w, n, k, act_bits);
    case ew::GGML_Q3_K: return dispatch_bits<Q3K>(x, w, n, k, act_bits);
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
    __m256 s0, s1, m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
    blk.scales(s0, s1);
    if constexpr (Format::kHalfMins) blk.half_mins(m0, m1);
    alignas(32) float a[8], c[8], ma[8], mc[8];
    _mm256_store_ps(a, s0);
    _mm256_store_ps(c, s1);
    _mm256_store_ps(ma, m0);
    _mm256_store_ps(mc, m1);
    for (int b = 0; b < kBlocksPerSuper; ++b) {
      alignas(32) uint8_t q[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), blk.codes(b));
      float* o = out + sb * QK_K + b * QK;
      for (int e = 0; e < QK; ++e) {
        if constexpr (Format::kHalfScales) {
          const int h = 2 * b + e / 16;
          const float s = h < 8 ? a[h] : c[h - 8];
          o[e] = s * static_cast<float>(static_cast<int>(q[e]) - Format::kOffset) - (h < 8 ? ma[h] : mc[h - 8]);
        } else {
          o[e] = a[b] * static_cast<float>(q[e]) - c[b];
        }
      }
    }
  }
}

void dequantize_any(int64_t qtype, const uint8_t* row, int64_t n_super, float* out) {
  switch (qtype) {
    case ew::GGML_Q2_K: dequantize_row<Q2K>(row, n_super, out); break;
    case ew::GGML_Q3_K: dequantize_row<Q3K>(row, n_super, out); break;
    case ew::GGML_Q4_K: dequantize_row<Q4K>(row, n_super, out); break;
    case ew::GGML_Q5_K: dequantize_row<Q5K>(row, n_super, out); break;
    default: dequantize_row<Q6K>(row, n_super, out);
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
    dequantize_any(qtype, wp + ip[t] * w.size(1), k / QK_K, out.data_ptr<float>() + t * k);
  }
  return out;
}

// Rows start .. start + out.size(0) - 1, dequantized exactly into `out` (contiguous fp32 [rows, k]), the rows
// split between threads: the training backward's slices of a frozen matrix, written into a buffer it reuses
// (personalize/frozen.py) instead of a fresh allocation per slice.
void kquant_rows_into(const at::Tensor& w, int64_t start, int64_t qtype, int64_t k, at::Tensor out) {
  const int64_t bytes = super_bytes(qtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2 && k % QK_K == 0 && w.size(1) == k / QK_K * bytes, "kquant_rows_into: bad weight layout");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(1) == k, "kquant_rows_into: out must be contiguous fp32 [rows, ", k, "]");
  const int64_t n = out.size(0);
  TORCH_CHECK(start >= 0 && start + n <= w.size(0), "kquant_rows_into: rows ", start, "..", start + n - 1, " out of range [0, ", w.size(0), ")");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t t = r0; t < r1; ++t) dequantize_any(qtype, wp + (start + t) * w.size(1), k / QK_K, op + t * k);
  });
}

at::Tensor kquant_linear_meta(const at::Tensor& x, const at::Tensor&, int64_t, int64_t n, int64_t, int64_t) { return at::empty({x.size(0), n}, x.options()); }

at::Tensor kquant_rows_meta(const at::Tensor&, const at::Tensor& ids, int64_t, int64_t k) {
  return at::empty({ids.size(0), k}, ids.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(edgewise, m) {
  m.def("kquant_linear(Tensor x, Tensor w, int qtype, int n, int k, int act_bits) -> Tensor");
  m.def("kquant_rows(Tensor w, Tensor ids, int qtype, int k) -> Tensor");
  m.def("kquant_rows_into(Tensor w, int start, int qtype, int k, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(edgewise, CPU, m) {
  m.impl("kquant_linear", &kquant_linear);
  m.impl("kquant_rows", &kquant_rows);
  m.impl("kquant_rows_into", &kquant_rows_into);
}

TORCH_LIBRARY_IMPL(edgewise, Meta, m) {
  m.impl("kquant_linear", &kquant_linear_meta);
  m.impl("kquant_rows", &kquant_rows_meta);
}
