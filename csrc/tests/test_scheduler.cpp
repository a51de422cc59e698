// ctest: Scheduler budgets, chunked prefill, decode, super-link appends, preemption,
// priority, abort, queue limits, and a randomized engine loop checked against a fake
// KV store (every computed position read through the step's block table must hold
// the sequence's token) with the scheduler's invariants after every step.
#include <climits>
#include <algorithm>
#include <map>
#include <random>
#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"
#include "runtime/scheduler.h"

using namespace unimlm;

static std::vector<int32_t> toks(int n, int start = 0) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[static_cast<size_t>(i)] = start + i;
  return t;
}

static SchedulerConfig cfg(int blocks, int bs, int64_t budget, int max_seqs = 8,
                           SchedulingPolicy pol = SchedulingPolicy::kFcfs) {
  SchedulerConfig c;
  c.num_blocks = blocks;
  c.block_size = bs;
  c.max_num_batched_tokens = budget;
  c.max_num_seqs = max_seqs;
  c.policy = pol;
  return c;
}

static int find(const StepOutput& o, int64_t id) {
  for (size_t i = 0; i < o.size(); ++i)
    if (o.seq_ids[i] == id) return static_cast<int>(i);
  return -1;
}

static void test_chunked_prefill_and_decode() {
  Scheduler s(cfg(32, 4, 10));
  s.add_request(1, toks(25));
  const int expect[] = {10, 10, 5};
  for (int k = 0; k < 3; ++k) {
    StepOutput o = s.step();
    CHECK(o.size() == 1 && o.num_new_tokens[0] == expect[k] && o.num_computed[0] == 10 * k);
    CHECK(o.is_prefill[0] == 1 && o.do_sample[0] == (k == 2 ? 1 : 0));
    CHECK(o.query_start_loc.back() == expect[k] && o.slot_mapping.size() == static_cast<size_t>(expect[k]));
    for (int j = 0; j < expect[k]; ++j) {
      const int64_t p = 10 * k + j;
      CHECK(o.slot_mapping[static_cast<size_t>(j)] == o.block_tables[static_cast<size_t>(p / 4)] * 4 + p % 4);
    }
    s.update(1, k == 2 ? std::vector<int32_t>{7} : std::vector<int32_t>{});
  }
  StepOutput o = s.step();  // decode
  CHECK(o.size() == 1 && o.num_new_tokens[0] == 1 && o.num_computed[0] == 25 && !o.is_prefill[0] && o.do_sample[0]);
  CHECK(s.step().size() == 0);  // waits for its sampled token
  s.update(1, {3, 100, 101, 102, 103});  // routing token + K = 4 query positions
  o = s.step();
  CHECK(o.size() == 1 && o.num_new_tokens[0] == 5 && o.num_computed[0] == 26 && !o.is_prefill[0] && o.do_sample[0]);
  s.finish(1);
  CHECK(s.num_free_blocks() == 32);
  s.check_invariants();
}

static void test_budget_shared_decode_first() {
  Scheduler s(cfg(64, 4, 8, 3));
  s.add_request(1, toks(3));
  s.add_request(2, toks(3, 50));
  StepOutput o = s.step();
  CHECK(o.size() == 2 && o.num_batched_tokens == 6);
  s.update(1, {9});
  s.update(2, {9});
  s.add_request(3, toks(20, 90));
  s.add_request(4, toks(4, 200));
  o = s.step();  // two decodes first, then 6 prefill tokens of seq 3; seq 4 over max_num_seqs
  CHECK(o.size() == 3 && o.seq_ids[0] == 1 && o.seq_ids[1] == 2 && o.seq_ids[2] == 3);
  CHECK(o.num_new_tokens[2] == 6 && o.is_prefill[2] && !o.do_sample[2] && o.num_batched_tokens == 8);
  CHECK(s.num_running() == 3 && s.num_waiting() == 1);
  s.check_invariants();
}

static void test_prefix_cache_hit() {
  Scheduler s(cfg(64, 4, 100));
  s.add_request(1, toks(18));
  s.step();
  s.update(1, {5});
  s.add_request(2, toks(18));  // identical prompt: 16 cached, last block recomputed
  StepOutput o = s.step();
  const int i = find(o, 2);
  CHECK(i >= 0 && o.num_computed[static_cast<size_t>(i)] == 16 && o.num_new_tokens[static_cast<size_t>(i)] == 2);
  CHECK(s.num_cached_tokens(2) == 16);
  s.finish(1);
  s.finish(2);
  s.add_request(3, toks(18));  // after both finished, the prefix is still cached
  o = s.step();
  CHECK(o.num_computed[0] == 16);
  s.check_invariants();
}

static void test_preemption_recompute() {
  Scheduler s(cfg(6, 4, 64));
  s.add_request(1, toks(8));
  s.add_request(2, toks(8, 100));
  StepOutput o = s.step();
  CHECK(o.size() == 2 && s.num_free_blocks() == 2);
  int32_t t = 0;
  for (int k = 0; k < 8; ++k) {  // each decode 4 tokens fills one block: pool runs out
    s.update(1, {t++});
    s.update(2, {t++});
    o = s.step();
    s.check_invariants();
    if (!o.preempted.empty()) break;
  }
  CHECK(o.preempted.size() == 1 && o.preempted[0] == 2);  // latest arrival loses
  CHECK(s.state(2) == SeqState::kWaiting && s.num_computed_tokens(2) == 0);
  CHECK(find(o, 1) == 0 && find(o, 2) < 0);
  const int64_t total2 = s.num_tokens(2);
  s.finish(1);
  o = s.step();  // recompute all of seq 2's tokens (prefix blocks may be cache hits)
  CHECK(o.size() == 1 && o.seq_ids[0] == 2 && o.is_prefill[0] && o.do_sample[0]);
  CHECK(o.num_computed[0] + o.num_new_tokens[0] == total2 && o.num_computed[0] % 4 == 0);
  CHECK(s.num_preemptions() == 1);
  s.check_invariants();
}

static void test_priority() {
  Scheduler s(cfg(64, 4, 64, 2, SchedulingPolicy::kPriority));
  s.add_request(1, toks(4), 5);
  s.add_request(2, toks(4, 10), 1);
  s.add_request(3, toks(4, 20), 1);
  StepOutput o = s.step();  // max 2 seqs: both priority 1, FCFS among them
  CHECK(o.size() == 2 && o.seq_ids[0] == 2 && o.seq_ids[1] == 3 && s.num_waiting() == 1);
  // Preemption picks the lowest priority even when it arrived first.
  Scheduler p(cfg(4, 4, 64, 4, SchedulingPolicy::kPriority));
  p.add_request(1, toks(7), 9);
  p.add_request(2, toks(7, 10), 0);
  o = p.step();
  CHECK(o.size() == 2 && o.seq_ids[0] == 2);  // running order follows priority
  p.update(1, {1, 2});
  p.update(2, {1, 2});  // both need a third block, only 0 free
  o = p.step();
  CHECK(o.preempted.size() == 1 && o.preempted[0] == 1 && find(o, 2) == 0);
  p.check_invariants();
  // A more urgent arrival preempts a less urgent running sequence (pool or seats full).
  for (int max_seqs : {1, 4}) {
    Scheduler q(cfg(4, 4, 64, max_seqs, SchedulingPolicy::kPriority));
    q.add_request(1, toks(15), 5);
    q.step();
    q.update(1, {1});
    q.add_request(2, toks(4, 50), 5);  // same priority: waits
    o = q.step();
    CHECK(o.preempted.empty() && o.size() == 1 && o.seq_ids[0] == 1);
    q.update(1, {});
    q.add_request(3, toks(4, 70), 0);
    o = q.step();
    CHECK(o.preempted.size() == 1 && o.preempted[0] == 1 && o.size() == 1 && o.seq_ids[0] == 3);
    CHECK(q.state(1) == SeqState::kWaiting);
    q.check_invariants();
  }
  Scheduler f(cfg(4, 4, 64, 1, SchedulingPolicy::kFcfs));  // FCFS never does this
  f.add_request(1, toks(15), 5);
  f.step();
  f.add_request(3, toks(4, 70), 0);
  o = f.step();
  CHECK(o.preempted.empty() && f.state(3) == SeqState::kWaiting);
}

static void test_abort_limits_and_errors() {
  SchedulerConfig c = cfg(4, 4, 64);
  c.max_queue_size = 2;
  Scheduler s(c);
  s.add_request(1, toks(4));
  s.add_request(2, toks(4));
  CHECK_THROWS(s.add_request(3, toks(4)), QueueFullError);
  CHECK_THROWS(s.add_request(1, toks(4)), std::invalid_argument);
  CHECK_THROWS(s.add_request(4, {}), std::invalid_argument);
  CHECK_THROWS(s.add_request(5, toks(17)), std::invalid_argument);  // pool holds 16 tokens
  s.step();
  s.add_request(3, toks(4));
  CHECK(s.abort(3) && !s.abort(3));  // from waiting
  CHECK(s.abort(1));                 // from running
  CHECK_THROWS(s.finish(1), std::out_of_range);
  CHECK(!s.update(1, {1}));
  s.update(2, toks(13));  // grows past the pool: rejected at the next step
  StepOutput o = s.step();
  CHECK(o.rejected.size() == 1 && o.rejected[0] == 2 && !s.contains(2));
  CHECK(s.num_free_blocks() == 4);
  s.check_invariants();
  SchedulerConfig bad = cfg(4, 4, 0);
  CHECK_THROWS(Scheduler{bad}, std::invalid_argument);
}

struct Ref {
  std::vector<int32_t> tokens;
};

static void check_kv(const StepOutput& o, const std::map<int64_t, Ref>& ref, std::vector<int64_t>& kv, int bs) {
  for (const CopyPair& c : o.cow)
    for (int j = 0; j < bs; ++j) kv[static_cast<size_t>(c.dst * bs + j)] = kv[static_cast<size_t>(c.src * bs + j)];
  for (size_t i = 0; i < o.size(); ++i) {
    const Ref& r = ref.at(o.seq_ids[i]);
    const int32_t* table = o.block_tables.data() + o.block_table_start[i];
    for (int32_t j = 0; j < o.num_new_tokens[i]; ++j) {
      const int64_t p = o.num_computed[i] + j;
      const int64_t slot = o.slot_mapping[static_cast<size_t>(o.query_start_loc[i] + j)];
      CHECK(slot == static_cast<int64_t>(table[p / bs]) * bs + p % bs);
      kv[static_cast<size_t>(slot)] = r.tokens[static_cast<size_t>(p)];
    }
    for (int64_t p = 0; p < o.num_computed[i]; ++p)  // attention reads the whole prefix
      CHECK(kv[static_cast<size_t>(table[p / bs] * bs + p % bs)] == r.tokens[static_cast<size_t>(p)]);
  }
}

// The engine's half of a step: sample, finish some, append a super-link to others.
template <typename Uni>
static void sample_and_update(Scheduler& s, const StepOutput& o, std::map<int64_t, Ref>& ref, Uni& uni) {
  for (size_t i = 0; i < o.size(); ++i) {
    const int64_t id = o.seq_ids[i];
    if (!o.do_sample[i]) {
      s.update(id, {});
      continue;
    }
    const int fate = uni(0, 19);
    std::vector<int32_t> app{static_cast<int32_t>(uni(0, 3))};
    if (fate == 0 || ref[id].tokens.size() > 60) {
      s.finish(id);
      ref.erase(id);
      continue;
    }
    if (fate == 1) app.insert(app.end(), {90, 91, 92, 93});  // super-link
    ref[id].tokens.insert(ref[id].tokens.end(), app.begin(), app.end());
    s.update(id, app);
  }
}

// Returns (preemptions, steps that scheduled a prefix-cache hit).
static std::pair<int64_t, int64_t> test_randomized(uint32_t seed, SchedulingPolicy pol) {
  std::mt19937 rng(seed);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int bs = 4, blocks = 40;
  SchedulerConfig c = cfg(blocks, bs, uni(8, 40), uni(2, 8), pol);
  c.max_queue_size = 16;
  Scheduler s(c);
  std::vector<int64_t> kv(static_cast<size_t>(blocks * bs), -1);
  std::map<int64_t, Ref> ref;
  int64_t next_id = 0, preemptions = 0, hits = 0;
  for (int step = 0; step < 600; ++step) {
    if (uni(0, 2) == 0 && step < 500) {
      Ref r;
      const int n = uni(1, 40);
      for (int i = 0; i < n; ++i) r.tokens.push_back(i < 16 ? i % 3 : uni(0, 3));
      try {
        s.add_request(next_id, r.tokens, uni(0, 3));
        ref.emplace(next_id, r);
      } catch (const QueueFullError&) {
      }
      ++next_id;
    }
    StepOutput o = s.step();
    CHECK(o.num_batched_tokens <= c.max_num_batched_tokens && static_cast<int>(o.size()) <= c.max_num_seqs);
    for (int64_t id : o.rejected) ref.erase(id);
    preemptions += static_cast<int64_t>(o.preempted.size());
    check_kv(o, ref, kv, bs);
    for (size_t i = 0; i < o.size(); ++i) hits += o.is_prefill[i] && o.num_computed[i] > 0 && s.num_cached_tokens(o.seq_ids[i]) > 0;
    sample_and_update(s, o, ref, uni);
    if (uni(0, 30) == 0 && !ref.empty()) {
      auto it = ref.begin();
      std::advance(it, uni(0, static_cast<int>(ref.size()) - 1));
      CHECK(s.abort(it->first));
      ref.erase(it);
    }
    s.check_invariants();
  }
  for (auto& r : ref) s.finish(r.first);
  s.check_invariants();
  CHECK(s.num_free_blocks() == blocks && s.num_running() == 0 && s.num_waiting() == 0);
  CHECK(s.num_preemptions() == preemptions);
  return {preemptions, hits};
}

// Submitters and an aborter on other threads while this thread runs the engine loop.
static void test_concurrent_submit_abort() {
  SchedulerConfig c = cfg(64, 4, 32, 8);
  c.max_queue_size = 1000;
  Scheduler s(c);
  constexpr int kThreads = 3, kPer = 100;
  std::atomic<int> submitted{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPer; ++i) {
        s.add_request(t * kPer + i, toks(1 + i % 9, t), i % 3);
        ++submitted;
      }
    });
  threads.emplace_back([&] {
    for (int i = 0; i < kThreads * kPer; i += 7) s.abort(i);
  });
  std::map<int64_t, int> decoded;
  for (int step = 0; step < 100000; ++step) {
    StepOutput o = s.step();
    for (size_t i = 0; i < o.size(); ++i) {
      const int64_t id = o.seq_ids[i];
      if (o.do_sample[i] && ++decoded[id] == 3) s.abort(id);  // may race the aborter: fine
      else s.update(id, o.do_sample[i] ? std::vector<int32_t>{1} : std::vector<int32_t>{});
    }
    if (submitted == kThreads * kPer && s.num_running() == 0 && s.num_waiting() == 0) break;
  }
  for (auto& th : threads) th.join();
  for (int i = 0; i < kThreads * kPer; ++i) s.abort(i);
  s.check_invariants();
  CHECK(s.num_free_blocks() == 64 && s.num_running() == 0 && s.num_waiting() == 0);
}

// Overlapped scheduling: a sampled token goes in as a placeholder, is scheduled, then resolved before
// the next update(); the prefix cache hashes the resolved value, never the placeholder.
static void test_placeholder_resolve() {
  const int32_t kPlaceholder = INT32_MIN;
  Scheduler s(cfg(64, 4, 100));
  s.add_request(1, toks(3));
  StepOutput o = s.step();
  CHECK(o.do_sample[0]);
  s.update(1, {kPlaceholder});  // before its value is known
  o = s.step();                 // the placeholder is position 3, the last of block 0
  CHECK(o.size() == 1 && o.num_computed[0] == 3 && o.num_new_tokens[0] == 1 && o.do_sample[0]);
  CHECK(s.resolve_batch({1, 99}, {3, 0}, {7, 1}) == 1);  // unknown id 99 is skipped
  s.update(1, {kPlaceholder});  // commits block 0 = toks(3) + 7
  std::vector<int32_t> hit = toks(3), miss = toks(3);
  hit.push_back(7);
  hit.push_back(1);
  miss.push_back(kPlaceholder);
  miss.push_back(1);
  s.add_request(2, hit);
  s.add_request(3, miss);
  o = s.step();
  CHECK(o.num_computed[static_cast<size_t>(find(o, 2))] == 4 && s.num_cached_tokens(3) == 0);
  bool threw = false;
  try {
    s.resolve_batch({1}, {100}, {1});
  } catch (const std::out_of_range&) {
    threw = true;
  }
  CHECK(threw);
  s.check_invariants();
}

int main() {
  test_chunked_prefill_and_decode();
  test_placeholder_resolve();
  test_budget_shared_decode_first();
  test_prefix_cache_hit();
  test_preemption_recompute();
  test_priority();
  test_abort_limits_and_errors();
  test_concurrent_submit_abort();
  int64_t preemptions = 0, hits = 0;
  for (uint32_t seed = 0; seed < 6; ++seed) {
    auto r = test_randomized(seed, seed % 2 ? SchedulingPolicy::kPriority : SchedulingPolicy::kFcfs);
    std::printf("seed %u: %lld preemptions, %lld prefix-hit chunks\n", seed, static_cast<long long>(r.first),
                static_cast<long long>(r.second));
    preemptions += r.first;
    hits += r.second;
  }
  CHECK(preemptions > 0 && hits > 0);  // the random mix did exercise both paths
  std::puts("test_scheduler: ok");
  return 0;
}
