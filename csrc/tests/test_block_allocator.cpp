// ctest: BlockAllocator accounting.
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include "runtime/block_allocator.h"

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

int main() {
  unimlm::BlockAllocator a(4);
  CHECK(a.num_free() == 4);
  int b0 = a.allocate(), b1 = a.allocate();
  CHECK(b0 != b1 && a.num_free() == 2);
  a.retain(b0);
  CHECK(a.refcount(b0) == 2);
  CHECK(!a.release(b0));
  CHECK(a.release(b0));
  CHECK(a.release(b1));
  CHECK(a.num_free() == 4);
  bool threw = false;
  try { a.release(b1); } catch (const std::logic_error&) { threw = true; }
  CHECK(threw);
  for (int i = 0; i < 4; ++i) CHECK(a.allocate() >= 0);
  CHECK(a.allocate() == -1);
  std::puts("test_block_allocator: ok");
  return 0;
}
