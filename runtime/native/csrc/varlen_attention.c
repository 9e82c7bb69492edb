/* Self-attention over token-packed sequences, for the token-packed shared ONNX graph (the
   adapterserve.VarlenAttention op in ort_lora_op.c) (ORT 1.31.1 has no CPU
   kernel for com.microsoft.PackedMultiHeadAttention). q, k, v: [N, H] (rows of all sequences back
   to back, head h in columns h*d .. h*d+d-1), out likewise; sequence b holds rows cu[b] .. cu[b+1]-1.
   Each (sequence, head) is independent: the caller runs items 0 .. B*heads-1 on its thread pool.
   fp32, AVX-512; any head size d <= 256 (the last 16-float chunk of a head is masked).
   Prefix tuning: a sequence may also attend to np[b] prefix keys and values of its own, read before
   its rows' (pk, pv: [sequences, prefix_cap, H]); np NULL means none.
   Included by lora_kernel.c (the torch engine's packed forward) and ort_lora_op.c, hence the guard. */
#ifndef ADAPTERSERVE_VARLEN_ATTENTION_C
#define ADAPTERSERVE_VARLEN_ATTENTION_C
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>

/* exp(x) for x <= 0 (scores minus their row max; row_epilogue.c's erf): 2^n * p(r), r = x - n ln2,
   |r| <= ln2/2, degree-7 Taylor polynomial (truncation < 1e-8 relative, so the erf built on it stays
   within 1 ulp), scaled by vscalefps; x below -87 gives exp(-87). */
static inline __m512 exp_nonpos(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* One (sequence, head), four queries at a time. Scores are computed 16 keys at a time against a
   transposed, pre-scaled copy of the head's keys (kt[c][j]): broadcast q[c] times a row of kt, so a
   query costs d FMAs per 16 keys and no horizontal sum (a dot product per (query, key) with a
   horizontal sum was the old way). Four queries share every load of kt and of v and keep four
   independent FMA chains in flight. masked: a compile-time constant after inlining, so heads of 16k
   floats take unmasked loads only. */
#define QB 4
static inline __attribute__((always_inline)) void
attention_item(const int masked, const float *q, const float *k, const float *v, float *out, int64_t ld,
               int64_t out_ld, const int64_t *cu, int64_t heads, int64_t d, float scale, int64_t item,
               const float *pk, const float *pv, const int64_t *np, int64_t prefix_cap)
{
    int64_t b = item / heads, h = item % heads;
    int64_t start = cu[b], s = cu[b + 1] - cu[b];
    if (s <= 0) return;
    /* keys: the sequence's n prefix keys, then its s own; key j's row of k (or of pk) */
    const int64_t n = np ? np[b] : 0, keys = n + s, width = heads * d;
    const float *pkb = n ? pk + b * prefix_cap * width : NULL, *pvb = n ? pv + b * prefix_cap * width : NULL;
#define KEY_ROW(base, pbase, j) ((j) < n ? (pbase) + (j) * width : (base) + (start + (j) - n) * ld)
    int64_t padded = (keys + 15) & ~(int64_t)15;
    float stack_scores[QB * 256], *scores = padded <= 256 ? stack_scores : malloc((size_t)(QB * padded) * sizeof(float));
    float stack_kt[8192], *kt = d * padded <= 8192 ? stack_kt : malloc((size_t)(d * padded) * sizeof(float));
    const int64_t col = h * d, nv = (d + 15) / 16;
    const __mmask16 tail = d % 16 ? (__mmask16)((1u << (d % 16)) - 1) : (__mmask16)0xFFFF;
#define LOAD(ptr, c) (masked && (c) == nv - 1 ? _mm512_maskz_loadu_ps(tail, (ptr)) : _mm512_loadu_ps(ptr))
    for (int64_t j = 0; j < keys; j++) {
        const float *kj = KEY_ROW(k, pkb, j) + col;
        for (int64_t c = 0; c < d; c++) kt[c * padded + j] = kj[c] * scale;
    }
    for (int64_t c = 0; c < d; c++)
        for (int64_t j = keys; j < padded; j++) kt[c * padded + j] = 0.0f;
    const __mmask16 last = keys % 16 ? (__mmask16)((1u << (keys % 16)) - 1) : (__mmask16)0xFFFF;
    for (int64_t i0 = 0; i0 < s; i0 += QB) {
        const float *qr[QB];
        float inv[QB];
        /* A last block of fewer than QB queries repeats its final query and drops the copies. */
        for (int r = 0; r < QB; r++) qr[r] = q + (start + (i0 + r < s ? i0 + r : s - 1)) * ld + col;
        __m512 mv[QB];
        for (int r = 0; r < QB; r++) mv[r] = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < padded; j += 16) {
            __m512 acc[QB];
            for (int r = 0; r < QB; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t c = 0; c < d; c++) {
                __m512 kv = _mm512_loadu_ps(kt + c * padded + j);
                for (int r = 0; r < QB; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][c]), kv, acc[r]);
            }
            for (int r = 0; r < QB; r++) {
                if (j + 16 > keys) acc[r] = _mm512_mask_blend_ps(last, _mm512_set1_ps(-INFINITY), acc[r]);
                _mm512_storeu_ps(scores + r * padded + j, acc[r]);
                mv[r] = _mm512_max_ps(mv[r], acc[r]);
            }
        }
        for (int r = 0; r < QB; r++) {
            __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv[r])), sum = _mm512_setzero_ps();
            float *sr = scores + r * padded;
            for (int64_t j = 0; j < padded; j += 16) {
                __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m));
                _mm512_storeu_ps(sr + j, e);
                sum = _mm512_add_ps(sum, e);
            }
            inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        for (int64_t c = 0; c < nv; c++) {  /* 16 output columns at a time, QB queries */
            __m512 acc[QB];
            for (int r = 0; r < QB; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t j = 0; j < keys; j++) {
                __m512 vv = LOAD(KEY_ROW(v, pvb, j) + col + 16 * c, c);
                for (int r = 0; r < QB; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(scores[r * padded + j]), vv, acc[r]);
            }
            for (int r = 0; r < QB && i0 + r < s; r++) {
                float *o = out + (start + i0 + r) * out_ld + col + 16 * c;
                __m512 y = _mm512_mul_ps(acc[r], _mm512_set1_ps(inv[r]));
                if (masked && c == nv - 1) _mm512_mask_storeu_ps(o, tail, y);
                else _mm512_storeu_ps(o, y);
            }
        }
    }
#undef LOAD
#undef KEY_ROW
    if (scores != stack_scores) free(scores);
    if (kt != stack_kt) free(kt);
}
#undef QB

/* ld: the row stride of q, k and v (they may be column blocks of one packed [N, 3H] tensor); out_ld
   the output's. */
void varlen_attention_item_prefixed(const float *q, const float *k, const float *v, float *out, int64_t ld,
                                    int64_t out_ld, const int64_t *cu, int64_t heads, int64_t d, float scale,
                                    int64_t item, const float *pk, const float *pv, const int64_t *np,
                                    int64_t prefix_cap)
{
    if (d % 16)
        attention_item(1, q, k, v, out, ld, out_ld, cu, heads, d, scale, item, pk, pv, np, prefix_cap);
    else
        attention_item(0, q, k, v, out, ld, out_ld, cu, heads, d, scale, item, pk, pv, np, prefix_cap);
}

void varlen_attention_item(const float *q, const float *k, const float *v, float *out, int64_t ld, int64_t out_ld,
                           const int64_t *cu, int64_t heads, int64_t d, float scale, int64_t item)
{
    varlen_attention_item_prefixed(q, k, v, out, ld, out_ld, cu, heads, d, scale, item, NULL, NULL, NULL, 0);
}

/* All items on the calling thread (the kernel test; the ORT op hands items to ORT's pool, the
   torch engine to an OpenMP team: varlen_attention_rows in lora_kernel.c). */
void varlen_attention(const float *q, const float *k, const float *v, float *out, int64_t ld,
                      const int64_t *cu, int64_t batch, int64_t heads, int64_t d, float scale,
                      const float *pk, const float *pv, const int64_t *np, int64_t prefix_cap)
{
    for (int64_t item = 0; item < batch * heads; item++)
        varlen_attention_item_prefixed(q, k, v, out, ld, ld, cu, heads, d, scale, item, pk, pv, np, prefix_cap);
}
#endif
