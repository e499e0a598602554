// XLA FFI handler for one decoding step of causal grouped-query attention over a layer-stacked KV cache.
//
//   out[b, h] = softmax over {valid past slots s < start} ∪ {this token} of q[b, h]·k / √D, applied to the values
//
// The cache (L, B, S, K, D) is read in place at the chosen layer, and only its `start` valid slots: a pure-XLA
// formulation reads (or copies) all S slots of the capacity bucket. Each key and value row is read once for the G
// query heads that share it. Single-threaded: at 512 slots a layer's cache is about 400 KB, less than the cost
// of waking a pool. The kernel is cloned for AVX-512, AVX2+FMA and baseline x86-64, chosen at load time.
#include <cmath>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__)
#define HYPERJAX_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define HYPERJAX_CLONES
#endif

namespace hyperjax {
namespace {

constexpr int kLanes = 16;  // independent partial sums: vectorizable without reassociating a single sum

// always_inline: each ISA clone of attend_group gets its own vectorized copy.
__attribute__((always_inline)) inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  return s;
}

__attribute__((always_inline)) inline void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// One sequence: H = K·G query heads q (H, D) over `start` past cache rows (K·D floats each, read once and in
// order) and the new keys/values (K, D). scores holds H·(start + 1) floats. Cloned per ISA as a whole, so that
// dot and axpy inline into its loops and vectorize for the CPU at hand.
HYPERJAX_CLONES void attend(const float* q, const float* k_new, const float* v_new, const float* keys,
                            const float* values, int64_t start, int64_t kv_heads, int64_t groups, int64_t dim,
                            float* out, float* scores) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int64_t n = start + 1, heads = kv_heads * groups, row = kv_heads * dim;
  for (int64_t s = 0; s < start; ++s) {
    for (int64_t h = 0; h < heads; ++h) scores[h * n + s] = dot(q + h * dim, keys + s * row + h / groups * dim, dim);
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* sc = scores + h * n;
    sc[start] = dot(q + h * dim, k_new + h / groups * dim, dim);
    float peak = sc[start];
    for (int64_t s = 0; s < start; ++s) peak = sc[s] > peak ? sc[s] : peak;
    float total = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      // Below e^-80 a weight is 0: an underflowing exp would otherwise feed subnormals (slow) to the sums.
      const float z = (sc[s] - peak) * scale;
      total += (sc[s] = z < -80.0f ? 0.0f : std::exp(z));
    }
    const float inv = 1.0f / total;
    for (int64_t s = 0; s < n; ++s) sc[s] *= inv;
    float* o = out + h * dim;
    const float* v = v_new + h / groups * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = sc[start] * v[d];
  }
  for (int64_t s = 0; s < start; ++s) {
    for (int64_t h = 0; h < heads; ++h) axpy(scores[h * n + s], values + s * row + h / groups * dim, out + h * dim, dim);
  }
}

template <typename A, typename B>
bool same_shape(const A& a, const B& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

ffi::Error decode_attention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                            ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::S32> layer_buf,
                            ffi::Buffer<ffi::S32> start_buf, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), nd = k_new.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || nd.size() != 3 || !same_shape(values.dimensions(), kd) ||
      !same_shape(v_new.dimensions(), nd)) {
    return ffi::Error::InvalidArgument("hyperjax decode attention: expected q (B, H, D), new keys/values (B, K, D) "
                                       "and a cache (L, B, S, K, D)");
  }
  const int64_t batch = qd[0], heads = qd[1], dim = qd[2];
  const int64_t layers = kd[0], slots = kd[2], kv_heads = kd[3];
  if (kd[1] != batch || kd[4] != dim || nd[0] != batch || nd[1] != kv_heads || nd[2] != dim || kv_heads == 0 ||
      heads % kv_heads != 0) {
    return ffi::Error::InvalidArgument("hyperjax decode attention: q " + std::to_string(batch) + "x" +
                                       std::to_string(heads) + "x" + std::to_string(dim) +
                                       " does not fit a cache of " + std::to_string(kv_heads) + " KV heads");
  }
  const int64_t layer = *layer_buf.typed_data(), start = *start_buf.typed_data();
  if (layer < 0 || layer >= layers || start < 0 || start > slots) {
    return ffi::Error::InvalidArgument("hyperjax decode attention: layer " + std::to_string(layer) + " or start " +
                                       std::to_string(start) + " outside the cache (" + std::to_string(layers) +
                                       " layers, " + std::to_string(slots) + " slots)");
  }
  const int64_t row = kv_heads * dim;
  std::vector<float> scores(static_cast<size_t>(heads * (start + 1)));
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t cache_offset = (layer * batch + b) * slots * row;
    attend(q.typed_data() + b * heads * dim, k_new.typed_data() + b * row, v_new.typed_data() + b * row,
           keys.typed_data() + cache_offset, values.typed_data() + cache_offset, start, kv_heads, heads / kv_heads,
           dim, out->typed_data() + b * heads * dim, scores.data());
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace hyperjax

XLA_FFI_DEFINE_HANDLER_SYMBOL(hyperjax_decode_attention, hyperjax::decode_attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
