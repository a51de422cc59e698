#include "runtime/decoder_batcher.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>
#include <tuple>

#include "runtime/scheduler.h"

namespace unimlm {
namespace {

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
constexpr int64_t kMaxDelayUs = 86'400'000'000LL;  // keeps enqueue + delay far from overflow

inline int64_t deadline_or_never(const BatchItem& it) { return it.deadline_us > 0 ? it.deadline_us : kNever; }

bool batch_order(const BatchItem& a, const BatchItem& b) {
  return std::make_tuple(a.priority, deadline_or_never(a), a.enqueue_us, a.id) <
         std::make_tuple(b.priority, deadline_or_never(b), b.enqueue_us, b.id);
}

}  // namespace

int64_t DecoderBatcher::now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void DecoderBatcher::add_decoder(const std::string& name, const DecoderPolicy& policy) {
  if (policy.max_batch_size <= 0) throw std::invalid_argument("DecoderPolicy.max_batch_size must be positive");
  if (policy.max_queue_delay_us < 0 || policy.max_queue_delay_us > kMaxDelayUs)
    throw std::invalid_argument("DecoderPolicy.max_queue_delay_us must be in [0, 1 day]");
  if (policy.max_queue_size <= 0) throw std::invalid_argument("DecoderPolicy.max_queue_size must be positive");
  std::lock_guard<std::mutex> lock(mu_);
  if (queues_.count(name)) throw std::invalid_argument("decoder '" + name + "' already added");
  auto q = std::make_unique<Queue>();
  q->name = name;
  q->policy = policy;
  queues_.emplace(name, std::move(q));
}

DecoderBatcher::Queue& DecoderBatcher::queue(const std::string& name) const {
  auto it = queues_.find(name);
  if (it == queues_.end()) throw std::invalid_argument("unknown decoder '" + name + "'");
  return *it->second;
}

void DecoderBatcher::submit(const std::string& decoder, BatchItem item) {
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_) throw std::runtime_error("decoder batcher closed");
  Queue& q = queue(decoder);
  if (where_.count(item.id)) throw std::invalid_argument("item id " + std::to_string(item.id) + " already queued");
  if (static_cast<int64_t>(q.entries.size()) >= q.policy.max_queue_size)
    throw QueueFullError("decoder '" + decoder + "' queue full (" + std::to_string(q.policy.max_queue_size) + " items)");
  if (item.enqueue_us < 0) item.enqueue_us = now_us();
  q.entries.push_back(Entry{item, false});
  where_.emplace(item.id, &q);
  q.cv.notify_all();
}

bool DecoderBatcher::cancel(int64_t item_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = where_.find(item_id);
  if (it == where_.end()) return false;
  for (Entry& e : it->second->entries)
    if (e.item.id == item_id && !e.cancelled) {
      e.cancelled = true;
      it->second->cv.notify_all();
      return true;
    }
  return false;
}

int64_t DecoderBatcher::cancel_request(int64_t request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (auto& kv : queues_) {
    int64_t here = 0;
    for (Entry& e : kv.second->entries)
      if (e.item.request_id == request_id && !e.cancelled) {
        e.cancelled = true;
        ++here;
      }
    if (here) kv.second->cv.notify_all();
    n += here;
  }
  return n;
}

Batch DecoderBatcher::poll_locked(Queue& q, int64_t now, bool drain) {
  Batch b;
  b.decoder = q.name;
  std::vector<BatchItem> live;
  int64_t oldest = kNever;
  for (const Entry& e : q.entries) {
    if (e.cancelled) b.cancelled.push_back(e.item);
    else if (e.item.deadline_us > 0 && e.item.deadline_us <= now) b.expired.push_back(e.item);
    else {
      live.push_back(e.item);
      oldest = std::min(oldest, e.item.enqueue_us);
    }
  }
  const size_t max_batch = static_cast<size_t>(q.policy.max_batch_size);
  const bool release = !live.empty() && (drain || live.size() >= max_batch ||
                                         now - oldest >= q.policy.max_queue_delay_us);
  if (!release && b.expired.empty() && b.cancelled.empty()) return b;
  if (release) {
    const size_t take = std::min(max_batch, live.size());
    std::partial_sort(live.begin(), live.begin() + static_cast<std::ptrdiff_t>(take), live.end(), batch_order);
    b.items.assign(live.begin(), live.begin() + static_cast<std::ptrdiff_t>(take));
    live.erase(live.begin(), live.begin() + static_cast<std::ptrdiff_t>(take));
  }
  for (const auto* gone : {&b.items, &b.expired, &b.cancelled})
    for (const BatchItem& it : *gone) where_.erase(it.id);
  q.entries.clear();
  for (const BatchItem& it : live) q.entries.push_back(Entry{it, false});
  return b;
}

int64_t DecoderBatcher::next_wake_locked(const Queue& q) const {
  int64_t wake = kNever;
  for (const Entry& e : q.entries) {
    wake = std::min(wake, e.item.enqueue_us + q.policy.max_queue_delay_us);
    if (e.item.deadline_us > 0) wake = std::min(wake, e.item.deadline_us);
  }
  return wake;
}

Batch DecoderBatcher::poll(const std::string& decoder, int64_t now) {
  std::lock_guard<std::mutex> lock(mu_);
  return poll_locked(queue(decoder), now, closed_);
}

Batch DecoderBatcher::next_batch(const std::string& decoder, int64_t timeout_us) {
  std::unique_lock<std::mutex> lock(mu_);
  Queue& q = queue(decoder);
  const int64_t start = now_us();
  const int64_t give_up = timeout_us < 0 ? kNever : start + timeout_us;
  for (;;) {
    const int64_t now = now_us();
    Batch b = poll_locked(q, now, closed_);
    if (!b.empty()) return b;
    if (closed_) {
      b.closed = true;
      return b;
    }
    if (now >= give_up) return b;
    const int64_t wake = std::min(give_up, next_wake_locked(q));
    if (wake == kNever) q.cv.wait(lock);
    else q.cv.wait_until(lock, std::chrono::steady_clock::time_point(std::chrono::microseconds(wake)));
  }
}

void DecoderBatcher::close() {
  std::lock_guard<std::mutex> lock(mu_);
  closed_ = true;
  for (auto& kv : queues_) kv.second->cv.notify_all();
}

bool DecoderBatcher::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

int64_t DecoderBatcher::queue_size(const std::string& decoder) const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(queue(decoder).entries.size());
}

std::vector<std::string> DecoderBatcher::decoders() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> names;
  for (const auto& kv : queues_) names.push_back(kv.second->name);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace unimlm
