// Shared by the test kernels in vector_add.cu (tests/test_runtime.py also edits a copy of
// this header to check that the cache key follows included headers).
#pragma once

namespace pa_test {

// y += alpha * x over n elements, every argument in one struct. Mirrored in
// tests/test_runtime.py by AxpyArgs (a ctypes.Structure), which is also the packed
// argument buffer of axpy.ptx: same fields, same offsets.
struct AxpyParams {
  const float* x;
  float* y;
  float alpha;
  int n;
};

// -default-device makes this (unannotated) function device code.
inline int global_index() { return blockIdx.x * blockDim.x + threadIdx.x; }

}  // namespace pa_test
