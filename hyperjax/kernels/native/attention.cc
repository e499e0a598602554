// XLA FFI handler for one decoding step of causal grouped-query attention over a layer-stacked KV cache.
//
//   out[b, h] = softmax over {valid past slots s < start} ∪ {this token} of q[b, h]·k / √D, applied to the values
//
// The cache (L, B, S, K, D) is read in place at the chosen layer, and only its `start` valid slots: a pure-XLA
// formulation reads (or copies) all S slots of the capacity bucket. Each key and value row is read once for the G
// query heads that share it. Single-threaded: at 512 slots a layer's cache is about 400 KB, less than the cost
// of waking a pool. Functions are cloned for AVX-512, AVX2 and baseline x86-64 and chosen at load time.
#include <cmath>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__x86_64__) && defined(__GNUC__)
#define HYPERJAX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HYPERJAX_CLONES
#endif

namespace hyperjax {
namespace {

HYPERJAX_CLONES float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

HYPERJAX_CLONES void axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// One (batch row, KV head): G query heads q (G, D) over `start` past rows (stride `row`) and the new key/value.
void attend_group(const float* q, const float* k_new, const float* v_new, const float* keys, const float* values,
                  int64_t row, int64_t start, int64_t groups, int64_t dim, float* out, std::vector<float>& scores) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  scores.resize(static_cast<size_t>(groups * (start + 1)));
  for (int64_t s = 0; s < start; ++s) {
    for (int64_t g = 0; g < groups; ++g) scores[g * (start + 1) + s] = dot(q + g * dim, keys + s * row, dim) * scale;
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* sc = scores.data() + g * (start + 1);
    sc[start] = dot(q + g * dim, k_new, dim) * scale;
    float peak = sc[start];
    for (int64_t s = 0; s < start; ++s) peak = std::fmax(peak, sc[s]);
    float total = 0.0f;
    for (int64_t s = 0; s <= start; ++s) total += (sc[s] = std::exp(sc[s] - peak));
    const float inv = 1.0f / total;
    for (int64_t s = 0; s <= start; ++s) sc[s] *= inv;
    float* o = out + g * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = sc[start] * v_new[d];
  }
  for (int64_t s = 0; s < start; ++s) {
    for (int64_t g = 0; g < groups; ++g) axpy(scores[g * (start + 1) + s], values + s * row, out + g * dim, dim);
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
  const int64_t groups = heads / kv_heads, row = kv_heads * dim;
  std::vector<float> scores;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t cache_offset = ((layer * batch + b) * slots) * row;
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      const int64_t head0 = (b * heads + kh * groups) * dim;
      const int64_t kv = (b * kv_heads + kh) * dim;
      attend_group(q.typed_data() + head0, k_new.typed_data() + kv, v_new.typed_data() + kv,
                   keys.typed_data() + cache_offset + kh * dim, values.typed_data() + cache_offset + kh * dim, row,
                   start, groups, dim, out->typed_data() + head0, scores);
    }
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
