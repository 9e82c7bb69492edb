/* Fused mixed-task LoRA branch for the CPU torch engine (fp32, AVX-512):

       y[b, t, :] += (x[b, t, :] @ A[s]^T) @ B[s]    for t < len[b], s = slot[b] != 0

   Why not gather + bmm in torch: that copies every row's A/B out of the slot buffers (43 MB per
   batch of 32 on MiniLM) and runs over padded tokens too (about half the tokens of an SST-2 batch).
   Here each row reads its slot in place, only its real tokens, and x/y are touched while hot.
   Built at run time by runtime/native/lora_kernel.py (gcc -O3 -march=native -fopenmp); it shares torch's
   OpenMP runtime (same soname), so it uses the same threads as the base matmuls. */
#include <math.h>
#include <stdint.h>
#include <immintrin.h>

#include "varlen_attention.c"

#ifndef __AVX512F__
#error "adapterserve fused LoRA kernel needs AVX-512F (falls back to the torch path)"
#endif

#define MAX_R 64
/* lora_tokens also serves wide slots (slot_layers.SlotLoRALinear._add_wide: ranks up to 256) */
#define TOKEN_MAX_R 256

/* nt = 1 or 2 tokens at once (a compile-time constant after inlining): two tokens share every A/B load. */
static inline __attribute__((always_inline)) void
lora_tokens(const int nt, const float *x0, const float *x1, float *y0, float *y1,
            int64_t din, int64_t dout, const float *As, const float *Bs, int64_t r8)
{
    float xa[2][TOKEN_MAX_R];
    for (int64_t jc = 0; jc < r8; jc += 8) {
        __m512 acc0[8], acc1[8];
        for (int j = 0; j < 8; j++) { acc0[j] = _mm512_setzero_ps(); acc1[j] = _mm512_setzero_ps(); }
        for (int64_t k = 0; k < din; k += 16) {
            __m512 xv0 = _mm512_loadu_ps(x0 + k);
            __m512 xv1 = nt == 2 ? _mm512_loadu_ps(x1 + k) : xv0;
            for (int j = 0; j < 8; j++) {
                __m512 a = _mm512_loadu_ps(As + (jc + j) * din + k);
                acc0[j] = _mm512_fmadd_ps(xv0, a, acc0[j]);
                if (nt == 2) acc1[j] = _mm512_fmadd_ps(xv1, a, acc1[j]);
            }
        }
        for (int j = 0; j < 8; j++) {
            xa[0][jc + j] = _mm512_reduce_add_ps(acc0[j]);
            if (nt == 2) xa[1][jc + j] = _mm512_reduce_add_ps(acc1[j]);
        }
    }
    for (int64_t n = 0; n < dout; n += 16) {
        __m512 yv0 = _mm512_loadu_ps(y0 + n);
        __m512 yv1 = nt == 2 ? _mm512_loadu_ps(y1 + n) : yv0;
        for (int64_t j = 0; j < r8; j++) {
            __m512 b = _mm512_loadu_ps(Bs + j * dout + n);
            yv0 = _mm512_fmadd_ps(_mm512_set1_ps(xa[0][j]), b, yv0);
            if (nt == 2) yv1 = _mm512_fmadd_ps(_mm512_set1_ps(xa[1][j]), b, yv1);
        }
        _mm512_storeu_ps(y0 + n, yv0);
        if (nt == 2) _mm512_storeu_ps(y1 + n, yv1);
    }
}

static inline __mmask16 lanes_below(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }

/* LoKr above r_max (runtime/engine/slot_layers.py KronForm), for one token:

       y += vec(W1 · X · W2ᵀ)

   X is the token's input as [in_m, in_n] row-major, the layout of kron(W1, W2) (W1 [out_l, in_m], W2
   [out_k, in_n]) acting on it. W2ᵀ is given as P [in_n, k] times Q [k, out_k] (W2 a low-rank pair), or
   as P alone [in_n, out_k] (k = 0). params: the slot's factors as 8 int64s: W1 (its scaling folded
   in), P, Q, out_l, out_k, in_m, in_n, k; in_m * max(k, out_k) at most KRON_MAX. Three small products:
   Z1 = X P, Z = Z1 Q, then y += W1 Z (W1 Z summed apart, then added, as y += ΔW x). */
#define KRON_MAX 8192

/* C[m, :N] (+)= A[m, :K] B[:K, :N] for nr rows (1..8) from row m0 of A and C, columns n0 .. n0 + w
   (w <= 16 nv), rows lda / ldb / ldc floats apart: nr · nv accumulators, each B load shared by the nr
   rows. add: C's own values are added after the sum. nv and nr are compile-time constants once inlined. */
static inline __attribute__((always_inline)) void
kron_gemm_rows(const int nv, const int nr, int64_t K, int64_t n0, int64_t w, const float *a, int64_t lda,
               const float *b, int64_t ldb, float *c, int64_t ldc, int add)
{
    const __mmask16 m0 = lanes_below(w), m1 = nv == 2 ? lanes_below(w - 16) : 0;
    __m512 acc0[8], acc1[8];
    for (int r = 0; r < nr; r++) { acc0[r] = _mm512_setzero_ps(); acc1[r] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < K; k++) {
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + k * ldb + n0);
        const __m512 b1 = nv == 2 ? _mm512_maskz_loadu_ps(m1, b + k * ldb + n0 + 16) : b0;
        for (int r = 0; r < nr; r++) {
            const __m512 av = _mm512_set1_ps(a[r * lda + k]);
            acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
            if (nv == 2) acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        float *cr = c + r * ldc + n0;
        if (add) acc0[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, cr), acc0[r]);
        _mm512_mask_storeu_ps(cr, m0, acc0[r]);
        if (nv == 2) {
            if (add) acc1[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, cr + 16), acc1[r]);
            _mm512_mask_storeu_ps(cr + 16, m1, acc1[r]);
        }
    }
}

static inline __attribute__((always_inline)) void
kron_gemm_block(const int nv, int64_t M, int64_t K, int64_t n0, int64_t w, const float *a, int64_t lda,
                const float *b, int64_t ldb, float *c, int64_t ldc, int add)
{
    int64_t m = 0;
    if (nv == 1)  /* 8 rows: 8 sums in flight, as the 2-vector blocks of 4 rows have */
        for (; m + 8 <= M; m += 8)
            kron_gemm_rows(1, 8, K, n0, w, a + m * lda, lda, b, ldb, c + m * ldc, ldc, add);
    for (; m + 4 <= M; m += 4)
        kron_gemm_rows(nv, 4, K, n0, w, a + m * lda, lda, b, ldb, c + m * ldc, ldc, add);
    for (; m < M; m++)
        kron_gemm_rows(nv, 1, K, n0, w, a + m * lda, lda, b, ldb, c + m * ldc, ldc, add);
}

static void kron_gemm(int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, const float *b, int64_t ldb,
                      float *c, int64_t ldc, int add)
{
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
        const int64_t w = N - n0;
        if (w > 16)
            kron_gemm_block(2, M, K, n0, w, a, lda, b, ldb, c, ldc, add);
        else
            kron_gemm_block(1, M, K, n0, w, a, lda, b, ldb, c, ldc, add);
    }
}

static void kron_token(const float *x, float *y, const int64_t *params, float *z1, float *z2)
{
    const float *W1 = (const float *)params[0], *P = (const float *)params[1], *Q = (const float *)params[2];
    const int64_t out_l = params[3], out_k = params[4], in_m = params[5], in_n = params[6], k = params[7];
    const int64_t kk = k ? k : out_k;
    kron_gemm(in_m, kk, in_n, x, in_n, P, kk, z1, kk, 0);
    if (k)
        kron_gemm(in_m, out_k, k, z1, k, Q, out_k, z2, out_k, 0);
    kron_gemm(out_l, out_k, in_m, W1, in_m, k ? z2 : z1, out_k, y, out_k, 1);
}

int lora_kernel_abi(void) { return 8; }

/* Everything one call needs; each row is independent (the ONNX Runtime op runs rows on ORT's pool). */
typedef struct {
    const float *x; int64_t x_row, x_tok;
    float *y; int64_t y_row, y_tok;
    int64_t T, din, dout;
    const float *A, *B; int64_t r_max;
    const int64_t *slot_r8, *slot, *len;
    /* Token-packed rows (the packed ONNX graph, the torch engine's packed forward): row b is tokens offsets[b] .. offsets[b+1]-1 of one
       [N, d] sequence of tokens; x_row, y_row, T and len are unused. NULL: rows of T tokens each. */
    const int64_t *offsets;
    /* LoKr above r_max: [slots][8] each slot's kron_token params, out_l (index 3) 0 where it has none
       in this layer; NULL: none at all. */
    const int64_t *kron;
} LoraArgs;

/* Row b's first x and y token and its token count (its real length, or its span of packed tokens). */
static int64_t row_tokens(const LoraArgs *p, int64_t b, const float **xb, float **yb)
{
    if (p->offsets) {
        *xb = p->x + p->offsets[b] * p->x_tok;
        *yb = p->y + p->offsets[b] * p->y_tok;
        return p->offsets[b + 1] - p->offsets[b];
    }
    *xb = p->x + b * p->x_row;
    *yb = p->y + b * p->y_row;
    return (p->len && p->len[b] < p->T) ? p->len[b] : p->T;
}

/* Per-feature vectors of a slot (slot_layers.SlotLoRALinear's out_scale / out_shift / vector_flags:
   IA3, DoRA, trained biases): which ones a slot sets. */
enum { VEC_IN = 1, VEC_SCALE = 2, VEC_SHIFT = 4 };

/* n tokens of d floats, ld apart: y = y * scale, then y + shift (either may be NULL), as the torch
   path's two in-place ops. */
static void scale_shift_tokens(float *y, int64_t ld, int64_t n, int64_t d, const float *scale, const float *shift)
{
    for (int64_t t = 0; t < n; t++, y += ld) {
        if (scale)
            for (int64_t i = 0; i < d; i++)
                y[i] *= scale[i];
        if (shift)
            for (int64_t i = 0; i < d; i++)
                y[i] += shift[i];
    }
}

/* Row b's output scale and shift where its slot's flags say, after its delta, over every position of
   the row (padding included, as the torch path's broadcast) or its packed tokens. */
static void row_out_vectors(const LoraArgs *p, int64_t b, const float *scale, const float *shift, const int64_t *flags)
{
    const int64_t s = p->slot[b], f = flags[s];
    if (!(f & (VEC_SCALE | VEC_SHIFT)))
        return;
    float *yb;
    int64_t n;
    if (p->offsets) {
        yb = p->y + p->offsets[b] * p->y_tok;
        n = p->offsets[b + 1] - p->offsets[b];
    } else {
        yb = p->y + b * p->y_row;
        n = p->T;
    }
    scale_shift_tokens(yb, p->y_tok, n, p->dout, f & VEC_SCALE ? scale + s * p->dout : NULL,
                       f & VEC_SHIFT ? shift + s * p->dout : NULL);
}

/* Row b's tokens through its slot's LoKr factors (lora_row). */
static void kron_row(const LoraArgs *p, int64_t b, const int64_t *params)
{
    float z1[KRON_MAX], z2[KRON_MAX];
    const float *xb;
    float *yb;
    const int64_t n_tok = row_tokens(p, b, &xb, &yb);
    for (int64_t t = 0; t < n_tok; t++)
        kron_token(xb + t * p->x_tok, yb + t * p->y_tok, params, z1, z2);
}

static void lora_row(const LoraArgs *p, int64_t b)
{
    const int64_t s = p->slot[b];
    if (s == 0) return;
    if (p->kron && p->kron[8 * s + 3])
        kron_row(p, b, p->kron + 8 * s);
    const int64_t r8 = p->slot_r8[s];
    if (r8 == 0) return;
    const float *As = p->A + s * p->r_max * p->din;
    const float *Bs = p->B + s * p->r_max * p->dout;
    const float *xb;
    float *yb;
    int64_t n_tok = row_tokens(p, b, &xb, &yb), t = 0;
    int64_t xt = p->x_tok, yt = p->y_tok;
    for (; t + 1 < n_tok; t += 2)
        lora_tokens(2, xb + t * xt, xb + (t + 1) * xt, yb + t * yt, yb + (t + 1) * yt, p->din, p->dout, As, Bs, r8);
    if (t < n_tok)
        lora_tokens(1, xb + t * xt, xb + t * xt, yb + t * yt, yb + t * yt, p->din, p->dout, As, Bs, r8);
}

/* x: rows x T tokens of din floats (strides in floats; the feature dim is contiguous), y likewise
   with dout. A: [slots, r_max, din], B: [slots, r_max, dout], contiguous, scaling folded into B,
   zero past each adapter's rank. din, dout multiples of 16. slot_r8[s]: slot s's rank in this layer
   rounded up to 8 (<= r_max <= MAX_R), 0 when its adapter does not touch the layer: every row pays
   only for its own adapter's rank. len may be NULL: every one of the T positions counts.
   scale, shift [slots, dout] and flags [slots]: each slot's output vectors, applied after the delta;
   flags NULL: none. kron [slots][8]: each slot's LoKr factors (LoraArgs.kron), or NULL. */
void lora_rows(const float *x, int64_t x_row, int64_t x_tok, float *y, int64_t y_row, int64_t y_tok,
               int64_t rows, int64_t T, int64_t din, int64_t dout,
               const float *A, const float *B, int64_t r_max, const int64_t *slot_r8,
               const int64_t *slot, const int64_t *len, const float *scale, const float *shift,
               const int64_t *flags, const int64_t *kron, int nthreads)
{
    LoraArgs p = {x, x_row, x_tok, y, y_row, y_tok, T, din, dout, A, B, r_max, slot_r8, slot, len, NULL, kron};
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t b = 0; b < rows; b++) {
        lora_row(&p, b);
        if (flags)
            row_out_vectors(&p, b, scale, shift, flags);
    }
}

/* Token-packed rows (the torch engine's packed forward): x [N, din], y [N, dout] with token strides
   x_tok, y_tok; row b is tokens offsets[b] .. offsets[b+1]-1. */
void lora_rows_packed(const float *x, int64_t x_tok, float *y, int64_t y_tok, int64_t rows, int64_t din,
                      int64_t dout, const float *A, const float *B, int64_t r_max, const int64_t *slot_r8,
                      const int64_t *slot, const int64_t *offsets, const float *scale, const float *shift,
                      const int64_t *flags, const int64_t *kron, int nthreads)
{
    LoraArgs p = {x, 0, x_tok, y, 0, y_tok, 0, din, dout, A, B, r_max, slot_r8, slot, NULL, offsets, kron};
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t b = 0; b < rows; b++) {
        lora_row(&p, b);
        if (flags)
            row_out_vectors(&p, b, scale, shift, flags);
    }
}

/* AdapterHub bottleneck adapters whose effect adds to their rows (runtime/engine/slot_bottlenecks.py
   adds_before_norm, no norm of their own), in place over runs of tokens:

       y[t, :] += act(src[t, :] Wd^T + bd) Wu + bu      for t in run_start[i] .. run_end[i] - 1

   src is y itself for a sequential adapter (each token's down projection is made before its row of y
   is written) or the sublayer's input for a parallel one. x and y: [tokens, d] with row stride ld, d a
   multiple of 16. params[i]: the run's adapter as 6 int64s: Wd [r, d], bd [r], Wu [r, d] (transposed,
   its scaling folded in), bu [d] (scaled), r <= BN_MAX_R, activation (0 relu, 1 swish, 2 exact gelu). */
#define BN_MAX_R 256
static inline float bn_activation(float v, int64_t act)
{
    if (act == 0) return v > 0.0f ? v : 0.0f;
    if (act == 1) return v / (1.0f + expf(-v));
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

void bottleneck_runs(float *y, const float *src, int64_t ld, int64_t src_ld, int64_t d, int64_t runs,
                     const int64_t *run_start, const int64_t *run_end, const int64_t *params, int nthreads)
{
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t i = 0; i < runs; i++) {
        const int64_t *p = params + 6 * i;
        const float *Wd = (const float *)p[0], *bd = (const float *)p[1], *Wu = (const float *)p[2],
                    *bu = (const float *)p[3];
        const int64_t r = p[4], act = p[5];
        float h[BN_MAX_R];
        for (int64_t t = run_start[i]; t < run_end[i]; t++) {
            const float *xs = src + t * src_ld;
            float *yt = y + t * ld;
            int64_t j = 0;
            for (; j + 4 <= r; j += 4) {  /* four independent sums in flight */
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t k = 0; k < d; k += 16) {
                    __m512 xv = _mm512_loadu_ps(xs + k);
                    a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(Wd + (j + 0) * d + k), a0);
                    a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(Wd + (j + 1) * d + k), a1);
                    a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(Wd + (j + 2) * d + k), a2);
                    a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(Wd + (j + 3) * d + k), a3);
                }
                h[j] = _mm512_reduce_add_ps(a0) + bd[j];
                h[j + 1] = _mm512_reduce_add_ps(a1) + bd[j + 1];
                h[j + 2] = _mm512_reduce_add_ps(a2) + bd[j + 2];
                h[j + 3] = _mm512_reduce_add_ps(a3) + bd[j + 3];
            }
            for (; j < r; j++) {
                __m512 a0 = _mm512_setzero_ps();
                for (int64_t k = 0; k < d; k += 16)
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + k), _mm512_loadu_ps(Wd + j * d + k), a0);
                h[j] = _mm512_reduce_add_ps(a0) + bd[j];
            }
            for (j = 0; j < r; j++) h[j] = bn_activation(h[j], act);
            for (int64_t c = 0; c < d; c += 16) {
                __m512 acc = _mm512_loadu_ps(bu + c);
                for (j = 0; j < r; j++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(h[j]), _mm512_loadu_ps(Wu + j * d + c), acc);
                _mm512_storeu_ps(yt + c, _mm512_add_ps(_mm512_loadu_ps(yt + c), acc));
            }
        }
    }
}

/* exp(x) for x <= 0 (softmax after subtracting the row's max), 16 lanes: Cephes' expf reduction and
   polynomial (relative error ~1e-7, below float32's rounding of the probabilities it feeds), with
   2^n applied by scalef, so underflow goes to 0 through the denormals as expf does. */
static inline __m512 exp_nonpositive(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}


/* Logits of labels j .. j + nl - 1 for nr rows (each 1 to 4; constants after inlining): nr * nl
   independent accumulators, so the products are not one chain of dependent FMAs, and each weight
   load serves nr rows. Each dot product is summed as the
   plain loop would: 16 lanes over hidden, then the lanes. */
static inline __attribute__((always_inline)) void
head_block(const int nr, const int nl, const float *const *x, const float *w, int64_t j, int64_t hidden,
           int64_t full, __mmask16 tail, const float *b, float *const *y)
{
    __m512 acc[4][4];
    for (int r = 0; r < nr; r++)
        for (int l = 0; l < nl; l++)
            acc[r][l] = _mm512_setzero_ps();
    for (int64_t h = 0; h < full; h += 16) {
        __m512 xv[4];
        for (int r = 0; r < nr; r++)
            xv[r] = _mm512_loadu_ps(x[r] + h);
        for (int l = 0; l < nl; l++) {
            const __m512 wv = _mm512_loadu_ps(w + (j + l) * hidden + h);
            for (int r = 0; r < nr; r++)
                acc[r][l] = _mm512_fmadd_ps(xv[r], wv, acc[r][l]);
        }
    }
    if (tail) {
        __m512 xv[4];
        for (int r = 0; r < nr; r++)
            xv[r] = _mm512_maskz_loadu_ps(tail, x[r] + full);
        for (int l = 0; l < nl; l++) {
            const __m512 wv = _mm512_maskz_loadu_ps(tail, w + (j + l) * hidden + full);
            for (int r = 0; r < nr; r++)
                acc[r][l] = _mm512_fmadd_ps(xv[r], wv, acc[r][l]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int l = 0; l < nl; l++)
            y[r][j + l] = _mm512_reduce_add_ps(acc[r][l]) + b[j + l];
}

/* Softmax of one row's n logits into p (then zeros up to width); the logits past n are zeroed too. */
static void row_softmax(float *y, float *p, int64_t n, int64_t width)
{
    for (int64_t j = n; j < width; j++)
        y[j] = p[j] = 0.0f;
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes_below(n - j);
        top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, y + j));
    }
    const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes_below(n - j);
        const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, y + j), most)));
        _mm512_mask_storeu_ps(p + j, m, e);
        sum = _mm512_add_ps(sum, e);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes_below(n - j);
        _mm512_mask_storeu_ps(p + j, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, p + j), total));
    }
}

/* Per-task linear heads and softmax over a batch's features (runtime/heads.py on the CPU), one call
   for the batch: every numpy step it replaces (a product per task, a mask, a softmax) cost a few
   microseconds of dispatch, most of a 32-row batch's host work.
   task_of_row[rows]: each row's head; heads[tasks][3]: the address of its W [n, hidden] (row-major,
   float32), of its bias [n], and n. Rows are visited grouped by head (a counting sort into order,
   bounds: scratch of rows and tasks + 1), and four rows of a head share each read of its weights. Writes
   logits[row, :width] (W f + b for j < n, then 0) and probs[row, :width] (softmax over the first n,
   then 0). Heads may be shared among nthreads threads: the weights are cold after a forward (~1.3 MB
   for 32 tasks of 2-50 labels over 384 features) and one core's memory bandwidth bounds them (97 us
   for 32 rows here on one thread, 67 us on two: cpu_probes head-kernel-cold). The runtime passes 1:
   where the other cores are busy a team's wake-up costs milliseconds (runtime/heads.py). */
void head_scores(const float *f, int64_t hidden, int64_t rows, const int64_t *task_of_row, int64_t tasks,
                 const int64_t *heads, int64_t *order, int64_t *bounds, float *logits, float *probs, int64_t width,
                 int nthreads)
{
    for (int64_t k = 0; k <= tasks; k++)
        bounds[k] = 0;
    for (int64_t i = 0; i < rows; i++)
        bounds[task_of_row[i] + 1]++;
    for (int64_t k = 0; k < tasks; k++)
        bounds[k + 1] += bounds[k];
    for (int64_t i = 0; i < rows; i++)  /* bounds[k] counts up to task k's end, then is restored below */
        order[bounds[task_of_row[i]]++] = i;
    for (int64_t k = tasks; k > 0; k--)
        bounds[k] = bounds[k - 1];
    bounds[0] = 0;

    const int64_t full = hidden & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (hidden - full)) - 1u);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t k = 0; k < tasks; k++) {
        const float *w = (const float *)(intptr_t)heads[3 * k], *b = (const float *)(intptr_t)heads[3 * k + 1];
        const int64_t n = heads[3 * k + 2];
        for (int64_t q = bounds[k]; q < bounds[k + 1]; q += 4) {
            const int nr = bounds[k + 1] - q < 4 ? (int)(bounds[k + 1] - q) : 4;
            const float *x[4];
            float *y[4];
            for (int r = 0; r < 4; r++) {
                const int64_t row = order[q + (r < nr ? r : nr - 1)];
                x[r] = f + row * hidden;
                y[r] = logits + row * width;
            }
            for (int64_t j = 0; j < n; j += 4) {
                const int nl = n - j < 4 ? (int)(n - j) : 4;
                switch (nr * 4 + nl) {  /* every (rows, labels) block its own unrolled code */
#define HEAD_BLOCK(R, L) case R * 4 + L: head_block(R, L, x, w, j, hidden, full, tail, b, y); break;
                HEAD_BLOCK(1, 1) HEAD_BLOCK(1, 2) HEAD_BLOCK(1, 3) HEAD_BLOCK(1, 4)
                HEAD_BLOCK(2, 1) HEAD_BLOCK(2, 2) HEAD_BLOCK(2, 3) HEAD_BLOCK(2, 4)
                HEAD_BLOCK(3, 1) HEAD_BLOCK(3, 2) HEAD_BLOCK(3, 3) HEAD_BLOCK(3, 4)
                HEAD_BLOCK(4, 1) HEAD_BLOCK(4, 2) HEAD_BLOCK(4, 3) HEAD_BLOCK(4, 4)
#undef HEAD_BLOCK
                }
            }
            for (int r = 0; r < nr; r++)
                row_softmax(y[r], probs + order[q + r] * width, n, width);
        }
    }
}

/* varlen_attention.c over an OpenMP team, one (sequence, head) per item; dynamic schedule, as
   sequences differ in length. */
void varlen_attention_rows(const float *q, const float *k, const float *v, float *out, int64_t ld,
                           const int64_t *cu, int64_t batch, int64_t heads, int64_t d, float scale,
                           const float *pk, const float *pv, const int64_t *np, int64_t prefix_cap, int nthreads)
{
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t item = 0; item < batch * heads; item++)
        varlen_attention_item_prefixed(q, k, v, out, ld, ld, cu, heads, d, scale, item, pk, pv, np, prefix_cap);
}
