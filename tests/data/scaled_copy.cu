// Test kernel of tests/test_runtime.py: its element type and constants come from the
// prelude the runtime generates (value_t, kScale, kAddOne), not from this file.
extern "C" __global__ void scaled_copy(const value_t* x, value_t* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i] * static_cast<value_t>(kScale) + static_cast<value_t>(kAddOne ? 1 : 0);
}
