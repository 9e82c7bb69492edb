/* ONNX Runtime custom ops of domain `adapterserve`, for the shared-base ONNX engine:
   - SlotLoRA: out = y + each row's LoRA delta, computed by the fused kernel of lora_kernel.c;
   - SlotLoRAPacked: the same over token-packed rows (input 6 holds row offsets [rows + 1] in place
     of lengths; y/x are [1, N, .]), for the packed graph layout;
   - SlotLoRABF16, SlotLoRAPackedBF16: the same with bf16 slots on AMX tiles (lora_amx.c), in the
     int8 graph only;
   - each of those four with the suffix InPlace: the same, writing into y's buffer (nothing else
     reads y; see y_is_output);
   - SlotLoRAQKVPacked(BF16): one self-attention's q, k and v nodes as one, in place (compute_qkv);
   - VarlenAttention: softmax(q k^T / sqrt(d)) v per (sequence, head) over token-packed q/k/v
     (varlen_attention.c): ORT 1.31.1 has no CPU kernel for PackedMultiHeadAttention;
   - SlotRowScale(Packed): x with the rows of slots that scale this layer's input multiplied by their
     scale (IA3's feed-forward vectors), where the graph could not fold it into the LoRA op before.

   Why: the stock-op graph (Gather each row's A/B out of the slot tensors, then two batched MatMuls
   and an Add) copies r_max x (din + dout) floats per row and layer and runs over padded tokens; on
   MiniLM with 32 mixed tasks that was a third of the int8 graph's time. This op reads each row's slot
   in place, only its real tokens, at its own rank in this layer.

   Inputs: 0 y [rows, T, W] or [rows, W] (the base projection; W = dout, or wider when y packs several
   projections, e.g. q/k/v, and this node's columns start at y_offset), 1 x [rows, T, din] or
   [rows, din], 2 A [slots, r_max, din], 3 B [slots, r_max, dout] (scaling folded in), 4 slot_r8 int64
   [slots], 5 slot_per_row int64 [rows], 6 row_lengths int64 [rows], 7 y_offset int64 [1], and optional:
   8 out_scale [slots, dout], 9 out_shift [slots, dout] and 10 vector_flags int64 [slots] (each slot's
   per-feature vectors: IA3, DoRA, trained biases; y = out_scale * (y + delta) + out_shift for the rows
   of a slot whose flags say so), 11 residual (the output's shape; a residual Add folded in),
   12 activation int64 [1] (1: exact GELU of the sum; a Gelu node folded in; 0 or absent: none),
   13-15 LayerNorm scale [dout], bias [dout] and epsilon [1] (a LayerNormalization over the last dim
   folded in), 16 post_scale [slots, dout] and 17 post_flags int64 [slots] (the next layer's input
   scale, a SlotRowScale node folded in: applied last). The *BF16 ops take 2 and 3 as int32 bf16
   pairs (lora_amx.c's layouts). All float tensors fp32, contiguous. Output: [rows, T, dout] or [rows, dout]. The engine checks shapes before every run (runtime/engine/onnx/engine.py); the version-1
   kernel callback cannot return an error, so a mismatch here aborts rather than compute garbage.

   The pip wheel of onnxruntime ships no C headers, so the few OrtApi entries used are declared below
   by position: ORT only ever appends to OrtApi (the header's "DO NOT MODIFY ABOVE"), so a position,
   once released, is fixed. All but KernelContext_ParallelFor (API 17, ORT 1.17) are in the version-1
   block; with an older ORT the op runs its rows on one thread. The op struct uses the layout of
   OrtCustomOp as of its last fields (GetMayInplace .. ReleaseAliasMap), declared as version 21; ORT
   reads a field only when the declared version is at least the one that added it.
   Rows run on ORT's own intra-op pool: an OpenMP team here would fight ORT's spinning workers for
   the cores (measured: 8x slower than one thread). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "lora_kernel.c"
#include "lora_amx.c"
#include "varlen_attention.c"
#include "row_epilogue.c"

typedef struct OrtStatus OrtStatus;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtTensorTypeAndShapeInfo OrtShape;

/* Positions in OrtApi (version-1 block). */
enum {
    API_CREATE_CUSTOM_OP_DOMAIN = 26,
    API_CUSTOM_OP_DOMAIN_ADD = 27,
    API_ADD_CUSTOM_OP_DOMAIN = 28,
    API_GET_TENSOR_MUTABLE_DATA = 51,
    API_GET_DIMENSIONS_COUNT = 61,
    API_GET_DIMENSIONS = 62,
    API_GET_TENSOR_TYPE_AND_SHAPE = 65,
    API_KERNEL_CONTEXT_GET_INPUT = 90,
    API_KERNEL_CONTEXT_GET_OUTPUT = 91,
    API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
    API_KERNEL_CONTEXT_PARALLEL_FOR = 274,  /* OrtApi version 17 */
};

typedef struct {
    const void *const *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} ApiBase;

typedef struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct CustomOp *op, const void *api, const void *info);
    const char *(*GetName)(const struct CustomOp *op);
    const char *(*GetExecutionProviderType)(const struct CustomOp *op);
    int (*GetInputType)(const struct CustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct CustomOp *op);
    int (*GetOutputType)(const struct CustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct CustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    /* version 8 */
    int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
    /* version 13, 14 */
    int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct CustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct CustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct CustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct CustomOp *op);
    /* version 16, 17: left NULL (ORT then uses CreateKernel/KernelCompute, no shape inference) */
    void *CreateKernelV2, *KernelComputeV2, *InferOutputShapeFn;
    int (*GetStartVersion)(const struct CustomOp *op);
    int (*GetEndVersion)(const struct CustomOp *op);
    /* later versions: the output may take over input 0's buffer (no copy of y); no aliases */
    size_t (*GetMayInplace)(int **input_index, int **output_index);
    void (*ReleaseMayInplace)(int *input_index, int *output_index);
    size_t (*GetAliasMap)(int **input_index, int **output_index);
    void (*ReleaseAliasMap)(int *input_index, int *output_index);
} CustomOp;

enum { ELEM_FLOAT = 1, ELEM_INT32 = 6, ELEM_INT64 = 7, N_INPUTS = 18 };  /* 8-17: the optional vectors and epilogue */

static const void *const *api;
static int has_parallel_for;

int adapterserve_ort_abi(void) { return 10; }

#define CALL(idx, type, ...) ((type)api[idx])(__VA_ARGS__)

static void check(OrtStatus *status, const char *what)
{
    if (status) {
        fprintf(stderr, "adapterserve.SlotLoRA: ORT call %s failed\n", what);
        abort();
    }
}

typedef OrtStatus *(*get_input_fn)(const OrtKernelContext *, size_t, const OrtValue **);
typedef OrtStatus *(*get_output_fn)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
typedef OrtStatus *(*data_fn)(OrtValue *, void **);
typedef OrtStatus *(*shape_fn)(const OrtValue *, OrtShape **);
typedef OrtStatus *(*dims_count_fn)(const OrtShape *, size_t *);
typedef OrtStatus *(*dims_fn)(const OrtShape *, int64_t *, size_t);
typedef void (*release_shape_fn)(OrtShape *);

/* Input i's data (and its dims when asked); NULL for an absent optional input. */
static void *input(OrtKernelContext *ctx, size_t i, int64_t *dims, size_t *ndims)
{
    const OrtValue *v;
    void *data;
    check(CALL(API_KERNEL_CONTEXT_GET_INPUT, get_input_fn, ctx, i, &v), "KernelContext_GetInput");
    if (!v)
        return NULL;
    if (dims) {
        OrtShape *shape;
        check(CALL(API_GET_TENSOR_TYPE_AND_SHAPE, shape_fn, v, &shape), "GetTensorTypeAndShape");
        check(CALL(API_GET_DIMENSIONS_COUNT, dims_count_fn, shape, ndims), "GetDimensionsCount");
        if (*ndims > 3) abort();
        check(CALL(API_GET_DIMENSIONS, dims_fn, shape, dims, *ndims), "GetDimensions");
        CALL(API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, release_shape_fn, shape);
    }
    check(CALL(API_GET_TENSOR_MUTABLE_DATA, data_fn, (OrtValue *)v, &data), "GetTensorMutableData");
    return data;
}

typedef OrtStatus *(*parallel_for_fn)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t, void *);

/* fn(task, i) for i < n on ORT's intra-op pool, in at most `batches` contiguous batches (or here,
   where the ORT is older than KernelContext_ParallelFor). */
static void run_items(OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t n, size_t batches, void *task)
{
    if (has_parallel_for && n > 1) {
        check(CALL(API_KERNEL_CONTEXT_PARALLEL_FOR, parallel_for_fn, ctx, fn, n, n < batches ? n : batches, task),
              "KernelContext_ParallelFor");
    } else {
        for (size_t i = 0; i < n; i++)
            fn(task, i);
    }
}

typedef struct {
    LoraArgs lora;
    const float *y;  /* the base projection, copied row by row into the output unless ORT ran us in place */
    int64_t y_width, y_offset;  /* y's last dim and this node's first column in it */
    int bf16;  /* the *BF16 ops: A and B in lora_amx.c's pair layouts, shaped by sh */
    Bf16Shape sh;
    const float *residual;  /* optional input 11, the output's shape: added after the delta, or NULL */
    int gelu;  /* optional input 12 = 1: exact GELU */
    const float *ln_scale, *ln_bias;  /* optional inputs 13, 14: LayerNorm, or NULL */
    float ln_epsilon;  /* optional input 15 */
    const float *out_scale, *out_shift;  /* optional inputs 8, 9 [slots, dout], or NULL */
    const int64_t *vec_flags;  /* optional input 10 [slots] */
    const float *post_scale;  /* optional input 16 [slots, dout]: the next layer's input scale, or NULL */
    const int64_t *post_flags;  /* optional input 17 [slots] */
} RowTask;

/* Output tokens [*t0, *t1) of a row: every position of it, padding included, as the graph's nodes did. */
static void row_span(const LoraArgs *p, int64_t row, int64_t *t0, int64_t *t1)
{
    if (p->offsets) {
        *t0 = p->offsets[row], *t1 = p->offsets[row + 1];
    } else {
        *t0 = row * p->T, *t1 = (row + 1) * p->T;
    }
}

/* Output tokens [t0, t1) from the base projection (this node's columns of it). */
static void copy_tokens(const RowTask *task, int64_t t0, int64_t t1)
{
    const LoraArgs *p = &task->lora;
    if (task->y_width == p->dout) {  /* one block */
        memmove(p->y + t0 * p->dout, task->y + t0 * p->dout, (size_t)((t1 - t0) * p->dout) * sizeof(float));
        return;
    }
    for (int64_t t = t0; t < t1; t++)
        memmove(p->y + t * p->dout, task->y + t * task->y_width + task->y_offset, (size_t)p->dout * sizeof(float));
}

static void copy_row(const RowTask *task, int64_t row)
{
    const LoraArgs *p = &task->lora;
    if (p->offsets)
        copy_tokens(task, p->offsets[row], p->offsets[row + 1]);
    else
        copy_tokens(task, row * p->T, (row + 1) * p->T);
}

/* The nodes that followed this one in the graph, folded in (runtime/engine/onnx/export._fold_*), over
   output tokens [t0, t1) while the row is in cache: the residual Add, the GELU, the LayerNorm
   (row_epilogue.c). */
static void epilogue(const RowTask *task, int64_t t0, int64_t t1)
{
    const int64_t d = task->lora.dout;
    float *out = task->lora.y + t0 * d;
    const float *res = task->residual ? task->residual + t0 * d : NULL;
    if (task->ln_scale && !task->gelu) {  /* the residual sum within the LayerNorm's first pass */
        layer_norm_tokens(out, res, t1 - t0, d, task->ln_scale, task->ln_bias, task->ln_epsilon);
        return;
    }
    if (res)
        add_residual_span(out, res, (t1 - t0) * d);
    if (task->gelu)
        gelu_span(out, (t1 - t0) * d);
    if (task->ln_scale)
        layer_norm_tokens(out, NULL, t1 - t0, d, task->ln_scale, task->ln_bias, task->ln_epsilon);
}

static void row_task(void *args, size_t row)
{
    const RowTask *task = args;
    if (task->y != task->lora.y)  /* each task copies its own row: the copy is spread over the pool too */
        copy_row(task, (int64_t)row);
    if (task->bf16)
        lora_row_bf16(&task->lora, &task->sh, (int64_t)row);
    else
        lora_row(&task->lora, (int64_t)row);
    const LoraArgs *p = &task->lora;
    int64_t t0, t1;
    row_span(p, (int64_t)row, &t0, &t1);
    if (task->vec_flags)
        row_out_vectors(p, (int64_t)row, task->out_scale, task->out_shift, task->vec_flags);
    if (task->residual || task->gelu || task->ln_scale)
        epilogue(task, t0, t1);
    if (task->post_flags) {
        const int64_t s = p->slot[row];
        if (task->post_flags[s] & VEC_IN)
            scale_shift_tokens(p->y + t0 * p->dout, p->dout, t1 - t0, p->dout, task->post_scale + s * p->dout, NULL);
    }
}

/* Inputs first..first+2: a [slots, d] scale, a [slots, d] shift and [slots] flags, each optional; aborts
   unless present ones fit. */
static void vector_inputs(OrtKernelContext *ctx, size_t first, int64_t slots, int64_t d, const float **scale,
                          const float **shift, const int64_t **flags)
{
    int64_t dims[3][3];
    size_t n[3];
    *scale = input(ctx, first, dims[0], &n[0]);
    *shift = input(ctx, first + 1, dims[1], &n[1]);
    *flags = input(ctx, first + 2, dims[2], &n[2]);
    if ((*scale && (n[0] != 2 || dims[0][0] != slots || dims[0][1] != d))
        || (*shift && (n[1] != 2 || dims[1][0] != slots || dims[1][1] != d))
        || (*flags && (n[2] != 1 || dims[2][0] != slots)) || ((*scale || *shift) && !*flags)) {
        fprintf(stderr, "adapterserve.SlotLoRA: vector inputs must be [slots, %lld] scale and shift and [slots] flags\n",
                (long long)d);
        abort();
    }
}

/* Whether a node's slot tensors A [slots, ...] and B [slots, ..., dout] (3-d; an, bn their ranks) fit
   x's din: fp32 [slots, r_max, din] and [slots, r_max, dout], or the bf16 pair layouts of lora_amx.c,
   whose shape goes to *sh. Shared by the single and the q/k/v ops. */
static int slots_fit(int bf16, const int64_t *adims, size_t an, const int64_t *bdims, size_t bn, int64_t din,
                     Bf16Shape *sh)
{
    if (an != 3 || bn != 3 || adims[1] > MAX_R || bdims[2] % 16)
        return 0;
    *sh = (Bf16Shape){adims[1], 2 * adims[2], 2 * bdims[1]};
    return bf16 ? sh->din_pad == ((din + 31) & ~(int64_t)31) && sh->r16 % 16 == 0 && sh->rb % 2 == 0
                : adims[2] == din;
}

/* SlotLoRA: rows [rows, T, d] (or [rows, d]), input 6 each row's real length. SlotLoRAPacked: one
   [1, N, d] run of token-packed rows, input 6 their offsets [rows + 1] (cumulative lengths).
   bf16 (SlotLoRABF16, SlotLoRAPackedBF16): inputs 2 and 3 are int32 [slots, R16, din_pad / 2] and
   [slots, RB / 2, dout] in lora_amx.c's layouts. Optional inputs 8-10: the slots' output vectors;
   11: a residual of the output's shape; 12: the activation (1: GELU); 13-15: LayerNorm scale, bias,
   epsilon; 16-17: the next layer's input scale and flags. */
static void compute(OrtKernelContext *ctx, int packed, int bf16)
{
    int64_t ydims[3], xdims[3], adims[3], bdims[3], sdims[3];
    size_t yn, xn, an, bn, sn;
    const float *y = input(ctx, 0, ydims, &yn);
    const float *x = input(ctx, 1, xdims, &xn);
    const float *a = input(ctx, 2, adims, &an);
    const float *b = input(ctx, 3, bdims, &bn);
    const int64_t *r8 = input(ctx, 4, NULL, NULL);
    const int64_t *slot = input(ctx, 5, sdims, &sn);
    const int64_t *len = input(ctx, 6, NULL, NULL);
    const int64_t y_offset = *(const int64_t *)input(ctx, 7, NULL, NULL);
    int64_t rows = packed ? sdims[0] : ydims[0], T = yn == 3 ? ydims[1] : 1;
    int64_t din = xdims[xn - 1], y_width = ydims[yn - 1], dout = bdims[2];
    Bf16Shape sh;
    if (xn != yn || !slots_fit(bf16, adims, an, bdims, bn, din, &sh) || y_offset < 0
        || y_offset + dout > y_width || xdims[0] != ydims[0] || (yn == 3 && xdims[1] != T) || din % 16
        || (packed && (yn != 3 || ydims[0] != 1 || len[rows] != T)) || (!packed && xdims[0] != rows)) {
        fprintf(stderr, "adapterserve.SlotLoRA: inconsistent shapes (x %zu-d, A %zu-d)\n", xn, an);
        abort();
    }
    int64_t out_dims[3] = {ydims[0], ydims[1], ydims[2]};
    out_dims[yn - 1] = dout;
    int64_t rdims[3];
    size_t rn;
    const int64_t slots = adims[0];
    const float *out_scale, *out_shift;
    const int64_t *vec_flags;
    vector_inputs(ctx, 8, slots, dout, &out_scale, &out_shift, &vec_flags);
    int64_t pdims[2][3];
    size_t pn[2];
    const float *post_scale = input(ctx, 16, pdims[0], &pn[0]);
    const int64_t *post_flags = input(ctx, 17, pdims[1], &pn[1]);
    if ((post_scale == NULL) != (post_flags == NULL)
        || (post_scale && (pn[0] != 2 || pdims[0][0] != slots || pdims[0][1] != dout || pn[1] != 1
                           || pdims[1][0] != slots))) {
        fprintf(stderr, "adapterserve.SlotLoRA: inputs 16 and 17 (the next layer's input scale) must be "
                        "[slots, dout] and [slots], together\n");
        abort();
    }
    const float *residual = input(ctx, 11, rdims, &rn);
    if (residual && (rn != yn || memcmp(rdims, out_dims, yn * sizeof(int64_t)))) {
        fprintf(stderr, "adapterserve.SlotLoRA: the residual's shape is not the output's\n");
        abort();
    }
    const int64_t *activation = input(ctx, 12, NULL, NULL);
    if (activation && (*activation < 0 || *activation > 1)) {
        fprintf(stderr, "adapterserve.SlotLoRA: unknown activation %lld\n", (long long)*activation);
        abort();
    }
    int64_t gdims[3], bdims_ln[3], edims[3];
    size_t gn, bn_ln, en;
    const float *ln_scale = input(ctx, 13, gdims, &gn), *ln_bias = input(ctx, 14, bdims_ln, &bn_ln);
    const float *ln_epsilon = input(ctx, 15, edims, &en);
    if ((ln_scale || ln_bias || ln_epsilon)
        && (!ln_scale || !ln_bias || !ln_epsilon || gn != 1 || bn_ln != 1 || gdims[0] != dout || bdims_ln[0] != dout
            || en != 1 || edims[0] != 1)) {
        fprintf(stderr, "adapterserve.SlotLoRA: LayerNorm inputs 13-15 must be scale [dout], bias [dout], epsilon [1]\n");
        abort();
    }
    OrtValue *out_value;
    float *out;
    check(CALL(API_KERNEL_CONTEXT_GET_OUTPUT, get_output_fn, ctx, 0, out_dims, yn, &out_value), "KernelContext_GetOutput");
    check(CALL(API_GET_TENSOR_MUTABLE_DATA, data_fn, out_value, (void **)&out), "GetTensorMutableData");
    RowTask task = {{x, T * din, yn == 3 ? din : 0, out, T * dout, yn == 3 ? dout : 0, T, din, dout,
                     a, b, adims[1], r8, slot, packed ? NULL : len, packed ? len : NULL}, y, y_width, y_offset, bf16, sh, residual,
                    activation && *activation == 1, ln_scale, ln_bias, ln_epsilon ? *ln_epsilon : 0,
                    out_scale, out_shift, vec_flags, post_scale, post_flags};
    if (out == y) {
        /* ORT handed over y's buffer (an *InPlace op: y_is_output): nothing to copy. The exporter
           names a node *InPlace only when y is its own projection, so this node's columns are all of y. */
        if (y_width != dout || y_offset != 0) {
            fprintf(stderr, "adapterserve.SlotLoRA: run in y's buffer, but y is wider than this node's output\n");
            abort();
        }
        task.y = out;
    }
    run_items(ctx, row_task, (size_t)rows, (size_t)rows, &task);
}

static void compute_padded(void *kernel, OrtKernelContext *ctx) { (void)kernel; compute(ctx, 0, 0); }
static void compute_packed(void *kernel, OrtKernelContext *ctx) { (void)kernel; compute(ctx, 1, 0); }
static void compute_padded_bf16(void *kernel, OrtKernelContext *ctx) { (void)kernel; compute(ctx, 0, 1); }
static void compute_packed_bf16(void *kernel, OrtKernelContext *ctx) { (void)kernel; compute(ctx, 1, 1); }

/* adapterserve.SlotLoRAQKVPacked(BF16): the q, k and v LoRA nodes of one self-attention as one node
   over their packed base projection y [1, N, dq + dk + dv] (one int8 GEMM's output,
   runtime/engine/onnx/export._fuse_qkv): each row adds its three deltas to its columns in place, so
   nothing is copied out into three tensors (VarlenAttention reads the packed tensor) and the rows go
   to the pool once, not three times. Inputs: 0 y, 1 x [1, N, din], 2-7 A, B, slot_r8 (fp32, or the
   bf16 pair layouts), out_scale, out_shift, vector_flags of q (the last three optional, as SlotLoRA's
   8-10), 8-13 of k, 14-19 of v, 20 slot_per_row [rows], 21 row offsets [rows + 1].
   Output: y's shape, in y's buffer (declared as an alias: y_is_output). */
enum { QKV_PART = 6, QKV_INPUTS = 2 + 3 * QKV_PART + 2 };

typedef struct {
    RowTask part[3];
    const float *y;  /* the base projection, copied row by row into the output unless ORT ran us in place */
} QkvTask;

static void qkv_row_task(void *args, size_t row)
{
    const QkvTask *t = args;
    const LoraArgs *p = &t->part[0].lora;
    float *out = p->y;  /* part 0's columns start the row */
    if (t->y != out) {
        const int64_t w = t->part[0].y_width, t0 = p->offsets[row], t1 = p->offsets[row + 1];
        memcpy(out + t0 * w, t->y + t0 * w, (size_t)((t1 - t0) * w) * sizeof(float));
    }
    for (int i = 0; i < 3; i++) {
        if (t->part[i].bf16)
            lora_row_bf16(&t->part[i].lora, &t->part[i].sh, (int64_t)row);
        else
            lora_row(&t->part[i].lora, (int64_t)row);
        if (t->part[i].vec_flags)  /* over this part's columns: its lora.y starts there, tokens y_width apart */
            row_out_vectors(&t->part[i].lora, (int64_t)row, t->part[i].out_scale, t->part[i].out_shift,
                            t->part[i].vec_flags);
    }
}

static void compute_qkv(OrtKernelContext *ctx, int bf16)
{
    int64_t ydims[3], xdims[3], sdims[3], odims[3], adims[3][3], bdims[3][3];
    size_t yn, xn, sn, on, an, bn;
    const float *y = input(ctx, 0, ydims, &yn);
    const float *x = input(ctx, 1, xdims, &xn);
    const int64_t *slot = input(ctx, 2 + 3 * QKV_PART, sdims, &sn);
    const int64_t *offsets = input(ctx, 3 + 3 * QKV_PART, odims, &on);
    int64_t rows = sdims[0], n = ydims[1], width = ydims[2], din = xdims[2], col = 0;
    int ok = yn == 3 && xn == 3 && ydims[0] == 1 && xdims[0] == 1 && xdims[1] == n && din % 16 == 0
             && sn == 1 && on == 1 && odims[0] == rows + 1 && offsets[rows] == n;
    QkvTask task;
    float *out = NULL;
    const void *ab[3][2];
    const int64_t *r8[3];
    for (int i = 0; i < 3 && ok; i++) {
        const size_t first = 2 + QKV_PART * (size_t)i;
        ab[i][0] = input(ctx, first, adims[i], &an);
        ab[i][1] = input(ctx, first + 1, bdims[i], &bn);
        r8[i] = input(ctx, first + 2, NULL, NULL);
        Bf16Shape sh;
        ok = slots_fit(bf16, adims[i], an, bdims[i], bn, din, &sh);
        const float *scale = NULL, *shift = NULL;
        const int64_t *flags = NULL;
        if (ok)
            vector_inputs(ctx, first + 3, adims[i][0], bdims[i][2], &scale, &shift, &flags);
        task.part[i] = (RowTask){{x, 0, din, NULL, 0, width, n, din, bdims[i][2], ab[i][0], ab[i][1], adims[i][1], r8[i],
                                  slot, NULL, offsets}, NULL, width, col, bf16, sh, NULL, 0, NULL, NULL, 0,
                                 scale, shift, flags, NULL, NULL};
        col += bdims[i][2];
    }
    if (!ok || col != width) {
        fprintf(stderr, "adapterserve.SlotLoRAQKVPacked: inconsistent shapes (y width %lld, q/k/v widths sum to %lld)\n",
                (long long)width, (long long)col);
        abort();
    }
    OrtValue *out_value;
    check(CALL(API_KERNEL_CONTEXT_GET_OUTPUT, get_output_fn, ctx, 0, ydims, 3, &out_value), "KernelContext_GetOutput");
    check(CALL(API_GET_TENSOR_MUTABLE_DATA, data_fn, out_value, (void **)&out), "GetTensorMutableData");
    task.y = y;  /* out != y: ORT kept y (another node reads it); each row starts from a copy */
    for (int i = 0; i < 3; i++)
        task.part[i].lora.y = out + task.part[i].y_offset;
    run_items(ctx, qkv_row_task, (size_t)rows, (size_t)rows, &task);
}

static void compute_qkv_fp32(void *kernel, OrtKernelContext *ctx) { (void)kernel; compute_qkv(ctx, 0); }
static void compute_qkv_bf16(void *kernel, OrtKernelContext *ctx) { (void)kernel; compute_qkv(ctx, 1); }

/* adapterserve.VarlenAttention: q, k, v [1, N, H] of token-packed sequences, offsets [B + 1],
   num_heads int64 [1]; out [1, N, H]. With k and v absent, q is the packed [1, N, 3H] (q | k | v
   columns; SlotLoRAQKVPacked's output), as ORT's MultiHeadAttention takes a packed QKV.
   Softmax(q k^T / sqrt(d)) v within each sequence (varlen_attention.c), one (sequence, head) per
   task on ORT's pool. */
enum { ATTENTION_BATCHES = 32 };

typedef struct {
    const float *q, *k, *v;
    float *out;
    int64_t ld, out_ld, heads, d;
    const int64_t *offsets;
    float scale;
} AttentionTask;

static void attention_task(void *args, size_t item)
{
    const AttentionTask *t = args;
    varlen_attention_item(t->q, t->k, t->v, t->out, t->ld, t->out_ld, t->offsets, t->heads, t->d, t->scale,
                          (int64_t)item);
}

static void compute_attention(void *kernel, OrtKernelContext *ctx)
{
    (void)kernel;
    int64_t qdims[3], kdims[3], vdims[3], odims[3];
    size_t qn, kn = 0, vn = 0, on;
    const float *q = input(ctx, 0, qdims, &qn);
    const float *k = input(ctx, 1, kdims, &kn);
    const float *v = input(ctx, 2, vdims, &vn);
    const int64_t *offsets = input(ctx, 3, odims, &on);
    const int64_t heads = *(const int64_t *)input(ctx, 4, NULL, NULL);
    const int packed_qkv = !k && !v;
    int64_t batch = odims[0] - 1, n = qdims[1], ld = qdims[2], width = packed_qkv ? ld / 3 : ld;
    if (qn != 3 || on != 1 || qdims[0] != 1 || heads <= 0 || width % heads || (packed_qkv && ld % 3)
        || width / heads > 256 || batch < 0 || offsets[batch] != n
        || (!packed_qkv && (!k || !v || kn != 3 || vn != 3 || memcmp(qdims, kdims, sizeof qdims)
                            || memcmp(qdims, vdims, sizeof qdims)))) {
        fprintf(stderr, "adapterserve.VarlenAttention: inconsistent shapes\n");
        abort();
    }
    if (packed_qkv)
        k = q + width, v = q + 2 * width;
    int64_t out_dims[3] = {1, n, width};
    OrtValue *out_value;
    float *out;
    check(CALL(API_KERNEL_CONTEXT_GET_OUTPUT, get_output_fn, ctx, 0, out_dims, 3, &out_value), "KernelContext_GetOutput");
    check(CALL(API_GET_TENSOR_MUTABLE_DATA, data_fn, out_value, (void **)&out), "GetTensorMutableData");
    int64_t d = width / heads;
    AttentionTask task = {q, k, v, out, ld, width, heads, d, offsets, 1.0f / sqrtf((float)d)};
    size_t items = (size_t)(batch * heads);
    /* Items go to the pool in at most ATTENTION_BATCHES contiguous batches: one task per item (384 on a
       batch of 32 MiniLM rows) cost more in dispatch than it gained in balance (cpu_probes onnx-nodes:
       2.97 -> 2.47 ms per batch of 32 SST-2 rows over 6 layers). */
    run_items(ctx, attention_task, items, ATTENTION_BATCHES, &task);
}

/* adapterserve.SlotRowScale(Packed): x [rows, T, d] or [rows, d] (packed: [1, N, d]), 1 in_scale
   [slots, d], 2 vector_flags int64 [slots], 3 slot_per_row [rows], 4 row lengths [rows] (unused: every
   position is scaled, as the graph's Mul did) or, packed, row offsets [rows + 1]. Output: x with each row
   whose slot has VEC_IN multiplied by its scale (an input scale the exporter could not fold into the
   LoRA op that makes x). The *InPlace variants run in x's buffer (declared as an alias, as the LoRA
   ops'), which the exporter names only where nothing else reads x: then a batch without such rows
   costs nothing but the call. */
typedef struct {
    const float *x, *scale;
    float *out;
    const int64_t *flags, *slot, *offsets;
    int64_t T, d;
} RowScaleTask;

static void row_scale_task(void *args, size_t row)
{
    const RowScaleTask *t = args;
    const int64_t t0 = t->offsets ? t->offsets[row] : (int64_t)row * t->T;
    const int64_t t1 = t->offsets ? t->offsets[row + 1] : ((int64_t)row + 1) * t->T;
    if (t->out != t->x)  /* else ORT ran us in x's buffer (*InPlace) */
        memcpy(t->out + t0 * t->d, t->x + t0 * t->d, (size_t)((t1 - t0) * t->d) * sizeof(float));
    const int64_t s = t->slot[row];
    if (t->flags[s] & VEC_IN)
        scale_shift_tokens(t->out + t0 * t->d, t->d, t1 - t0, t->d, t->scale + s * t->d, NULL);
}

static void compute_row_scale(OrtKernelContext *ctx, int packed)
{
    int64_t xdims[3], cdims[3], fdims[3], sdims[3], ldims[3];
    size_t xn, cn, fn, sn, ln;
    const float *x = input(ctx, 0, xdims, &xn);
    const float *scale = input(ctx, 1, cdims, &cn);
    const int64_t *flags = input(ctx, 2, fdims, &fn);
    const int64_t *slot = input(ctx, 3, sdims, &sn);
    const int64_t *lengths = input(ctx, 4, ldims, &ln);
    const int64_t rows = sdims[0], d = xdims[xn - 1], T = xn == 3 ? xdims[1] : 1;
    if (xn < 2 || cn != 2 || cdims[1] != d || fn != 1 || fdims[0] != cdims[0] || sn != 1 || ln != 1
        || (packed ? xn != 3 || xdims[0] != 1 || ldims[0] != rows + 1 || lengths[rows] != T
                   : xdims[0] != rows || ldims[0] != rows)) {
        fprintf(stderr, "adapterserve.SlotRowScale: inconsistent shapes\n");
        abort();
    }
    for (int64_t r = 0; r < rows; r++) {
        if (slot[r] < 0 || slot[r] >= cdims[0]) {
            fprintf(stderr, "adapterserve.SlotRowScale: slot %lld out of range\n", (long long)slot[r]);
            abort();
        }
    }
    OrtValue *out_value;
    float *out;
    check(CALL(API_KERNEL_CONTEXT_GET_OUTPUT, get_output_fn, ctx, 0, xdims, xn, &out_value), "KernelContext_GetOutput");
    check(CALL(API_GET_TENSOR_MUTABLE_DATA, data_fn, out_value, (void **)&out), "GetTensorMutableData");
    RowScaleTask task = {x, scale, out, flags, slot, packed ? lengths : NULL, packed ? 0 : T, d};
    run_items(ctx, row_scale_task, (size_t)rows, (size_t)rows, &task);
}

static void compute_row_scale_padded(void *kernel, OrtKernelContext *ctx) { (void)kernel; compute_row_scale(ctx, 0); }
static void compute_row_scale_packed(void *kernel, OrtKernelContext *ctx) { (void)kernel; compute_row_scale(ctx, 1); }

static void *create_kernel(const CustomOp *op, const void *api_, const void *info)
{
    (void)op; (void)api_; (void)info;
    return (void *)1;  /* stateless */
}
static const char *op_name(const CustomOp *op) { (void)op; return "SlotLoRA"; }
static const char *packed_op_name(const CustomOp *op) { (void)op; return "SlotLoRAPacked"; }
static const char *attention_op_name(const CustomOp *op) { (void)op; return "VarlenAttention"; }
static const char *bf16_op_name(const CustomOp *op) { (void)op; return "SlotLoRABF16"; }
static const char *packed_bf16_op_name(const CustomOp *op) { (void)op; return "SlotLoRAPackedBF16"; }
static const char *in_place_op_name(const CustomOp *op) { (void)op; return "SlotLoRAInPlace"; }
static const char *packed_in_place_op_name(const CustomOp *op) { (void)op; return "SlotLoRAPackedInPlace"; }
static const char *bf16_in_place_op_name(const CustomOp *op) { (void)op; return "SlotLoRABF16InPlace"; }
static const char *packed_bf16_in_place_op_name(const CustomOp *op) { (void)op; return "SlotLoRAPackedBF16InPlace"; }
static const char *qkv_op_name(const CustomOp *op) { (void)op; return "SlotLoRAQKVPacked"; }
static const char *qkv_bf16_op_name(const CustomOp *op) { (void)op; return "SlotLoRAQKVPackedBF16"; }
static const char *row_scale_op_name(const CustomOp *op) { (void)op; return "SlotRowScale"; }
static const char *packed_row_scale_op_name(const CustomOp *op) { (void)op; return "SlotRowScalePacked"; }
static const char *row_scale_in_place_op_name(const CustomOp *op) { (void)op; return "SlotRowScaleInPlace"; }
static const char *packed_row_scale_in_place_op_name(const CustomOp *op) { (void)op; return "SlotRowScalePackedInPlace"; }
static const char *op_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
/* SlotLoRA's int64 inputs: 4-7 (ranks, slots, lengths, offset), 10 and 17 (flags), 12 (activation). */
static int lora_int64_input(size_t i) { return (i >= 4 && i <= 7) || i == 10 || i == 12 || i == 17; }
static int input_type(const CustomOp *op, size_t i) { (void)op; return lora_int64_input(i) ? ELEM_INT64 : ELEM_FLOAT; }
static size_t input_count(const CustomOp *op) { (void)op; return N_INPUTS; }
static int bf16_input_type(const CustomOp *op, size_t i)
{
    (void)op;
    return i == 2 || i == 3 ? ELEM_INT32 : lora_int64_input(i) ? ELEM_INT64 : ELEM_FLOAT;
}
/* Per q/k/v part: A, B (fp32 or int32 pairs), slot_r8, out_scale, out_shift, flags. */
static int qkv_input_type(const CustomOp *op, size_t i)
{
    (void)op;
    if (i < 2) return ELEM_FLOAT;
    if (i >= 2 + 3 * QKV_PART) return ELEM_INT64;
    const size_t k = (i - 2) % QKV_PART;
    return k == 2 || k == 5 ? ELEM_INT64 : ELEM_FLOAT;
}
static int qkv_bf16_input_type(const CustomOp *op, size_t i)
{
    return i >= 2 && i < 2 + 3 * QKV_PART && (i - 2) % QKV_PART < 2 ? ELEM_INT32 : qkv_input_type(op, i);
}
static int qkv_optional(const CustomOp *op, size_t i)
{
    (void)op;
    return i >= 2 && i < 2 + 3 * QKV_PART && (i - 2) % QKV_PART >= 3;  /* each part's vectors */
}
static size_t qkv_input_count(const CustomOp *op) { (void)op; return QKV_INPUTS; }
static int attention_input_type(const CustomOp *op, size_t i) { (void)op; return i < 3 ? ELEM_FLOAT : ELEM_INT64; }
static int row_scale_input_type(const CustomOp *op, size_t i) { (void)op; return i < 2 ? ELEM_FLOAT : ELEM_INT64; }
static size_t row_scale_input_count(const CustomOp *op) { (void)op; return 5; }
static size_t attention_input_count(const CustomOp *op) { (void)op; return 5; }
static int output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return ELEM_FLOAT; }
static size_t output_count(const CustomOp *op) { (void)op; return 1; }
static void destroy_kernel(void *kernel) { (void)kernel; }
static int required(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; /* INPUT_OUTPUT_REQUIRED */ }
static int epilogue_optional(const CustomOp *op, size_t i) { (void)op; return i >= 8; /* 1: INPUT_OUTPUT_OPTIONAL */ }
static int kv_optional(const CustomOp *op, size_t i) { (void)op; return i == 1 || i == 2; /* a packed QKV in q */ }
static int default_memory(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; /* OrtMemTypeDefault */ }
static int one(const CustomOp *op) { (void)op; return 1; }
static int start_version(const CustomOp *op) { (void)op; return 1; }
static int end_version(const CustomOp *op) { (void)op; return 2147483647; }
/* Output 0 and input 0 (y) as one pair: as GetMayInplace, ORT 1.31.1 never took it up (our output has
   no static shape for its planner to compare), so the *InPlace ops and SlotLoRAQKVPacked declare it
   as GetAliasMap: ORT then hands them y's buffer as the output, always. Safe only where nothing else
   reads y: the exporter names a node *InPlace only then (runtime/engine/onnx/export._in_place_lora_ops)
   and fuses q/k/v only when their three nodes are y's only readers. */
static size_t y_is_output(int **input_index, int **output_index)
{
    *input_index = malloc(sizeof(int));
    *output_index = malloc(sizeof(int));
    if (!*input_index || !*output_index) abort();
    **input_index = 0;  /* y */
    **output_index = 0;
    return 1;
}
static void release_pairs(int *input_index, int *output_index) { free(input_index); free(output_index); }
static size_t no_pairs(int **input_index, int **output_index) { *input_index = NULL; *output_index = NULL; return 0; }

/* The eight LoRA ops differ in name, input types (fp32 or bf16-pair slots), compute function and
   whether y is their output's buffer (*InPlace: the alias pair; the others offer it as may-inplace,
   which ORT 1.31.1 does not take up). */
#define LORA_OP(name_fn, input_type_fn, compute_fn, inplace_fn, alias_fn) {                              \
    21, create_kernel, name_fn, op_provider, input_type_fn, input_count, output_type, output_count,        \
    compute_fn, destroy_kernel, epilogue_optional, required, default_memory, one, one, one, one, NULL, NULL, NULL, \
    start_version, end_version, inplace_fn, release_pairs, alias_fn, release_pairs,                      \
}
static CustomOp slot_lora_op = LORA_OP(op_name, input_type, compute_padded, y_is_output, no_pairs);
static CustomOp slot_lora_packed_op = LORA_OP(packed_op_name, input_type, compute_packed, y_is_output, no_pairs);
static CustomOp slot_lora_bf16_op = LORA_OP(bf16_op_name, bf16_input_type, compute_padded_bf16, y_is_output, no_pairs);
static CustomOp slot_lora_packed_bf16_op = LORA_OP(packed_bf16_op_name, bf16_input_type, compute_packed_bf16, y_is_output,
                                                   no_pairs);
static CustomOp slot_lora_in_place_op = LORA_OP(in_place_op_name, input_type, compute_padded, no_pairs, y_is_output);
static CustomOp slot_lora_packed_in_place_op = LORA_OP(packed_in_place_op_name, input_type, compute_packed, no_pairs,
                                                       y_is_output);
static CustomOp slot_lora_bf16_in_place_op = LORA_OP(bf16_in_place_op_name, bf16_input_type, compute_padded_bf16,
                                                     no_pairs, y_is_output);
static CustomOp slot_lora_packed_bf16_in_place_op = LORA_OP(packed_bf16_in_place_op_name, bf16_input_type,
                                                            compute_packed_bf16, no_pairs, y_is_output);
static CustomOp slot_lora_qkv_op = {
    21, create_kernel, qkv_op_name, op_provider, qkv_input_type, qkv_input_count, output_type, output_count,
    compute_qkv_fp32, destroy_kernel, qkv_optional, required, default_memory, one, one, one, one, NULL, NULL, NULL,
    start_version, end_version, no_pairs, release_pairs, y_is_output, release_pairs,
};
static CustomOp slot_lora_qkv_bf16_op = {
    21, create_kernel, qkv_bf16_op_name, op_provider, qkv_bf16_input_type, qkv_input_count, output_type, output_count,
    compute_qkv_bf16, destroy_kernel, qkv_optional, required, default_memory, one, one, one, one, NULL, NULL, NULL,
    start_version, end_version, no_pairs, release_pairs, y_is_output, release_pairs,
};
#define ROW_SCALE_OP(name_fn, compute_fn, alias_fn) {                                                       \
    21, create_kernel, name_fn, op_provider, row_scale_input_type, row_scale_input_count, output_type, output_count, \
    compute_fn, destroy_kernel, required, required, default_memory, one, one, one, one, NULL, NULL, NULL,      \
    start_version, end_version, no_pairs, release_pairs, alias_fn, release_pairs,                               \
}
static CustomOp row_scale_op = ROW_SCALE_OP(row_scale_op_name, compute_row_scale_padded, no_pairs);
static CustomOp packed_row_scale_op = ROW_SCALE_OP(packed_row_scale_op_name, compute_row_scale_packed, no_pairs);
static CustomOp row_scale_in_place_op = ROW_SCALE_OP(row_scale_in_place_op_name, compute_row_scale_padded, y_is_output);
static CustomOp packed_row_scale_in_place_op = ROW_SCALE_OP(packed_row_scale_in_place_op_name, compute_row_scale_packed,
                                                            y_is_output);
static CustomOp varlen_attention_op = {
    21, create_kernel, attention_op_name, op_provider, attention_input_type, attention_input_count, output_type,
    output_count, compute_attention, destroy_kernel, kv_optional, required, default_memory, one, one, one, one, NULL,
    NULL, NULL, start_version, end_version, no_pairs, release_pairs, no_pairs, release_pairs,
};

typedef OrtStatus *(*create_domain_fn)(const char *, void **);
typedef OrtStatus *(*domain_add_fn)(void *, void *);
typedef OrtStatus *(*add_domain_fn)(void *, void *);

/* Entry point ORT looks up in SessionOptions.register_custom_ops_library. */
OrtStatus *RegisterCustomOps(void *options, const ApiBase *base)
{
    api = base->GetApi(17);
    has_parallel_for = api != NULL;
    if (!api) api = base->GetApi(1);
    if (!api) abort();
    void *domain;
    OrtStatus *s = CALL(API_CREATE_CUSTOM_OP_DOMAIN, create_domain_fn, "adapterserve", &domain);
    if (s) return s;
    const char *amx = getenv("ADAPTERSERVE_LORA_AMX");  /* "off": the bf16 ops take their portable loop */
    amx_disabled = amx && strcmp(amx, "off") == 0;
    CustomOp *ops[] = {&slot_lora_op, &slot_lora_packed_op, &slot_lora_bf16_op, &slot_lora_packed_bf16_op,
                       &slot_lora_in_place_op, &slot_lora_packed_in_place_op, &slot_lora_bf16_in_place_op,
                       &slot_lora_packed_bf16_in_place_op, &slot_lora_qkv_op, &slot_lora_qkv_bf16_op,
                       &varlen_attention_op, &row_scale_op, &packed_row_scale_op, &row_scale_in_place_op,
                       &packed_row_scale_in_place_op};
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++) {
        s = CALL(API_CUSTOM_OP_DOMAIN_ADD, domain_add_fn, domain, ops[i]);
        if (s) return s;
    }
    return CALL(API_ADD_CUSTOM_OP_DOMAIN, add_domain_fn, options, domain);
}
