#pragma once
// KV-cache block manager: per-sequence block tables over a BlockAllocator, prefix
// sharing by content hash, copy-on-write, and pool sizing.
//
// Prefix hashing: full block i of a sequence has
//   hash_i = H(hash_{i-1}, tokens[i*bs .. (i+1)*bs), extra_keys[i])
// with hash_{-1} a fixed root. extra_keys[i] (0 = none) distinguishes blocks whose
// token ids are equal but whose content is not, e.g. <im_patch> placeholders of
// different images: pass the image content hash for every block overlapping image
// tokens (see block_extra_keys). Only blocks whose every token has been computed are
// registered (commit), so a sharer never reads KV that is not written yet.
//
// A sequence's table covers positions [0, num_tokens) where num_tokens is the largest
// total ever passed to allocate_slots; writes go to positions >= write_from.
// Not thread-safe: the Scheduler serialises access.
#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "runtime/block_allocator.h"

namespace unimlm {

struct CopyPair {
  int32_t src;  // block to copy from (still referenced by other sequences)
  int32_t dst;  // fresh block now owned by the writing sequence
};

// Sizing inputs for the KV pool, all in bytes except the model shape.
struct KVCacheBudget {
  int64_t total_memory = 0;
  double utilization = 0.9;
  int64_t weights = 0;
  int64_t activations = 0;
  int64_t decoders = 0;
  int32_t num_layers = 0;
  int32_t block_size = 16;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t dtype_bytes = 2;
  int64_t num_kv_blocks_override = -1;  // >= 0: use this, ignore the budget
};

// 2 (K and V) * layers * block_size * kv_heads * head_dim * dtype_bytes.
int64_t kv_bytes_per_block(const KVCacheBudget& b);
// floor((total * utilization - weights - activations - decoders) / bytes_per_block),
// or the override. Throws std::invalid_argument when the budget leaves no block.
int64_t num_kv_blocks(const KVCacheBudget& b);

// Per-block extra keys from image spans: every block overlapping [start, end) gets
// `key` mixed in (several images in one block mix all of theirs). spans: [n, 3] as
// (start, end, key) triples flattened. Returns [ceil(num_tokens / block_size)].
std::vector<uint64_t> block_extra_keys(int64_t num_tokens, int32_t block_size,
                                       const std::vector<int64_t>& spans);

uint64_t hash_block(uint64_t parent, const int32_t* tokens, int32_t n, uint64_t extra);

class BlockManager {
 public:
  BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching = true);

  // Starts seq_id's table with the longest run of cached full blocks of `tokens`,
  // taking a reference on each. The block holding the last token is never matched
  // (its logits must be computed). Returns the number of cached tokens, a multiple
  // of block_size and < tokens.size(). Throws if seq_id already has a table.
  int64_t match_prefix(int64_t seq_id, const std::vector<int32_t>& tokens,
                       const std::vector<uint64_t>& extra_keys);
  // Number of blocks allocate_slots(seq_id, write_from, num_tokens) would take.
  int32_t blocks_needed(int64_t seq_id, int64_t write_from, int64_t num_tokens) const;
  // Grows the table to cover num_tokens positions and copies-on-write every block at
  // or after write_from that other sequences share, appending the pairs to *cow.
  // Returns false and changes nothing when the pool is short. Creates the table if
  // seq_id has none.
  bool allocate_slots(int64_t seq_id, int64_t write_from, int64_t num_tokens,
                      std::vector<CopyPair>* cow);
  // Registers the hashes of full blocks within the first num_computed tokens.
  void commit(int64_t seq_id, const std::vector<int32_t>& tokens, int64_t num_computed,
              const std::vector<uint64_t>& extra_keys);
  // child shares all of parent's blocks (refcount + 1 each).
  void fork(int64_t parent_id, int64_t child_id);
  // Releases every block of seq_id; hashed ones stay cached until evicted. No-op for
  // an unknown id.
  void free(int64_t seq_id);

  bool has(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int32_t>& block_table(int64_t seq_id) const;
  int64_t slot(int64_t seq_id, int64_t position) const;

  int32_t block_size() const { return block_size_; }
  int32_t num_blocks() const { return alloc_.num_blocks(); }
  int32_t num_free() const { return alloc_.num_free(); }
  int32_t num_cached() const { return alloc_.num_cached(); }
  int32_t num_used() const { return alloc_.num_used(); }
  int32_t refcount(int32_t block) const { return alloc_.refcount(block); }
  size_t num_seqs() const { return seqs_.size(); }
  bool prefix_caching() const { return prefix_caching_; }
  int64_t prefix_query_tokens() const { return query_tokens_; }
  int64_t prefix_hit_tokens() const { return hit_tokens_; }
  int64_t num_evictions() const { return alloc_.num_evictions(); }

  // Allocator invariants plus: each block's refcount == its occurrences in all tables.
  void check_invariants() const;

 private:
  struct SeqBlocks {
    std::vector<int32_t> table;
    int64_t num_hashed = 0;  // leading full blocks whose hash is known
    uint64_t last_hash = 0;  // hash of block num_hashed - 1 (root when 0 blocks)
  };
  SeqBlocks& get(int64_t seq_id);
  const SeqBlocks& get(int64_t seq_id) const;
  int64_t blocks_for(int64_t num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }

  BlockAllocator alloc_;
  int32_t block_size_;
  bool prefix_caching_;
  std::unordered_map<int64_t, SeqBlocks> seqs_;
  int64_t query_tokens_ = 0;
  int64_t hit_tokens_ = 0;
};

}  // namespace unimlm
