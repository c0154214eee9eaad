// Shifted Cholesky factorisation and triangular inverse of one small SPD matrix: the pieces shared by the serial
// CPU twin (csrc/cpu_kernels.cpp) and the CUDA kernel (csrc/cuda/shifted_cholesky.cu), one CholeskyQR pass's
// l x l work in one call instead of a dozen library launches.
//
// For a Gram matrix G (l x l, row-major) and s = factor * tr(G) + tiny:
//   G + s I = R^T R   (R upper triangular, right-looking: pivot, scale row k, update the trailing triangle),
//   X = R^-1          (upper, right-looking from the bottom row: finalise row k, fold it into the rows above).
// Every step is a loop over independent items `first, first + stride, ...`, so the CPU runs it with (0, 1) and
// a thread block with (threadIdx.x, blockDim.x) and a barrier between steps; each element sees the same
// operations in the same order on both.
//
// Rank check: with Q' = Q R^-1 and G = Q^T Q, Q'^T Q' = R^-T G R^-1 = I - s X^T X, so column j of Q' has squared
// norm 1 - s ||X e_j||^2; below 1/2 means Q was numerically rank-deficient there (csrc/README.md, info bit 2).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace keeplora {
namespace cholesky {

constexpr int kFailed = 1;        // info bit: the factorisation met a pivot that is not positive and finite
constexpr int kRankDeficient = 2;  // info bit: a column of Q R^-1 has squared norm < 1/2

// The diagonal shift s = factor * tr(G) + tiny (tiny lets an all-zero block factor).
template <typename T>
KEEPLORA_HD T shift(const T* g, int l, T factor, T tiny) {
  T trace = 0;
  for (int i = 0; i < l; ++i) trace += g[static_cast<int64_t>(i) * l + i];
  return factor * trace + tiny;
}

// r[k][k] <- sqrt(r[k][k]); false when the pivot is not positive and finite (r is then left as it was).
template <typename T>
KEEPLORA_HD bool take_pivot(T* r, int l, int k) {
  T* p = r + static_cast<int64_t>(k) * l + k;
  const T v = *p;
  if (!(v > T(0)) || !(v - v == T(0))) return false;  // v - v is NaN for an infinite (or NaN) v
  *p = sqrt(v);
  return true;
}

// r[k][j] /= r[k][k] for j > k.
template <typename T>
KEEPLORA_HD void scale_row(T* r, int l, int k, int first, int stride) {
  T* row = r + static_cast<int64_t>(k) * l;
  const T inv = T(1) / row[k];
  for (int j = k + 1 + first; j < l; j += stride) row[j] *= inv;
}

// r[i][j] -= r[k][i] * r[k][j] for k < i <= j < l: the trailing upper triangle, items numbered row by row
// (consecutive items touch consecutive j) and walked without a division per item.
template <typename T>
KEEPLORA_HD void update_trailing(T* r, int l, int k, int first, int stride) {
  const T* row_k = r + static_cast<int64_t>(k) * l;
  if (stride == 1 && first == 0) {  // serial: the same items in the same order, as plain loops (vectorised)
    for (int i = k + 1; i < l; ++i) {
      T* row_i = r + static_cast<int64_t>(i) * l;
      const T f = row_k[i];
      for (int j = i; j < l; ++j) row_i[j] -= f * row_k[j];
    }
    return;
  }
  int i = k + 1, j = k + 1 + first;
  while (i < l && j >= l) j -= l - ++i;  // row i holds columns i .. l-1
  while (i < l) {
    r[static_cast<int64_t>(i) * l + j] -= row_k[i] * row_k[j];
    j += stride;
    while (i < l && j >= l) j -= l - ++i;
  }
}

// Strict lower triangle of r set to zero (it held G's entries).
template <typename T>
KEEPLORA_HD void zero_lower(T* r, int l, int first, int stride) {
  for (int item = first; item < l * l; item += stride) {
    if (item / l > item % l) r[item] = T(0);
  }
}

// Inverse, step k (k = l-1 down to 0), part 1: row k of X is final. x[k][c] holds sum_{k' > k} r[k][k'] x[k'][c]
// (zero for c = k); x[k][c] <- (delta_kc - x[k][c]) / r[k][k] for c >= k.
template <typename T>
KEEPLORA_HD void finalise_inverse_row(const T* r, T* x, int l, int k, int first, int stride) {
  const T inv = T(1) / r[static_cast<int64_t>(k) * l + k];
  T* row = x + static_cast<int64_t>(k) * l;
  for (int c = k + first; c < l; c += stride) row[c] = ((c == k ? T(1) : T(0)) - row[c]) * inv;
}

// Inverse, step k, part 2: x[i][c] += r[i][k] * x[k][c] for i < k <= c (items row by row, no division per item).
template <typename T>
KEEPLORA_HD void fold_inverse_row(const T* r, T* x, int l, int k, int first, int stride) {
  const int width = l - k;
  const T* row_k = x + static_cast<int64_t>(k) * l;
  if (stride == 1 && first == 0) {  // serial: the same items in the same order, as plain loops (vectorised)
    for (int i = 0; i < k; ++i) {
      T* row_i = x + static_cast<int64_t>(i) * l;
      const T f = r[static_cast<int64_t>(i) * l + k];
      for (int c = k; c < l; ++c) row_i[c] += f * row_k[c];
    }
    return;
  }
  int i = 0, c = k + first;
  while (i < k && c >= l) {
    c -= width;
    ++i;
  }
  while (i < k) {
    x[static_cast<int64_t>(i) * l + c] += r[static_cast<int64_t>(i) * l + k] * row_k[c];
    c += stride;
    while (i < k && c >= l) {
      c -= width;
      ++i;
    }
  }
}

// Whether column c of Q R^-1 keeps squared norm >= 1/2 (see the header comment).
template <typename T>
KEEPLORA_HD bool column_kept(const T* x, int l, int c, T s) {
  T norm2 = 0;
  for (int i = 0; i <= c; ++i) norm2 += x[static_cast<int64_t>(i) * l + c] * x[static_cast<int64_t>(i) * l + c];
  return T(1) - s * norm2 >= T(0.5);
}

// The identity (r and x both), used when the factorisation failed: the pass then leaves Q unchanged (flagged).
template <typename T>
KEEPLORA_HD void set_identity(T* r, T* x, int l, int first, int stride) {
  for (int item = first; item < l * l; item += stride) {
    const T v = item / l == item % l ? T(1) : T(0);
    r[item] = v;
    x[item] = v;
  }
}

// Serial version of one matrix (the CPU twin): r, x outputs (l x l row-major); returns the info bits.
template <typename T>
int factor_serial(const T* g, int l, T factor, T tiny, bool check_rank, T* r, T* x) {
  const int64_t ll = static_cast<int64_t>(l) * l;
  for (int64_t e = 0; e < ll; ++e) {
    r[e] = g[e];
    x[e] = T(0);
  }
  const T s = shift(g, l, factor, tiny);
  for (int i = 0; i < l; ++i) r[static_cast<int64_t>(i) * l + i] += s;
  for (int k = 0; k < l; ++k) {
    if (!take_pivot(r, l, k)) {
      set_identity(r, x, l, 0, 1);
      return kFailed;
    }
    scale_row(r, l, k, 0, 1);
    update_trailing(r, l, k, 0, 1);
  }
  zero_lower(r, l, 0, 1);
  for (int k = l - 1; k >= 0; --k) {
    finalise_inverse_row(r, x, l, k, 0, 1);
    fold_inverse_row(r, x, l, k, 0, 1);
  }
  int info = 0;
  if (check_rank) {
    for (int c = 0; c < l; ++c) {
      if (!column_kept(x, l, c, s)) info |= kRankDeficient;
    }
  }
  return info;
}

}  // namespace cholesky
}  // namespace keeplora
