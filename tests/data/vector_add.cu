// Test kernels of tests/test_runtime.py (not part of the library).
#include <cuda_fp16.h>

#include "vector_add.cuh"

namespace pa_test {

// out = a + b. A template, so the tests instantiate it through NVRTC name expressions.
template <typename T>
__global__ void vector_add(const T* a, const T* b, T* out, int n) {
  const int i = global_index();
  if (i < n) out[i] = a[i] + b[i];
}

// y += alpha * x, the arguments in one by-value struct (the hip backend's convention).
__global__ void axpy(const __grid_constant__ AxpyParams p) {
  const int i = global_index();
  if (i < p.n) p.y[i] += p.alpha * p.x[i];
}

// out = in reversed, staged through n floats of dynamic shared memory (one CTA), so a
// test can ask for more than the 48 KB a launch gets without opting in.
__global__ void reverse_through_shared(const float* in, float* out, int n) {
  extern __shared__ float tile[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) tile[i] = in[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = tile[n - 1 - i];
}

// Keeps N values live per thread; built with --maxrregcount=32 it must spill, which the
// resource-usage tests detect.
template <int N>
__global__ void register_hungry(const float* x, float* y, int stride) {
  float v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = x[threadIdx.x + i * stride];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < N; ++i) sum += v[i] * v[(i * 7 + j) % N];
  y[threadIdx.x] = sum;
}

}  // namespace pa_test
