// compat_cuda.cuh: the CUDA half of compat.cuh (which documents the API); include that.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

// A by-value kernel parameter read in place from the constant bank (no local copy).
#define PA_GRID_CONSTANT __grid_constant__
#define PA_NEG_INF (__int_as_float(0xff800000))

namespace pa {

constexpr int SMEM_PER_CTA = 227 * 1024;  // sm_90's opt-in maximum
constexpr bool ASYNC_COPIES = true;

template <bool IS_BF16> struct q16;
template <> struct q16<true> {
  using t = __nv_bfloat16;
  using t2 = __nv_bfloat162;
  static PA_DEVICE t2 from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static PA_DEVICE t from_float(float a) { return __float2bfloat16_rn(a); }
  static PA_DEVICE float to_float(t a) { return __bfloat162float(a); }
};
template <> struct q16<false> {
  using t = __half;
  using t2 = __half2;
  static PA_DEVICE t2 from_floats(float a, float b) { return __floats2half2_rn(a, b); }
  static PA_DEVICE t from_float(float a) { return __float2half_rn(a); }
  static PA_DEVICE float to_float(t a) { return __half2float(a); }
};

// D += A * B for one m16n8k16 tile; a: 4 regs, b: 2 regs, d: 4 fp32 (row-major fragments).
template <bool IS_BF16> PA_DEVICE void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (IS_BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

PA_DEVICE unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// Lane l passes the address of row (l % 8) of matrix (l / 8); register i receives matrix i,
// lane l holding row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1.
PA_DEVICE void ldmatrix_x4(unsigned (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
}

// The L2 policy of the K/V stream copies, per call (pa_hybrid/backends/base.py,
// stream_evict_first): every cache byte is read once per call, so with evict-first its lines
// go first and the stream leaves alone what other kernels left in L2 (dirty lines, whose
// write-back would share DRAM with it); on long calls on the H100 that costs more than it saves.
// Volatile, so that it is made where it is used and not held in registers through a loop
// (held, the 64-bit policy spilled a kernel at its 128-register bound under the NVRTC of CUDA 13.0).
PA_DEVICE unsigned long long l2_stream_policy(bool evict_first) {
  unsigned long long first, normal;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(first));
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(normal));
  return evict_first ? first : normal;
}
// Through a shuffle: a value ptxas cannot prove warp-uniform. The ptxas of CUDA 13.0 addressed
// two copies of each 16-bit 32-row variant through uniform registers it never wrote (UR0/UR1
// where it had set up the ring's base and this policy: an illegal instruction on the H100);
// with the policy in lanes, every copy reads registers that were written (RESULTS.md, section 49).
PA_DEVICE unsigned long long lane_copy(unsigned long long policy) { return __shfl_sync(0xffffffffu, policy, 0); }
PA_DEVICE void cp_async_16(void* smem, const void* gmem, unsigned long long policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "l"(policy));
}
// 4 bytes (cache-all: for small rows without 16-byte alignment, such as per-token scales).
PA_DEVICE void cp_async_4(void* smem, const void* gmem, unsigned long long policy) {
  asm volatile("cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "l"(policy));
}
PA_DEVICE void cp_async_4_or_zero(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 4 : 0));
}
PA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

PA_DEVICE void allow_dependent_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}
template <int N> PA_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

PA_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
PA_DEVICE void warp_sync() { __syncwarp(); }
PA_DEVICE float fast_exp2(float x) { return exp2f(x); }

// Two adjacent e4m3 cache values (16 bits, low byte first) -> a packed 16-bit pair of the
// query type; exact. e4m3 -> f16 is one instruction per pair on sm_89+ (the backend's floor).
template <int KV_KIND, bool IS_BF16> PA_DEVICE unsigned widen2(unsigned short v) {
  static_assert(KV_KIND == KV_FP8_E4M3, "the kernel widens int8 caches four values at a time (widen4)");
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3);
  if constexpr (IS_BF16) {  // f16 -> f32 -> bf16: exact (3 mantissa bits)
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
    return as_u32(q16<IS_BF16>::from_floats(f.x, f.y));
  } else {
    return *reinterpret_cast<const unsigned*>(&h);
  }
}

// Four adjacent int8 cache values (a 32-bit word, low byte first) -> the packed 16-bit pairs
// of the query type of bytes 0-1 (lo) and 2-3 (hi); exact. The bytes are sign-extended where
// they sit, by shifts: extracting each byte first took up to 30 more registers (and spills)
// in head-256 variants.
template <int KV_KIND, bool IS_BF16> PA_DEVICE void widen4(unsigned v, unsigned& lo, unsigned& hi) {
  static_assert(KV_KIND == KV_INT8, "the kernel widens e4m3 caches two values at a time (widen2)");
  using Q = q16<IS_BF16>;
  auto byte = [v](int shift) { return static_cast<float>(static_cast<int>(v << shift) >> 24); };  // byte (24 - shift) / 8
  lo = as_u32(Q::from_floats(byte(24), byte(16)));
  hi = as_u32(Q::from_floats(byte(8), byte(0)));
}

}  // namespace pa
