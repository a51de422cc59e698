// ctest: RequestQueue bounds, timeouts, close, and 4 producers x 4 consumers moving
// every id exactly once.
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"
#include "runtime/request_queue.h"
#include "runtime/scheduler.h"

using namespace unimlm;

static void test_bounds() {
  RequestQueue q(2);
  CHECK(q.try_push(1) == PushStatus::kOk && q.try_push(2) == PushStatus::kOk);
  CHECK(q.try_push(3) == PushStatus::kFull);
  CHECK_THROWS(q.push(3), QueueFullError);
  int64_t id = -1;
  CHECK(q.pop(&id, 0) && id == 1);
  CHECK(q.pop_all(10) == std::vector<int64_t>{2});
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(!q.pop(&id, 3000));
  CHECK(std::chrono::steady_clock::now() - t0 >= std::chrono::microseconds(3000));
  q.push(5);
  q.close();
  CHECK(q.try_push(6) == PushStatus::kClosed);
  CHECK_THROWS(q.push(6), std::runtime_error);
  CHECK(q.pop(&id, -1) && id == 5);  // drains after close
  CHECK(!q.pop(&id, -1));             // then returns at once
  CHECK_THROWS(RequestQueue(0), std::invalid_argument);
}

static void test_mpmc() {
  constexpr int kProducers = 4, kConsumers = 4, kPer = 5000;
  RequestQueue q(64);
  std::vector<std::atomic<int>> seen(kProducers * kPer);
  std::atomic<int64_t> rejected{0};
  std::vector<std::thread> threads;
  for (int p = 0; p < kProducers; ++p)
    threads.emplace_back([&, p] {
      for (int i = 0; i < kPer; ++i) {
        const int64_t id = static_cast<int64_t>(p) * kPer + i;
        while (q.try_push(id) == PushStatus::kFull) {
          ++rejected;
          std::this_thread::yield();
        }
      }
    });
  for (int c = 0; c < kConsumers; ++c)
    threads.emplace_back([&] {
      int64_t id;
      while (q.pop(&id, -1)) ++seen[static_cast<size_t>(id)];
    });
  for (int p = 0; p < kProducers; ++p) threads[static_cast<size_t>(p)].join();
  while (q.size() > 0) std::this_thread::yield();
  q.close();
  for (int c = 0; c < kConsumers; ++c) threads[static_cast<size_t>(kProducers + c)].join();
  for (auto& s : seen) CHECK(s.load() == 1);
  std::printf("mpmc: %d ids, %lld full rejections retried\n", kProducers * kPer, static_cast<long long>(rejected.load()));
}

int main() {
  test_bounds();
  test_mpmc();
  std::puts("test_request_queue: ok");
  return 0;
}
