#pragma once
// Minimal assertion helpers for the ctest executables (they stay active under NDEBUG).
#include <cstdio>
#include <cstdlib>

#define CHECK(cond)                                                                \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

#define CHECK_THROWS(expr, Exc)                                                       \
  do {                                                                                \
    bool threw_ = false;                                                              \
    try {                                                                             \
      (void)(expr);                                                                   \
    } catch (const Exc&) {                                                            \
      threw_ = true;                                                                  \
    }                                                                                 \
    if (!threw_) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s did not throw %s\n", __FILE__, __LINE__, #expr, #Exc); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)
