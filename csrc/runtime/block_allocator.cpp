#include "runtime/block_allocator.h"

#include <stdexcept>
#include <string>

namespace unimlm {

BlockAllocator::BlockAllocator(int32_t num_blocks) {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive");
  meta_.assign(static_cast<size_t>(num_blocks), Meta{});
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
  by_hash_.reserve(static_cast<size_t>(num_blocks));
}

void BlockAllocator::check(int32_t block) const {
  if (block < 0 || block >= num_blocks())
    throw std::out_of_range("block id " + std::to_string(block) + " out of range");
}

void BlockAllocator::lru_push_back(int32_t block) {
  Meta& m = meta_[static_cast<size_t>(block)];
  m.prev = lru_tail_;
  m.next = -1;
  if (lru_tail_ >= 0) meta_[static_cast<size_t>(lru_tail_)].next = block;
  else lru_head_ = block;
  lru_tail_ = block;
  ++num_cached_;
}

void BlockAllocator::lru_remove(int32_t block) {
  Meta& m = meta_[static_cast<size_t>(block)];
  if (m.prev >= 0) meta_[static_cast<size_t>(m.prev)].next = m.next;
  else lru_head_ = m.next;
  if (m.next >= 0) meta_[static_cast<size_t>(m.next)].prev = m.prev;
  else lru_tail_ = m.prev;
  m.prev = m.next = -1;
  --num_cached_;
}

void BlockAllocator::unhash(int32_t block) {
  Meta& m = meta_[static_cast<size_t>(block)];
  by_hash_.erase(m.hash);
  m.hashed = false;
  m.hash = 0;
}

int32_t BlockAllocator::allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (lru_head_ >= 0) {
    b = lru_head_;
    lru_remove(b);
    unhash(b);
    ++num_evictions_;
  } else {
    return -1;
  }
  meta_[static_cast<size_t>(b)].refcount = 1;
  return b;
}

void BlockAllocator::retain(int32_t block) {
  check(block);
  Meta& m = meta_[static_cast<size_t>(block)];
  if (m.refcount == 0) throw std::logic_error("retain of unused block " + std::to_string(block));
  ++m.refcount;
}

bool BlockAllocator::release(int32_t block) {
  check(block);
  Meta& m = meta_[static_cast<size_t>(block)];
  if (m.refcount == 0) throw std::logic_error("double free of block " + std::to_string(block));
  if (--m.refcount > 0) return false;
  if (m.hashed) lru_push_back(block);
  else free_.push_back(block);
  return true;
}

int32_t BlockAllocator::acquire_cached(uint64_t hash) {
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return -1;
  int32_t b = it->second;
  Meta& m = meta_[static_cast<size_t>(b)];
  if (m.refcount == 0) lru_remove(b);
  ++m.refcount;
  return b;
}

bool BlockAllocator::set_hash(int32_t block, uint64_t hash) {
  check(block);
  Meta& m = meta_[static_cast<size_t>(block)];
  if (m.refcount == 0) throw std::logic_error("set_hash on unused block " + std::to_string(block));
  if (m.hashed) return m.hash == hash;
  auto ins = by_hash_.emplace(hash, block);
  if (!ins.second) return ins.first->second == block;
  m.hashed = true;
  m.hash = hash;
  return true;
}

bool BlockAllocator::is_hashed(int32_t block) const {
  check(block);
  return meta_[static_cast<size_t>(block)].hashed;
}

int32_t BlockAllocator::refcount(int32_t block) const {
  check(block);
  return meta_[static_cast<size_t>(block)].refcount;
}

void BlockAllocator::check_invariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("BlockAllocator: " + what); };
  std::vector<char> seen(meta_.size(), 0);
  for (int32_t b : free_) {
    const Meta& m = meta_[static_cast<size_t>(b)];
    if (seen[static_cast<size_t>(b)]++) fail("block in free list twice");
    if (m.refcount != 0 || m.hashed) fail("free-list block is used or hashed");
  }
  int32_t n_lru = 0;
  for (int32_t b = lru_head_; b >= 0; b = meta_[static_cast<size_t>(b)].next) {
    const Meta& m = meta_[static_cast<size_t>(b)];
    if (seen[static_cast<size_t>(b)]++) fail("block both free and cached, or LRU cycle");
    if (m.refcount != 0 || !m.hashed) fail("cached block is used or unhashed");
    ++n_lru;
  }
  if (n_lru != num_cached_) fail("LRU length != num_cached");
  size_t n_hashed = 0;
  for (size_t b = 0; b < meta_.size(); ++b) {
    const Meta& m = meta_[b];
    if (m.refcount < 0) fail("negative refcount");
    if (!seen[b] && m.refcount == 0) fail("leaked block " + std::to_string(b));
    if (m.hashed) {
      ++n_hashed;
      auto it = by_hash_.find(m.hash);
      if (it == by_hash_.end() || it->second != static_cast<int32_t>(b)) fail("hash map mismatch");
    }
  }
  if (n_hashed != by_hash_.size()) fail("hash map holds stale entries");
}

}  // namespace unimlm
