// Weight layout shared by every kernel, and the interface between the dispatcher and the per-ISA kernels.
//
// A matrix W (rows, cols) in a GGUF block format (32 weights per block along cols) is repacked into groups of
// 16 rows (the last group padded with zero rows). One group is a contiguous run of its blocks, each block
// being
//
//   quants   [chunk c][row r][4 bytes]   bytes 4c..4c+3 of row r's GGUF quant run
//   scales   [row r]                     fp16 d
//   mins     [row r]                     fp16 m (Q4_1 only)
//
// and the group is padded to a multiple of 64 bytes. A kernel thus reads one sequential stream (separate
// scale arrays would make three, which the hardware prefetchers follow far worse: half the bandwidth). One
// 64-byte chunk holds 4 quant bytes of 16 rows: an AVX-512 vector whose 32-bit lane r belongs to row r, which
// a dot-product instruction (4 byte products summed per lane) multiplies by 4 broadcast activations. Q4
// chunks c = 0..3 hold weights 4c..4c+3 in their low nibbles and 16+4c..19+4c in their high nibbles (GGUF's
// nibble order); Q8_0 chunks c = 0..7 hold weights 4c..4c+3, stored as q + 128 (q XOR 0x80) so that they are
// unsigned bytes. hyperjax/kernels/native/__init__.py builds the same layout with numpy (`repack`).
#pragma once

#include <cstdint>
#include <cstring>

namespace hyperjax {

// Bumped whenever the layout or the exported symbols change; the Python loader refuses a mismatching library.
constexpr int kAbiVersion = 4;

enum class Kind : int { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };
constexpr int kNumKinds = 3;

constexpr int kBlock = 32;      // weights per GGUF block
constexpr int kGroupRows = 16;  // rows interleaved in one group
constexpr int kMaxTile = 4;     // batch rows one kernel call multiplies against a group's weights

constexpr int quant_bytes(Kind k) { return k == Kind::kQ8_0 ? 32 : 16; }  // per row and block
constexpr bool has_min(Kind k) { return k == Kind::kQ4_1; }
// Added to every quant so that it is an unsigned byte: w = (stored − offset)·d (+ m).
constexpr int quant_offset(Kind k) { return k == Kind::kQ4_0 ? 8 : k == Kind::kQ8_0 ? 128 : 0; }

// Bytes of one block of a group: 16 rows' quants, scales and mins.
constexpr int block_bytes(Kind k) { return kGroupRows * (quant_bytes(k) + 2 + (has_min(k) ? 2 : 0)); }

inline int64_t group_stride(Kind k, int64_t blocks) { return (blocks * block_bytes(k) + 63) / 64 * 64; }

// Pointers into block k of a group (see the layout above).
struct BlockView {
  const uint8_t* quants;
  const uint16_t* scales;
  const uint16_t* mins;
};

inline BlockView block_view(Kind k, const uint8_t* group, int64_t block) {
  const uint8_t* quants = group + block * block_bytes(k);
  const auto* scales = reinterpret_cast<const uint16_t*>(quants + kGroupRows * quant_bytes(k));
  return {quants, scales, scales + kGroupRows};
}

// Activations quantized per 32-block: x ≈ q·scale, with the block's integer sum Σq (to remove the quant offset:
// Σ(w−o)·q = Σw·q − o·Σq) and scale·Σq for Q4_1's m·Σx term. Using the quantized sum there, not the exact one,
// makes the min term see the same rounded activations as the quants, so the rounding error meets w = d·q + m
// (centred) rather than d·q alone (offset by |m|): half the error on SmolLM2's activations.
struct Activations {
  const int8_t* q;      // (batch, cols)
  const float* scale;   // (batch, blocks)
  const float* sum;     // (batch, blocks)
  const int32_t* qsum;  // (batch, blocks)
  int64_t cols;
  int64_t blocks;
};

// y[j·y_stride + r] = Σ_cols x[b0 + j]·W[row r of the group], for j < tile and r < valid (≤ 16).
using TileFn = void (*)(const uint8_t* group, const Activations& a, int64_t b0, float* y, int64_t y_stride,
                        int valid);
// Quantizes one activation row of `blocks` blocks.
using QuantizeFn = void (*)(const float* x, int64_t blocks, int8_t* q, float* scale, float* sum,
                            int32_t* qsum);

struct Kernels {
  const char* name;
  QuantizeFn quantize;
  TileFn tile[kNumKinds][kMaxTile];  // [kind][tile − 1]
};

// The table of a tile template instantiated for every kind and tile size.
#define HYPERJAX_TILE_TABLE(fn)                                                             \
  {                                                                                         \
      {&fn<Kind::kQ4_0, 1>, &fn<Kind::kQ4_0, 2>, &fn<Kind::kQ4_0, 3>, &fn<Kind::kQ4_0, 4>}, \
      {&fn<Kind::kQ4_1, 1>, &fn<Kind::kQ4_1, 2>, &fn<Kind::kQ4_1, 3>, &fn<Kind::kQ4_1, 4>}, \
      {&fn<Kind::kQ8_0, 1>, &fn<Kind::kQ8_0, 2>, &fn<Kind::kQ8_0, 3>, &fn<Kind::kQ8_0, 4>}, \
  }

const Kernels* scalar_kernels();
const Kernels* avx2_kernels();    // nullptr when not compiled for x86-64
const Kernels* avx512_kernels();  // AVX-512 F/BW/VL + VNNI; nullptr when not compiled for x86-64

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace hyperjax
