// The flash engine's sparse SwiGLU FFN over the neuron bundles held in its DRAM cache (AVX2).
//
// A cache is `units` [capacity, unit_bytes] uint8, filled from slot 0 up (swap-delete keeps the
// live units in [0, n_units)). A unit is what one 4 KiB-aligned read brings: `bpu` bundles, then
// `bpu` int32 neuron ids (-1 marks an empty bundle). Bundle of neuron i, all Q4_1 as in the GGUF:
//   gate row i : D/32 blocks of (fp16 d, fp16 m, 16 bytes of nibbles)   (GGUF's own bytes)
//   up row i   : same
//   down col i : D/2 bytes of nibbles, in GGUF's block nibble order along the output dim (per 32
//                outputs, low nibbles are outputs 0..15, high 16..31); its fp16 scales are the
//                down matrix's block (i / 32) scales, kept resident: down_d, down_m [F/32, D].
// Every weight is q * d + m with the fp16 d and m widened to fp32, exactly as the GGUF means it;
// activations stay fp32 (no activation rounding), so with every neuron cached this is the fp32
// dense FFN up to summation order:
//   h_i = silu(gate_i . x) * (up_i . x);   y = sum_i h_i * down_col_i.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "blocks.h"

namespace {

using ew::fp16_at;
using ew::hsum;
using ew::QK;
constexpr int64_t Q4_1_BLOCK = ew::Q4_1_BYTES;

// 16 bytes of nibbles -> 32 codes as floats, GGUF order (low nibbles 0..15, high 16..31).
inline void unpack32(const uint8_t* qs, __m256 out[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

// Q4_1 row . x, with the per-block sums of x precomputed: sum_b d_b * (q_b . x_b) + m_b * sum(x_b).
inline float q4_1_row_dot(const uint8_t* row, const float* x, const float* xsum, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  float macc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * Q4_1_BLOCK;
    const float d = fp16_at(blk), m = fp16_at(blk + 2);
    __m256 q[4];
    unpack32(blk + 4, q);
    const float* xb = x + b * QK;
    __m256 dot = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
    dot = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb + 8), dot);
    dot = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb + 16), dot);
    dot = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb + 24), dot);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), dot, acc);
    macc += m * xsum[b];
  }
  return hsum(acc) + macc;
}

at::Tensor flash_ffn(const at::Tensor& x, const at::Tensor& units, int64_t n_units, int64_t bpu, const at::Tensor& down_d, const at::Tensor& down_m) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(0) == 1, "flash_ffn: x must be fp32 [1, D]");
  const int64_t D = x.size(1);
  TORCH_CHECK(D % QK == 0, "flash_ffn: D must be a multiple of 32");
  const int64_t nb = D / QK, row_bytes = nb * Q4_1_BLOCK, bundle_bytes = 2 * row_bytes + D / 2;
  TORCH_CHECK(units.scalar_type() == at::kByte && units.is_contiguous() && units.dim() == 2, "flash_ffn: units must be uint8 [capacity, unit_bytes]");
  const int64_t unit_bytes = units.size(1);
  TORCH_CHECK(bpu >= 1 && bpu * (bundle_bytes + 4) <= unit_bytes, "flash_ffn: ", bpu, " bundles of ", bundle_bytes, " bytes plus ids do not fit a unit of ", unit_bytes);
  TORCH_CHECK(n_units >= 0 && n_units <= units.size(0), "flash_ffn: n_units out of range");
  TORCH_CHECK(down_d.scalar_type() == at::kHalf && down_m.scalar_type() == at::kHalf && down_d.is_contiguous() && down_m.is_contiguous() &&
                  down_d.dim() == 2 && down_d.size(1) == D && down_m.sizes() == down_d.sizes(),
              "flash_ffn: down_d and down_m must be fp16 [F/32, D]");
  const int64_t n_down_blocks = down_d.size(0);

  const float* xp = x.data_ptr<float>();
  const uint8_t* up = units.data_ptr<uint8_t>();
  std::vector<float> xsum(nb);
  for (int64_t b = 0; b < nb; ++b) {
    float s = 0.f;
    for (int64_t i = 0; i < QK; ++i) s += xp[b * QK + i];
    xsum[b] = s;
  }

  // 1. h for every cached neuron (bundles are independent: split units between threads).
  const int64_t n_bundles = n_units * bpu;
  std::vector<float> h(n_bundles, 0.f);
  std::vector<int32_t> block_of(n_bundles, -1);
  at::parallel_for(0, n_units, 8, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const uint8_t* unit = up + u * unit_bytes;
      for (int64_t k = 0; k < bpu; ++k) {
        int32_t id;
        std::memcpy(&id, unit + bpu * bundle_bytes + 4 * k, 4);
        if (id < 0) continue;
        TORCH_CHECK(id / QK < n_down_blocks, "flash_ffn: neuron id ", id, " beyond the down scales (corrupt unit?)");
        const uint8_t* bundle = unit + k * bundle_bytes;
        const float g = q4_1_row_dot(bundle, xp, xsum.data(), nb);
        const float v = q4_1_row_dot(bundle + row_bytes, xp, xsum.data(), nb);
        h[u * bpu + k] = g / (1.f + std::exp(-g)) * v;
        block_of[u * bpu + k] = id / QK;
      }
    }
  });

  // 2. y = sum_i h_i * (q_i * d_b(i) + m_b(i)), grouped by the down matrix's neuron block b:
  //    y = sum_b d_b * (sum_{i in b} h_i q_i) + m_b * (sum_{i in b} h_i). Each thread owns a range of
  //    output blocks, streams every cached bundle once, and accumulates per neuron block.
  at::Tensor y = at::zeros({1, D}, x.options());
  float* yp = y.data_ptr<float>();
  const uint16_t* dd = reinterpret_cast<const uint16_t*>(down_d.data_ptr<at::Half>());
  const uint16_t* mm = reinterpret_cast<const uint16_t*>(down_m.data_ptr<at::Half>());
  std::vector<float> hsum_of_block(n_down_blocks, 0.f);
  std::vector<uint8_t> block_used(n_down_blocks, 0);
  for (int64_t s = 0; s < n_bundles; ++s) {
    if (block_of[s] < 0) continue;
    hsum_of_block[block_of[s]] += h[s];
    block_used[block_of[s]] = 1;
  }
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    const int64_t width = (end - begin) * QK;
    std::vector<float> acc(n_down_blocks * width, 0.f);
    for (int64_t s = 0; s < n_bundles; ++s) {
      const int32_t blk = block_of[s];
      if (blk < 0) continue;
      const __m256 hv = _mm256_set1_ps(h[s]);
      const uint8_t* col = up + (s / bpu) * unit_bytes + (s % bpu) * bundle_bytes + 2 * row_bytes;
      float* a = acc.data() + blk * width;
      for (int64_t ob = begin; ob < end; ++ob) {
        __m256 q[4];
        unpack32(col + ob * (QK / 2), q);
        float* ab = a + (ob - begin) * QK;
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(ab + 8 * i, _mm256_fmadd_ps(hv, q[i], _mm256_loadu_ps(ab + 8 * i)));
      }
    }
    for (int64_t b = 0; b < n_down_blocks; ++b) {
      if (!block_used[b]) continue;
      const __m256 hs = _mm256_set1_ps(hsum_of_block[b]);
      const float* a = acc.data() + b * width;
      for (int64_t o = 0; o < width; o += 8) {
        const int64_t j = begin * QK + o;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dd + b * D + j)));
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mm + b * D + j)));
        __m256 v = _mm256_fmadd_ps(d, _mm256_loadu_ps(a + o), _mm256_loadu_ps(yp + j));
        _mm256_storeu_ps(yp + j, _mm256_fmadd_ps(m, hs, v));
      }
    }
  });
  return y;
}

// The flash reader's batch: runs [n, 3] int64 (file_offset, length, buffer_offset) read with pread on
// `fd` into `buffer` by `threads` plain threads (no Python, no GIL: the reads of one layer are in
// flight together). Returns -1 when every run was read whole, else the index of the first run that
// came back short; a failed pread raises with errno's text. Alignment is the caller's to check.
int64_t read_runs(int64_t fd, const at::Tensor& runs, const at::Tensor& buffer, int64_t threads) {
  TORCH_CHECK(runs.scalar_type() == at::kLong && runs.is_contiguous() && runs.dim() == 2 && runs.size(1) == 3, "read_runs: runs must be int64 [n, 3]");
  TORCH_CHECK(buffer.scalar_type() == at::kByte && buffer.is_contiguous(), "read_runs: buffer must be contiguous uint8");
  const int64_t n = runs.size(0);
  const int64_t* r = runs.data_ptr<int64_t>();
  uint8_t* base = buffer.data_ptr<uint8_t>();
  const int64_t limit = buffer.numel();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(r[3 * i + 1] > 0 && r[3 * i + 2] >= 0 && r[3 * i + 2] + r[3 * i + 1] <= limit, "read_runs: run ", i, " does not fit the buffer");
  std::atomic<int64_t> next{0}, first_short{n}, first_errno{0};
  auto work = [&]() {
    for (int64_t i = next++; i < n; i = next++) {
      int64_t done = 0;
      const int64_t off = r[3 * i], len = r[3 * i + 1];
      while (done < len) {
        const ssize_t got = pread(static_cast<int>(fd), base + r[3 * i + 2] + done, len - done, off + done);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) { int64_t zero = 0; first_errno.compare_exchange_strong(zero, errno); return; }
        if (got == 0) break;
        done += got;
      }
      if (done < len) {
        int64_t cur = first_short.load();
        while (i < cur && !first_short.compare_exchange_weak(cur, i)) {}
      }
    }
  };
  const int64_t t = std::max<int64_t>(1, std::min(threads, n));
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < t; ++k) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
  TORCH_CHECK(first_errno.load() == 0, "read_runs: pread failed: ", std::strerror(static_cast<int>(first_errno.load())));
  return first_short.load() < n ? first_short.load() : -1;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(edgewise, m) {
  m.def("flash_ffn(Tensor x, Tensor units, int n_units, int bpu, Tensor down_d, Tensor down_m) -> Tensor");
  m.def("read_runs(int fd, Tensor runs, Tensor(a!) buffer, int threads) -> int");
}

TORCH_LIBRARY_IMPL(edgewise, CPU, m) {
  m.impl("flash_ffn", &flash_ffn);
  m.impl("read_runs", &read_runs);
}
