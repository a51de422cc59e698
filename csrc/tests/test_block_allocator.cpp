// ctest: BlockAllocator accounting, hashing and the LRU cache of freed hashed blocks.
#include <stdexcept>

#include "check.h"
#include "runtime/block_allocator.h"

using unimlm::BlockAllocator;

static void test_refcounts() {
  BlockAllocator a(4);
  CHECK(a.num_free() == 4 && a.num_used() == 0);
  int b0 = a.allocate(), b1 = a.allocate();
  CHECK(b0 != b1 && a.num_free() == 2 && a.num_used() == 2);
  a.retain(b0);
  CHECK(a.refcount(b0) == 2);
  CHECK(!a.release(b0));
  CHECK(a.release(b0));
  CHECK(a.release(b1));
  CHECK(a.num_free() == 4);
  CHECK_THROWS(a.release(b1), std::logic_error);
  CHECK_THROWS(a.retain(b1), std::logic_error);
  CHECK_THROWS(a.refcount(4), std::out_of_range);
  for (int i = 0; i < 4; ++i) CHECK(a.allocate() >= 0);
  CHECK(a.allocate() == -1);
  a.check_invariants();
  CHECK_THROWS(BlockAllocator(0), std::invalid_argument);
}

static void test_cache_and_lru() {
  BlockAllocator a(3);
  int x = a.allocate(), y = a.allocate(), z = a.allocate();
  CHECK(a.set_hash(x, 11) && a.set_hash(y, 22));
  CHECK(!a.set_hash(z, 11));  // hash held by x: z stays unhashed
  CHECK(!a.is_hashed(z) && a.is_hashed(x));
  CHECK(a.release(x) && a.release(y) && a.release(z));
  CHECK(a.num_cached() == 2 && a.num_free() == 3 && a.num_used() == 0);
  a.check_invariants();
  // Revive y from the cache; x stays evictable.
  CHECK(a.acquire_cached(22) == y && a.refcount(y) == 1 && a.num_cached() == 1);
  CHECK(a.acquire_cached(33) == -1);
  // Free (unhashed) z goes first, then the LRU cached block x is evicted.
  CHECK(a.allocate() == z);
  CHECK(a.num_evictions() == 0);
  CHECK(a.allocate() == x);
  CHECK(a.num_evictions() == 1 && !a.contains_hash(11) && !a.is_hashed(x));
  CHECK(a.allocate() == -1);
  a.check_invariants();
}

static void test_lru_order() {
  BlockAllocator a(3);
  int b[3];
  for (int i = 0; i < 3; ++i) {
    b[i] = a.allocate();
    CHECK(a.set_hash(b[i], 100 + static_cast<uint64_t>(i)));
  }
  a.release(b[1]);
  a.release(b[0]);
  a.release(b[2]);  // LRU order: b1, b0, b2
  CHECK(a.acquire_cached(100) == b[0]);
  a.release(b[0]);  // b0 becomes most recent: b1, b2, b0
  CHECK(a.allocate() == b[1]);
  CHECK(a.allocate() == b[2]);
  CHECK(a.allocate() == b[0]);
  a.check_invariants();
}

int main() {
  test_refcounts();
  test_cache_and_lru();
  test_lru_order();
  std::puts("test_block_allocator: ok");
  return 0;
}
