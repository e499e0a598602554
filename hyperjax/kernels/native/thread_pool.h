// A persistent pool for short parallel loops (~200 calls per decoded token, each a few microseconds).
//
// run(n, ...) splits [0, n) into one contiguous range per thread (the caller is thread 0). Each thread takes
// chunks of its own range first (good for streaming weights), then steals chunks left in the others' ranges.
// The caller waits only for chunks that were claimed, never for a worker to show up: on a busy machine a
// descheduled worker costs nothing but its share of the parallelism (a barrier would stall every call for a
// time slice).
//
// A range is one 64-bit word, end << 32 | next, claimed with fetch_add. A claim is valid when the returned
// `next` is below `end`; a valid claim can only happen while its job runs (the caller waits for every claimed
// task), so a worker that wakes up late and claims from a finished or a newer job's words is always
// consistent.
//
// Idle workers spin for a short while (the next matmul usually follows within microseconds), then sleep.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace hyperjax {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class ThreadPool {
 public:
  // Runs fn(ctx, begin, end) over disjoint ranges covering [0, n).
  using Task = void (*)(const void* ctx, int64_t begin, int64_t end);

  explicit ThreadPool(int num_threads)
      : num_threads_(std::max(1, num_threads)), ranges_(new Range[num_threads_]) {
    for (int t = 1; t < num_threads_; ++t) workers_.emplace_back([this, t] { worker_loop(t); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stop_.store(true);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Not reentrant: callers serialise with their own lock.
  void run(int64_t n, Task fn, const void* ctx) {
    if (n <= 1 || num_threads_ == 1) {
      if (n > 0) fn(ctx, 0, n);
      return;
    }
    task_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    chunk_.store(std::max<int64_t>(1, n / (num_threads_ * kChunksPerThread)), std::memory_order_relaxed);
    for (int t = 0; t < num_threads_; ++t) {
      const uint64_t begin = n * t / num_threads_, end = n * (t + 1) / num_threads_;
      ranges_[t].word.store(end << 32 | begin, std::memory_order_release);
    }
    generation_.fetch_add(1);  // seq_cst: ordered before the read of sleepers_ below
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);  // a sleeper checks the generation under this lock
      wake_.notify_all();
    }
    work(0);
    while (done_.load(std::memory_order_acquire) != n) cpu_relax();  // only claimed, running chunks remain
  }

 private:
  static constexpr int kChunksPerThread = 4;
  static constexpr auto kWorkerSpin = std::chrono::microseconds(200);

  struct alignas(64) Range {
    std::atomic<uint64_t> word{0};
  };

  // Claims and runs chunks: own range first, then the others in turn.
  void work(int self) {
    for (int i = 0; i < num_threads_; ++i) {
      Range& range = ranges_[(self + i) % num_threads_];
      for (;;) {
        const int64_t chunk = chunk_.load(std::memory_order_relaxed);
        const uint64_t word = range.word.fetch_add(chunk, std::memory_order_acq_rel);
        const int64_t begin = word & 0xFFFFFFFF, end = word >> 32;
        if (begin >= end) break;
        const int64_t stop = std::min(end, begin + chunk);
        task_(ctx_, begin, stop);
        done_.fetch_add(stop - begin, std::memory_order_release);
      }
    }
  }

  void worker_loop(int t) {
    uint64_t seen = 0;
    for (;;) {
      seen = wait_for_job(seen);
      if (stop_.load(std::memory_order_relaxed)) return;
      work(t);
    }
  }

  uint64_t wait_for_job(uint64_t seen) {
    const auto deadline = std::chrono::steady_clock::now() + kWorkerSpin;
    for (int i = 0;; ++i) {
      const uint64_t gen = generation_.load(std::memory_order_acquire);
      if (gen != seen) return gen;
      cpu_relax();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() > deadline) break;
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1);
    wake_.wait(lock, [&] { return generation_.load() != seen; });
    sleepers_.fetch_sub(1);
    return generation_.load(std::memory_order_acquire);
  }

  const int num_threads_;
  std::unique_ptr<Range[]> ranges_;
  std::vector<std::thread> workers_;

  // The job: written by the caller before the range words that publish it, read after a valid claim.
  Task task_ = nullptr;
  const void* ctx_ = nullptr;
  std::atomic<int64_t> chunk_{1};

  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<uint64_t> generation_{0};
  alignas(64) std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

}  // namespace hyperjax
