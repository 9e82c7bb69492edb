/* What the shared graph did to a LoRA op's output right after it, done by the op while each row is
   still in cache (runtime/engine/onnx/export._fold_*): the residual Add of attention.output / output and
   the LayerNorm after it, and the exact GELU of intermediate. Each saves a pass over [tokens, width]
   in memory and one node.

   The erf is Norbert Juffa's faithfully rounded erff (max error < 1 ulp; the polynomial
   coefficients are his, https://stackoverflow.com/questions/35148198), the same algorithm ONNX
   Runtime's MLAS uses for its Gelu; here both branches run on all 16 lanes and a mask picks one. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "varlen_attention.c"  /* exp_nonpos */

/* out[i] += res[i], i < n (n a multiple of 16). Same order of additions as the graph's Add:
   (y + delta) + residual. */
static void add_residual_span(float *out, const float *res, int64_t n)
{
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(out + i), _mm512_loadu_ps(res + i)));
}

static inline __m512 erf16(__m512 a)
{
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512 t = _mm512_andnot_ps(sign, a), s = _mm512_mul_ps(a, a);
    /* |a| > 475/512: erf = 1 - exp(poly(t)) with the sign of a */
    __m512 r = _mm512_fmadd_ps(_mm512_set1_ps(-1.72853470e-5f), t, _mm512_set1_ps(3.83197126e-4f));
    const __m512 u = _mm512_fmadd_ps(_mm512_set1_ps(-3.88396438e-3f), t, _mm512_set1_ps(2.42546219e-2f));
    r = _mm512_fmadd_ps(r, s, u);
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-1.06777877e-1f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-6.34846687e-1f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-1.28717512e-1f));
    r = _mm512_fmsub_ps(r, t, t);
    __m512 big = _mm512_sub_ps(_mm512_set1_ps(1.0f), exp_nonpos(r));
    big = _mm512_or_ps(big, _mm512_and_ps(a, sign));
    /* |a| <= 475/512: a + a poly(a^2) */
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(-5.96761703e-4f), s, _mm512_set1_ps(4.99119423e-3f));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-2.67681349e-2f));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(1.12819925e-1f));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(-3.76125336e-1f));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(1.28379166e-1f));
    const __m512 small = _mm512_fmadd_ps(p, a, a);
    const __mmask16 is_big = _mm512_cmp_ps_mask(t, _mm512_set1_ps(0.927734375f), _CMP_GT_OQ);
    return _mm512_mask_blend_ps(is_big, small, big);
}

/* x[i] = x[i] / 2 (1 + erf(x[i] / sqrt 2)), i < n (n a multiple of 16): exact GELU, as the graph's
   com.microsoft Gelu (and torch's default nn.GELU). */
static void gelu_span(float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        const __m512 half = _mm512_mul_ps(v, _mm512_set1_ps(0.5f));
        const __m512 e = erf16(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)));
        _mm512_storeu_ps(x + i, _mm512_fmadd_ps(half, e, half));
    }
}

/* Each of n tokens of d floats (d a multiple of 16), plus its residual first where res is not NULL,
   normalized over its d features, then scaled and shifted: (x - mean) / sqrt(var + eps) * scale +
   bias, var the biased variance, as ONNX LayerNormalization over the last axis. Per token, while it
   is in L1: the residual sum and the mean in one pass, the squared deviations (two passes lose less
   than a mean of squares minus the squared mean), then the output. */
static void layer_norm_tokens(float *x, const float *res, int64_t n, int64_t d, const float *scale, const float *bias,
                              float eps)
{
    for (int64_t t = 0; t < n; t++, x += d) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            __m512 v = _mm512_loadu_ps(x + i);
            if (res) {
                v = _mm512_add_ps(v, _mm512_loadu_ps(res + t * d + i));
                _mm512_storeu_ps(x + i, v);
            }
            if (i / 16 % 2) acc1 = _mm512_add_ps(acc1, v); else acc0 = _mm512_add_ps(acc0, v);
        }
        const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) / (float)d);
        acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(x + i), mean);
            if (i / 16 % 2) acc1 = _mm512_fmadd_ps(c, c, acc1); else acc0 = _mm512_fmadd_ps(c, c, acc0);
        }
        const float var = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) / (float)d;
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(var + eps));
        for (int64_t i = 0; i < d; i += 16) {
            const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mean), inv);
            _mm512_storeu_ps(x + i, _mm512_fmadd_ps(c, _mm512_loadu_ps(scale + i), _mm512_loadu_ps(bias + i)));
        }
    }
}

/* For tests: the two functions over n floats (n a multiple of 16), in place. */
void adapterserve_erf(float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(x + i, erf16(_mm512_loadu_ps(x + i)));
}

void adapterserve_gelu(float *x, int64_t n) { gelu_span(x, n); }
