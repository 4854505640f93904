// A stand-in for <hip/hip_runtime.h> that runs csrc/ kernels compiled for HIP on the host:
// sim::launch runs each block with one std::thread per GPU thread. Cross-lane builtins
// exchange values through shared slots between barriers of a 32-lane half of a wave64
// (compat_hip.cuh keeps every exchange inside one half, and the halves may diverge), and
// __syncthreads is a barrier of the block. The 4x4x4 MFMA (16 blocks) follows AMD's
// documented layout: block b is lanes 4b..4b+3; lane 4b+i holds row i of A and column i
// of B (4 values each, k in order), and gets column i of D (rows in order).
// Used by tests/data/hip_fragments_check.cpp and hip_kernel_sim.cpp.
#pragma once
#include <sys/mman.h>

#include <algorithm>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct uint4 {
  unsigned x, y, z, w;
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int min(int a, int b) { return std::min(a, b); }
inline int max(int a, int b) { return std::max(a, b); }

struct sim_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local sim_dim3 threadIdx, blockIdx;
inline sim_dim3 gridDim;

namespace sim {
constexpr int HALF = 32;  // the lanes one exchange spans
constexpr int MAX_THREADS = 1024;

struct Block {
  explicit Block(int threads) : all(threads) {
    for (int h = 0; h < (threads + HALF - 1) / HALF; ++h) halves.emplace_back(std::make_unique<std::barrier<>>(std::min(HALF, threads - h * HALF)));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> halves;
  uint32_t slots[MAX_THREADS];
  float operands[MAX_THREADS][12];  // a[4], b[4], c[4] of each thread, as floats
};
inline Block* block;

inline std::barrier<>& my_half() { return *block->halves[threadIdx.x / HALF]; }

// Run fn on every thread of every block of the grid, one block at a time.
inline void launch(sim_dim3 grid, int threads, const std::function<void()>& fn) {
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block current(threads);
        block = &current;
        std::vector<std::thread> team;
        for (int t = 0; t < threads; ++t)
          team.emplace_back([&, t] {
            threadIdx = {unsigned(t), 0, 0};
            blockIdx = {x, y, z};
            fn();
          });
        for (auto& thread : team) thread.join();
      }
}

// LDS lives below 4 GB: compat_hip.cuh passes LDS addresses as 32-bit offsets
inline unsigned char* lds_buffer(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
  return p == MAP_FAILED ? nullptr : static_cast<unsigned char*>(p);
}

inline uint32_t exchange(uint32_t v, int src_in_wave) {
  const int wave_base = threadIdx.x / 64 * 64;
  block->slots[threadIdx.x] = v;
  my_half().arrive_and_wait();
  const uint32_t r = block->slots[wave_base + src_in_wave];
  my_half().arrive_and_wait();
  return r;
}
inline float bf16_to_float(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }
inline float f16_to_float(uint16_t h) { return float(std::bit_cast<_Float16>(h)); }

template <class V4, class F4>
F4 mfma_4x4x4(V4 a, V4 b, F4 c, float (*widen)(uint16_t)) {
  float* mine = block->operands[threadIdx.x];
  for (int k = 0; k < 4; ++k) {
    mine[k] = widen(std::bit_cast<uint16_t>(a[k]));
    mine[4 + k] = widen(std::bit_cast<uint16_t>(b[k]));
    mine[8 + k] = c[k];
  }
  my_half().arrive_and_wait();
  const int base = threadIdx.x / 4 * 4, j = threadIdx.x % 4;
  F4 d;
  for (int i = 0; i < 4; ++i) {
    float sum = mine[8 + i];
    for (int k = 0; k < 4; ++k) sum += block->operands[base + i][k] * block->operands[base + j][4 + k];
    d[i] = sum;
  }
  my_half().arrive_and_wait();
  return d;
}
}  // namespace sim

inline unsigned __lane_id() { return threadIdx.x % 64; }
inline void __syncthreads() { sim::block->all.arrive_and_wait(); }
inline unsigned __shfl(unsigned v, int src, int width) { return sim::exchange(v, src + (__lane_id() & ~(width - 1))); }
inline float __shfl(float v, int src, int width) {
  return std::bit_cast<float>(__shfl(std::bit_cast<unsigned>(v), src, width));
}
inline float __shfl_xor(float v, int mask, int width) {
  return std::bit_cast<float>(sim::exchange(std::bit_cast<unsigned>(v), __lane_id() ^ mask));
}

#define __builtin_amdgcn_mfma_f32_4x4x4bf16_1k(a, b, c, cbsz, abid, blgp) sim::mfma_4x4x4(a, b, c, sim::bf16_to_float)
#define __builtin_amdgcn_mfma_f32_4x4x4f16(a, b, c, cbsz, abid, blgp) sim::mfma_4x4x4(a, b, c, sim::f16_to_float)
#define __builtin_amdgcn_fence(order, scope) ((void)0)
#define __builtin_amdgcn_wave_barrier() sim::my_half().arrive_and_wait()
#define __builtin_amdgcn_exp2f exp2f
