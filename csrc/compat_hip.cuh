// compat_hip.cuh: the HIP half of compat.cuh (which documents the API); include that.
//
// Target: CDNA3 (gfx942, wave64, 64 KB of LDS per workgroup). Checked by compiling every
// variant with clang-19 in CI; never run on an AMD GPU. Headers as old as ROCm 5.2 do:
// no hip_bf16.h (the bf16 type is ours) and no device libraries (builtins, not libm).
//
// Each wave64 holds two of the kernels' 32-lane warps; cross-lane exchanges use width 32
// so they stay inside the caller's half. The m16n8k16 MMA is built from the 4x4x4 MFMA
// with 16 blocks, the one whose blocks are 4 adjacent lanes, so each half computes its
// own product (the two halves of a wave may be in different loop iterations, one masked
// off). Its operands and results are moved between the mma.sync fragment layout and the
// MFMA layout with lane shuffles: correct, not fast; a native wave64 tiling would be the
// real port.
#pragma once

#define PA_GRID_CONSTANT  // kernel arguments live in the kernarg segment, read in place
#define PA_NEG_INF (-__builtin_inff())

namespace pa {

constexpr int SMEM_PER_CTA = 64 * 1024;  // LDS per workgroup on gfx942
constexpr bool ASYNC_COPIES = false;     // the copies below are plain loads and stores

struct bf16 {
  unsigned short bits;
};
struct bf16x2 {
  bf16 lo, hi;
};
struct f16x2 {
  _Float16 lo, hi;
};

PA_DEVICE unsigned float_bits(float f) { return __builtin_bit_cast(unsigned, f); }
PA_DEVICE float bits_float(unsigned u) { return __builtin_bit_cast(float, u); }

template <bool IS_BF16> struct q16;
template <> struct q16<true> {
  using t = bf16;
  using t2 = bf16x2;
  static PA_DEVICE t from_float(float a) {  // round to nearest even; NaN stays a (quiet) NaN
    const unsigned u = float_bits(a);
    if ((u & 0x7fffffffu) > 0x7f800000u) return t{static_cast<unsigned short>((u >> 16) | 0x40)};
    return t{static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
  }
  static PA_DEVICE t2 from_floats(float a, float b) { return t2{from_float(a), from_float(b)}; }
  static PA_DEVICE float to_float(t a) { return bits_float(static_cast<unsigned>(a.bits) << 16); }
};
template <> struct q16<false> {
  using t = _Float16;
  using t2 = f16x2;
  static PA_DEVICE t from_float(float a) { return static_cast<_Float16>(a); }  // round to nearest even
  static PA_DEVICE t2 from_floats(float a, float b) { return t2{from_float(a), from_float(b)}; }
  static PA_DEVICE float to_float(t a) { return static_cast<float>(a); }
};

PA_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor(v, mask, 32); }
PA_DEVICE unsigned shfl(unsigned v, int src_lane) { return __shfl(v, src_lane, 32); }  // src in this half
PA_DEVICE unsigned lane_id() { return __lane_id() % 32; }

// A wave's lanes run in lockstep; the fences keep the compiler from moving LDS accesses
// across this point and wait for this lane's LDS writes to complete.
PA_DEVICE void warp_sync() {
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup");
  __builtin_amdgcn_wave_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");
}

PA_DEVICE float fast_exp2(float x) { return __builtin_amdgcn_exp2f(x); }

// No programmatic dependent launch on ROCm: the next kernel starts when this grid ends.
PA_DEVICE void allow_dependent_launch() {}

// Copies: 16- and 4-byte loads into registers, stored to LDS; complete when they return, so
// commit and wait have nothing to track. No L2 policy: it is ignored.
PA_DEVICE unsigned long long l2_stream_policy(bool) { return 0; }
PA_DEVICE unsigned long long lane_copy(unsigned long long policy) { return policy; }
PA_DEVICE void cp_async_16(void* smem, const void* gmem, unsigned long long) {
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
}
PA_DEVICE void cp_async_4(void* smem, const void* gmem, unsigned long long) {
  *static_cast<unsigned*>(smem) = *static_cast<const unsigned*>(gmem);
}
PA_DEVICE void cp_async_4_or_zero(void* smem, const void* gmem, bool valid) {
  *static_cast<unsigned*>(smem) = valid ? *static_cast<const unsigned*>(gmem) : 0u;
}
PA_DEVICE void cp_async_commit() {}
template <int N> PA_DEVICE void cp_async_wait() {}

// ldmatrix: lane l holds the row address of row l % 8 of matrix l / 8; register i gets
// matrix i's row l / 4, bytes 4 (l % 4) .. +3. The address comes from the lane that has it,
// as a 32-bit LDS offset (the low half of a generic LDS address), so the reads are LDS reads.
PA_DEVICE void ldmatrix_x4(unsigned (&r)[4], const void* row_addr) {
  typedef __attribute__((address_space(3))) const unsigned lds_word;
  const unsigned lane = lane_id();
  const unsigned offset = static_cast<unsigned>(reinterpret_cast<unsigned long long>(row_addr));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned row = shfl(offset, 8 * i + lane / 4);
    r[i] = reinterpret_cast<lds_word*>(static_cast<unsigned long long>(row))[lane % 4];
  }
}

// mma.sync m16n8k16 fragments (lane l, g = l / 4, t = l % 4; each register a pair of
// 16-bit values, the lower k / column first):
//   A: a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B: b0 = B[2t..][g], b1 = B[2t+8..][g]
//   D: d0, d1 = D[g][2t], D[g][2t+1]; d2, d3 = D[g+8][2t], D[g+8][2t+1]
// The product is computed transposed, E = D^T = B^T A^T (8 x 16), as 8 blocks of 4x4 over
// 4 k-steps of 4: lane l works on block (na, mb) = (l / 16, l / 4 % 4), i = l % 4, i.e.
// E[4 na .. +3][4 mb .. +3], and the 4x4x4 MFMA takes from it X row i (B^T's n = 4 na + i)
// and Y column i (A^T's m = 4 mb + i), and returns E's column i: D[4 mb + i][4 na .. +3].
template <bool IS_BF16> PA_DEVICE void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  typedef short short4_t __attribute__((ext_vector_type(4)));
  typedef _Float16 half4_t __attribute__((ext_vector_type(4)));
  typedef float float4_t __attribute__((ext_vector_type(4)));
  typedef unsigned uint2_t __attribute__((ext_vector_type(2)));
  const unsigned lane = lane_id();
  const int na = lane / 16, mb = lane / 4 % 4, i = lane % 4;
  const int n = 4 * na + i, m = 4 * mb + i;
  float4_t e = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) {  // k = 4 kc .. 4 kc + 3: two 16-bit pairs per operand
    uint2_t x, y;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const int pair_lane = 2 * (kc % 2) + p;  // t of the fragment lane holding k = 4 kc + 2 p
      // B[k][n] pairs sit in lane 4 n + t, register b0 for k < 8, b1 above
      x[p] = shfl(kc < 2 ? b0 : b1, 4 * n + pair_lane);
      // A[m][k] pairs sit in lane 4 (m % 8) + t, register (m / 8) + 2 (k / 8)
      const unsigned lo = shfl(a[2 * (kc / 2)], 4 * (m % 8) + pair_lane);
      const unsigned hi = shfl(a[2 * (kc / 2) + 1], 4 * (m % 8) + pair_lane);
      y[p] = m < 8 ? lo : hi;
    }
    if constexpr (IS_BF16) {
      e = __builtin_amdgcn_mfma_f32_4x4x4bf16_1k(__builtin_bit_cast(short4_t, x), __builtin_bit_cast(short4_t, y), e, 0, 0, 0);
    } else {
      e = __builtin_amdgcn_mfma_f32_4x4x4f16(__builtin_bit_cast(half4_t, x), __builtin_bit_cast(half4_t, y), e, 0, 0, 0);
    }
  }
  // D[r][c] is item c % 4 of lane 16 (c / 4) + r: row g's columns 2t, 2t+1 are items
  // 2 (t % 2) and +1 of lane 16 (t / 2) + g, row g + 8's of that lane + 8.
  const int g = lane / 4, t = lane % 4, src = 16 * (t / 2) + g;
  float row0[4], row1[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    row0[c] = __shfl(e[c], src, 32);
    row1[c] = __shfl(e[c], src + 8, 32);
  }
  d[0] += t % 2 ? row0[2] : row0[0];
  d[1] += t % 2 ? row0[3] : row0[1];
  d[2] += t % 2 ? row1[2] : row1[0];
  d[3] += t % 2 ? row1[3] : row1[1];
}

// e4m3 (OCP, as torch.float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN) -> float,
// exactly. gfx942's fp8 converts read the FNUZ variant, so this is done with integer ops.
PA_DEVICE float e4m3_to_float(unsigned char v) {
  const unsigned sign = static_cast<unsigned>(v & 0x80) << 24, exp = (v >> 3) & 0xf, man = v & 0x7;
  if (exp == 0xf && man == 0x7) return bits_float(sign | 0x7fc00000u);
  if (exp == 0) return bits_float(sign | float_bits(static_cast<float>(man) * 0x1p-9f));  // subnormal
  return bits_float(sign | ((exp + 120) << 23) | (man << 20));
}

// Two adjacent 8-bit cache values (low byte first) -> a packed 16-bit pair of the query type
// (exact: e4m3 and int8 values are all representable in f16 and bf16).
template <int KV_KIND, bool IS_BF16> PA_DEVICE unsigned widen2(unsigned short v) {
  using Q = q16<IS_BF16>;
  if constexpr (KV_KIND == KV_FP8_E4M3) {
    return as_u32(Q::from_floats(e4m3_to_float(v & 0xff), e4m3_to_float(v >> 8)));
  } else {
    const signed char lo = static_cast<signed char>(v & 0xff);
    const signed char hi = static_cast<signed char>(v >> 8);
    return as_u32(Q::from_floats(static_cast<float>(lo), static_cast<float>(hi)));
  }
}
// Four adjacent 8-bit cache values (one 32-bit word) -> the packed pairs of bytes 0-1 and 2-3.
template <int KV_KIND, bool IS_BF16> PA_DEVICE void widen4(unsigned v, unsigned& lo, unsigned& hi) {
  lo = widen2<KV_KIND, IS_BF16>(static_cast<unsigned short>(v));
  hi = widen2<KV_KIND, IS_BF16>(static_cast<unsigned short>(v >> 16));
}

}  // namespace pa
