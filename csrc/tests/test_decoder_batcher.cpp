// ctest: DecoderBatcher release rules (size, delay), order (priority, deadline),
// expiry and cancellation with a fake clock via poll(); blocking next_batch with
// worker threads, timeouts and close().
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"
#include "runtime/decoder_batcher.h"
#include "runtime/scheduler.h"

using namespace unimlm;

static BatchItem item(int64_t id, int32_t prio, int64_t t, int64_t deadline = 0, int64_t req = 0) {
  BatchItem b;
  b.id = id;
  b.request_id = req ? req : id;
  b.priority = prio;
  b.enqueue_us = t;
  b.deadline_us = deadline;
  b.payload = 1000 + id;
  return b;
}

static DecoderPolicy policy(int32_t batch, int64_t delay, int64_t cap = 100) {
  DecoderPolicy p;
  p.max_batch_size = batch;
  p.max_queue_delay_us = delay;
  p.max_queue_size = cap;
  return p;
}

static void test_release_rules() {
  DecoderBatcher b;
  b.add_decoder("det", policy(3, 100));
  b.add_decoder("gen", policy(1, 0));
  b.submit("det", item(1, 0, 1000));
  b.submit("det", item(2, 0, 1010));
  CHECK(b.poll("det", 1050).empty());  // neither full nor old enough
  Batch r = b.poll("det", 1100);       // oldest waited 100 us
  CHECK(r.items.size() == 2 && r.items[0].id == 1 && r.items[0].payload == 1001 && r.decoder == "det");
  CHECK(b.queue_size("det") == 0);
  for (int i = 0; i < 4; ++i) b.submit("det", item(10 + i, 0, 2000 + i));
  r = b.poll("det", 2004);  // full: 3 released, one stays
  CHECK(r.items.size() == 3 && b.queue_size("det") == 1);
  CHECK(b.queue_size("gen") == 0);
  CHECK_THROWS(b.submit("nope", item(50, 0, 0)), std::invalid_argument);
  CHECK_THROWS(b.submit("det", item(13, 0, 0)), std::invalid_argument);  // id 13 still queued
  CHECK_THROWS(b.add_decoder("det", policy(1, 0)), std::invalid_argument);
  CHECK_THROWS(b.add_decoder("bad", policy(0, 0)), std::invalid_argument);
}

static void test_order_expiry_cancel() {
  DecoderBatcher b;
  b.add_decoder("seg", policy(2, 0, 5));
  b.submit("seg", item(1, 2, 0));
  b.submit("seg", item(2, 1, 5, 0));
  b.submit("seg", item(3, 1, 6, 500));
  b.submit("seg", item(4, 0, 7, 20, 9));
  b.submit("seg", item(5, 0, 8, 0, 9));
  CHECK_THROWS(b.submit("seg", item(6, 0, 9)), QueueFullError);
  CHECK(b.cancel_request(9) == 2);
  CHECK(!b.cancel(4));  // already cancelled
  Batch r = b.poll("seg", 30);
  CHECK(r.cancelled.size() == 2 && r.expired.empty());
  // Same priority 1: the one with a deadline first; priority 2 waits.
  CHECK(r.items.size() == 2 && r.items[0].id == 3 && r.items[1].id == 2);
  b.submit("seg", item(7, 0, 40, 50));
  r = b.poll("seg", 60);  // 7 expired before batching; 1 is released alone
  CHECK(r.expired.size() == 1 && r.expired[0].id == 7 && r.items.size() == 1 && r.items[0].id == 1);
  CHECK(b.queue_size("seg") == 0 && b.poll("seg", 1000).empty());
  b.submit("seg", item(7, 0, 100));  // ids are reusable once reported
  CHECK(b.cancel(7));
  r = b.poll("seg", 100);
  CHECK(r.cancelled.size() == 1 && r.items.empty());
}

static void test_blocking_and_close() {
  DecoderBatcher b;
  b.add_decoder("pose", policy(4, 20000));
  const int64_t t0 = DecoderBatcher::now_us();
  Batch r = b.next_batch("pose", 5000);  // nothing queued: times out
  CHECK(r.empty() && !r.closed && DecoderBatcher::now_us() - t0 >= 5000);
  std::atomic<int> got{0};
  std::thread worker([&] {
    Batch x = b.next_batch("pose", -1);
    got = static_cast<int>(x.items.size());
  });
  for (int i = 0; i < 4; ++i) b.submit("pose", item(i, 0, -1));
  worker.join();  // woken by the fourth submit (full batch), long before the delay
  CHECK(got == 4);
  b.submit("pose", item(10, 0, -1));
  const int64_t t1 = DecoderBatcher::now_us();
  r = b.next_batch("pose", -1);  // released by max_queue_delay
  CHECK(r.items.size() == 1 && DecoderBatcher::now_us() - t1 >= 15000);
  std::vector<std::thread> waiters;
  std::atomic<int> closed_seen{0};
  for (int i = 0; i < 3; ++i)
    waiters.emplace_back([&] {
      for (;;) {
        Batch x = b.next_batch("pose", -1);
        if (x.closed) break;
      }
      ++closed_seen;
    });
  b.submit("pose", item(20, 0, -1));
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  b.close();  // drains item 20 as a batch, then every waiter sees closed
  for (auto& w : waiters) w.join();
  CHECK(closed_seen == 3 && b.queue_size("pose") == 0);
  CHECK_THROWS(b.submit("pose", item(21, 0, -1)), std::runtime_error);
}

int main() {
  test_release_rules();
  test_order_expiry_cancel();
  test_blocking_and_close();
  std::puts("test_decoder_batcher: ok");
  return 0;
}
