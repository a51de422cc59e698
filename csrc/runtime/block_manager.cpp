#include "runtime/block_manager.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace unimlm {
namespace {

constexpr uint64_t kRootHash = 0x6a09e667f3bcc908ULL;

inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline uint64_t extra_at(const std::vector<uint64_t>& keys, int64_t i) {
  return i < static_cast<int64_t>(keys.size()) ? keys[static_cast<size_t>(i)] : 0;
}

}  // namespace

uint64_t hash_block(uint64_t parent, const int32_t* tokens, int32_t n, uint64_t extra) {
  uint64_t h = mix64(parent ^ 0x3c6ef372fe94f82bULL);
  for (int32_t i = 0; i < n; ++i) h = mix64(h ^ static_cast<uint32_t>(tokens[i]));
  return mix64(h ^ mix64(extra + static_cast<uint64_t>(n)));
}

int64_t kv_bytes_per_block(const KVCacheBudget& b) {
  if (b.num_layers <= 0 || b.block_size <= 0 || b.num_kv_heads <= 0 || b.head_dim <= 0 ||
      b.dtype_bytes <= 0)
    throw std::invalid_argument("KVCacheBudget: num_layers, block_size, num_kv_heads, head_dim "
                                "and dtype_bytes must be positive");
  return 2LL * b.num_layers * b.block_size * b.num_kv_heads * b.head_dim * b.dtype_bytes;
}

int64_t num_kv_blocks(const KVCacheBudget& b) {
  if (b.num_kv_blocks_override >= 0) return b.num_kv_blocks_override;
  if (!(b.utilization > 0.0 && b.utilization <= 1.0))
    throw std::invalid_argument("KVCacheBudget: utilization must be in (0, 1]");
  const int64_t per_block = kv_bytes_per_block(b);
  const double left = static_cast<double>(b.total_memory) * b.utilization -
                      static_cast<double>(b.weights + b.activations + b.decoders);
  const int64_t n = left > 0 ? static_cast<int64_t>(left / static_cast<double>(per_block)) : 0;
  if (n <= 0)
    throw std::invalid_argument("KVCacheBudget: memory budget leaves no KV block (" +
                                std::to_string(static_cast<int64_t>(left)) + " bytes left, " +
                                std::to_string(per_block) + " per block)");
  return n;
}

std::vector<uint64_t> block_extra_keys(int64_t num_tokens, int32_t block_size,
                                       const std::vector<int64_t>& spans) {
  if (block_size <= 0 || num_tokens < 0) throw std::invalid_argument("bad num_tokens/block_size");
  if (spans.size() % 3 != 0) throw std::invalid_argument("spans must be (start, end, key) triples");
  std::vector<uint64_t> keys(static_cast<size_t>((num_tokens + block_size - 1) / block_size), 0);
  for (size_t s = 0; s < spans.size(); s += 3) {
    const int64_t start = spans[s], end = spans[s + 1];
    if (start < 0 || end > num_tokens || start >= end)
      throw std::invalid_argument("span [" + std::to_string(start) + ", " + std::to_string(end) +
                                  ") outside [0, " + std::to_string(num_tokens) + ")");
    for (int64_t blk = start / block_size; blk <= (end - 1) / block_size; ++blk) {
      uint64_t& k = keys[static_cast<size_t>(blk)];
      k = mix64(k ^ static_cast<uint64_t>(spans[s + 2]));
    }
  }
  return keys;
}

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching)
    : alloc_(num_blocks), block_size_(block_size), prefix_caching_(enable_prefix_caching) {
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive");
  seqs_.reserve(1024);
}

BlockManager::SeqBlocks& BlockManager::get(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::out_of_range("no block table for sequence " + std::to_string(seq_id));
  return it->second;
}

const BlockManager::SeqBlocks& BlockManager::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::out_of_range("no block table for sequence " + std::to_string(seq_id));
  return it->second;
}

int64_t BlockManager::match_prefix(int64_t seq_id, const std::vector<int32_t>& tokens,
                                   const std::vector<uint64_t>& extra_keys) {
  if (seqs_.count(seq_id)) throw std::logic_error("sequence " + std::to_string(seq_id) + " already has blocks");
  SeqBlocks& s = seqs_[seq_id];
  s.last_hash = kRootHash;
  if (!prefix_caching_ || tokens.empty()) return 0;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t max_blocks = (n - 1) / block_size_;  // blocks not holding the last token
  query_tokens_ += n;
  for (int64_t i = 0; i < max_blocks; ++i) {
    const uint64_t h = hash_block(s.last_hash, tokens.data() + i * block_size_, block_size_,
                                  extra_at(extra_keys, i));
    const int32_t b = alloc_.acquire_cached(h);
    if (b < 0) break;
    s.table.push_back(b);
    s.last_hash = h;
    s.num_hashed = i + 1;
  }
  const int64_t cached = s.num_hashed * block_size_;
  hit_tokens_ += cached;
  return cached;
}

int32_t BlockManager::blocks_needed(int64_t seq_id, int64_t write_from, int64_t num_tokens) const {
  auto it = seqs_.find(seq_id);
  static const std::vector<int32_t> kEmpty;
  const std::vector<int32_t>& table = it == seqs_.end() ? kEmpty : it->second.table;
  int64_t need = std::max<int64_t>(0, blocks_for(num_tokens) - static_cast<int64_t>(table.size()));
  for (size_t i = static_cast<size_t>(std::max<int64_t>(0, write_from / block_size_)); i < table.size(); ++i)
    if (alloc_.refcount(table[i]) > 1) ++need;
  return static_cast<int32_t>(need);
}

bool BlockManager::allocate_slots(int64_t seq_id, int64_t write_from, int64_t num_tokens,
                                  std::vector<CopyPair>* cow) {
  if (write_from < 0 || num_tokens < write_from) throw std::invalid_argument("allocate_slots: bad range");
  if (blocks_needed(seq_id, write_from, num_tokens) > alloc_.num_free()) return false;
  SeqBlocks& s = seqs_[seq_id];
  if (s.table.empty() && s.num_hashed == 0) s.last_hash = kRootHash;
  for (size_t i = static_cast<size_t>(write_from / block_size_); i < s.table.size(); ++i) {
    const int32_t src = s.table[i];
    if (alloc_.refcount(src) <= 1) continue;
    const int32_t dst = alloc_.allocate();
    alloc_.release(src);
    s.table[i] = dst;
    if (cow) cow->push_back(CopyPair{src, dst});
  }
  const int64_t want = blocks_for(num_tokens);
  while (static_cast<int64_t>(s.table.size()) < want) s.table.push_back(alloc_.allocate());
  return true;
}

void BlockManager::commit(int64_t seq_id, const std::vector<int32_t>& tokens, int64_t num_computed,
                          const std::vector<uint64_t>& extra_keys) {
  if (!prefix_caching_) return;
  SeqBlocks& s = get(seq_id);
  const int64_t full = std::min<int64_t>({num_computed, static_cast<int64_t>(tokens.size())}) / block_size_;
  const int64_t limit = std::min<int64_t>(full, static_cast<int64_t>(s.table.size()));
  for (int64_t i = s.num_hashed; i < limit; ++i) {
    const uint64_t h = hash_block(s.last_hash, tokens.data() + i * block_size_, block_size_,
                                  extra_at(extra_keys, i));
    alloc_.set_hash(s.table[static_cast<size_t>(i)], h);
    s.last_hash = h;
    s.num_hashed = i + 1;
  }
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  if (seqs_.count(child_id)) throw std::logic_error("sequence " + std::to_string(child_id) + " already has blocks");
  const SeqBlocks parent = get(parent_id);
  for (int32_t b : parent.table) alloc_.retain(b);
  seqs_.emplace(child_id, parent);
}

void BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return;
  const std::vector<int32_t>& table = it->second.table;
  // Tail first: the LRU then evicts a prefix's last blocks before its first ones.
  for (auto b = table.rbegin(); b != table.rend(); ++b) alloc_.release(*b);
  seqs_.erase(it);
}

const std::vector<int32_t>& BlockManager::block_table(int64_t seq_id) const { return get(seq_id).table; }

int64_t BlockManager::slot(int64_t seq_id, int64_t position) const {
  const SeqBlocks& s = get(seq_id);
  const int64_t blk = position / block_size_;
  if (position < 0 || blk >= static_cast<int64_t>(s.table.size()))
    throw std::out_of_range("position " + std::to_string(position) + " has no slot");
  return static_cast<int64_t>(s.table[static_cast<size_t>(blk)]) * block_size_ + position % block_size_;
}

void BlockManager::check_invariants() const {
  alloc_.check_invariants();
  std::vector<int32_t> refs(static_cast<size_t>(alloc_.num_blocks()), 0);
  for (const auto& kv : seqs_)
    for (int32_t b : kv.second.table) ++refs[static_cast<size_t>(b)];
  for (int32_t b = 0; b < alloc_.num_blocks(); ++b)
    if (refs[static_cast<size_t>(b)] != alloc_.refcount(b))
      throw std::logic_error("BlockManager: block " + std::to_string(b) + " refcount " +
                             std::to_string(alloc_.refcount(b)) + " != table references " +
                             std::to_string(refs[static_cast<size_t>(b)]));
}

}  // namespace unimlm
