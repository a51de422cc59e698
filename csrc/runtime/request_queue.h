#pragma once
// Bounded multi-producer multi-consumer queue of request ids. Thread-safe.
// push beyond capacity is rejected (QueueFullError / PushStatus::kFull), never blocks;
// pop blocks up to a timeout; close() wakes every waiter, later pushes are rejected
// and pops drain what is left, then return false.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

namespace unimlm {

enum class PushStatus { kOk, kFull, kClosed };

class RequestQueue {
 public:
  explicit RequestQueue(int64_t capacity);

  PushStatus try_push(int64_t id);
  // Throws QueueFullError (scheduler.h) when full, std::runtime_error when closed.
  void push(int64_t id);
  // Pops into *id. timeout_us < 0 waits forever, 0 does not wait. Returns false on
  // timeout or when closed and empty.
  bool pop(int64_t* id, int64_t timeout_us);
  // Pops up to max_items without waiting.
  std::vector<int64_t> pop_all(int64_t max_items);
  void close();
  bool closed() const;
  int64_t size() const;
  int64_t capacity() const { return capacity_; }

 private:
  const int64_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable not_empty_;
  std::deque<int64_t> q_;
  bool closed_ = false;
};

}  // namespace unimlm
