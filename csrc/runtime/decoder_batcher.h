#pragma once
// Per-decoder queues of routed payload groups, released as batches. Thread-safe.
//
// Each decoder (det, seg, grd, pose, gen, edit, ...) has a policy. A decoder's queue
// releases a batch when it holds max_batch_size live items, or when its oldest live
// item has waited max_queue_delay_us; the batch takes up to max_batch_size items in
// (priority ascending, deadline ascending with none last, enqueue time, id) order.
// Items whose deadline has passed, or cancelled while queued, are never batched: the
// next poll returns them in `expired` / `cancelled` (a poll returning only those is a
// non-empty result too, so the worker can fail their requests).
// Times are microseconds of std::chrono::steady_clock (now_us()); poll() takes the
// time from the caller, so policies test with a fake clock. next_batch() blocks on a
// condition variable until a result is ready, the timeout passes, or close(); after
// close() it drains the remaining items as batches without waiting, then returns an
// empty Batch with closed = true.
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace unimlm {

struct BatchItem {
  int64_t id = 0;           // unique across the batcher while queued
  int64_t request_id = 0;
  int32_t priority = 0;     // lower is more urgent
  int64_t enqueue_us = -1;  // < 0: now_us() at submit
  int64_t deadline_us = 0;  // 0: none
  int64_t payload = 0;      // opaque handle (a ticket the Python side maps to tensors)
};

struct DecoderPolicy {
  int32_t max_batch_size = 8;
  int64_t max_queue_delay_us = 2000;
  int64_t max_queue_size = 4096;  // submit beyond: QueueFullError
};

struct Batch {
  std::string decoder;
  std::vector<BatchItem> items;
  std::vector<BatchItem> expired;
  std::vector<BatchItem> cancelled;
  bool closed = false;
  bool empty() const { return items.empty() && expired.empty() && cancelled.empty(); }
};

class DecoderBatcher {
 public:
  static int64_t now_us();

  // Throws std::invalid_argument for a duplicate name or a bad policy.
  void add_decoder(const std::string& name, const DecoderPolicy& policy);
  // Throws std::invalid_argument (unknown decoder, duplicate id), QueueFullError,
  // std::runtime_error after close().
  void submit(const std::string& decoder, BatchItem item);
  // Marks a queued item cancelled (false if not queued), or all queued items of a
  // request (returns how many).
  bool cancel(int64_t item_id);
  int64_t cancel_request(int64_t request_id);
  // Non-blocking: the result at time now_us (possibly empty).
  Batch poll(const std::string& decoder, int64_t now_us);
  // Blocking: waits up to timeout_us (< 0: no limit) for a non-empty result.
  Batch next_batch(const std::string& decoder, int64_t timeout_us);
  void close();
  bool closed() const;
  int64_t queue_size(const std::string& decoder) const;  // live + not yet reported
  std::vector<std::string> decoders() const;

 private:
  struct Entry {
    BatchItem item;
    bool cancelled = false;
  };
  struct Queue {
    std::string name;
    DecoderPolicy policy;
    std::vector<Entry> entries;
    std::condition_variable cv;
  };
  Queue& queue(const std::string& name) const;
  Batch poll_locked(Queue& q, int64_t now, bool drain);
  int64_t next_wake_locked(const Queue& q) const;

  mutable std::mutex mu_;
  std::unordered_map<std::string, std::unique_ptr<Queue>> queues_;
  std::unordered_map<int64_t, Queue*> where_;  // queued item id -> its queue
  bool closed_ = false;
};

}  // namespace unimlm
