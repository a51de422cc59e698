#pragma once
// Fixed pool of KV-cache blocks: reference counts, a free list, and an LRU cache of
// freed blocks that still hold a hashed full block, so a prefix survives the sequence
// that computed it while space allows.
//
// Every block is in exactly one of three states:
//   used       refcount > 0 (hashed or not)
//   cached     refcount == 0, hashed, in the LRU list (evictable)
//   free       refcount == 0, not hashed, in the free list
// so num_blocks == num_used + num_cached + num_free_unhashed at all times.
//
// Hashes are 64-bit (chained over the parent block, see BlockManager); a collision
// would alias two prefixes, with probability about n^2 / 2^65 for n cached blocks.
// Not thread-safe: the owner (BlockManager under the Scheduler's lock) serialises access.
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace unimlm {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  // A block with refcount 1 and no hash, or -1 when nothing is free or evictable.
  // Takes a never-hashed free block first, else evicts the least recently used cached one.
  int32_t allocate();
  // Adds a reference to a used block.
  void retain(int32_t block);
  // Drops a reference. At zero a hashed block enters the LRU cache (most recent end),
  // an unhashed one the free list. Returns true when the refcount reached zero.
  bool release(int32_t block);

  // Block holding `hash` (used or cached) with one more reference, or -1. A cached
  // block leaves the LRU list.
  int32_t acquire_cached(uint64_t hash);
  // Registers a used block under `hash`. Returns false, leaving the block unhashed,
  // when another block already holds that hash; true when registered (or when this
  // block already holds it).
  bool set_hash(int32_t block, uint64_t hash);
  bool is_hashed(int32_t block) const;
  bool contains_hash(uint64_t hash) const { return by_hash_.count(hash) != 0; }

  int32_t num_blocks() const { return static_cast<int32_t>(meta_.size()); }
  // Blocks an allocate() can return: free plus evictable cached.
  int32_t num_free() const { return static_cast<int32_t>(free_.size()) + num_cached_; }
  int32_t num_cached() const { return num_cached_; }
  int32_t num_used() const { return num_blocks() - num_free(); }
  int32_t refcount(int32_t block) const;
  int64_t num_evictions() const { return num_evictions_; }

  // Throws std::logic_error when the three-state accounting above is broken.
  void check_invariants() const;

 private:
  struct Meta {
    int32_t refcount = 0;
    bool hashed = false;
    uint64_t hash = 0;
    int32_t prev = -1;  // LRU links (valid only while cached)
    int32_t next = -1;
  };
  void check(int32_t block) const;
  void lru_push_back(int32_t block);
  void lru_remove(int32_t block);
  void unhash(int32_t block);

  std::vector<Meta> meta_;      // [num_blocks]
  std::vector<int32_t> free_;   // LIFO: recently freed blocks are reused first
  std::unordered_map<uint64_t, int32_t> by_hash_;
  int32_t lru_head_ = -1;       // least recently used cached block
  int32_t lru_tail_ = -1;
  int32_t num_cached_ = 0;
  int64_t num_evictions_ = 0;
};

}  // namespace unimlm
