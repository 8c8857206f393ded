/* One batch-1..16 GPT-2 decode step on the CPU, all in one call.
 *
 * Why this exists: a cached decode step of a small model does ~60 tiny operations, and in
 * eager PyTorch each one costs a few microseconds of dispatch; together they, not arithmetic,
 * set the speed (docs/benchmarks.md). For a large model the step streams every weight once,
 * and PyTorch's matrix-vector product uses one core. Here the whole step is one C call, the
 * matrix-vector products split their output columns over threads, and the weights are read in
 * minigpt's [in, out] layout, row by row, which streams memory at full speed.
 *
 * The math is exactly the model's (minigpt_cli/model.py): pre-LayerNorm blocks, tanh GELU,
 * scaled dot-product attention over the key/value cache, tied output head. Only float32.
 * The cache is minigpt's KVCache layout, [layers, batch, heads, cache_len, head_dim]; this step
 * writes the new keys and values at column `col` and attends over columns 0..col.
 *
 * Built on first use by minigpt_cli/native.py with the system C compiler; when there is none,
 * minigpt decodes with PyTorch instead. tests/test_native.py holds it to the PyTorch path.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_BATCH 16
#define ACC_FLOATS 4096 /* per-thread accumulators: 16 KB, inside L1 */
#define LN_EPS 1e-5f

/* Per-layer weight pointers, in this order (bias and LayerNorm-shift entries may be NULL). */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_W, LN2_B, FC_W, FC_B, MPROJ_W,
       MPROJ_B, PER_LAYER };
/* Model-level pointers come first. */
enum { WTE, WPE, HEAD_T, LNF_W, LNF_B, GLOBALS };

int minigpt_abi_version(void) { return 1; }
int minigpt_max_batch(void) { return MAX_BATCH; }

/* y[b, :] = x[b, :] @ W + bias for b < B; W is [n_in, n_out], row-major.
 * Output columns are cut into tiles, one thread per tile. A tile's accumulators stay in L1
 * while W's rows stream past once, four rows at a time, shared by every batch row: one load
 * and store of an accumulator per four weights keeps the loop bound by DRAM bandwidth
 * (40 GB/s on the 2-core machine of docs/benchmarks.md, against 23 GB/s one row at a time). */
static void matvec(int B, int n_in, int n_out, const float *x, const float *W, const float *bias,
                   float *y, int nt) {
    const int max_tile = ACC_FLOATS / B / 16 * 16;
    int ntiles = (n_out + max_tile - 1) / max_tile;
    if (ntiles < nt) ntiles = nt;
    ntiles = (ntiles + nt - 1) / nt * nt;
    int tile = (n_out + ntiles - 1) / ntiles;
    tile = (tile + 15) / 16 * 16;
    ntiles = (n_out + tile - 1) / tile;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && ntiles > 1)
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
        for (int b = 0; b < B; b++)
            memcpy(y + (size_t)b * n_out + j0, acc + b * tile, (size_t)w * sizeof(float));
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

/* One query per (row, head) against cache columns 0..col; masked columns (valid == 0) are
 * skipped. The new token's own column is always valid, so no row is ever empty. */
static void attention(int B, int H, int D, int S, int col, const float *qkv, const float *kc,
                      const float *vc, const uint8_t *valid, float *out, int nt) {
    const int C = H * D;
    const float scale = 1.f / sqrtf((float)D);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && (B * H) > 1 && col >= 64)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        const float *q = qkv + (size_t)b * 3 * C + (size_t)h * D;
        const float *K = kc + ((size_t)b * H + h) * (size_t)S * D;
        const float *V = vc + ((size_t)b * H + h) * (size_t)S * D;
        const uint8_t *ok = valid ? valid + (size_t)b * S : NULL;
        float scores[col + 1];
        float mx = -INFINITY;
        for (int s = 0; s <= col; s++) {
            if (ok && !ok[s] && s != col) { scores[s] = -INFINITY; continue; }
            float dot = 0.f;
            const float *k = K + (size_t)s * D;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < D; d++) dot += q[d] * k[d];
            scores[s] = dot * scale;
            if (scores[s] > mx) mx = scores[s];
        }
        float sum = 0.f;
        for (int s = 0; s <= col; s++) {
            scores[s] = scores[s] == -INFINITY ? 0.f : expf(scores[s] - mx);
            sum += scores[s];
        }
        float *o = out + (size_t)b * C + (size_t)h * D;
        memset(o, 0, (size_t)D * sizeof(float));
        for (int s = 0; s <= col; s++) {
            if (scores[s] == 0.f) continue;
            const float p = scores[s] / sum;
            const float *v = V + (size_t)s * D;
#pragma omp simd
            for (int d = 0; d < D; d++) o[d] += p * v[d];
        }
    }
}

static void add_into(size_t n, float *x, const float *y) {
#pragma omp simd
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

static void gelu_tanh(size_t n, float *x) {
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    for (size_t i = 0; i < n; i++) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
}

/* dims: n_layer, n_head, n_embd, vocab, batch, cache_len, col, threads.
 * tokens, pos: [batch]; valid: [batch, cache_len] or NULL; kc, vc: the cache;
 * logits: [batch, vocab]; scratch: 10 * batch * n_embd floats. Returns 0, or -1 on bad dims. */
int minigpt_decode_step(const int64_t *dims, const float *const *w, const int64_t *tokens,
                        const int64_t *pos, const uint8_t *valid, float *kc, float *vc,
                        float *logits, float *scratch) {
    const int L = (int)dims[0], H = (int)dims[1], C = (int)dims[2], V = (int)dims[3];
    const int B = (int)dims[4], S = (int)dims[5], col = (int)dims[6], nt = (int)dims[7];
    if (B < 1 || B > MAX_BATCH || C % H || col < 0 || col >= S || nt < 1) return -1;
    const int D = C / H;
    float *x = scratch, *h = x + B * C, *att = h + B * C, *qkv = att + B * C;
    float *f = qkv + 3 * B * C; /* 4 * B * C */

    for (int b = 0; b < B; b++) {
        const float *te = w[WTE] + (size_t)tokens[b] * C, *pe = w[WPE] + (size_t)pos[b] * C;
        for (int c = 0; c < C; c++) x[b * C + c] = te[c] + pe[c];
    }
    for (int l = 0; l < L; l++) {
        const float *const *p = w + GLOBALS + (size_t)l * PER_LAYER;
        const size_t layer_off = (size_t)l * B * H * S * D;
        layer_norm(B, C, x, p[LN1_W], p[LN1_B], h);
        matvec(B, C, 3 * C, h, p[ATTN_W], p[ATTN_B], qkv, nt);
        for (int b = 0; b < B; b++)
            for (int hh = 0; hh < H; hh++) {
                const size_t at = layer_off + (((size_t)b * H + hh) * S + col) * D;
                memcpy(kc + at, qkv + (size_t)b * 3 * C + C + (size_t)hh * D, D * sizeof(float));
                memcpy(vc + at, qkv + (size_t)b * 3 * C + 2 * C + (size_t)hh * D,
                       D * sizeof(float));
            }
        attention(B, H, D, S, col, qkv, kc + layer_off, vc + layer_off, valid, att, nt);
        matvec(B, C, C, att, p[APROJ_W], p[APROJ_B], h, nt);
        add_into((size_t)B * C, x, h);
        layer_norm(B, C, x, p[LN2_W], p[LN2_B], h);
        matvec(B, C, 4 * C, h, p[FC_W], p[FC_B], f, nt);
        gelu_tanh((size_t)B * 4 * C, f);
        matvec(B, 4 * C, C, f, p[MPROJ_W], p[MPROJ_B], h, nt);
        add_into((size_t)B * C, x, h);
    }
    layer_norm(B, C, x, w[LNF_W], w[LNF_B], h);
    matvec(B, C, V, h, w[HEAD_T], NULL, logits, nt);
    return 0;
}
