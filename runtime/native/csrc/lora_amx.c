/* The LoRA delta of one row in bf16, for the int8 shared graph's adapterserve.SlotLoRA*BF16 ops
   (ort_lora_op.c); the arguments of lora_row (lora_kernel.c), with A and B in the pair layouts below:

       y[t, :] += bf16(bf16(x[t, :]) @ A[s]^T) @ B[s]    A, B bf16; fp32 accumulation

   Why: with a different adapter on every row, the fp32 kernel runs at the FMA ports' limit and was a
   quarter of the int8 graph's time (docs/benchmarks.md). On Intel AMX one tile multiply does
   16 x 16 x 32 multiply-adds, and bf16 slots halve what each row reads. Rounding x, A, B and xA to bf16
   moves the delta by <1e-2 relative; the int8 graph's own quantization error is larger, and its
   accuracy is tested against the bundled adapters' fp32 accuracy. The fp32 graph keeps the fp32 op.

   Slot layouts (uint32 = a pair of bf16, the lower half the even index), written once per
   registration by runtime/native/ort_ops.py (pack_bf16_a / pack_bf16_b), so a forward converts only x:
     A^T: [slots][R16 / 16][din_pad / 32][16 pairs kk][16 ranks n] = A[16 c + n][32 kc + 2 kk (+1)];
          R16 = r_max rounded up to 16, din_pad = din rounded up to 32 (zeros past them);
     B:   [slots][RB / 2][dout] = (B[2 j][o], B[2 j + 1][o]); RB = r_max, or rounded up to 32 above 32.
   These are the operand layouts of AMX's tdpbf16ps; each row's tile loads read them in place.

   Tiles are configured at every row: ONNX Runtime's AMX int8 GEMM (MLAS) configures them its own way
   on the same threads. Where AMX cannot run (not compiled in, a CPU without it, the kernel refuses
   the process the tile state, or ADAPTERSERVE_LORA_AMX=off) a scalar loop computes the same sums. */
#include <stdlib.h>
#include <string.h>

static int amx_disabled;  /* set from ADAPTERSERVE_LORA_AMX=off when the ops are registered */

static inline float bf16_to_f32(uint16_t v)
{
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f)  /* round to nearest even, as vcvtneps2bf16 */
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

typedef struct {
    int64_t r16, din_pad, rb;  /* A^T rank rows, padded din, B rank rows (see the layouts above) */
} Bf16Shape;

/* Portable path: the same products in the same precision, one token at a time. */
static void lora_row_bf16_scalar(const LoraArgs *p, const Bf16Shape *sh, int64_t b, int64_t r8,
                                 const float *xb, float *yb, int64_t n_tok)
{
    int64_t s = p->slot[b];
    const uint32_t *at = (const uint32_t *)p->A + s * sh->r16 * (sh->din_pad / 2);
    const uint32_t *bp = (const uint32_t *)p->B + s * (sh->rb / 2) * p->dout;
    const int64_t kch1 = sh->din_pad / 32;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *x = xb + t * p->x_tok;
        float *y = yb + t * p->y_tok;
        float xa[MAX_R];
        for (int64_t j = 0; j < r8; j++) {
            float acc = 0;
            for (int64_t k = 0; k < p->din; k++) {
                int64_t q = k / 2;
                uint32_t pair = at[((j / 16 * kch1 + q / 16) * 16 + q % 16) * 16 + j % 16];
                acc += bf16_to_f32(f32_to_bf16(x[k])) * bf16_to_f32((uint16_t)(k & 1 ? pair >> 16 : pair));
            }
            xa[j] = bf16_to_f32(f32_to_bf16(acc));
        }
        for (int64_t o = 0; o < p->dout; o++) {
            float acc = 0;
            for (int64_t j = 0; j < r8; j++) {
                uint32_t pair = bp[(j / 2) * p->dout + o];
                acc += xa[j] * bf16_to_f32((uint16_t)(j & 1 ? pair >> 16 : pair));
            }
            y[o] += acc;
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands a process the 8 KB AMX register state only on request (once per process, any thread). */
static int amx_permitted(void)
{
    static int state = -1;  /* a race only repeats the same idempotent request */
    if (state < 0)
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return state;
}

/* Per-thread scratch, grown on demand (ORT's pool threads live as long as the process). */
static __thread void *scratch_mem;
static __thread size_t scratch_cap;

static void *scratch(size_t bytes)
{
    if (bytes > scratch_cap) {
        free(scratch_mem);
        scratch_cap = (bytes + 4095) & ~(size_t)4095;
        scratch_mem = aligned_alloc(64, scratch_cap);
        if (!scratch_mem) abort();
    }
    return scratch_mem;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles for a chunk of m <= 16 tokens: 0 xA accumulator [m, n1], 1 x [m, 32 din], 2 A^T pairs
   [16, n1], 3 xA bf16 [m, k2], 4/6 B pairs [k2 / 2, 16], 5/7 y [m, 16] (two output tiles in flight). */
static void configure_tiles(int m, int n1, int k2)
{
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = (uint8_t)m; cfg.colsb[0] = (uint16_t)(n1 * 4);
    cfg.rows[1] = (uint8_t)m; cfg.colsb[1] = 64;
    cfg.rows[2] = 16; cfg.colsb[2] = (uint16_t)(n1 * 4);
    cfg.rows[3] = (uint8_t)m; cfg.colsb[3] = (uint16_t)(k2 * 2);
    cfg.rows[4] = (uint8_t)(k2 / 2); cfg.colsb[4] = 64;
    cfg.rows[5] = (uint8_t)m; cfg.colsb[5] = 64;
    cfg.rows[6] = (uint8_t)(k2 / 2); cfg.colsb[6] = 64;
    cfg.rows[7] = (uint8_t)m; cfg.colsb[7] = 64;
    _tile_loadconfig(&cfg);
}

/* n floats (n a multiple of 16) -> bf16. */
static inline void bf16_row(uint16_t *dst, const float *src, int64_t n)
{
    int64_t k = 0;
    for (; k + 32 <= n; k += 32)
        _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k)));
    if (k < n)
        _mm256_storeu_si256((__m256i *)(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
}

static int lora_row_bf16_amx(const LoraArgs *p, const Bf16Shape *sh, int64_t b, int64_t r8,
                             const float *xb, float *yb, int64_t n_tok)
{
    if (!amx_permitted()) return 0;
    const int64_t s = p->slot[b], din = p->din, dout = p->dout, din_pad = sh->din_pad, kch1 = din_pad / 32;
    const uint32_t *at = (const uint32_t *)p->A + s * sh->r16 * (din_pad / 2);
    const uint32_t *bp = (const uint32_t *)p->B + s * (sh->rb / 2) * dout;
    /* Rank chunks: n1 <= 16 columns for x A^T, k2 <= 32 for xA B (both within the padded layouts). */
    const int64_t n1 = r8 < 16 ? r8 : 16, nch1 = (r8 + n1 - 1) / n1;
    const int64_t k2 = r8 < 32 ? r8 : 32, kch2 = (r8 + k2 - 1) / k2;
    /* x in bf16 [16][din_pad] (zero past din) in this thread's scratch; xA fp32 and bf16 [16][<= 64]. */
    uint16_t *xbf = scratch((size_t)(16 * din_pad) * 2);
    float xa[16 * MAX_R] __attribute__((aligned(64)));
    uint16_t xab[16 * MAX_R] __attribute__((aligned(64)));
    const int64_t xa_ld = nch1 * n1, xab_ld = kch2 * k2;
    if (din_pad > din)
        for (int64_t t = 0; t < 16; t++)
            memset(xbf + t * din_pad + din, 0, (size_t)(din_pad - din) * 2);
    memset(xab, 0, sizeof xab);
    int64_t configured = 0;
    for (int64_t t0 = 0; t0 < n_tok; t0 += 16) {
        const int64_t m = n_tok - t0 < 16 ? n_tok - t0 : 16;
        if (m != configured)  /* at most twice a row: its 16-token chunks, then its last */
            configure_tiles((int)m, (int)n1, (int)k2), configured = m;
        for (int64_t t = 0; t < m; t++)
            bf16_row(xbf + t * din_pad, xb + (t0 + t) * p->x_tok, din);
        for (int64_t nc = 0; nc < nch1; nc++) {
            _tile_zero(0);
            for (int64_t kc = 0; kc < kch1; kc++) {
                _tile_loadd(1, xbf + kc * 32, din_pad * 2);
                _tile_loadd(2, at + (nc * kch1 + kc) * 256, 64);  /* n1 of the 16 rank columns */
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, xa + nc * n1, xa_ld * 4);
        }
        for (int64_t t = 0; t < m; t++)
            for (int64_t j = 0; j < r8; j += 8)
                _mm_storeu_si128((__m128i *)(xab + t * xab_ld + j),
                                 (__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(xa + t * xa_ld + j)));
        float *yc = yb + t0 * p->y_tok;
        const int64_t ys = p->y_tok * 4;
        for (int64_t kc = 0; kc < kch2; kc++) {
            _tile_loadd(3, xab + kc * k2, xab_ld * 2);
            const uint32_t *bk = bp + kc * (k2 / 2) * dout;
            int64_t n = 0;
            for (; n + 32 <= dout; n += 32) {
                _tile_loadd(5, yc + n, ys);
                _tile_loadd(7, yc + n + 16, ys);
                _tile_loadd(4, bk + n, dout * 4);
                _tile_loadd(6, bk + n + 16, dout * 4);
                _tile_dpbf16ps(5, 3, 4);
                _tile_dpbf16ps(7, 3, 6);
                _tile_stored(5, yc + n, ys);
                _tile_stored(7, yc + n + 16, ys);
            }
            if (n < dout) {
                _tile_loadd(5, yc + n, ys);
                _tile_loadd(4, bk + n, dout * 4);
                _tile_dpbf16ps(5, 3, 4);
                _tile_stored(5, yc + n, ys);
            }
        }
    }
    _tile_release();
    return 1;
}

static int amx_bf16_available(void) { return !amx_disabled && amx_permitted(); }
#else
static int lora_row_bf16_amx(const LoraArgs *p, const Bf16Shape *sh, int64_t b, int64_t r8,
                             const float *xb, float *yb, int64_t n_tok)
{
    (void)p; (void)sh; (void)b; (void)r8; (void)xb; (void)yb; (void)n_tok;
    return 0;
}

static int amx_bf16_available(void) { return 0; }
#endif

/* Whether the bf16 ops run on AMX here (1) or on the portable loop (0). */
int adapterserve_amx_bf16(void) { return amx_bf16_available(); }

static void lora_row_bf16(const LoraArgs *p, const Bf16Shape *sh, int64_t b)
{
    int64_t s = p->slot[b];
    int64_t r8 = s == 0 ? 0 : p->slot_r8[s];
    if (r8 == 0) return;
    const float *xb;
    float *yb;
    int64_t n_tok = row_tokens(p, b, &xb, &yb);
    if (n_tok <= 0) return;
    if (amx_disabled || !lora_row_bf16_amx(p, sh, b, r8, xb, yb, n_tok))
        lora_row_bf16_scalar(p, sh, b, r8, xb, yb, n_tok);
}
