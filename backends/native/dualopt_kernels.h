/* The spec's Adam step and pull on one contiguous range, shared by both C front ends:
 * dualopt_cpu.c (torch, through ctypes) and dualopt_xla.c (JAX, through XLA's FFI).
 *
 * The arithmetic is decoupled_core.rule.adam_pre_weight followed by pull, operation
 * for operation, in the range's dtype, with every coefficient already rounded to that
 * dtype by the caller.  Compiled with -ffp-contract=off (no FMA contraction) and
 * without -ffast-math, every operation is one correctly rounded IEEE operation, so
 * the result equals the core evaluated with numpy bit for bit.  -fno-math-errno only
 * lets sqrt vectorise (a negative argument cannot occur: v >= 0).
 *
 * One loop per pull kind, so that the compiler vectorises each without a branch in
 * the body.  The kind is the caller's: DUALOPT_PULL_NONE only where the spec skips
 * the pull (a coefficient known to be 0 before the step; c * (pre - a) could be NaN).
 */
#ifndef DUALOPT_KERNELS_H
#define DUALOPT_KERNELS_H

#include <math.h>
#include <stdint.h>

enum { DUALOPT_PULL_NONE = 0, DUALOPT_PULL_ZERO = 1, DUALOPT_PULL_ANCHOR = 2 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* AVX2 where the CPU has it, chosen at load time: wider vectors, same IEEE results. */
#define DUALOPT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DUALOPT_VECTOR_CLONES
#endif

/* The coefficients of one step in the range's dtype T. */
#define DUALOPT_COEFFICIENTS(T) \
  struct {                      \
    T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2, c, sign; \
  }

typedef DUALOPT_COEFFICIENTS(float) dualopt_coefficients_f32;
typedef DUALOPT_COEFFICIENTS(double) dualopt_coefficients_f64;

/* m, v <- the new moments; STORE(i, new_theta) writes the result (in place, or elsewhere).
 * sign is +1, or -1 to maximise (exact: the gradient of the minimised objective). */
#define DUALOPT_ADAM_STEP(T, SQRT, p, g, m, v, a, n, k, kind, STORE)                   \
  do {                                                                                \
    const T b1 = (k)->beta1, omb1 = (k)->one_minus_beta1, b2 = (k)->beta2,            \
            omb2 = (k)->one_minus_beta2, eps = (k)->eps, ss = (k)->step_size,         \
            ib = (k)->inv_sqrt_bc2, c = (k)->c, sign = (k)->sign;                     \
    if ((kind) == DUALOPT_PULL_NONE) {                                                \
      for (int64_t i = 0; i < (n); i++) {                                             \
        DUALOPT_ADAM_PRE(T, SQRT);                                                    \
        STORE(i, pre);                                                                \
      }                                                                               \
    } else if ((kind) == DUALOPT_PULL_ANCHOR) {                                       \
      for (int64_t i = 0; i < (n); i++) {                                             \
        DUALOPT_ADAM_PRE(T, SQRT);                                                    \
        STORE(i, pre - c * (pre - (a)[i]));                                           \
      }                                                                               \
    } else {                                                                          \
      for (int64_t i = 0; i < (n); i++) {                                             \
        DUALOPT_ADAM_PRE(T, SQRT);                                                    \
        STORE(i, pre - c * pre);                                                      \
      }                                                                               \
    }                                                                                 \
  } while (0)

/* One element: the moments (written back) and the pre-weight `pre`, reading p[i] before any store. */
#define DUALOPT_ADAM_PRE(T, SQRT)                                \
  T gi = sign * g[i];                                            \
  T mi = b1 * m[i] + omb1 * gi;                                  \
  T vi = b2 * v[i] + omb2 * (gi * gi);                           \
  T pre = p[i] - ss * (mi / (SQRT(vi) * ib + eps));              \
  m[i] = mi;                                                     \
  v[i] = vi

/* A value is non-finite iff its exponent bits are all ones; the OR-reduction vectorises. */
DUALOPT_VECTOR_CLONES static int dualopt_finite_f32(const uint32_t *restrict x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; i++) bad |= (uint32_t)((x[i] & 0x7f800000u) == 0x7f800000u);
  return bad == 0;
}

DUALOPT_VECTOR_CLONES static int dualopt_finite_f64(const uint64_t *restrict x, int64_t n) {
  uint64_t bad = 0;
  for (int64_t i = 0; i < n; i++) bad |= (uint64_t)((x[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
  return bad == 0;
}

#endif
