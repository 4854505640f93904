// Runs compat_hip.cuh's fragment code on the host, 64 threads standing in for the lanes of
// one wave64 (hip_lanes/hip/hip_runtime.h), and checks it against what PTX defines for the
// CUDA half: ldmatrix.x4 and mma.sync m16n8k16 (f32 += bf16/f16), each 32-lane half of the
// wave with its own data. Also the e4m3 and bf16 conversions. Exit code 0: all agree.
// Build: clang++ -std=c++20 -O1 -pthread -D__HIP_PLATFORM_AMD__ -Ihip_lanes -I<csrc>
// (tests/test_hip_rocm_compile.py).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "compat.cuh"

namespace {

constexpr int HALVES = 2, LANES = 64;
int failures = 0;

void expect(bool ok, const char* what, int half, int lane, double got, double want) {
  if (!ok && failures++ < 10) std::printf("FAIL %s half %d lane %d: got %g, want %g\n", what, half, lane, got, want);
}

// one 16-bit value of the query type from a float (exact for the small integers used)
template <bool IS_BF16> uint16_t bits16(float v) { return std::bit_cast<uint16_t>(pa::q16<IS_BF16>::from_float(v)); }
uint32_t pack(uint16_t lo, uint16_t hi) { return lo | uint32_t(hi) << 16; }

template <bool IS_BF16> void check_mma(std::mt19937& rng) {
  // small integers: every product and sum is exact in fp32, whatever the summation order
  std::uniform_int_distribution<int> value(-8, 8);
  float A[HALVES][16][16], B[HALVES][16][8], C[HALVES][16][8];
  for (int h = 0; h < HALVES; ++h) {
    for (auto& row : A[h]) for (float& x : row) x = value(rng);
    for (auto& row : B[h]) for (float& x : row) x = value(rng);
    for (auto& row : C[h]) for (float& x : row) x = value(rng);
  }
  float D[HALVES][32][4];
  sim::launch({1, 1, 1}, LANES, [&] {
      const int l = threadIdx.x, h = l / 32, g = l % 32 / 4, t = l % 4;
      auto a16 = [&](int r, int c) { return pack(bits16<IS_BF16>(A[h][r][c]), bits16<IS_BF16>(A[h][r][c + 1])); };
      auto b16 = [&](int k, int n) { return pack(bits16<IS_BF16>(B[h][k][n]), bits16<IS_BF16>(B[h][k + 1][n])); };
      const unsigned a[4] = {a16(g, 2 * t), a16(g + 8, 2 * t), a16(g, 2 * t + 8), a16(g + 8, 2 * t + 8)};
      float d[4] = {C[h][g][2 * t], C[h][g][2 * t + 1], C[h][g + 8][2 * t], C[h][g + 8][2 * t + 1]};
      pa::mma_16816<IS_BF16>(d, a, b16(2 * t, g), b16(2 * t + 8, g));
      std::memcpy(D[h][l % 32], d, sizeof d);
  });
  for (int h = 0; h < HALVES; ++h) {
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      for (int i = 0; i < 4; ++i) {
        float want = C[h][rows[i]][cols[i]];
        for (int k = 0; k < 16; ++k) want += A[h][rows[i]][k] * B[h][k][cols[i]];
        expect(D[h][l][i] == want, IS_BF16 ? "mma_16816<bf16>" : "mma_16816<f16>", h, l, D[h][l][i], want);
      }
    }
  }
}

void check_ldmatrix(std::mt19937& rng, unsigned char* lds) {
  // each half: four 8x8 matrices of 16-bit values, rows of 16 bytes, in a shuffled row order
  uint16_t* words = reinterpret_cast<uint16_t*>(lds);
  for (int i = 0; i < HALVES * 4 * 8 * 8; ++i) words[i] = static_cast<uint16_t>(rng());
  int row_at[HALVES][4][8];  // row r of matrix m of half h starts at 16-byte row row_at[h][m][r]
  std::vector<int> order(HALVES * 32);
  for (int i = 0; i < HALVES * 32; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (int i = 0; i < HALVES * 32; ++i) row_at[i / 32][i % 32 / 8][i % 8] = order[i];
  unsigned got[HALVES][32][4];
  sim::launch({1, 1, 1}, LANES, [&] {
      const int h = threadIdx.x / 32, hl = threadIdx.x % 32;
      unsigned r[4];
      pa::ldmatrix_x4(r, lds + 16 * row_at[h][hl / 8][hl % 8]);
      std::memcpy(got[h][hl], r, sizeof r);
  });
  for (int h = 0; h < HALVES; ++h)
    for (int l = 0; l < 32; ++l)
      for (int m = 0; m < 4; ++m) {
        unsigned want;
        std::memcpy(&want, lds + 16 * row_at[h][m][l / 4] + 4 * (l % 4), 4);
        expect(got[h][l][m] == want, "ldmatrix_x4", h, l, got[h][l][m], want);
      }
}

void check_conversions() {
  for (int v = 0; v < 256; ++v) {  // every e4m3 (OCP, torch.float8_e4m3fn) value
    const int sign = v >> 7, exp = (v >> 3) & 15, man = v & 7;
    const double want = (sign ? -1 : 1) * (exp ? std::ldexp(8 + man, exp - 10) : std::ldexp(man, -9));
    const float got = pa::e4m3_to_float(static_cast<unsigned char>(v));
    if (exp == 15 && man == 7)
      expect(std::isnan(got), "e4m3 NaN", 0, v, got, NAN);
    else
      expect(got == want, "e4m3", 0, v, got, want);
  }
  const float samples[] = {1.f, -2.5f, 3.14159f, 1e-20f, 65504.f, 1.00390625f, 1.01171875f, -0.f};
  for (float x : samples) {  // bf16 rounding to nearest even, against the rounding mode of the FPU
    const uint32_t u = std::bit_cast<uint32_t>(x), lower = u & 0xffff0000u, upper = lower + 0x10000u;
    const float lo = std::bit_cast<float>(lower), hi = std::bit_cast<float>(upper);
    const double dl = std::fabs(double(x) - lo), dh = std::fabs(double(hi) - x);
    const uint32_t want = dl < dh ? lower : dh < dl ? upper : ((lower >> 16) & 1 ? upper : lower);
    const uint32_t got = uint32_t(pa::q16<true>::from_float(x).bits) << 16;
    expect(got == want, "bf16 rounding", 0, 0, std::bit_cast<float>(got), std::bit_cast<float>(want));
  }
}

}  // namespace

int main() {
  std::mt19937 rng(std::random_device{}());
  unsigned char* lds = sim::lds_buffer(1 << 16);
  if (lds == nullptr) return 2;
  for (int round = 0; round < 4; ++round) {
    check_mma<true>(rng);
    check_mma<false>(rng);
    check_ldmatrix(rng, lds);
  }
  check_conversions();
  std::printf("%s\n", failures ? "FAILED" : "all fragments and conversions agree");
  return failures ? 1 : 0;
}
