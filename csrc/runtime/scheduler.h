#pragma once
// Continuous-batching scheduler (vLLM-style, recompute preemption) over a BlockManager.
//
// A sequence is a list of token ids and a count of computed ones. Each step schedules
// for every running sequence min(uncomputed tokens, token budget left) new tokens, so
// the same rule covers
//   chunked prefill   a long prompt spreads over steps,
//   decode            one sampled token appended by update() -> 1 new token,
//   super-link append update() appends the routing token plus K query tokens ->
//                     1 + K new tokens next step (chunked too if the budget is short).
// A sequence with nothing uncomputed (waiting for its sampled token) is skipped.
//
// Engine loop (all methods are thread-safe; one mutex):
//   add_request(id, prompt, priority, extra_keys)  -> queued, or throws QueueFullError /
//                                                    std::invalid_argument (never fits)
//   out = step()                                    -> StepOutput below; num_computed of
//                                                    each scheduled sequence advances now
//   run the model on out; copy KV blocks out.cow_src -> out.cow_dst first
//   for i with out.do_sample[i]: sample t; update(id, {t}) (or {R, q1..qK} after a
//                                routing token R); finish(id) when done
//   abort(id) at any time, from any thread
// update() also registers the now fully computed blocks in the prefix cache, so call it
// (with an empty token list if nothing was sampled) only after the step's KV is written.
//
// Preemption: when a running sequence cannot get blocks, the running sequence last in
// policy order (lowest priority, then latest arrival) loses all its blocks and goes
// back to the front of the waiting queue with all its tokens to recompute (its hashed
// blocks stay in the prefix cache, so the recompute is often mostly a cache hit).
// No sequence is admitted in a step whose running sequences preempted one another.
// Priority policy only: at the start of a step, while the head of the waiting queue
// is strictly more urgent (lower number) than the last running sequence and lacks a
// seat (max_num_seqs) or the blocks for its first chunk, that running sequence is
// preempted the same way, and the head is admitted in this step.
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "runtime/block_manager.h"

namespace unimlm {

struct QueueFullError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class SchedulingPolicy { kFcfs, kPriority };

struct SchedulerConfig {
  int32_t num_blocks = 1024;
  int32_t block_size = 16;
  bool enable_prefix_caching = true;
  int32_t max_num_seqs = 256;             // running sequences
  int64_t max_num_batched_tokens = 8192;  // new tokens per step
  int64_t max_queue_size = 4096;          // waiting sequences; add_request beyond: QueueFullError
  int64_t max_model_len = 0;              // tokens per sequence; 0: pool capacity
  SchedulingPolicy policy = SchedulingPolicy::kFcfs;
  void validate() const;                  // throws std::invalid_argument
};

// One step's batch, flattened for the model runner (N sequences, T new tokens).
struct StepOutput {
  std::vector<int64_t> seq_ids;          // [N]
  std::vector<int32_t> num_new_tokens;   // [N]
  std::vector<int64_t> num_computed;     // [N] position of the first new token
  std::vector<uint8_t> is_prefill;       // [N] chunk lies in the (re)computed prompt
  std::vector<uint8_t> do_sample;        // [N] chunk reaches the last known token
  std::vector<int32_t> query_start_loc;  // [N + 1] cumulative num_new_tokens
  std::vector<int64_t> slot_mapping;     // [T] block_id * block_size + offset
  std::vector<int32_t> block_table_start;  // [N + 1] offsets into block_tables
  std::vector<int32_t> block_tables;     // concatenated block tables
  std::vector<CopyPair> cow;             // copy src -> dst before running the step
  std::vector<int64_t> preempted;        // sent back to waiting this step
  std::vector<int64_t> rejected;         // removed: grew past max_model_len / the pool
  int64_t num_batched_tokens = 0;
  size_t size() const { return seq_ids.size(); }
};

enum class SeqState { kWaiting, kRunning };

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  // Queues a new sequence. extra_keys: per-block prefix-hash keys (block_extra_keys).
  void add_request(int64_t seq_id, std::vector<int32_t> prompt, int32_t priority = 0,
                   std::vector<uint64_t> extra_keys = {});
  StepOutput step();
  // Appends tokens to a sequence (sampled token, or routing token + K query ids) and
  // commits the prefix-cache hashes of its computed full blocks.
  // Returns false for an unknown id (finished or aborted meanwhile).
  bool update(int64_t seq_id, const std::vector<int32_t>& appended);
  // update(ids[i], {tokens[i]}) for each i under one lock; returns how many were known.
  int64_t update_batch(const std::vector<int64_t>& ids, const std::vector<int32_t>& tokens);
  // Overlapped scheduling: a sampled token can be appended (update) as a placeholder before its
  // value is known, so the next step schedules it; resolve_batch sets tokens[positions[i]] =
  // values[i] of sequence ids[i] once known. Resolve before the sequence's next update(): update
  // hashes full computed blocks with their token values. Returns how many ids were known; throws
  // std::out_of_range for a position past a known sequence's tokens.
  int64_t resolve_batch(const std::vector<int64_t>& ids, const std::vector<int64_t>& positions,
                        const std::vector<int32_t>& values);
  // Removes a sequence and frees its blocks. finish throws for an unknown id; abort
  // returns false.
  void finish(int64_t seq_id);
  bool abort(int64_t seq_id);

  bool contains(int64_t seq_id) const;
  SeqState state(int64_t seq_id) const;
  int64_t num_tokens(int64_t seq_id) const;
  int64_t num_computed_tokens(int64_t seq_id) const;
  int64_t num_cached_tokens(int64_t seq_id) const;  // prefix-cache hit at last admission
  std::vector<int32_t> block_table(int64_t seq_id) const;
  size_t num_waiting() const;
  size_t num_running() const;
  int32_t num_free_blocks() const;
  int32_t num_cached_blocks() const;
  int64_t num_preemptions() const;
  const SchedulerConfig& config() const { return cfg_; }
  // Block-manager invariants plus: every running sequence has a table, no waiting one does.
  void check_invariants() const;

 private:
  struct Seq {
    int64_t id;
    int32_t priority;
    int64_t arrival;
    std::vector<int32_t> tokens;
    std::vector<uint64_t> extra_keys;
    int64_t num_computed = 0;
    int64_t num_cached = 0;
    int64_t prefill_len = 0;  // tokens to (re)compute as prefill since last admission
    SeqState state = SeqState::kWaiting;
    std::tuple<int64_t, int64_t, int64_t> wait_key{};  // its key in waiting_ while waiting
  };
  using WaitKey = std::tuple<int64_t, int64_t, int64_t>;  // (priority, order, id)

  bool before(const Seq* a, const Seq* b) const;
  WaitKey wait_key(const Seq& s, bool front);
  Seq& get(int64_t seq_id);
  const Seq& get(int64_t seq_id) const;
  int64_t capacity_tokens() const;
  void remove(Seq& s);
  void preempt(Seq& s, StepOutput& out);
  bool schedule_running(Seq& s, int64_t budget, StepOutput& out, bool& self_preempted);
  void admit_waiting(int64_t& budget, StepOutput& out);
  void preempt_for_priority(StepOutput& out);
  void emit(Seq& s, int64_t n, bool prefill, StepOutput& out);
  bool update_locked(Seq& s, const int32_t* appended, size_t n);

  SchedulerConfig cfg_;
  BlockManager blocks_;
  mutable std::mutex mu_;
  std::unordered_map<int64_t, std::unique_ptr<Seq>> seqs_;
  std::set<WaitKey> waiting_;
  std::vector<Seq*> running_;  // sorted by policy order
  int64_t next_arrival_ = 0;
  int64_t next_front_ = -1;    // FCFS: preempted sequences jump the queue
  int64_t num_preemptions_ = 0;
};

}  // namespace unimlm
