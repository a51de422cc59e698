#pragma once
// Fixed pool of KV-cache blocks with reference counts. Not thread-safe by itself:
// the owner (block manager / scheduler) serialises access.
#include <cstdint>
#include <vector>

namespace unimlm {

class BlockAllocator {
 public:
  explicit BlockAllocator(int32_t num_blocks);

  // Returns a block id with refcount 1, or -1 when the pool is empty.
  int32_t allocate();
  // Adds a reference to an allocated block (prefix sharing).
  void retain(int32_t block);
  // Drops a reference; the block returns to the pool when it reaches zero.
  // Returns true when the block was freed.
  bool release(int32_t block);

  int32_t num_blocks() const { return static_cast<int32_t>(refcount_.size()); }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t refcount(int32_t block) const;

 private:
  void check(int32_t block) const;
  std::vector<int32_t> free_;      // LIFO free list: recently freed blocks are reused first
  std::vector<int32_t> refcount_;  // [num_blocks]
};

}  // namespace unimlm
