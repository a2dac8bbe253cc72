// GGUF's weight block formats, and the activation quantization every edgewise kernel shares (AVX2;
// AVX-VNNI's vpdpwssd where the CPU has it, same bits: add_madd).
//
// One definition of each format's bytes, as ggml lays them out (ggml-common.h); a kernel includes
// this header and never restates a size. Values are in GGUF order: a row of K weights is K / 32
// (or K / 256) consecutive blocks.
//
//   Q4_0  (18 B / 32):  fp16 d, 16 B nibbles                    w = (q - 8) * d
//   Q4_1  (20 B / 32):  fp16 d, fp16 m, 16 B nibbles            w = q * d + m
//   Q8_0  (34 B / 32):  fp16 d, 32 int8                         w = q * d
//   (nibbles: byte i holds element i in its low half and element i + 16 in its high half)
//
// K-quants: super-blocks of 256 weights, split into sub-blocks with their own integer scales.
//   Q2_K (84 B / 256):  16 B of (scale, min) nibbles for 16 sub-blocks of 16 (scale low, min high),
//                       64 B low 2-bit pairs laid out as Q3_K's, fp16 d, fp16 dmin.
//                       w = d * scale_s * q - dmin * min_s, q in 0..3.
//   Q3_K (110 B / 256): 32 B high bits, 64 B low 2-bit pairs, 12 B of 6-bit scales for 16 sub-blocks
//                       of 16 (stored + 32), fp16 d.  w = d * (scale_s - 32) * (q - 4), q in 0..7.
//                       Each half of 128 elements uses 32 B of the pairs: its 32-element block b
//                       (0..3) takes bits 2b, 2b+1 of pair byte l as q's bits 0-1, and for block
//                       c = 4 half + b (0..7) bit c of high byte l as q's bit 2. Scale s's low 4
//                       bits are byte s's low nibble (s < 8) or byte s - 8's high nibble; its top
//                       2 bits are bits 2 (s / 4), 2 (s / 4) + 1 of byte 8 + s % 4.
//   Q4_K (144 B / 256): fp16 d, fp16 dmin, 12 B of 6-bit (scale, min) for 8 sub-blocks of 32,
//                       128 B nibbles: bytes 32j..32j+31 hold sub-block 2j (low nibbles, element l
//                       in byte l) and sub-block 2j+1 (high nibbles).
//                       w = d * scale_s * q - dmin * min_s,  q in 0..15.
//   Q5_K (176 B / 256): fp16 d, fp16 dmin, 12 B scales as Q4_K, 32 B high bits (bit s of byte l is
//                       the 5th bit of element l of sub-block s), 128 B nibbles as Q4_K; q in 0..31.
//   Q6_K (210 B / 256): 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales (one per sub-block
//                       of 16), fp16 d.  w = d * scale_s * (q - 32), q in 0..63. Each half of 128
//                       elements uses 64 B of ql and 32 B of qh: its 32-element block b (0..3) takes
//                       ql[32 (b & 1) + l] (low nibble for b < 2, high for b >= 2) and bits 2b, 2b+1
//                       of qh[l] as q's bits 4 and 5.
//   The 12 scale bytes of Q4_K/Q5_K: scale_j, min_j are the low 6 bits of bytes j and j + 4 for
//   j < 4; for j >= 4, scale_j = (byte j+4 & 15) | (byte j-4 >> 6) << 4 and
//   min_j = (byte j+4 >> 4) | (byte j >> 6) << 4.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// The small helpers of the hot loops are forced inline: in a translation unit as big as a kernel file
// GCC stops inlining, and k4_scales became a call per super-block that passed its two vectors
// through memory (10% of the 1.5B model's decode time at one thread, by perf).
#define EW_INLINE inline __attribute__((always_inline))

namespace ew {

constexpr int64_t QK = 32;     // elements per block of the 32-formats, and per activation block
constexpr int64_t QK_K = 256;  // elements per K-quant super-block

constexpr int64_t Q4_0_BYTES = 18, Q4_1_BYTES = 20, Q8_0_BYTES = 34;
constexpr int64_t Q2_K_BYTES = 84, Q3_K_BYTES = 110, Q4_K_BYTES = 144, Q5_K_BYTES = 176, Q6_K_BYTES = 210;

// Batch invariance: a product of up to EXACT_ROWS activation rows is computed row by row, each row
// exactly as decode computes its one row, bit for bit; only longer batches (prefill) tile rows
// against each weight row, which groups the float sums differently. Speculative decoding checks a
// draft in such a batch and must reproduce decode's logits (edgewise/lm/speculative.py). The weight
// row stays in L1 across the batch's rows, so the rows cost compute, not DRAM traffic. The K-quants'
// int8 kernel is batch invariant at every batch size and shares each weight block's unpacking
// across 4 rows (kquant_matmul.cpp, rows_dot_k8), so a draft's extra rows cost less there.
// The one definition: kernels/__init__.py's exact_rows() reads it from here.
constexpr int64_t EXACT_ROWS = 8;

// ggml's type ids, as GGUF stores them (gguf.GGMLQuantizationType)
enum GgmlType : int64_t { GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q8_0 = 8, GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14 };

EW_INLINE float hsum(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

EW_INLINE float hsum(__m256 v) { return hsum(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))); }

// acc + madd(a, b): int16 pairs multiplied and summed into int32 lanes. Where the CPU has AVX-VNNI (built with
// -mavxvnni: kernels/__init__.py's build_flags) one instruction, vpdpwssd, does it; the arithmetic is the same
// (neither saturates: it wraps only at two products of -32768 * -32768, which no kernel's operands reach), so
// both builds give the same bits.
EW_INLINE __m256i add_madd(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

EW_INLINE int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

EW_INLINE float fp16_at(const uint8_t* p) {  // an fp16 stored at any alignment, widened by F16C
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// max |x| over 32 floats
EW_INLINE float amax32(const float* x) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x));
  for (int e = 8; e < 32; e += 8) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + e)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// 32 int32 codes (4 vectors, element order) -> 32 int8 (saturating) or 32 int16; packs interleave 128-bit
// lanes, the permutes restore element order.
template <typename Q>
EW_INLINE void store_codes(const __m256i q[4], Q* out) {
  const __m256i w01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
  const __m256i w23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
  if constexpr (std::is_same_v<Q, int8_t>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(_mm256_packs_epi16(w01, w23), 0xD8));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), w01);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), w23);
  }
}

// One block of 32 floats -> Q codes, round half to even (the MXCSR default, as numpy's rint).
template <typename Q>
EW_INLINE void quantize_block(const float* x, Q* out_q, float* out_d, float* out_s) {
  constexpr float qmax = std::is_same_v<Q, int8_t> ? 127.f : 32767.f;
  const float d = amax32(x) / qmax;
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), id));
  const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  store_codes(q, out_q);
  *out_d = d;
  *out_s = d * static_cast<float>(sum);
}

// Activation rows quantized per block of 32: codes q (x ~= d * q), scale d, and d * sum(q) (for the
// min terms of Q4_1 and the K-quants). `paired`: blocks 2p and 2p+1 stored as [2p: 0..15 | 2p+1:
// 0..15 | 2p: 16..31 | 2p+1: 16..31], to match Q4_1's packed nibbles (an odd last block stays in
// order). `half_sums`: also d * sum(q) over each half block of 16, for Q6_K's offset of 32 per
// sub-block of 16.
template <typename Q>
struct Activations {
  std::vector<Q> q;
  std::vector<float> d, s, s16;
  int64_t n_blocks;
  Activations(const float* x, int64_t rows, int64_t n_blocks, bool paired, bool half_sums = false)
      : q(rows * n_blocks * QK), d(rows * n_blocks), s(rows * n_blocks), n_blocks(n_blocks) {
    for (int64_t i = 0; i < rows * n_blocks; ++i) quantize_block(x + i * QK, q.data() + i * QK, &d[i], &s[i]);
    if (half_sums) {
      s16.resize(2 * rows * n_blocks);
      for (int64_t i = 0; i < rows * n_blocks; ++i)
        for (int h = 0; h < 2; ++h) {
          int32_t sum = 0;
          for (int64_t e = 0; e < QK / 2; ++e) sum += q[i * QK + h * QK / 2 + e];
          s16[2 * i + h] = d[i] * static_cast<float>(sum);
        }
    }
    if (!paired) return;
    // [2p: 0..15 | 2p: 16..31 | 2p+1: 0..15 | 2p+1: 16..31] -> swap the middle two quarters
    constexpr int64_t half = QK / 2 * sizeof(Q);
    alignas(32) char tmp[QK * sizeof(Q)];
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b + 2 <= n_blocks; b += 2) {
        char* pair = reinterpret_cast<char*>(q.data() + (r * n_blocks + b) * QK);
        std::memcpy(tmp, pair + half, half);
        std::memcpy(pair + half, pair + 2 * half, half);
        std::memcpy(pair + 2 * half, tmp, half);
      }
  }
  const Q* row(int64_t r) const { return q.data() + r * n_blocks * QK; }
};

// Activation rows for the K-quants' int8 kernels, per super-block of 256: one float scale D, a 5-bit
// integer sub-scale e_b (1..31) per block of 32, and int8 codes with x ~= D * e_b * q (rounded half
// to even). D = max|x| / (127 * 31) over the super-block and e_b = ceil(31 * max|x_b| / max|x|), so
// each block's step D * e_b is at most its own max|x_b| / 127 plus D: about per-32 resolution (ggml's
// Q8_K, one scale per 256, lost 1.6% perplexity on Gemma 3, whose activations have outlier channels),
// while a kernel still sums a whole super-block exactly in int32, with e_b folded into the weight's
// integer sub-block scales, and applies the float scales once per super-block.
// Stored per (row, super-block): D; e as 8 int16 (e8, per block) and as 16 (e16, per half-block of 16,
// for Q6_K's scales); the codes' sums per 16 (sum16, Q6_K's offset of 32); and D * e_s * sum_s per
// block of 32 as float (min32, the term Q4_K/Q5_K's mins multiply).
struct ActivationsK {
  static constexpr int kMaxSub = 31;
  std::vector<int8_t> q;
  std::vector<float> d, min32;
  std::vector<int16_t> e8, e16, sum16;
  int64_t n_super;
  ActivationsK(const float* x, int64_t rows, int64_t n_super_)
      : q(rows * n_super_ * QK_K), d(rows * n_super_), min32(rows * n_super_ * 8), e8(rows * n_super_ * 8), e16(rows * n_super_ * 16), sum16(rows * n_super_ * 16), n_super(n_super_) {
    for (int64_t i = 0; i < rows * n_super; ++i) quantize(x + i * QK_K, i);
  }
  const int8_t* codes(int64_t row, int64_t sb) const { return q.data() + (row * n_super + sb) * QK_K; }

 private:
  void quantize(const float* x, int64_t i) {
    float amax[8], top = 0.f;
    for (int b = 0; b < 8; ++b) top = std::max(top, amax[b] = amax32(x + b * QK));
    const float D = top / (127.f * kMaxSub);
    const float per_block = top > 0.f ? kMaxSub / top : 0.f;
    int8_t* out = q.data() + i * QK_K;
    for (int b = 0; b < 8; ++b) {
      const int e = std::min(kMaxSub, std::max(1, static_cast<int>(std::ceil(amax[b] * per_block))));
      const float step = D * static_cast<float>(e);
      const __m256 id = _mm256_set1_ps(step > 0.f ? 1.f / step : 0.f);
      __m256i c[4];
      for (int j = 0; j < 4; ++j) c[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + b * QK + 8 * j), id));
      store_codes(c, out + b * QK);
      int sum[2] = {0, 0};
      for (int k = 0; k < QK; ++k) sum[k / 16] += out[b * QK + k];
      e8[8 * i + b] = static_cast<int16_t>(e);
      for (int h = 0; h < 2; ++h) {
        e16[16 * i + 2 * b + h] = static_cast<int16_t>(e);
        sum16[16 * i + 2 * b + h] = static_cast<int16_t>(sum[h]);
      }
      min32[8 * i + b] = D * static_cast<float>(e * (sum[0] + sum[1]));
    }
    d[i] = D;
  }
};

EW_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

}  // namespace ew
