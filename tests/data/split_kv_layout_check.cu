// Compile-time check that pa_hybrid/backends/hip.py agrees with the C++ kernel. The test
// writes expected_layout.h (static_asserts of sizeof/offsetof SplitKvParams and of each
// SplitKvConfig's threads and shared memory, from the Python side) and compiles this with
// nvcc; the checks run in the host pass, where offsetof is standard.
#include <cstddef>

#include "paged_decode_split_kv.cu"

#ifndef __CUDA_ARCH__
#include "expected_layout.h"
#endif
