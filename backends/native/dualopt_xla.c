/* DualOpt's CPU kernels for dualopt.optax, called by XLA through its FFI (custom calls).
 *
 * Why a C file: on a model of many small tensors an XLA:CPU step costs per kernel
 * and per buffer, not per byte.  XLA compiles each tensor's Adam step into three
 * kernels (first moment, second moment, parameter); these handlers step a whole
 * group of small tensors in one call, one pass over each, and check the gradients
 * of all of them for NaN/Inf in another single call.
 *
 * The arithmetic is dualopt_kernels.h's, shared with dualopt_cpu.c: the spec's,
 * operation for operation, bitwise the core with numpy.  XLA runs compiled code with
 * subnormals flushed to zero; the handlers restore IEEE gradual underflow for their
 * own duration, as the spec (and numpy) computes.
 *
 * The tensors of a call are shared out among XLA's own intra-op threads (the FFI
 * thread pool), one tensor at a time from an atomic counter; the calling thread takes
 * tensors too, so a call never waits for a thread that has not started.
 *
 * Written against XLA's C API (xla/ffi/api/c_api.h, shipped with jaxlib), so that a
 * C compiler is all it needs.  Built on first use by dualopt/_optax_native.py, which
 * also builds the operands described at each handler.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "dualopt_kernels.h"
#include "xla/ffi/api/c_api.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* MXCSR: FTZ (bit 15) and DAZ (bit 6). */
typedef unsigned int fp_mode;
static fp_mode ieee_begin(void) {
  fp_mode saved = _mm_getcsr();
  _mm_setcsr(saved & ~((1u << 15) | (1u << 6)));
  return saved;
}
static void ieee_end(fp_mode saved) { _mm_setcsr(saved); }
#elif defined(__aarch64__)
/* FPCR: FZ (bit 24). */
typedef unsigned long fp_mode;
static fp_mode ieee_begin(void) {
  fp_mode saved;
  __asm__ volatile("mrs %0, fpcr" : "=r"(saved));
  fp_mode ieee = saved & ~(1ul << 24);
  __asm__ volatile("msr fpcr, %0" : : "r"(ieee));
  return saved;
}
static void ieee_end(fp_mode saved) { __asm__ volatile("msr fpcr, %0" : : "r"(saved)); }
#else
typedef int fp_mode;
static fp_mode ieee_begin(void) { return 0; }
static void ieee_end(fp_mode saved) { (void)saved; }
#endif

#define DUALOPT_XLA_ABI 1
int dualopt_xla_abi(void) { return DUALOPT_XLA_ABI; }

/* Coefficient columns of the table operand, one row per tensor (see dualopt_xla_adam_*). */
enum { COL_BETA1, COL_OMB1, COL_BETA2, COL_OMB2, COL_EPS, COL_STEP_SIZE, COL_INV_SQRT_BC2, COL_C, N_COLS };

static XLA_FFI_Error *metadata(XLA_FFI_CallFrame *frame) {
  XLA_FFI_Metadata_Extension *ext = (XLA_FFI_Metadata_Extension *)frame->extension_start;
  ext->metadata->api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
  ext->metadata->api_version.extension_start = NULL;
  ext->metadata->api_version.major_version = XLA_FFI_API_MAJOR;
  ext->metadata->api_version.minor_version = XLA_FFI_API_MINOR;
  ext->metadata->traits = 0;
  return NULL;
}

static XLA_FFI_Error *error(XLA_FFI_CallFrame *frame, const char *message) {
  XLA_FFI_Error_Create_Args args;
  memset(&args, 0, sizeof args);
  args.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  args.message = message;
  args.errc = XLA_FFI_Error_Code_INVALID_ARGUMENT;
  return frame->api->XLA_FFI_Error_Create(&args);
}

static int64_t numel(const XLA_FFI_Buffer *b) {
  int64_t n = 1;
  for (int64_t i = 0; i < b->rank; i++) n *= b->dims[i];
  return n;
}

/* Below this many elements in a call, threads cost more than they save. */
#define MIN_PARALLEL_ELEMENTS (1 << 15)

/* A parallel loop over `count` items.  Heap-allocated and reference counted: a task
 * that the pool starts after the loop has finished finds no item left and only
 * releases its reference; `fn` and `ctx` are touched only for claimed items, and
 * the caller returns only when every claimed item is done. */
typedef struct {
  atomic_long next, done;
  atomic_int refs;
  long count;
  void (*fn)(void *ctx, long item);
  void *ctx;
} loop;

static void release(loop *w) {
  if (atomic_fetch_sub(&w->refs, 1) == 1) free(w);
}

static void drain(loop *w) {
  long i;
  while ((i = atomic_fetch_add(&w->next, 1)) < w->count) {
    w->fn(w->ctx, i);
    atomic_fetch_add(&w->done, 1);
  }
}

static void task(void *data) {
  loop *w = (loop *)data;
  fp_mode mode = ieee_begin(); /* a pool thread has XLA's flush-to-zero mode */
  drain(w);
  ieee_end(mode);
  release(w);
}

static void destroy(XLA_FFI_CallFrame *frame, XLA_FFI_Error *e) {
  XLA_FFI_Error_Destroy_Args args;
  memset(&args, 0, sizeof args);
  args.struct_size = XLA_FFI_Error_Destroy_Args_STRUCT_SIZE;
  args.error = e;
  frame->api->XLA_FFI_Error_Destroy(&args);
}

static int64_t pool_threads(XLA_FFI_CallFrame *frame) {
  int64_t n = 0;
  XLA_FFI_ThreadPool_NumThreads_Args args;
  memset(&args, 0, sizeof args);
  args.struct_size = XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE;
  args.ctx = frame->ctx;
  args.num_threads = &n;
  XLA_FFI_Error *e = frame->api->XLA_FFI_ThreadPool_NumThreads(&args);
  if (e) {
    destroy(frame, e);
    return 0;
  }
  return n;
}

/* fn(ctx, i) for i in [0, count), on this thread and on up to count - 1 pool threads. */
static void parallel_for(XLA_FFI_CallFrame *frame, long count, int64_t elements, void (*fn)(void *, long),
                         void *ctx) {
  int64_t helpers = elements >= MIN_PARALLEL_ELEMENTS ? pool_threads(frame) : 0;
  if (helpers > count - 1) helpers = count - 1;
  loop *w = helpers > 0 ? (loop *)malloc(sizeof(loop)) : NULL;
  if (!w) {
    for (long i = 0; i < count; i++) fn(ctx, i);
    return;
  }
  atomic_init(&w->next, 0);
  atomic_init(&w->done, 0);
  atomic_init(&w->refs, (int)(1 + helpers));
  w->count = count;
  w->fn = fn;
  w->ctx = ctx;
  for (int64_t h = 0; h < helpers; h++) {
    XLA_FFI_ThreadPool_Schedule_Args args;
    memset(&args, 0, sizeof args);
    args.struct_size = XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE;
    args.ctx = frame->ctx;
    args.task = task;
    args.data = w;
    XLA_FFI_Error *e = frame->api->XLA_FFI_ThreadPool_Schedule(&args);
    if (e) {
      destroy(frame, e);
      release(w); /* this helper will never run */
    }
  }
  drain(w);
  while (atomic_load(&w->done) < count) sched_yield(); /* items claimed by running helpers */
  release(w);
}

#define ARG(i) ((XLA_FFI_Buffer *)frame->args.args[i])
#define RET(i) ((XLA_FFI_Buffer *)frame->rets.rets[i])

typedef struct {
  XLA_FFI_CallFrame *frame;
  atomic_int bad;
} scan;

static void scan_one(void *ctx, long i) {
  scan *s = (scan *)ctx;
  if (atomic_load_explicit(&s->bad, memory_order_relaxed)) return;
  XLA_FFI_CallFrame *frame = s->frame;
  const XLA_FFI_Buffer *g = ARG(i);
  int ok = g->dtype == XLA_FFI_DataType_F64 ? dualopt_finite_f64((const uint64_t *)g->data, numel(g))
                                            : dualopt_finite_f32((const uint32_t *)g->data, numel(g));
  if (!ok) atomic_store(&s->bad, 1);
}

/* dualopt_xla_all_finite: arguments are gradients (float32 or float64, any shapes); the one
 * result is an int32 scalar, 1 when every element of every gradient is finite, else 0. */
XLA_FFI_Error *dualopt_xla_all_finite(XLA_FFI_CallFrame *frame) {
  if (frame->extension_start && frame->extension_start->type == XLA_FFI_Extension_Metadata) return metadata(frame);
  if (frame->rets.size != 1 || RET(0)->dtype != XLA_FFI_DataType_S32)
    return error(frame, "dualopt_xla_all_finite: one int32 result");
  int64_t elements = 0;
  for (int64_t i = 0; i < frame->args.size; i++) {
    if (ARG(i)->dtype != XLA_FFI_DataType_F32 && ARG(i)->dtype != XLA_FFI_DataType_F64)
      return error(frame, "dualopt_xla_all_finite: float32 or float64 gradients");
    elements += numel(ARG(i));
  }
  scan s = {frame, 0};
  parallel_for(frame, (long)frame->args.size, elements, scan_one, &s);
  *(int32_t *)RET(0)->data = !atomic_load(&s.bad);
  return NULL;
}

#define STORE_UPDATE(i, x) (out[i] = (x) - p[i])
#define STORE_PARAM(i, x) (p[i] = (x))

#define ADAM_TENSOR(NAME, T, SQRT, COEFFICIENTS, STORE)                                                  \
  DUALOPT_VECTOR_CLONES static void NAME(const T *restrict p, const T *restrict g, T *restrict m,        \
                                         T *restrict v, const T *restrict a, T *restrict out, int64_t n, \
                                         const T *row, int kind) {                                       \
    const COEFFICIENTS k = {row[COL_BETA1], row[COL_OMB1],      row[COL_BETA2],         row[COL_OMB2], \
                            row[COL_EPS],   row[COL_STEP_SIZE], row[COL_INV_SQRT_BC2], row[COL_C], (T)1}; \
    DUALOPT_ADAM_STEP(T, SQRT, p, g, m, v, a, n, &k, kind, STORE);                                       \
  }

/* The new param in place of the old (its buffer is the result's). */
#define ADAM_TENSOR_IN_PLACE(NAME, T, SQRT, COEFFICIENTS)                                                   \
  DUALOPT_VECTOR_CLONES static void NAME(T *restrict p, const T *restrict g, T *restrict m, T *restrict v,  \
                                         const T *restrict a, int64_t n, const T *row, int kind) {          \
    const COEFFICIENTS k = {row[COL_BETA1], row[COL_OMB1],      row[COL_BETA2],         row[COL_OMB2],     \
                            row[COL_EPS],   row[COL_STEP_SIZE], row[COL_INV_SQRT_BC2], row[COL_C], (T)1}; \
    DUALOPT_ADAM_STEP(T, SQRT, p, g, m, v, a, n, &k, kind, STORE_PARAM);                                    \
  }

ADAM_TENSOR(adam_update_f32, float, sqrtf, dualopt_coefficients_f32, STORE_UPDATE)
ADAM_TENSOR(adam_update_f64, double, sqrt, dualopt_coefficients_f64, STORE_UPDATE)
ADAM_TENSOR_IN_PLACE(adam_param_f32, float, sqrtf, dualopt_coefficients_f32)
ADAM_TENSOR_IN_PLACE(adam_param_f64, double, sqrt, dualopt_coefficients_f64)

typedef struct {
  XLA_FFI_CallFrame *frame;
  int ok, updates, is_f64;
  const int32_t *layout;
} step;

/* Tensor t of a dualopt_xla_adam_* call (see there). */
static void step_one(void *ctx, long t) {
  const step *st = (const step *)ctx;
  XLA_FFI_CallFrame *frame = st->frame;
  const XLA_FFI_Buffer *table = ARG(1), *packed = ARG(3), *p = ARG(4 + 4 * t), *g = ARG(5 + 4 * t);
  void *m = RET(3 * t + 1)->data, *v = RET(3 * t + 2)->data, *out = RET(3 * t)->data;
  int64_t n = numel(p);
  int kind = st->layout[2 * t];
  if (n == 0) return; /* a zero-size buffer may have no memory at all */
  size_t bytes = (size_t)n * (st->is_f64 ? 8 : 4);
  /* Results that alias their arguments are normally the same buffer; where XLA chose another, copy first. */
  if (m != ARG(6 + 4 * t)->data) memcpy(m, ARG(6 + 4 * t)->data, bytes);
  if (v != ARG(7 + 4 * t)->data) memcpy(v, ARG(7 + 4 * t)->data, bytes);
  if (!st->updates && out != p->data) memcpy(out, p->data, bytes);
#define STEP_TYPED(T, SUFFIX)                                                                         \
  do {                                                                                                \
    const T *row = (const T *)table->data + t * N_COLS;                                               \
    const T *a = kind == DUALOPT_PULL_ANCHOR ? (const T *)packed->data + st->layout[2 * t + 1] : NULL; \
    if (!st->ok) {                                                                                    \
      if (st->updates)                                                                                \
        for (int64_t i = 0; i < n; i++) ((T *)out)[i] = (T)-0.0;                                      \
    } else if (st->updates) {                                                                         \
      adam_update_##SUFFIX(p->data, g->data, m, v, a, out, n, row, kind);                             \
    } else {                                                                                          \
      adam_param_##SUFFIX(out, g->data, m, v, a, n, row, kind);                                       \
    }                                                                                                 \
  } while (0)
  if (st->is_f64)
    STEP_TYPED(double, f64);
  else
    STEP_TYPED(float, f32);
#undef STEP_TYPED
}

/* One Adam step and pull for L tensors of one dtype T (float32 or float64).
 *
 * Arguments: ok (int32 scalar: 0 skips the step), table (T[L, N_COLS]: the tensor's
 * coefficients, see COL_*), layout (int32[L, 2]: the pull kind DUALOPT_PULL_* and the
 * offset of the tensor's anchor in `packed`), packed (T[K]: the packed anchors), then
 * per tensor param, grad, m, v.  Results per tensor: out, m, v, where m and v alias
 * their arguments (updated in place) and out is `new - param` (updates) or `new`
 * (params, aliasing the param: updated in place).  A skipped step leaves m and v alone
 * and writes -0.0 (updates: params keep their bits) or leaves the param (params). */
static XLA_FFI_Error *adam(XLA_FFI_CallFrame *frame, int updates) {
  if (frame->extension_start && frame->extension_start->type == XLA_FFI_Extension_Metadata) return metadata(frame);
  if (frame->args.size < 4)
    return error(frame, "dualopt_xla_adam: ok, table, layout, packed, then 4 buffers per tensor");
  const XLA_FFI_Buffer *table = ARG(1), *layout = ARG(2), *packed = ARG(3);
  int64_t count = table->rank == 2 ? table->dims[0] : -1;
  int is_f64 = table->dtype == XLA_FFI_DataType_F64;
  if (count < 0 || table->dims[1] != N_COLS || (!is_f64 && table->dtype != XLA_FFI_DataType_F32) ||
      layout->dtype != XLA_FFI_DataType_S32 || numel(layout) != 2 * count || packed->dtype != table->dtype ||
      ARG(0)->dtype != XLA_FFI_DataType_S32 || frame->args.size != 4 + 4 * count || frame->rets.size != 3 * count)
    return error(frame, "dualopt_xla_adam: operands do not match the table");
  const int32_t *lay = (const int32_t *)layout->data;
  int64_t packed_n = numel(packed), elements = 0;
  for (int64_t t = 0; t < count; t++) {
    int64_t n = numel(ARG(4 + 4 * t));
    elements += n;
    for (int j = 0; j < 4; j++)
      if (ARG(4 + 4 * t + j)->dtype != table->dtype || numel(ARG(4 + 4 * t + j)) != n)
        return error(frame, "dualopt_xla_adam: every buffer of a tensor has the table's dtype and the param's size");
    if (lay[2 * t] == DUALOPT_PULL_ANCHOR && (lay[2 * t + 1] < 0 || lay[2 * t + 1] + n > packed_n))
      return error(frame, "dualopt_xla_adam: an anchor offset is outside the packed anchors");
  }
  step st = {frame, *(const int32_t *)ARG(0)->data != 0, updates, is_f64, lay};
  fp_mode mode = ieee_begin();
  parallel_for(frame, (long)count, elements, step_one, &st);
  ieee_end(mode);
  return NULL;
}

XLA_FFI_Error *dualopt_xla_adam_updates(XLA_FFI_CallFrame *frame) { return adam(frame, 1); }
XLA_FFI_Error *dualopt_xla_adam_params(XLA_FFI_CallFrame *frame) { return adam(frame, 0); }
