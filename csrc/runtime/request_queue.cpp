#include "runtime/request_queue.h"

#include <chrono>
#include <stdexcept>
#include <string>

#include "runtime/scheduler.h"

namespace unimlm {

RequestQueue::RequestQueue(int64_t capacity) : capacity_(capacity) {
  if (capacity <= 0) throw std::invalid_argument("RequestQueue capacity must be positive");
}

PushStatus RequestQueue::try_push(int64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return PushStatus::kClosed;
    if (static_cast<int64_t>(q_.size()) >= capacity_) return PushStatus::kFull;
    q_.push_back(id);
  }
  not_empty_.notify_one();
  return PushStatus::kOk;
}

void RequestQueue::push(int64_t id) {
  switch (try_push(id)) {
    case PushStatus::kOk: return;
    case PushStatus::kFull:
      throw QueueFullError("request queue full (capacity " + std::to_string(capacity_) + ")");
    case PushStatus::kClosed: throw std::runtime_error("request queue closed");
  }
}

bool RequestQueue::pop(int64_t* id, int64_t timeout_us) {
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] { return !q_.empty() || closed_; };
  if (timeout_us < 0) not_empty_.wait(lock, ready);
  else if (timeout_us > 0 && !not_empty_.wait_for(lock, std::chrono::microseconds(timeout_us), ready)) return false;
  // timeout 0 is a poll: no timed wait (a zero-length wait_for still costs a futex round trip)
  if (q_.empty()) return false;
  *id = q_.front();
  q_.pop_front();
  return true;
}

std::vector<int64_t> RequestQueue::pop_all(int64_t max_items) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> out;
  while (!q_.empty() && static_cast<int64_t>(out.size()) < max_items) {
    out.push_back(q_.front());
    q_.pop_front();
  }
  return out;
}

void RequestQueue::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  not_empty_.notify_all();
}

bool RequestQueue::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

int64_t RequestQueue::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(q_.size());
}

}  // namespace unimlm
