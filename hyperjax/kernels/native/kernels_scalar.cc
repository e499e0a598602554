// Portable kernels: the reference for the SIMD ones (same integer sums), and the path on CPUs without AVX2.
#include <cmath>

#include "layout.h"

namespace hyperjax {
namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F;
  const uint32_t mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24, exact in float32
    float v = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -v : v;
  }
  uint32_t bits = exponent == 0x1F ? sign | 0x7F800000 | (mantissa << 13)  // infinity or NaN
                                   : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

void quantize_scalar(const float* x, int64_t blocks, int8_t* q, float* scale, float* sum, int32_t* qsum) {
  for (int64_t k = 0; k < blocks; ++k, x += kBlock, q += kBlock) {
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t qs = 0;
    for (int i = 0; i < kBlock; ++i) {
      q[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));  // round half to even, as the SIMD conversions
      qs += q[i];
    }
    scale[k] = amax / 127.0f;
    qsum[k] = qs;
    sum[k] = scale[k] * static_cast<float>(qs);
  }
}

template <Kind K, int Tile>
void tile_scalar(const uint8_t* group, const Activations& a, int64_t b0, float* y, int64_t y_stride,
                 int valid) {
  constexpr int kChunks = quant_bytes(K) / 4;
  for (int r = 0; r < valid; ++r) {
    for (int j = 0; j < Tile; ++j) {
      const int64_t b = b0 + j;
      float acc = 0.0f;
      for (int64_t k = 0; k < a.blocks; ++k) {
        const BlockView blk = block_view(K, group, k);
        const uint8_t* w = blk.quants + 4 * r;
        const int8_t* xq = a.q + b * a.cols + k * kBlock;
        int32_t dot = 0;
        for (int c = 0; c < kChunks; ++c) {
          for (int e = 0; e < 4; ++e) {
            const int u = w[c * 4 * kGroupRows + e];
            if constexpr (K == Kind::kQ8_0) {
              dot += u * xq[4 * c + e];
            } else {
              dot += (u & 0x0F) * xq[4 * c + e] + (u >> 4) * xq[kBlock / 2 + 4 * c + e];
            }
          }
        }
        const int64_t i = b * a.blocks + k;
        dot -= quant_offset(K) * a.qsum[i];
        acc += static_cast<float>(dot) * (half_to_float(blk.scales[r]) * a.scale[i]);
        if constexpr (has_min(K)) acc += half_to_float(blk.mins[r]) * a.sum[i];
      }
      y[j * y_stride + r] = acc;
    }
  }
}

const Kernels kScalar = {
    "scalar",
    &quantize_scalar,
    HYPERJAX_TILE_TABLE(tile_scalar),
};

}  // namespace

const Kernels* scalar_kernels() { return &kScalar; }

}  // namespace hyperjax
