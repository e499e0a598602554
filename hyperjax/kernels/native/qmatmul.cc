// XLA FFI handlers for y (batch, rows) = x (batch, cols) @ W.T with W in a repacked GGUF block format.
//
// Per call: quantize x to int8 per 32-block (once, shared by every row), then split the row groups (and, for
// large batches, tiles of batch rows) across a persistent thread pool; each task runs the best kernel this
// CPU supports on its groups. Exported symbols: hyperjax_{q4_0,q4_1,q8_0}_matmul (FFI handlers) and a few
// hyperjax_native_* C functions for the Python loader.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "layout.h"
#include "thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace hyperjax {
namespace {

// Batch rows per task: a task reuses its group's weights (in L1) across them.
constexpr int64_t kBatchTile = 32;
// Activations are quantized on the pool from this many values on (below, one thread is faster).
constexpr int64_t kParallelQuantize = 64 * 1024;

const Kernels* best_kernels() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    return avx512_kernels();
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return avx2_kernels();
  }
#endif
  return scalar_kernels();
}

int default_threads() {
  if (const char* env = std::getenv("HYPERJAX_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// Global state. `g_mutex` serialises calls (XLA may run independent custom calls concurrently; the pool
// already uses every core) and guards the pool and the kernel choice.
std::mutex g_mutex;
std::unique_ptr<ThreadPool> g_pool;
int g_requested_threads = 0;  // 0: default_threads()
const Kernels* g_kernels = best_kernels();

ThreadPool& get_pool() {
  if (!g_pool)
    g_pool = std::make_unique<ThreadPool>(g_requested_threads > 0 ? g_requested_threads : default_threads());
  return *g_pool;
}

// Per-call activation scratch, grown on demand and kept (64-byte aligned).
class Scratch {
 public:
  void* get(size_t bytes) {
    if (bytes_.size() < bytes + 64) bytes_.resize(bytes + 64);
    auto p = reinterpret_cast<uintptr_t>(bytes_.data());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t{63});
  }

 private:
  std::vector<unsigned char> bytes_;
};
Scratch g_scratch;

struct QuantizeJob {
  const Kernels* kernels;
  const float* x;
  int8_t* q;
  float* scale;
  float* sum;
  int32_t* qsum;
  int64_t cols, blocks;
};

void quantize_rows(const void* ctx, int64_t begin, int64_t end) {
  const auto& j = *static_cast<const QuantizeJob*>(ctx);
  for (int64_t b = begin; b < end; ++b) {
    j.kernels->quantize(j.x + b * j.cols, j.blocks, j.q + b * j.cols, j.scale + b * j.blocks,
                        j.sum + b * j.blocks, j.qsum + b * j.blocks);
  }
}

struct MatmulJob {
  const Kernels* kernels;
  Kind kind;
  const uint8_t* w;
  int64_t stride;  // bytes per group
  Activations act;
  int64_t batch, rows, tiles;  // tiles: batch tiles per group
  float* y;
};

// Task t = (group t / tiles, batch tile t % tiles): consecutive tasks share a group, which stays in cache.
void matmul_tasks(const void* ctx, int64_t begin, int64_t end) {
  const auto& j = *static_cast<const MatmulJob*>(ctx);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t g = t / j.tiles, b_end = std::min(j.batch, (t % j.tiles + 1) * kBatchTile);
    const int valid = static_cast<int>(std::min<int64_t>(kGroupRows, j.rows - g * kGroupRows));
    for (int64_t b = t % j.tiles * kBatchTile; b < b_end; b += kMaxTile) {
      const int tile = static_cast<int>(std::min<int64_t>(kMaxTile, b_end - b));
      j.kernels->tile[static_cast<int>(j.kind)][tile - 1](j.w + g * j.stride, j.act, b,
                                                          j.y + b * j.rows + g * kGroupRows, j.rows, valid);
    }
  }
}

// y (batch, rows) = x (batch, cols) @ W.T with W = w[layer]: w holds a stack of repacked matrices (layers,
// groups, stride), indexed here rather than sliced by XLA, which would copy the slice before a custom call.
template <Kind K>
ffi::Error matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::S32> layer,
                  ffi::ResultBuffer<ffi::F32> y, int64_t rows) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || layer.element_count() != 1) {
    return ffi::Error::InvalidArgument(
        "hyperjax native matmul: needs x 2-D, weights 3-D, a scalar layer, y 2-D");
  }
  const int64_t batch = xd[0], cols = xd[1], blocks = cols / kBlock;
  const int64_t groups = (rows + kGroupRows - 1) / kGroupRows, index = *layer.typed_data();
  if (cols % kBlock != 0 || rows < 0 || wd[1] != groups || wd[2] != group_stride(K, blocks) ||
      yd[0] != batch || yd[1] != rows) {
    return ffi::Error::InvalidArgument("hyperjax native matmul: shapes do not match the repacked layout (x " +
                                       std::to_string(batch) + "x" + std::to_string(cols) + ", weights " +
                                       std::to_string(wd[1]) + "x" + std::to_string(wd[2]) + ", rows " +
                                       std::to_string(rows) + ")");
  }
  if (index < 0 || index >= wd[0]) {
    return ffi::Error::InvalidArgument("hyperjax native matmul: layer " + std::to_string(index) +
                                       " outside 0.." + std::to_string(wd[0] - 1));
  }
  if (batch == 0 || rows == 0) return ffi::Error::Success();

  std::lock_guard<std::mutex> lock(g_mutex);
  ThreadPool& threads = get_pool();
  // Scratch: int8 activations, then per-block scale, float sum and integer sum.
  const int64_t q_bytes = (batch * cols + 63) / 64 * 64, n_blocks = batch * blocks;
  auto* base = static_cast<unsigned char*>(g_scratch.get(q_bytes + n_blocks * 12));
  auto* q = reinterpret_cast<int8_t*>(base);
  auto* scale = reinterpret_cast<float*>(base + q_bytes);
  float* sum = scale + n_blocks;
  auto* qsum = reinterpret_cast<int32_t*>(sum + n_blocks);

  const QuantizeJob qjob{g_kernels, x.typed_data(), q, scale, sum, qsum, cols, blocks};
  if (batch * cols >= kParallelQuantize) {
    threads.run(batch, &quantize_rows, &qjob);
  } else {
    quantize_rows(&qjob, 0, batch);
  }

  const int64_t tiles = (batch + kBatchTile - 1) / kBatchTile;
  const uint8_t* weights = w.typed_data() + index * groups * wd[2];
  const Activations act{q, scale, sum, qsum, cols, blocks};
  const MatmulJob job{g_kernels, K, weights, wd[2], act, batch, rows, tiles, y->typed_data()};
  threads.run(groups * tiles, &matmul_tasks, &job);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace hyperjax

#define HYPERJAX_DEFINE_MATMUL(symbol, kind)                      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, hyperjax::matmul<kind>,   \
                                ffi::Ffi::Bind()                  \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::U8>>()  \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>() \
                                    .Attr<int64_t>("rows"))

HYPERJAX_DEFINE_MATMUL(hyperjax_q4_0_matmul, hyperjax::Kind::kQ4_0);
HYPERJAX_DEFINE_MATMUL(hyperjax_q4_1_matmul, hyperjax::Kind::kQ4_1);
HYPERJAX_DEFINE_MATMUL(hyperjax_q8_0_matmul, hyperjax::Kind::kQ8_0);

extern "C" {

int hyperjax_native_abi_version() { return hyperjax::kAbiVersion; }

const char* hyperjax_native_isa() {
  std::lock_guard<std::mutex> lock(hyperjax::g_mutex);
  return hyperjax::g_kernels->name;
}

// Selects a kernel family by name ("scalar", "avx2", "avx512_vnni", or "auto" for the best supported one).
// Returns 0 when this CPU or build lacks it (nothing changes).
int hyperjax_native_set_isa(const char* name) {
  using namespace hyperjax;
  const std::string want(name);
  const Kernels* best = best_kernels();
  const Kernels* pick = nullptr;
  if (want == "auto") {
    pick = best;
  } else {
    // The families in increasing order of the features they need; any up to the best one runs here.
    for (const Kernels* k : {scalar_kernels(), avx2_kernels(), avx512_kernels()}) {
      if (k && want == k->name) pick = k;
      if (k == best) break;
    }
  }
  if (!pick) return 0;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_kernels = pick;
  return 1;
}

int hyperjax_native_num_threads() {
  std::lock_guard<std::mutex> lock(hyperjax::g_mutex);
  return hyperjax::get_pool().num_threads();
}

// Replaces the pool (n ≤ 0: HYPERJAX_NUM_THREADS or the available cores).
void hyperjax_native_set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(hyperjax::g_mutex);
  hyperjax::g_requested_threads = n;
  hyperjax::g_pool.reset();
}

}  // extern "C"
