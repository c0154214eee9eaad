// Counter-based Gaussian sketch: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC'11) + Box-Muller.
//
// The sketch Omega (rows x cols) is a pure function of (seed, rows, flat index): element (i, j) uses the
// column-major flat index e = j * rows + i, drawn from the 4-vector of normals of group e / 4, lane e % 4.
// The same function runs in the CPU loop and in the CUDA kernel, so both devices build the same sketch (the
// Box-Muller step is evaluated in double and rounded to float, so the two agree to the last float bit except for
// the rare case where the devices' libm results straddle a rounding boundary). Column j depends only on
// (seed, rows, j): a wider sketch extends a narrower one.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace keeplora {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
// Fixed words of the counter: they keep this stream apart from any other Philox user of the same seed.
constexpr uint32_t kStream0 = 0x6b6c7261u;  // "kl" "ra"
constexpr uint32_t kStream1 = 0x72737664u;  // "rsvd"

KEEPLORA_HD void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 on counter c with key k; writes four 32-bit words.
KEEPLORA_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                               uint32_t out[4]) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c0, &hi0, &lo0);
    mulhilo(kMul1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n1 = lo1;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    const uint32_t n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Uniform in the open interval (0, 1) from 32 random bits.
KEEPLORA_HD double uniform_open(uint32_t bits) {
  return (static_cast<double>(bits) + 0.5) * 2.3283064365386962890625e-10;  // 2^-32
}

// Four standard normals of group `group` for `seed` (two Box-Muller pairs), evaluated in double.
KEEPLORA_HD void normal4(uint64_t seed, uint64_t group, double out[4]) {
  uint32_t bits[4];
  philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), kStream0, kStream1,
                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), bits);
  const double two_pi = 6.283185307179586476925286766559;
  for (int pair = 0; pair < 2; ++pair) {
    const double radius = sqrt(-2.0 * log(uniform_open(bits[2 * pair])));
    const double angle = two_pi * uniform_open(bits[2 * pair + 1]);
    out[2 * pair] = radius * cos(angle);
    out[2 * pair + 1] = radius * sin(angle);
  }
}

}  // namespace philox
}  // namespace keeplora
