// AVX-512 kernels with VNNI (vpdpbusd: 64 unsigned-byte × signed-byte products summed into 16 int32 lanes).
//
// One group of 16 rows is one vector of output lanes: per block, the 4 (Q4) or 8 (Q8_0) quant vectors of the
// group meet broadcast 4-byte runs of activations, so no horizontal reduction is ever needed. Functions carry
// target attributes (not file-wide flags) so that the library runs on any x86-64 CPU and dispatches at run
// time.
#include "layout.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define HYPERJAX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

namespace hyperjax {
namespace {

HYPERJAX_AVX512 void quantize_avx512(const float* x, int64_t blocks, int8_t* q, float* scale, float* sum,
                                     int32_t* qsum) {
  for (int64_t k = 0; k < blocks; ++k, x += kBlock, q += kBlock) {
    const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    // Round to nearest even (the default MXCSR mode); |x·inv| ≤ 127, so the narrowing never saturates.
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qhi));
    scale[k] = amax / 127.0f;
    qsum[k] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    sum[k] = scale[k] * static_cast<float>(qsum[k]);
  }
}

template <Kind K, int Tile>
HYPERJAX_AVX512 void tile_avx512(const uint8_t* group, const Activations& a, int64_t b0, float* y,
                                 int64_t y_stride, int valid) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 acc[Tile];
  for (int j = 0; j < Tile; ++j) acc[j] = _mm512_setzero_ps();

  for (int64_t k = 0; k < a.blocks; ++k) {
    // w[c] multiplies activation bytes 4c..4c+3 of the block (see layout.h for the nibble order).
    __m512i w[8];
    const BlockView blk = block_view(K, group, k);
    if constexpr (K == Kind::kQ8_0) {
      for (int c = 0; c < 8; ++c) w[c] = _mm512_loadu_si512(blk.quants + 64 * c);
    } else {
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(blk.quants + 64 * c);
        w[c] = _mm512_and_si512(v, low_nibbles);
        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.scales)));
    __m512 m = _mm512_setzero_ps();
    if constexpr (has_min(K)) {
      m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.mins)));
    }
    for (int j = 0; j < Tile; ++j) {
      const int64_t i = (b0 + j) * a.blocks + k;
      const int8_t* x = a.q + (b0 + j) * a.cols + k * kBlock;
      __m512i dot = _mm512_set1_epi32(-quant_offset(K) * a.qsum[i]);
      for (int c = 0; c < 8; ++c)
        dot = _mm512_dpbusd_epi32(dot, w[c], _mm512_set1_epi32(load_i32(x + 4 * c)));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(a.scale[i])), acc[j]);
      if constexpr (has_min(K)) acc[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.sum[i]), acc[j]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  for (int j = 0; j < Tile; ++j) _mm512_mask_storeu_ps(y + j * y_stride, mask, acc[j]);
}

const Kernels kAvx512 = {
    "avx512_vnni",
    &quantize_avx512,
    HYPERJAX_TILE_TABLE(tile_avx512),
};

}  // namespace

const Kernels* avx512_kernels() { return &kAvx512; }

}  // namespace hyperjax

#else

namespace hyperjax {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace hyperjax

#endif
