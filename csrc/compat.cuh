// compat.cuh: every platform-specific construct the kernels use, behind one small API.
//
// The kernels in this directory include only this header and call only what it
// defines (plus plain C++); each platform's half is its own file (compat_cuda.cuh,
// compat_hip.cuh), included from here, and nothing else in csrc/ is platform code.
// The CUDA half targets sm_80+ (mma.sync m16n8k16, ldmatrix, cp.async) and sm_89+ for
// the packed fp8 converts. The HIP half targets CDNA3 (gfx942, wave64); it compiles in
// CI (clang-19, tests/test_hip_rocm_compile.py) but has never run on an AMD GPU.
//
// What the kernels need:
//   q16<IS_BF16>           the 16-bit operand type and its packed pair
//   mma_16816<IS_BF16>     D[16x8] += A[16x16] * B[16x8], fp32 accumulators, in the
//                          fragment layout of PTX mma.sync m16n8k16 (per 32-lane warp)
//   ldmatrix_x4(...)       four 8x8 16-bit matrices from shared memory into fragments
//   l2_stream_policy(ef)   the L2 policy of the K/V stream copies: evict-first or normal (CUDA)
//   lane_copy(policy)      the same policy, as a value the compiler cannot hold in uniform registers
//   cp_async_16 / _4       16- and 4-byte global->shared copies of the K/V stream, under that policy
//   cp_async_4_or_zero     a 4-byte copy, or 4 zero bytes (nothing read) when !valid
//   cp_async_commit/wait   group bookkeeping of those copies
//   shfl_xor(v, m)         butterfly exchange inside a warp
//   warp_sync()            a warp's shared-memory writes are visible to the whole warp
//   fast_exp2(x)           2^x
//   allow_dependent_launch()  lets a kernel launched after this one with programmatic
//                          dependent launch start now (it waits for this grid's results itself)
//   widen2<KV_KIND, ...>   two 8-bit cache values (16 bits) -> a packed 16-bit pair (e4m3)
//   widen4<KV_KIND, ...>   four 8-bit cache values (a 32-bit word) -> two packed 16-bit pairs (int8)
//   PA_GRID_CONSTANT       how a by-value parameter struct is declared
//   PA_NEG_INF             -infinity as a float constant
//   SMEM_PER_CTA           the most shared memory one CTA may have (tiles are sized to it)
//   ASYNC_COPIES           whether cp_async_* overlap with compute (else a ring of one
//                          stage does as well as a deeper one)
// (__syncthreads, __launch_bounds__, blockIdx/threadIdx and __shared__ are common to both.)
//
// A "warp" is 32 lanes on both: on wave64 hardware each wave holds two of them (lanes
// 0-31 and 32-63), and every cross-lane operation below stays inside its half.
#pragma once

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define PA_HIP 1
#include <hip/hip_runtime.h>
#endif

#define PA_DEVICE __device__ __forceinline__

namespace pa {

using i64 = long long;

enum KvKind : int { KV_16BIT = 0, KV_FP8_E4M3 = 1, KV_INT8 = 2 };

template <typename T2> PA_DEVICE unsigned as_u32(T2 v) { return *reinterpret_cast<unsigned*>(&v); }

}  // namespace pa

#ifdef PA_HIP
#include "compat_hip.cuh"
#else
#include "compat_cuda.cuh"
#endif
