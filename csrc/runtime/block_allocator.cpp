#include "runtime/block_allocator.h"

#include <stdexcept>
#include <string>

namespace unimlm {

BlockAllocator::BlockAllocator(int32_t num_blocks) {
  if (num_blocks <= 0) throw std::invalid_argument("num_blocks must be positive");
  refcount_.assign(static_cast<size_t>(num_blocks), 0);
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

void BlockAllocator::check(int32_t block) const {
  if (block < 0 || block >= num_blocks())
    throw std::out_of_range("block id " + std::to_string(block) + " out of range");
}

int32_t BlockAllocator::allocate() {
  if (free_.empty()) return -1;
  int32_t b = free_.back();
  free_.pop_back();
  refcount_[static_cast<size_t>(b)] = 1;
  return b;
}

void BlockAllocator::retain(int32_t block) {
  check(block);
  if (refcount_[static_cast<size_t>(block)] == 0)
    throw std::logic_error("retain of free block " + std::to_string(block));
  ++refcount_[static_cast<size_t>(block)];
}

bool BlockAllocator::release(int32_t block) {
  check(block);
  int32_t& rc = refcount_[static_cast<size_t>(block)];
  if (rc == 0) throw std::logic_error("double free of block " + std::to_string(block));
  if (--rc == 0) {
    free_.push_back(block);
    return true;
  }
  return false;
}

int32_t BlockAllocator::refcount(int32_t block) const {
  check(block);
  return refcount_[static_cast<size_t>(block)];
}

}  // namespace unimlm
