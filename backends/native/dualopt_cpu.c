/* DualOpt's CPU kernel for dualopt.torch: the spec's Adam step and pull in one pass over memory.
 *
 * Why a C file: the finetune step reads one more tensor (the anchor) than AdamW;
 * torch has no fused kernel that can also read it, and a second multi-tensor pass
 * costs 12 more bytes per element (1.4x AdamW instead of 32/28 = 1.14x).  Measured
 * on the ViT-B-like set, the kernel makes the finetune step about a quarter faster
 * than the same adapter without it (benchmarks/step_cost_torch.py prints both).
 *
 * The arithmetic is decoupled_core.rule.adam_pre_weight followed by pull, operation
 * for operation, in the tensor's dtype, with every coefficient rounded once from the
 * caller's float64 to that dtype.  Compiled with -ffp-contract=off (no FMA contraction)
 * and without -ffast-math, every operation is one correctly rounded IEEE operation, so
 * the result equals the core evaluated with numpy bit for bit.  -fno-math-errno only
 * lets sqrt vectorise (a negative argument cannot occur: v >= 0).
 *
 * Built on first use by dualopt/_native_build.py (with -fopenmp where the compiler has it)
 * and called through ctypes by dualopt/_torch_native.py, which checks the dtype, device,
 * contiguity and size of every operand first: this file trusts its pointers and counts.
 * The GIL is released while the kernel runs.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* One loop per pull kind, so that the compiler vectorises each without a branch in
 * the body.  DUALOPT_PULL_NONE only where the spec skips the pull (a coefficient
 * known to be 0 before the step; c * (pre - a) could be NaN). */
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

/* m, v <- the new moments; STORE(i, new_theta) writes the parameter.
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

#define DUALOPT_NATIVE_ABI 1
#define MAX_THREADS 64
/* Below this many elements per thread a thread costs more than it saves. */
#define MIN_PER_THREAD (1 << 16)

int dualopt_abi(void) { return DUALOPT_NATIVE_ABI; }

/* Host coefficients of one step, as the core names them. */
typedef struct {
  double beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2;
} adam_coefficients;

#define STORE_IN_PLACE(i, x) (p[i] = (x))

#define ADAM_PULL_RANGE(NAME, T, SQRT, COEFFICIENTS)                                              \
  DUALOPT_VECTOR_CLONES static void NAME(T *restrict p, const T *restrict g, T *restrict m,        \
                                         T *restrict v, const T *restrict a, int64_t n,            \
                                         const adam_coefficients *h, T c, int negate) {            \
    const COEFFICIENTS k = {(T)h->beta1, (T)h->one_minus_beta1, (T)h->beta2, (T)h->one_minus_beta2, \
                            (T)h->eps, (T)h->step_size, (T)h->inv_sqrt_bc2, c, negate ? (T)-1 : (T)1}; \
    int kind = c == (T)0 ? DUALOPT_PULL_NONE : a ? DUALOPT_PULL_ANCHOR : DUALOPT_PULL_ZERO;         \
    DUALOPT_ADAM_STEP(T, SQRT, p, g, m, v, a, n, &k, kind, STORE_IN_PLACE);                        \
  }

ADAM_PULL_RANGE(adam_pull_f64_range, double, sqrt, dualopt_coefficients_f64)
ADAM_PULL_RANGE(adam_pull_f32_range, float, sqrtf, dualopt_coefficients_f32)

/* The tensors of one call seen as one concatenated range [0, total); a job is a slice of it. */
typedef struct {
  void *const *p, *const *g, *const *m, *const *v, *const *a;
  const int64_t *n;
  const double *c;
  int64_t count, lo, hi;
  const adam_coefficients *k;
  int negate, is_f64;
} job;

static void *adam_pull_job(void *arg) {
  job *j = (job *)arg;
  int64_t start = 0;
  for (int64_t t = 0; t < j->count && start < j->hi; t++) {
    int64_t end = start + j->n[t], lo = j->lo > start ? j->lo : start, hi = j->hi < end ? j->hi : end;
    if (lo < hi) {
      int64_t o = lo - start, len = hi - lo;
      if (j->is_f64) {
        double *const *p = (double *const *)j->p;
        adam_pull_f64_range(p[t] + o, (const double *)j->g[t] + o, (double *)j->m[t] + o, (double *)j->v[t] + o,
                            j->a ? (const double *)j->a[t] + o : NULL, len, j->k, (double)j->c[t], j->negate);
      } else {
        float *const *p = (float *const *)j->p;
        adam_pull_f32_range(p[t] + o, (const float *)j->g[t] + o, (float *)j->m[t] + o, (float *)j->v[t] + o,
                            j->a ? (const float *)j->a[t] + o : NULL, len, j->k, (float)j->c[t], j->negate);
      }
    }
    start = end;
  }
  return NULL;
}

/* Split [0, total) into equal slices and run fn on each, one per thread.
 * Threads come from OpenMP: the loader links this file against the libgomp torch has
 * loaded, so the kernels share torch's thread pool instead of competing with its
 * spinning workers for the cores.  Without OpenMP the slices run one after another. */
static void run_jobs(job *proto, int64_t total, int threads, void *(*fn)(void *), job *jobs) {
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if ((int64_t)threads * MIN_PER_THREAD > total) threads = (int)(total / MIN_PER_THREAD);
  if (threads < 1) threads = 1;
  int64_t slice = (total + threads - 1) / threads;
  slice = (slice + 63) & ~(int64_t)63; /* slices start on 64-element boundaries */
  for (int i = 0; i < threads; i++) {
    jobs[i] = *proto;
    jobs[i].lo = (int64_t)i * slice < total ? (int64_t)i * slice : total;
    jobs[i].hi = (int64_t)(i + 1) * slice < total ? (int64_t)(i + 1) * slice : total;
  }
  if (threads == 1) {
    fn(&jobs[0]);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int i = 0; i < threads; i++) fn(&jobs[i]);
}

static int64_t total_of(const int64_t *n, int64_t count) {
  int64_t total = 0;
  for (int64_t t = 0; t < count; t++) total += n[t];
  return total;
}

/* One Adam step and pull for `count` contiguous tensors of one dtype, in place.
 * a == NULL: scratch (anchor 0); otherwise a[t] is tensor t's anchor.  c[t] is
 * tensor t's pull coefficient (host float64, rounded here to the dtype). */
void dualopt_adam_pull(void *const *p, void *const *g, void *const *m, void *const *v, void *const *a,
                       const int64_t *n, const double *c, int64_t count, const adam_coefficients *k,
                       int negate, int is_f64, int threads) {
  job proto = {p, g, m, v, a, n, c, count, 0, 0, k, negate, is_f64};
  job jobs[MAX_THREADS];
  run_jobs(&proto, total_of(n, count), threads, adam_pull_job, jobs);
}
