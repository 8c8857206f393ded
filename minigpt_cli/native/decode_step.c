/* One GPT-2 decode step for 1..64 rows on the CPU, all in one call.
 *
 * Why this exists: a cached decode step of a small model does ~60 tiny operations, and in
 * eager PyTorch each one costs a few microseconds of dispatch; together they, not arithmetic,
 * set the speed (docs/benchmarks.md). For a large model the step streams every weight once,
 * and PyTorch's matrix-vector product uses one core. Here the whole step is one C call inside
 * one OpenMP thread region, the matrix-vector products split their output columns over the
 * threads, and the weights are read in minigpt's [in, out] layout four rows at a time, which
 * streams memory at full speed (benchmarks/native_step.py).
 *
 * The math is exactly the model's (minigpt_cli/model.py): pre-LayerNorm blocks, tanh GELU,
 * scaled dot-product attention over the key/value cache, tied output head. Only float32.
 * The cache is minigpt's KVCache layout, [layers, slots, heads, cache_len, head_dim]; each row
 * names its own slot and column, writes its new key and value there and attends over columns
 * 0..col of that slot, so sequences of different lengths share a step with no padding.
 *
 * Built on first use by minigpt_cli/native.py with the system C compiler; when there is none,
 * minigpt decodes with PyTorch instead. tests/test_native.py holds it to the PyTorch path.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_BATCH 64
#define ACC_FLOATS 4096 /* per-thread accumulators: 16 KB, inside L1 */
#define LN_EPS 1e-5f

/* Per-layer weight pointers, in this order (bias and LayerNorm-shift entries may be NULL). */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_W, LN2_B, FC_W, FC_B, MPROJ_W,
       MPROJ_B, PER_LAYER };
/* Model-level pointers come first. */
enum { WTE, WPE, HEAD_T, LNF_W, LNF_B, GLOBALS };

int minigpt_abi_version(void) { return 2; }
int minigpt_max_batch(void) { return MAX_BATCH; }

/* e^x for float32, written so the softmax and GELU loops vectorize (libm's expf is an opaque
 * scalar call, and gcc vectorizes calls to it only under -ffast-math). Cody-Waite range
 * reduction x = n ln2 + r and Cephes' degree-6 polynomial: within 1 ulp of the exact value on
 * [-87, 88] (expf: 0.5 ulp). Inputs below -87.3 give ~1e-38, not 0. */
#pragma omp declare simd
static inline float exp_f32(float x) {
    x = fminf(fmaxf(x, -87.3f), 88.7f);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.f;
    union { int32_t i; float f; } scale = { ((int32_t)n + 127) << 23 };
    return e * scale.f;
}

/* GELU with GPT-2's tanh approximation; tanh(u) = 1 - 2 / (e^(2u) + 1), vectorizable. */
#pragma omp declare simd
static inline float gelu_tanh(float v) {
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    const float t = 1.f - 2.f / (exp_f32(2.f * k * (v + 0.044715f * v * v * v)) + 1.f);
    return 0.5f * v * (1.f + t);
}

/* What a matrix-vector product does with its result: store it, store GELU of it (the MLP's
 * first layer), or add it to the destination (the residual stream after a projection).
 * Fusing these into the product's last pass saves a sweep and a thread barrier each. */
enum { STORE, STORE_GELU, ADD };

/* y[b, :] (op)= x[b, :] @ W + bias for b < B; W is [n_in, n_out], row-major.
 * Runs inside the step's parallel region: `omp for` hands each thread whole column tiles.
 * A tile's accumulators stay in L1 while W's rows stream past once, four rows at a time,
 * shared by every batch row: one accumulator load and store per four weights keeps the loop
 * at DRAM bandwidth (41 GB/s on the machine of docs/benchmarks.md, benchmarks/native_step.py).
 */
static void matvec(int B, int n_in, int n_out, const float *x, const float *W, const float *bias,
                   float *y, int op, int nt) {
    const int max_tile = ACC_FLOATS / B / 16 * 16;
    int ntiles = (n_out + max_tile - 1) / max_tile;
    if (ntiles < nt) ntiles = nt;
    ntiles = (ntiles + nt - 1) / nt * nt;
    int tile = (n_out + ntiles - 1) / ntiles;
    tile = (tile + 15) / 16 * 16;
    ntiles = (n_out + tile - 1) / tile;
#pragma omp for schedule(static)
    for (int t = 0; t < ntiles; t++) {
        const int j0 = t * tile;
        const int w = j0 + tile < n_out ? tile : n_out - j0;
        float acc[ACC_FLOATS];
        for (int b = 0; b < B; b++) {
            if (bias) memcpy(acc + b * tile, bias + j0, (size_t)w * sizeof(float));
            else memset(acc + b * tile, 0, (size_t)w * sizeof(float));
        }
        int i = 0;
        for (; i + 4 <= n_in; i += 4) {
            const float *restrict r0 = W + (size_t)i * n_out + j0;
            const float *restrict r1 = r0 + n_out, *restrict r2 = r1 + n_out;
            const float *restrict r3 = r2 + n_out;
            for (int b = 0; b < B; b++) {
                const float *xb = x + (size_t)b * n_in + i;
                const float x0 = xb[0], x1 = xb[1], x2 = xb[2], x3 = xb[3];
                float *restrict a = acc + b * tile;
#pragma omp simd
                for (int j = 0; j < w; j++)
                    a[j] += x0 * r0[j] + x1 * r1[j] + x2 * r2[j] + x3 * r3[j];
            }
        }
        for (; i < n_in; i++) {
            const float *restrict row = W + (size_t)i * n_out + j0;
            for (int b = 0; b < B; b++) {
                const float xi = x[(size_t)b * n_in + i];
                float *restrict a = acc + b * tile;
#pragma omp simd
                for (int j = 0; j < w; j++) a[j] += xi * row[j];
            }
        }
        for (int b = 0; b < B; b++) {
            const float *restrict a = acc + b * tile;
            float *restrict out = y + (size_t)b * n_out + j0;
            if (op == ADD) {
#pragma omp simd
                for (int j = 0; j < w; j++) out[j] += a[j];
            } else if (op == STORE_GELU) {
#pragma omp simd
                for (int j = 0; j < w; j++) out[j] = gelu_tanh(a[j]);
            } else {
                memcpy(out, a, (size_t)w * sizeof(float));
            }
        }
    }
}

static void layer_norm(int B, int C, const float *x, const float *g, const float *beta,
                       float *out) {
    for (int b = 0; b < B; b++) {
        const float *xr = x + (size_t)b * C;
        float *o = out + (size_t)b * C;
        float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
        for (int c = 0; c < C; c++) mean += xr[c];
        mean /= (float)C;
#pragma omp simd reduction(+ : var)
        for (int c = 0; c < C; c++) var += (xr[c] - mean) * (xr[c] - mean);
        const float rstd = 1.f / sqrtf(var / (float)C + LN_EPS);
        for (int c = 0; c < C; c++) {
            float v = (xr[c] - mean) * rstd * g[c];
            o[c] = beta ? v + beta[c] : v;
        }
    }
}

/* Write each row's new key and value at its slot's column, then (after the barrier that ends
 * the loop) one query per (row, head) against its slot's columns 0..col. Rows are independent:
 * a row's result never depends on which other rows share the step, so a sequence decodes the
 * same alone or in any batch (the engine's batched == alone guarantee). Two rows may even
 * share a slot at consecutive columns (a prompt chunk): the write pass finishes first. */
static void attention(int B, int H, int D, int S, const int64_t *slot, const int64_t *col,
                      const float *qkv, float *kc, float *vc, float *out) {
    const int C = H * D;
    const float scale = 1.f / sqrtf((float)D);
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        const float *q = qkv + (size_t)b * 3 * C + (size_t)h * D;
        const size_t head = ((size_t)slot[b] * H + h) * (size_t)S * D + (size_t)col[b] * D;
        memcpy(kc + head, q + C, (size_t)D * sizeof(float));
        memcpy(vc + head, q + 2 * C, (size_t)D * sizeof(float));
    }
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H, n = (int)col[b] + 1;
        const float *q = qkv + (size_t)b * 3 * C + (size_t)h * D;
        const float *K = kc + ((size_t)slot[b] * H + h) * (size_t)S * D;
        const float *V = vc + ((size_t)slot[b] * H + h) * (size_t)S * D;
        float p[n];
        float mx = -INFINITY;
        for (int s = 0; s < n; s++) {
            float dot = 0.f;
            const float *k = K + (size_t)s * D;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; d++) dot += q[d] * k[d];
            p[s] = dot * scale;
            if (p[s] > mx) mx = p[s];
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int s = 0; s < n; s++) {
            p[s] = exp_f32(p[s] - mx);
            sum += p[s];
        }
        const float inv = 1.f / sum;
        float *o = out + (size_t)b * C + (size_t)h * D;
        memset(o, 0, (size_t)D * sizeof(float));
        for (int s = 0; s < n; s++) {
            const float wt = p[s] * inv;
            const float *v = V + (size_t)s * D;
#pragma omp simd
            for (int d = 0; d < D; d++) o[d] += wt * v[d];
        }
    }
}

/* dims: n_layer, n_head, n_embd, vocab, rows, cache_len, n_slots, threads.
 * tokens, pos, slot, col: [rows]: row b feeds token tokens[b] at position pos[b], and writes
 * its key and value at column col[b] of cache slot slot[b]; kc, vc: the cache,
 * [layers, n_slots, heads, cache_len, head_dim]; logits: [rows, vocab];
 * scratch: 10 * rows * n_embd floats. Returns 0, or -1 on bad arguments. */
int minigpt_decode_step(const int64_t *dims, const float *const *w, const int64_t *tokens,
                        const int64_t *pos, const int64_t *slot, const int64_t *col, float *kc,
                        float *vc, float *logits, float *scratch) {
    const int L = (int)dims[0], H = (int)dims[1], C = (int)dims[2], V = (int)dims[3];
    const int B = (int)dims[4], S = (int)dims[5], NS = (int)dims[6], nt = (int)dims[7];
    if (B < 1 || B > MAX_BATCH || C % H || nt < 1) return -1;
    for (int b = 0; b < B; b++)
        if (slot[b] < 0 || slot[b] >= NS || col[b] < 0 || col[b] >= S) return -1;
    const int D = C / H;
    float *x = scratch, *h = x + B * C, *att = h + B * C, *qkv = att + B * C;
    float *f = qkv + 3 * B * C; /* 4 * B * C */

    /* One parallel region for the whole step: every `omp for` below shares out its loop and
     * ends in a barrier, and `single` does the small serial parts. Forking threads once per
     * step instead of once per product matters when a product takes a few microseconds. */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp single
        for (int b = 0; b < B; b++) {
            const float *te = w[WTE] + (size_t)tokens[b] * C;
            const float *pe = w[WPE] + (size_t)pos[b] * C;
            for (int c = 0; c < C; c++) x[b * C + c] = te[c] + pe[c];
            if (L > 0)
                layer_norm(1, C, x + b * C, w[GLOBALS + LN1_W], w[GLOBALS + LN1_B], h + b * C);
        }
        for (int l = 0; l < L; l++) {
            const float *const *p = w + GLOBALS + (size_t)l * PER_LAYER;
            const size_t layer_off = (size_t)l * NS * H * S * D;
            matvec(B, C, 3 * C, h, p[ATTN_W], p[ATTN_B], qkv, STORE, nt);
            attention(B, H, D, S, slot, col, qkv, kc + layer_off, vc + layer_off, att);
            matvec(B, C, C, att, p[APROJ_W], p[APROJ_B], x, ADD, nt);
#pragma omp single
            layer_norm(B, C, x, p[LN2_W], p[LN2_B], h);
            matvec(B, C, 4 * C, h, p[FC_W], p[FC_B], f, STORE_GELU, nt);
            matvec(B, 4 * C, C, f, p[MPROJ_W], p[MPROJ_B], x, ADD, nt);
            /* The next layer's first LayerNorm, or the final one. */
            const float *g = l + 1 < L ? p[PER_LAYER + LN1_W] : w[LNF_W];
            const float *beta = l + 1 < L ? p[PER_LAYER + LN1_B] : w[LNF_B];
#pragma omp single
            layer_norm(B, C, x, g, beta, h);
        }
        if (L == 0) {
#pragma omp single
            layer_norm(B, C, x, w[LNF_W], w[LNF_B], h);
        }
        matvec(B, C, V, h, w[HEAD_T], NULL, logits, STORE, nt);
    }
    return 0;
}
