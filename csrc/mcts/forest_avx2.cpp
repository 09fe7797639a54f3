// The Forest compiled for AVX2 machines (namespace isa_avx2; see rlkern/mcts.h): forest.cpp
// once more, every function of it under target("avx2") and without FMA, so that each
// operation rounds as in the baseline build and results match it bit for bit.
//
// The target applies only to what forest.cpp defines: every header it includes is read
// first, outside the target region, so that no inline function or template shared with
// other files (whose one copy the linker keeps) is compiled for AVX2.
#include "rlkern/mcts.h"

#if RLK_MCTS_HAS_AVX2
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "rlkern/parallel.h"
#include "rlkern/simd.h"

RLK_AVX2_REGION_BEGIN
#define RLK_MCTS_ISA isa_avx2
#define RLK_MCTS_SECOND_ISA 1
#include "forest.cpp"
RLK_AVX2_REGION_END
#endif  // RLK_MCTS_HAS_AVX2
