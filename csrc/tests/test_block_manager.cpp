// ctest: BlockManager prefix sharing, copy-on-write, pool sizing, and a randomized
// mix of allocate / append / fork / free / preempt checked against a fake KV store:
// every computed position, read back through the sequence's block table, must hold
// the token (and extra key) that sequence wrote there.
#include <map>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "runtime/block_manager.h"

using unimlm::BlockManager;
using unimlm::CopyPair;

static std::vector<int32_t> iota_tokens(int n, int start = 0) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[static_cast<size_t>(i)] = start + i;
  return t;
}

static void test_prefix_sharing() {
  BlockManager bm(16, 4);
  auto a = iota_tokens(10);
  CHECK(bm.match_prefix(1, a, {}) == 0);
  CHECK(bm.allocate_slots(1, 0, 10, nullptr));
  CHECK(bm.block_table(1).size() == 3);
  bm.commit(1, a, 10, {});  // blocks 0 and 1 are full and computed
  auto b = iota_tokens(9);  // same first 8 tokens
  CHECK(bm.match_prefix(2, b, {}) == 8);
  CHECK(bm.block_table(2)[0] == bm.block_table(1)[0] && bm.block_table(2)[1] == bm.block_table(1)[1]);
  CHECK(bm.refcount(bm.block_table(1)[0]) == 2);
  // The last token is always computed: an 8-token prompt matches only one block.
  CHECK(bm.match_prefix(3, iota_tokens(8), {}) == 4);
  // Different extra key on block 0: no sharing.
  CHECK(bm.match_prefix(4, b, {7}) == 0);
  // Same tokens but a different first block: the chain breaks at block 0.
  auto c = b;
  c[0] = 99;
  CHECK(bm.match_prefix(5, c, {}) == 0);
  bm.check_invariants();
  for (int64_t s : {1, 2, 3, 4, 5}) bm.free(s);
  CHECK(bm.num_used() == 0 && bm.num_cached() == 2);
  // Cached blocks survive the finish and are matched again.
  CHECK(bm.match_prefix(6, b, {}) == 8 && bm.num_cached() == 0);
  bm.free(6);
  bm.check_invariants();
  CHECK_THROWS(bm.block_table(6), std::out_of_range);
}

static void test_copy_on_write() {
  BlockManager bm(8, 4);
  auto t = iota_tokens(6);
  bm.match_prefix(1, t, {});
  CHECK(bm.allocate_slots(1, 0, 6, nullptr));
  bm.fork(1, 2);
  CHECK(bm.refcount(bm.block_table(1)[1]) == 2);
  std::vector<CopyPair> cow;
  CHECK(bm.blocks_needed(2, 6, 7) == 1);  // the shared partial block
  CHECK(bm.allocate_slots(2, 6, 7, &cow));
  CHECK(cow.size() == 1 && cow[0].src == bm.block_table(1)[1] && cow[0].dst == bm.block_table(2)[1]);
  CHECK(bm.block_table(2)[0] == bm.block_table(1)[0]);  // full block 0 still shared
  CHECK(bm.refcount(cow[0].src) == 1 && bm.refcount(cow[0].dst) == 1);
  cow.clear();
  CHECK(bm.allocate_slots(1, 6, 7, &cow) && cow.empty());  // sole owner now
  bm.check_invariants();
  // Short pool: nothing changes.
  BlockManager small(2, 4);
  small.match_prefix(1, t, {});
  CHECK(small.allocate_slots(1, 0, 8, nullptr));
  CHECK(!small.allocate_slots(1, 8, 9, nullptr));
  CHECK(small.block_table(1).size() == 2 && small.num_free() == 0);
  CHECK(small.slot(1, 5) == small.block_table(1)[1] * 4 + 1);
  CHECK_THROWS(small.slot(1, 8), std::out_of_range);
}

static void test_sizing() {
  unimlm::KVCacheBudget b;
  b.total_memory = 80LL << 30;
  b.utilization = 0.9;
  b.weights = 14LL << 30;
  b.num_layers = 32;
  b.num_kv_heads = 32;
  b.head_dim = 128;
  CHECK(unimlm::kv_bytes_per_block(b) == 2LL * 32 * 16 * 32 * 128 * 2);
  const double left = (80.0 * 0.9 - 14.0) * (1LL << 30);
  CHECK(unimlm::num_kv_blocks(b) == static_cast<int64_t>(left / (2.0 * 32 * 16 * 32 * 128 * 2)));
  b.num_kv_blocks_override = 123;
  CHECK(unimlm::num_kv_blocks(b) == 123);
  b.num_kv_blocks_override = -1;
  b.weights = 80LL << 30;
  CHECK_THROWS(unimlm::num_kv_blocks(b), std::invalid_argument);
  auto keys = unimlm::block_extra_keys(10, 4, {2, 6, 5});  // tokens 2..5 -> blocks 0, 1
  CHECK(keys.size() == 3 && keys[0] != 0 && keys[0] == keys[1] && keys[2] == 0);
  CHECK_THROWS(unimlm::block_extra_keys(10, 4, {2, 11, 5}), std::invalid_argument);
}

// Randomized accounting + content check.
struct Model {
  std::vector<int32_t> tokens;
  std::vector<uint64_t> keys;
  int64_t computed = 0;
};

static void write_kv(const BlockManager& bm, int64_t id, const Model& m, int64_t from, int64_t to,
                     std::vector<int64_t>& kv) {
  for (int64_t p = from; p < to; ++p) {
    const uint64_t key = p / bm.block_size() < static_cast<int64_t>(m.keys.size()) ? m.keys[static_cast<size_t>(p / bm.block_size())] : 0;
    kv[static_cast<size_t>(bm.slot(id, p))] = m.tokens[static_cast<size_t>(p)] * 1000 + static_cast<int64_t>(key % 1000);
  }
}

static void verify(const BlockManager& bm, const std::map<int64_t, Model>& seqs, const std::vector<int64_t>& kv) {
  bm.check_invariants();
  CHECK(bm.num_free() + bm.num_used() == bm.num_blocks());
  for (const auto& [id, m] : seqs)
    for (int64_t p = 0; p < m.computed; ++p) {
      const uint64_t key = p / bm.block_size() < static_cast<int64_t>(m.keys.size()) ? m.keys[static_cast<size_t>(p / bm.block_size())] : 0;
      CHECK(kv[static_cast<size_t>(bm.slot(id, p))] == m.tokens[static_cast<size_t>(p)] * 1000 + static_cast<int64_t>(key % 1000));
    }
}

static void grow(BlockManager& bm, int64_t id, Model& m, int64_t n, std::vector<int64_t>& kv) {
  std::vector<CopyPair> cow;
  if (!bm.allocate_slots(id, m.computed, m.computed + n, &cow)) return;
  for (const CopyPair& c : cow)
    for (int32_t o = 0; o < bm.block_size(); ++o)
      kv[static_cast<size_t>(c.dst) * bm.block_size() + o] = kv[static_cast<size_t>(c.src) * bm.block_size() + o];
  write_kv(bm, id, m, m.computed, m.computed + n, kv);
  m.computed += n;
  bm.commit(id, m.tokens, m.computed, m.keys);
}

static void admit(BlockManager& bm, int64_t id, Model& m, std::vector<int64_t>& kv) {
  m.computed = bm.match_prefix(id, m.tokens, m.keys);
  CHECK(m.computed < static_cast<int64_t>(m.tokens.size()) && m.computed % bm.block_size() == 0);
  const int64_t before = m.computed;
  grow(bm, id, m, static_cast<int64_t>(m.tokens.size()) - m.computed, kv);
  if (m.computed == before) bm.free(id);
}

static void test_randomized(uint32_t seed, bool prefix_caching) {
  std::mt19937 rng(seed);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  BlockManager bm(48, 4, prefix_caching);
  std::vector<int64_t> kv(static_cast<size_t>(48 * 4), -1);
  std::map<int64_t, Model> seqs, preempted;
  int64_t next_id = 0;
  for (int op = 0; op < 3000; ++op) {
    const int kind = uni(0, 9);
    auto pick = [&]() { auto it = seqs.begin(); std::advance(it, uni(0, static_cast<int>(seqs.size()) - 1)); return it; };
    if (kind <= 2 || seqs.empty()) {  // new sequence: shared-prefix prompt, vocab of 3
      Model m;
      const int n = uni(1, 30);
      for (int i = 0; i < n; ++i) m.tokens.push_back(i < 12 ? i % 5 : uni(0, 2));
      if (uni(0, 2) == 0) m.keys = {static_cast<uint64_t>(uni(1, 2)), static_cast<uint64_t>(uni(1, 2))};
      const int64_t id = next_id++;
      admit(bm, id, m, kv);
      if (bm.has(id)) seqs.emplace(id, m);
    } else if (kind <= 5) {  // append 1 token, or 1 + K (super-link)
      auto it = pick();
      const int k = uni(0, 4) == 0 ? 5 : 1;
      for (int i = 0; i < k; ++i) it->second.tokens.push_back(uni(0, 2));
      const int64_t want = static_cast<int64_t>(it->second.tokens.size()) - it->second.computed;
      grow(bm, it->first, it->second, want, kv);
      it->second.tokens.resize(static_cast<size_t>(it->second.computed));
    } else if (kind == 6) {  // fork
      auto it = pick();
      bm.fork(it->first, next_id);
      seqs.emplace(next_id++, it->second);
    } else if (kind <= 8) {  // finish / cancel
      auto it = pick();
      bm.free(it->first);
      seqs.erase(it);
    } else {  // preempt, then readmit an older preempted one
      auto it = pick();
      bm.free(it->first);
      preempted.emplace(it->first, it->second);
      seqs.erase(it);
      auto back = preempted.begin();
      admit(bm, back->first, back->second, kv);
      if (bm.has(back->first)) seqs.emplace(back->first, back->second);
      preempted.erase(back);
    }
    verify(bm, seqs, kv);
  }
  for (auto& kv_seq : seqs) bm.free(kv_seq.first);
  bm.check_invariants();
  CHECK(bm.num_used() == 0 && bm.num_free() == bm.num_blocks());
  if (prefix_caching) CHECK(bm.prefix_hit_tokens() > 0);
  else CHECK(bm.num_cached() == 0);
}

int main() {
  test_prefix_sharing();
  test_copy_on_write();
  test_sizing();
  for (uint32_t seed = 0; seed < 4; ++seed) test_randomized(seed, seed != 3);
  std::puts("test_block_manager: ok");
  return 0;
}
