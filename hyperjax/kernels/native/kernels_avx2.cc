// AVX2 kernels: each 64-byte chunk of the layout is two 256-bit halves (rows 0–7 and 8–15), multiplied with
// vpmaddubsw (unsigned × signed bytes → pairs summed to int16) and vpmaddwd by ones (→ int32 lanes of 4
// products).
#include "layout.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define HYPERJAX_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace hyperjax {
namespace {

HYPERJAX_AVX2 int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

HYPERJAX_AVX2 float hmax_ps(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

HYPERJAX_AVX2 void quantize_avx2(const float* x, int64_t blocks, int8_t* q, float* scale, float* sum,
                                 int32_t* qsum) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  for (int64_t k = 0; k < blocks; ++k, x += kBlock, q += kBlock) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[i]));
    }
    const float m = hmax_ps(amax);
    const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m256i n[4];
    for (int i = 0; i < 4; ++i) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    // Saturating packs interleave the 128-bit lanes; the permutation restores element order.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    scale[k] = m / 127.0f;
    qsum[k] = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3])));
    sum[k] = scale[k] * static_cast<float>(qsum[k]);
  }
}

// The int32 dot products of one block for 8 rows (one half of the group's chunks) and one activation row.
template <Kind K>
HYPERJAX_AVX2 __m256i block_dot(const uint8_t* quants, const int8_t* x) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (K == Kind::kQ8_0) {
    // Signed weights: |w| × (x with w's sign); each pair sum is at most 2·128·127, inside int16.
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i dot = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i w =
          _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * c)), flip);
      const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(x + 4 * c)), w);
      dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), xs), ones));
    }
    return dot;
  } else {
    // Nibbles: each pair sum is at most 2·15·127 = 3810, so eight of them add up inside int16.
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    __m256i pairs = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * c));
      const __m256i lo = _mm256_and_si256(v, low_nibbles);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(x + 4 * c))));
      pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(x + 16 + 4 * c))));
    }
    return _mm256_madd_epi16(pairs, ones);
  }
}

template <Kind K, int Tile>
HYPERJAX_AVX2 void tile_avx2(const uint8_t* group, const Activations& a, int64_t b0, float* y,
                             int64_t y_stride, int valid) {
  // Q8_0 is multiplied as signed bytes here, so only Q4_0 has an offset to remove.
  constexpr int kOffset = K == Kind::kQ4_0 ? quant_offset(K) : 0;
  for (int half = 0; half < 2 && 8 * half < valid; ++half) {
    __m256 acc[Tile];
    for (int j = 0; j < Tile; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < a.blocks; ++k) {
      const BlockView blk = block_view(K, group, k);
      const uint8_t* quants = blk.quants + 32 * half;
      const __m256 d =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.scales + 8 * half)));
      for (int j = 0; j < Tile; ++j) {
        const int64_t i = (b0 + j) * a.blocks + k;
        __m256i dot = block_dot<K>(quants, a.q + (b0 + j) * a.cols + k * kBlock);
        if constexpr (kOffset != 0) dot = _mm256_sub_epi32(dot, _mm256_set1_epi32(kOffset * a.qsum[i]));
        acc[j] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(a.scale[i])), acc[j]);
        if constexpr (has_min(K)) {
          const __m256 m =
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.mins + 8 * half)));
          acc[j] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.sum[i]), acc[j]);
        }
      }
    }
    const int n = valid - 8 * half < 8 ? valid - 8 * half : 8;
    for (int j = 0; j < Tile; ++j) {
      float out[8];
      _mm256_storeu_ps(out, acc[j]);
      std::memcpy(y + j * y_stride + 8 * half, out, n * sizeof(float));
    }
  }
}

const Kernels kAvx2 = {
    "avx2",
    &quantize_avx2,
    HYPERJAX_TILE_TABLE(tile_avx2),
};

}  // namespace

const Kernels* avx2_kernels() { return &kAvx2; }

}  // namespace hyperjax

#else

namespace hyperjax {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace hyperjax

#endif
