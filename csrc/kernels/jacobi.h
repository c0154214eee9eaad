// One-sided (Hestenes) Jacobi SVD of small square matrices: the pieces shared by the serial CPU twin below and
// the CUDA kernel in csrc/cuda/jacobi_svd.cu.
//
// For an l x l matrix A (stored column-major, column j contiguous), rotations of column pairs (p, q) drive
// W = A·V towards orthogonal columns while V (starting at I) accumulates the same rotations. At convergence
// sigma_j = ||w_j||, u_j = w_j / sigma_j, A = U·diag(sigma)·V^T. Pairs are visited in round-robin
// ("circle method") order: l_pad - 1 rounds of l_pad / 2 disjoint pairs, so one round's rotations commute and
// the CUDA kernel runs them in parallel. A sweep without any rotation ends the iteration. One-sided Jacobi
// computes small singular values to high relative accuracy (Demmel & Veselic 1992), unlike eigh of A^T·A.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace keeplora {
namespace jacobi {

constexpr int kMaxSweeps = 60;

// Number of players in the round-robin schedule (columns padded to an even count).
KEEPLORA_HD int padded(int l) { return l + (l & 1); }

// Player at position `pos` (0 .. lp-1) in round `round` (0 .. lp-2): position 0 stays, the others rotate.
KEEPLORA_HD int player(int round, int pos, int lp) { return pos == 0 ? 0 : 1 + (pos - 1 + round) % (lp - 1); }

// The pair `k` (0 .. lp/2-1) of round `round`, ordered p < q. q may be the dummy column l when l is odd.
KEEPLORA_HD void pair_of(int round, int k, int lp, int* p, int* q) {
  const int a = player(round, k, lp);
  const int b = player(round, lp - 1 - k, lp);
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// Rotation (c, s) that makes x' = c·x - s·y and y' = s·x + c·y orthogonal, given alpha = ||x||^2,
// beta = ||y||^2, gamma = x^T·y. Returns false (no rotation) when |gamma| <= tol·sqrt(alpha·beta).
template <typename T>
KEEPLORA_HD bool rotation(T alpha, T beta, T gamma, T tol, T* c, T* s) {
  if (!(fabs(gamma) > tol * sqrt(alpha) * sqrt(beta))) return false;
  const T zeta = (beta - alpha) / (T(2) * gamma);
  const T t = copysign(T(1), zeta) / (fabs(zeta) + hypot(T(1), zeta));
  *c = T(1) / sqrt(T(1) + t * t);
  *s = *c * t;
  return true;
}

template <typename T>
KEEPLORA_HD T tolerance(int l);

template <>
KEEPLORA_HD float tolerance<float>(int l) {
  return static_cast<float>(l) * 1.1920928955078125e-07f;
}

template <>
KEEPLORA_HD double tolerance<double>(int l) {
  return static_cast<double>(l) * 2.220446049250313e-16;
}

// Sort key of a singular value: NaN sorts last so that every column gets a distinct output position.
template <typename T>
KEEPLORA_HD T sort_key(T sigma) {
  return sigma == sigma ? sigma : T(-1);
}

// Output position of column j: the number of columns with a larger key (ties broken by index).
template <typename T>
KEEPLORA_HD int output_position(const T* sigma, int l, int j) {
  const T key = sort_key(sigma[j]);
  int pos = 0;
  for (int k = 0; k < l; ++k) {
    const T other = sort_key(sigma[k]);
    pos += (other > key || (other == key && k < j)) ? 1 : 0;
  }
  return pos;
}

// Serial one-sided Jacobi SVD of one l x l column-major matrix `a`; `w` and `v` are l*l scratch arrays.
// Writes u (column-major, l x l), sigma (descending) and v_out (column-major). Zero singular values get a zero
// left vector (no arbitrary directions). Returns the number of sweeps.
template <typename T>
int svd_serial(const T* a, int l, T* w, T* v, T* sigma, int* position, T* u_out, T* sigma_out, T* v_out) {
  for (int k = 0; k < l * l; ++k) {
    w[k] = a[k];
    v[k] = T(0);
  }
  for (int j = 0; j < l; ++j) v[j * l + j] = T(1);
  const int lp = padded(l);
  const T tol = tolerance<T>(l);
  int sweep = 0;
  for (; sweep < kMaxSweeps; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < lp - 1; ++round) {
      for (int k = 0; k < lp / 2; ++k) {
        int p, q;
        pair_of(round, k, lp, &p, &q);
        if (q >= l) continue;
        T* wp = w + p * l;
        T* wq = w + q * l;
        T alpha = 0, beta = 0, gamma = 0;
        for (int i = 0; i < l; ++i) {
          alpha += wp[i] * wp[i];
          beta += wq[i] * wq[i];
          gamma += wp[i] * wq[i];
        }
        T c, s;
        if (!rotation(alpha, beta, gamma, tol, &c, &s)) continue;
        rotated = true;
        T* vp = v + p * l;
        T* vq = v + q * l;
        for (int i = 0; i < l; ++i) {
          const T x = wp[i], y = wq[i];
          wp[i] = c * x - s * y;
          wq[i] = s * x + c * y;
          const T vx = vp[i], vy = vq[i];
          vp[i] = c * vx - s * vy;
          vq[i] = s * vx + c * vy;
        }
      }
    }
    if (!rotated) break;
  }
  for (int j = 0; j < l; ++j) {
    T norm2 = 0;
    for (int i = 0; i < l; ++i) norm2 += w[j * l + i] * w[j * l + i];
    sigma[j] = sqrt(norm2);
  }
  for (int j = 0; j < l; ++j) position[j] = output_position(sigma, l, j);
  for (int j = 0; j < l; ++j) {
    const int dst = position[j];
    const T inv = sigma[j] > T(0) ? T(1) / sigma[j] : T(0);
    sigma_out[dst] = sigma[j];
    for (int i = 0; i < l; ++i) {
      u_out[dst * l + i] = w[j * l + i] * inv;
      v_out[dst * l + i] = v[j * l + i];
    }
  }
  return sweep;
}

}  // namespace jacobi
}  // namespace keeplora
