// A stand-in for <hip/hip_runtime.h> that lets csrc/compat_hip.cuh run on the host, one
// std::thread per lane of one wave64 (tests/data/hip_fragments_check.cpp): cross-lane
// builtins exchange values through shared slots between barriers, so straight-line
// fragment code sees what a wave would see. The 4x4x4 MFMA (16 blocks) follows AMD's
// documented layout: block b is lanes 4b..4b+3; lane 4b+i holds row i of A and column i
// of B (4 values each, k in order), and gets column i of D (rows in order).
#pragma once
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>

#define __device__
#define __forceinline__ inline
#define __global__

struct uint4 {
  unsigned x, y, z, w;
};

namespace sim {
constexpr int LANES = 64;
inline thread_local int lane;
inline std::barrier<> wave(LANES);
inline uint32_t slots[LANES];
inline float operands[LANES][12];  // a[4], b[4], c[4] of each lane, as floats

inline uint32_t exchange(uint32_t v, int src) {
  slots[lane] = v;
  wave.arrive_and_wait();
  const uint32_t r = slots[src];
  wave.arrive_and_wait();
  return r;
}
inline float bf16_to_float(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }
inline float f16_to_float(uint16_t h) { return float(std::bit_cast<_Float16>(h)); }

template <class V4, class F4>
F4 mfma_4x4x4(V4 a, V4 b, F4 c, float (*widen)(uint16_t)) {
  for (int k = 0; k < 4; ++k) {
    operands[lane][k] = widen(std::bit_cast<uint16_t>(a[k]));
    operands[lane][4 + k] = widen(std::bit_cast<uint16_t>(b[k]));
    operands[lane][8 + k] = c[k];
  }
  wave.arrive_and_wait();
  const int base = lane / 4 * 4, j = lane % 4;
  F4 d;
  for (int i = 0; i < 4; ++i) {
    float sum = operands[lane][8 + i];
    for (int k = 0; k < 4; ++k) sum += operands[base + i][k] * operands[base + j][4 + k];
    d[i] = sum;
  }
  wave.arrive_and_wait();
  return d;
}
}  // namespace sim

inline unsigned __lane_id() { return sim::lane; }
inline unsigned __shfl(unsigned v, int src, int width) { return sim::exchange(v, src + (sim::lane & ~(width - 1))); }
inline float __shfl(float v, int src, int width) {
  return std::bit_cast<float>(__shfl(std::bit_cast<unsigned>(v), src, width));
}
inline float __shfl_xor(float v, int mask, int width) {
  return std::bit_cast<float>(sim::exchange(std::bit_cast<unsigned>(v), sim::lane ^ mask));
}

#define __builtin_amdgcn_mfma_f32_4x4x4bf16_1k(a, b, c, cbsz, abid, blgp) sim::mfma_4x4x4(a, b, c, sim::bf16_to_float)
#define __builtin_amdgcn_mfma_f32_4x4x4f16(a, b, c, cbsz, abid, blgp) sim::mfma_4x4x4(a, b, c, sim::f16_to_float)
#define __builtin_amdgcn_fence(order, scope) ((void)0)
#define __builtin_amdgcn_wave_barrier() sim::wave.arrive_and_wait()
#define __builtin_amdgcn_exp2f exp2f
