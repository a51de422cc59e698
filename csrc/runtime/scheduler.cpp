#include "runtime/scheduler.h"

#include <algorithm>

namespace unimlm {

void SchedulerConfig::validate() const {
  auto bad = [](const std::string& m) { throw std::invalid_argument("SchedulerConfig: " + m); };
  if (num_blocks <= 0) bad("num_blocks must be positive, got " + std::to_string(num_blocks));
  if (block_size <= 0) bad("block_size must be positive, got " + std::to_string(block_size));
  if (max_num_seqs <= 0) bad("max_num_seqs must be positive, got " + std::to_string(max_num_seqs));
  if (max_num_batched_tokens <= 0)
    bad("max_num_batched_tokens must be positive, got " + std::to_string(max_num_batched_tokens));
  if (max_queue_size <= 0) bad("max_queue_size must be positive, got " + std::to_string(max_queue_size));
  if (max_model_len < 0) bad("max_model_len must be >= 0 (0: pool capacity)");
}

Scheduler::Scheduler(const SchedulerConfig& config)
    : cfg_((config.validate(), config)),
      blocks_(config.num_blocks, config.block_size, config.enable_prefix_caching) {
  running_.reserve(static_cast<size_t>(cfg_.max_num_seqs));
}

bool Scheduler::before(const Seq* a, const Seq* b) const {
  if (cfg_.policy == SchedulingPolicy::kPriority && a->priority != b->priority)
    return a->priority < b->priority;
  return a->arrival < b->arrival;
}

Scheduler::WaitKey Scheduler::wait_key(const Seq& s, bool front) {
  const int64_t prio = cfg_.policy == SchedulingPolicy::kPriority ? s.priority : 0;
  return WaitKey{prio, front ? next_front_-- : s.arrival, s.id};
}

Scheduler::Seq& Scheduler::get(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::out_of_range("unknown sequence " + std::to_string(seq_id));
  return *it->second;
}

const Scheduler::Seq& Scheduler::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::out_of_range("unknown sequence " + std::to_string(seq_id));
  return *it->second;
}

int64_t Scheduler::capacity_tokens() const {
  const int64_t pool = static_cast<int64_t>(cfg_.num_blocks) * cfg_.block_size;
  return cfg_.max_model_len > 0 ? std::min(pool, cfg_.max_model_len) : pool;
}

void Scheduler::add_request(int64_t seq_id, std::vector<int32_t> prompt, int32_t priority,
                            std::vector<uint64_t> extra_keys) {
  std::lock_guard<std::mutex> lock(mu_);
  if (prompt.empty()) throw std::invalid_argument("sequence " + std::to_string(seq_id) + ": empty prompt");
  if (seqs_.count(seq_id)) throw std::invalid_argument("sequence " + std::to_string(seq_id) + " already exists");
  const int64_t cap = capacity_tokens();
  if (static_cast<int64_t>(prompt.size()) > cap)
    throw std::invalid_argument("sequence " + std::to_string(seq_id) + ": prompt of " +
                                std::to_string(prompt.size()) + " tokens can never fit (limit " +
                                std::to_string(cap) + " tokens: max_model_len or the KV pool)");
  if (static_cast<int64_t>(waiting_.size()) >= cfg_.max_queue_size)
    throw QueueFullError("scheduler queue full (" + std::to_string(cfg_.max_queue_size) +
                         " waiting sequences)");
  auto s = std::make_unique<Seq>();
  s->id = seq_id;
  s->priority = priority;
  s->arrival = next_arrival_++;
  s->tokens = std::move(prompt);
  s->extra_keys = std::move(extra_keys);
  s->wait_key = wait_key(*s, false);
  waiting_.insert(s->wait_key);
  seqs_.emplace(seq_id, std::move(s));
}

void Scheduler::emit(Seq& s, int64_t n, bool prefill, StepOutput& out) {
  const std::vector<int32_t>& table = blocks_.block_table(s.id);
  const int64_t bs = cfg_.block_size;
  out.seq_ids.push_back(s.id);
  out.num_new_tokens.push_back(static_cast<int32_t>(n));
  out.num_computed.push_back(s.num_computed);
  out.is_prefill.push_back(prefill ? 1 : 0);
  for (int64_t p = s.num_computed; p < s.num_computed + n; ++p)
    out.slot_mapping.push_back(static_cast<int64_t>(table[static_cast<size_t>(p / bs)]) * bs + p % bs);
  out.query_start_loc.push_back(out.query_start_loc.back() + static_cast<int32_t>(n));
  out.block_tables.insert(out.block_tables.end(), table.begin(), table.end());
  out.block_table_start.push_back(static_cast<int32_t>(out.block_tables.size()));
  s.num_computed += n;
  out.do_sample.push_back(s.num_computed == static_cast<int64_t>(s.tokens.size()) ? 1 : 0);
  out.num_batched_tokens += n;
}

void Scheduler::remove(Seq& s) {
  if (s.state == SeqState::kRunning) {
    blocks_.free(s.id);
    running_.erase(std::find(running_.begin(), running_.end(), &s));
  } else {
    waiting_.erase(s.wait_key);
  }
  const int64_t id = s.id;  // s dies inside erase
  seqs_.erase(id);
}

void Scheduler::preempt(Seq& s, StepOutput& out) {
  blocks_.free(s.id);
  running_.erase(std::find(running_.begin(), running_.end(), &s));
  s.num_computed = 0;
  s.state = SeqState::kWaiting;
  s.wait_key = wait_key(s, true);
  waiting_.insert(s.wait_key);
  out.preempted.push_back(s.id);
  ++num_preemptions_;
}

bool Scheduler::schedule_running(Seq& s, int64_t n, StepOutput& out, bool& self_preempted) {
  while (!blocks_.allocate_slots(s.id, s.num_computed, s.num_computed + n, &out.cow)) {
    Seq* victim = running_.back();  // last in policy order; not scheduled yet this step
    preempt(*victim, out);
    if (victim == &s) {
      self_preempted = true;
      return false;
    }
  }
  emit(s, n, s.num_computed < s.prefill_len, out);
  return true;
}

void Scheduler::admit_waiting(int64_t& budget, StepOutput& out) {
  while (!waiting_.empty() && static_cast<int32_t>(running_.size()) < cfg_.max_num_seqs && budget > 0) {
    Seq& s = get(std::get<2>(*waiting_.begin()));
    if (static_cast<int64_t>(s.tokens.size()) > capacity_tokens()) {  // grew while waiting
      out.rejected.push_back(s.id);
      remove(s);
      continue;
    }
    const int64_t cached = blocks_.match_prefix(s.id, s.tokens, s.extra_keys);
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(s.tokens.size()) - cached, budget);
    if (!blocks_.allocate_slots(s.id, cached, cached + n, &out.cow)) {
      blocks_.free(s.id);
      break;  // head-of-line: later arrivals / lower priorities wait behind it
    }
    waiting_.erase(waiting_.begin());
    s.num_computed = cached;
    s.num_cached = cached;
    s.prefill_len = static_cast<int64_t>(s.tokens.size());
    s.state = SeqState::kRunning;
    running_.insert(std::upper_bound(running_.begin(), running_.end(), &s,
                                     [this](const Seq* a, const Seq* b) { return before(a, b); }),
                    &s);
    emit(s, n, true, out);
    budget -= n;
  }
}

void Scheduler::preempt_for_priority(StepOutput& out) {
  while (!waiting_.empty() && !running_.empty()) {
    const Seq& head = get(std::get<2>(*waiting_.begin()));
    Seq& victim = *running_.back();
    if (head.priority >= victim.priority) return;  // strictly more urgent only
    const int64_t chunk = std::min<int64_t>(static_cast<int64_t>(head.tokens.size()), cfg_.max_num_batched_tokens);
    const bool seat = static_cast<int32_t>(running_.size()) < cfg_.max_num_seqs;
    const bool room = blocks_.num_free() >= (chunk + cfg_.block_size - 1) / cfg_.block_size;
    if (seat && room) return;
    preempt(victim, out);
  }
}

StepOutput Scheduler::step() {
  std::lock_guard<std::mutex> lock(mu_);
  StepOutput out;
  out.query_start_loc.push_back(0);
  out.block_table_start.push_back(0);
  int64_t budget = cfg_.max_num_batched_tokens;
  const int64_t cap = capacity_tokens();
  if (cfg_.policy == SchedulingPolicy::kPriority) preempt_for_priority(out);
  const size_t priority_preempted = out.preempted.size();
  size_t i = 0;
  while (i < running_.size() && budget > 0) {
    Seq& s = *running_[i];
    const int64_t size = static_cast<int64_t>(s.tokens.size());
    if (size > cap) {
      out.rejected.push_back(s.id);
      remove(s);
      continue;
    }
    const int64_t pending = size - s.num_computed;
    if (pending <= 0) {
      ++i;
      continue;
    }
    const int64_t n = std::min(pending, budget);
    bool self_preempted = false;
    if (!schedule_running(s, n, out, self_preempted)) break;
    budget -= n;
    ++i;
  }
  if (out.preempted.size() == priority_preempted) admit_waiting(budget, out);
  return out;
}

bool Scheduler::update_locked(Seq& s, const int32_t* appended, size_t n) {
  s.tokens.insert(s.tokens.end(), appended, appended + n);
  if (s.state == SeqState::kRunning) blocks_.commit(s.id, s.tokens, s.num_computed, s.extra_keys);
  return true;
}

bool Scheduler::update(int64_t seq_id, const std::vector<int32_t>& appended) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return false;
  return update_locked(*it->second, appended.data(), appended.size());
}

int64_t Scheduler::update_batch(const std::vector<int64_t>& ids, const std::vector<int32_t>& tokens) {
  if (ids.size() != tokens.size()) throw std::invalid_argument("update_batch: ids and tokens differ in length");
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    auto it = seqs_.find(ids[i]);
    if (it != seqs_.end()) n += update_locked(*it->second, &tokens[i], 1) ? 1 : 0;
  }
  return n;
}

int64_t Scheduler::resolve_batch(const std::vector<int64_t>& ids, const std::vector<int64_t>& positions,
                                 const std::vector<int32_t>& values) {
  if (ids.size() != positions.size() || ids.size() != values.size())
    throw std::invalid_argument("resolve_batch: ids, positions and values differ in length");
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    auto it = seqs_.find(ids[i]);
    if (it == seqs_.end()) continue;
    Seq& s = *it->second;
    if (positions[i] < 0 || positions[i] >= static_cast<int64_t>(s.tokens.size()))
      throw std::out_of_range("resolve_batch: position " + std::to_string(positions[i]) + " outside sequence " +
                              std::to_string(ids[i]) + " of " + std::to_string(s.tokens.size()) + " tokens");
    s.tokens[static_cast<size_t>(positions[i])] = values[i];
    ++n;
  }
  return n;
}

void Scheduler::finish(int64_t seq_id) {
  std::lock_guard<std::mutex> lock(mu_);
  remove(get(seq_id));
}

bool Scheduler::abort(int64_t seq_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return false;
  remove(*it->second);
  return true;
}

bool Scheduler::contains(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return seqs_.count(seq_id) != 0;
}

SeqState Scheduler::state(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return get(seq_id).state;
}

int64_t Scheduler::num_tokens(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(get(seq_id).tokens.size());
}

int64_t Scheduler::num_computed_tokens(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return get(seq_id).num_computed;
}

int64_t Scheduler::num_cached_tokens(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return get(seq_id).num_cached;
}

std::vector<int32_t> Scheduler::block_table(int64_t seq_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  const Seq& s = get(seq_id);
  if (s.state != SeqState::kRunning) return {};
  return blocks_.block_table(seq_id);
}

size_t Scheduler::num_waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return waiting_.size();
}

size_t Scheduler::num_running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_.size();
}

int32_t Scheduler::num_free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return blocks_.num_free();
}

int32_t Scheduler::num_cached_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return blocks_.num_cached();
}

int64_t Scheduler::num_preemptions() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_preemptions_;
}

void Scheduler::check_invariants() const {
  std::lock_guard<std::mutex> lock(mu_);
  auto fail = [](const std::string& m) { throw std::logic_error("Scheduler: " + m); };
  blocks_.check_invariants();
  if (blocks_.num_seqs() != running_.size()) fail("block tables != running sequences");
  if (waiting_.size() + running_.size() != seqs_.size()) fail("waiting + running != sequences");
  for (size_t i = 0; i < running_.size(); ++i) {
    const Seq* s = running_[i];
    if (s->state != SeqState::kRunning || !blocks_.has(s->id)) fail("running sequence without blocks");
    if (s->num_computed > static_cast<int64_t>(s->tokens.size())) fail("computed past the tokens");
    if (i > 0 && before(s, running_[i - 1])) fail("running set out of policy order");
  }
  for (const WaitKey& k : waiting_) {
    const Seq& s = get(std::get<2>(k));
    if (s.state != SeqState::kWaiting || blocks_.has(s.id) || s.num_computed != 0)
      fail("waiting sequence holds blocks or computed tokens");
  }
}

}  // namespace unimlm
