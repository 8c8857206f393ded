/* One GPT-2 decode step for 1..64 rows on the CPU, all in one call.
 *
 * Why this exists: a cached decode step of a small model does ~60 tiny operations, and in
 * eager PyTorch each one costs a few microseconds of dispatch; together they, not arithmetic,
 * set the speed (docs/benchmarks.md). For a large model the step streams every weight once,
 * and PyTorch's matrix-vector product uses one core. Here the whole step is one C call inside
 * one OpenMP thread region, and the products split their output columns over the threads.
 * Each product is register-blocked over weights packed strip by strip (see matvec): at one row
 * it streams memory in one sequential run, and with many rows (a server's running requests, a
 * prompt's tokens) each weight read feeds them all (benchmarks/batched_step.py).
 *
 * The math is exactly the model's (minigpt_cli/model/gpt.py): pre-norm blocks, scaled dot-product
 * attention over the key/value cache, tied output head; GPT-2's LayerNorm, learned positions
 * and tanh-GELU MLP, or the options of minigpt_cli/model/layers.py (RMSNorm, rotary positions,
 * SwiGLU or ReLU² MLP, RMSNorm on queries and keys) as the dims say. Activations are
 * float32; each matrix is float32, or int8 with a float16 scale per GROUP input rows and output
 * column (minigpt_cli/model/int8.py), multiplied by its input rows rounded to int8 the same
 * way, with integer dot products (see q8_group).
 * The cache is minigpt's KVCache layout, [layers, slots, heads, cache_len, head_dim]; each row
 * names its own slot and column, writes its new key and value there and attends over columns
 * 0..col of that slot, so sequences of different lengths share a step with no padding.
 *
 * Built on first use by its binding beside it (__init__.py) with the system C compiler; when
 * there is none, minigpt decodes with PyTorch instead. tests/inference/test_native.py holds it
 * to the PyTorch path.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAX_BATCH 64

/* Per-layer weight pointers, in this order (bias, LayerNorm-shift and query/key-norm entries
 * may be NULL). */
enum { LN1_W, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_W, LN2_B, FC_W, FC_B, MPROJ_W,
       MPROJ_B, QN_W, KN_W, PER_LAYER };
/* The architecture, dims[8..12]: norm (0 LayerNorm, 1 RMSNorm), rotary (0 learned positions,
 * 1 rotary), MLP (0 GELU, 1 SwiGLU, 2 ReLU²), query/key norm (0/1), the MLP's inner width. */
enum { MLP_GELU, MLP_SWIGLU, MLP_RELU2 };
/* Model-level pointers come first. */
enum { WTE, WPE, HEAD_T, LNF_W, LNF_B, GLOBALS };

int minigpt_abi_version(void) { return 10; }
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

/* x * sigmoid(x), SwiGLU's gate. */
#pragma omp declare simd
static inline float silu(float v) { return v / (1.f + exp_f32(-v)); }

/* What a matrix-vector product does with its result: store it, store GELU or ReLU² of it
 * (the MLP's first layer), or add it to the destination (the residual stream after a
 * projection). Fusing these into the product's last pass saves a sweep and a thread barrier
 * each. */
enum { STORE, STORE_GELU, STORE_RELU2, ADD };

/* Register blocking. An output strip is STRIP = CV x VL columns; for a block of RB rows the
 * strip's RB x CV accumulators live in vector registers while W's rows stream past once: each
 * weight vector loaded feeds RB fused multiply-adds, so more rows cost arithmetic, not memory
 * traffic. VL floats are one vector register: 16 with AVX-512 (32 registers, blocks of up to
 * 12 rows), else 8 (AVX2 and others: 16 registers, blocks of up to 6 rows). The largest block
 * keeps 2 x MAX_RB independent sums in flight, enough to hide the multiply-add latency. */
#if defined(__AVX512F__)
#define VL 16
#define MAX_RB 12
#else
#define VL 8
#define MAX_RB 6
#endif
#define CV 2
#define STRIP (VL * CV)
/* Fetch ahead two lines of the range at pf: line (i * m) >> 16 at iteration i (m = 0: none).
 * Into L1 (locality 3); matvec says what the range is and why. */
#define PF_LINES(pf, i, m)                                                                      \
    do {                                                                                      \
        if (m) {                                                                              \
            const float *l_ = (pf) + (size_t)(((unsigned)(i) * (m)) >> 16) * STRIP;           \
            __builtin_prefetch(l_, 0, 3);                                                     \
            __builtin_prefetch(l_ + STRIP, 0, 3);                                             \
        }                                                                                     \
    } while (0)
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* out[r][..] = bias[j..] + sum over i of x[r, i] * P[i][..] for r < RB, over one strip of
 * STRIP columns whose weights P are packed contiguously ([n_in][STRIP], see below): the
 * accumulators stay in registers and the weights stream in order. Every row of every block
 * size does the same operations in the same order (one fused multiply-add per weight, i
 * ascending), so a row's result never depends on which rows share the step: the engine's
 * batched == alone guarantee. */
#define DEFINE_STRIP(RB)                                                                        \
    static void strip_##RB(int n_in, const float *x, const float *P, const float *bias,       \
                           float *out, const float *pf, unsigned pf_m) {                      \
        vf a[RB][CV];                                                                         \
        for (int c = 0; c < CV; c++) {                                                        \
            const vf b0 = bias ? vload(bias + c * VL) : (vf){0};                              \
            for (int r = 0; r < RB; r++) a[r][c] = b0;                                        \
        }                                                                                     \
        for (int i = 0; i < n_in; i++, P += STRIP) {                                          \
            PF_LINES(pf, i, pf_m);                                                            \
            const vf w0 = vload(P), w1 = vload(P + VL);                                       \
            for (int r = 0; r < RB; r++) {                                                    \
                const float xr = x[(size_t)r * n_in + i];                                     \
                a[r][0] += xr * w0;                                                           \
                a[r][1] += xr * w1;                                                           \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < RB; r++)                                                          \
            for (int c = 0; c < CV; c++) memcpy(out + r * STRIP + c * VL, &a[r][c], sizeof(vf)); \
    }
DEFINE_STRIP(1)
DEFINE_STRIP(2)
DEFINE_STRIP(3)
DEFINE_STRIP(4)
DEFINE_STRIP(5)
DEFINE_STRIP(6)
#if MAX_RB > 6
DEFINE_STRIP(7)
DEFINE_STRIP(8)
DEFINE_STRIP(9)
DEFINE_STRIP(10)
DEFINE_STRIP(11)
DEFINE_STRIP(12)
#endif

/* int8 x int8, llama.cpp's Q8_0 product. Weights are int8 in groups of GROUP input rows with
 * one float16 scale per group and output column (model/int8.py); before a product each input
 * row is rounded the same way, per group of GROUP values: scale max |x| / 127, values
 * round(x / scale) (quantize_rows). A group's product is then a sum of 32 integer products,
 * exact in int32 whatever order it is added in, times the two scales; the groups' results
 * are added in float32 in ascending order. So every row's result is the same whichever rows
 * share the step and whichever instructions add up the integers (model/q8.py's q8_product
 * is the reference).
 *
 * Why: a token streams every weight once, and a weight is 1 byte; widening each to float
 * (an instruction per weight vector, then a multiply-add per row) left the step waiting on
 * arithmetic, not memory. With AVX-512 VNNI one instruction multiplies and adds 64 byte pairs.
 *
 * Layout: a strip's weights are stored as unsigned bytes w + 128 in quads, [n_in / 4][STRIP][4]
 * (four consecutive inputs of one column together: what a dot-product instruction reads),
 * the inputs padded with zeros to whole groups and the columns to whole strips (padding has
 * scale 0); scales [groups][STRIP] as float16 bits, as Q8_0 keeps them (two bytes a group
 * fewer to stream). The +128 makes the weights the unsigned operand VNNI wants; quantize_rows
 * keeps each row's group sums, 128 * sum(x), which are taken off. */
#define GROUP 32
/* Rows per block: 2 x Q8_RB accumulators in registers beside the weights and constants (32
 * vector registers with AVX-512, 16 with AVX2). */
#if VL == 16
#define Q8_RB 6
#else
#define Q8_RB 4
#endif

/* Rows quantized for a product: values (int8, each row padded to whole groups), scales, and
 * 128 x each group's sum, for B rows of n_in. */
typedef struct {
    int8_t *v;
    float *scale;
    int32_t *offset;
    int stride; /* values per row: groups * GROUP */
} qrows;

#ifdef __AVX2__
/* One whole group of GROUP values, eight at a time: the same scale, values and sum as the
 * loop in quantize_rows (the largest magnitude is the same whatever order it is found in;
 * the conversion rounds to nearest even, as lrintf does). */
static inline void quantize_group(const float *x, int8_t *v, float *scale, int32_t *offset) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
    const __m256 x2 = _mm256_loadu_ps(x + 16), x3 = _mm256_loadu_ps(x + 24);
    const __m256 m = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(x0, magnitude), _mm256_and_ps(x1, magnitude)),
        _mm256_max_ps(_mm256_and_ps(x2, magnitude), _mm256_and_ps(x3, magnitude)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float d = _mm_cvtss_f32(h) / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    const __m256 vid = _mm256_set1_ps(id);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(x0, vid));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(x1, vid));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(x2, vid));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(x3, vid));
    /* packs work within 128-bit halves; the permute puts the four quads back in order */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1),
                                             _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256((__m256i *)v, _mm256_permutevar8x32_epi32(
                                          bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    const __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4E));
    u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1));
    *scale = d;
    *offset = 128 * _mm_cvtsi128_si32(u);
}
#endif

/* Rows [r0, r1) of B, quantized for a product (each thread takes its own rows). */
static void quantize_rows(int r0, int r1, int n_in, const float *x, qrows *q) {
    const int groups = q->stride / GROUP;
    for (int b = r0; b < r1; b++) {
        const float *xr = x + (size_t)b * n_in;
        int8_t *v = q->v + (size_t)b * q->stride;
        for (int g = 0; g < groups; g++) {
            const int i0 = g * GROUP, i1 = i0 + GROUP < n_in ? i0 + GROUP : n_in;
#ifdef __AVX2__
            if (i1 - i0 == GROUP) {
                quantize_group(xr + i0, v + i0, q->scale + (size_t)b * groups + g,
                               q->offset + (size_t)b * groups + g);
                continue;
            }
#endif
            float amax = 0.f;
            for (int i = i0; i < i1; i++) amax = fmaxf(amax, fabsf(xr[i]));
            const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int32_t sum = 0;
            for (int i = i0; i < i0 + GROUP; i++) {
                const int8_t t = i < i1 ? (int8_t)lrintf(xr[i] * id) : 0;
                v[i] = t;
                sum += t;
            }
            q->scale[(size_t)b * groups + g] = d;
            q->offset[(size_t)b * groups + g] = 128 * sum;
        }
    }
}

/* Integer dot products, the widest the build's CPU has, each giving the same exact sums:
 * - AVX-512 VNNI: one instruction multiplies 64 unsigned bytes (w + 128) by signed bytes (x)
 *   and adds each column's four products into its int32 lane; the + 128 is taken off by
 *   starting the sums at -128 * sum(x);
 * - AVX2: llama.cpp's way, multiply |x| by w carrying x's sign (pairs added into int16 lanes,
 *   at most 2 x 127 x 127, so never saturating), then pairs of those into int32 lanes;
 * - anything else: plain loops, for any compiler. */
#if defined(__AVX512VNNI__) && VL == 16
#define Q8_VNNI 1
#elif defined(__AVX2__) && VL == 8
#define Q8_AVX2 1
#endif
#if defined(Q8_VNNI) || defined(Q8_AVX2)
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
#endif
#ifdef Q8_VNNI
typedef __m512i vb; /* a vector of bytes */
/* acc + each column's four products of unsigned weight bytes by signed x bytes. */
static inline vi dotu(vi acc, vb w, int32_t x4) {
    return (vi)_mm512_dpbusd_epi32((__m512i)acc, w, _mm512_set1_epi32(x4));
}
static inline vi dot4(vi acc, const uint8_t *w, int32_t x4) {
    return dotu(acc, _mm512_loadu_si512(w), x4);
}
#elif defined(Q8_AVX2)
typedef __m256i vb;
/* acc + each column's four products of signed weight bytes by signed x bytes. */
static inline vi dots(vi acc, vb w, int32_t x4) {
    const __m256i x = _mm256_set1_epi32(x4);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
    return (vi)_mm256_add_epi32((__m256i)acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
static inline vi dot4(vi acc, const uint8_t *w, int32_t x4) {
    return dots(acc, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)w),
                                      _mm256_set1_epi8((char)0x80)), /* w + 128 -> w */
                x4);
}
#endif

/* A float16 (bits) as float32, exact for every value: normal, subnormal, zero, infinite or
 * not a number. Where the build has F16C (or AVX-512), load_halves converts a vector at once. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    float f;
    if (e == 0) { /* zero or subnormal: m x 2^-24, exact in float32 */
        f = (float)m * 0x1p-24f;
        uint32_t bits;
        memcpy(&bits, &f, 4);
        bits |= sign;
        memcpy(&f, &bits, 4);
        return f;
    }
    const uint32_t bits = sign | (e == 31 ? 0xFFu << 23 : (e + 112) << 23) | m << 13;
    memcpy(&f, &bits, 4);
    return f;
}

/* A strip's STRIP float16 scales as CV float vectors. */
static inline void load_halves(const uint16_t *h, vf f[CV]) {
    for (int c = 0; c < CV; c++) {
#if VL == 16
        f[c] = (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + c * VL)));
#elif defined(__F16C__)
        f[c] = (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + c * VL)));
#else
        for (int l = 0; l < VL; l++) f[c][l] = half_to_float(h[c * VL + l]);
#endif
    }
}

/* One strip of an int8 (BITS 8) or int4 (BITS 4) product for RB rows from r0: each group's
 * exact integer sums (GROUPFN), times the weights' and the row's scales, added in order. */
#define DEFINE_QSTRIP(NAME, RB, GROUPFN, BITS)                                                  \
    static void NAME##_##RB(int groups, const qrows *xq, int r0, const uint8_t *Q,            \
                            const uint16_t *S, const float *bias, float *out) {               \
        vf acc[RB][CV], ws[CV];                                                               \
        for (int c = 0; c < CV; c++) {                                                        \
            const vf b0 = bias ? vload(bias + c * VL) : (vf){0};                              \
            for (int r = 0; r < RB; r++) acc[r][c] = b0;                                      \
        }                                                                                     \
        for (int g = 0; g < groups; g++, S += STRIP, Q += GROUP * STRIP * (BITS) / 8) {       \
            vf sums[RB][CV];                                                                  \
            GROUPFN(RB, xq, r0, g, Q, sums);                                                  \
            load_halves(S, ws);                                                               \
            for (int r = 0; r < RB; r++) {                                                    \
                const float xs = xq->scale[(size_t)(r0 + r) * groups + g];                    \
                for (int c = 0; c < CV; c++) acc[r][c] += sums[r][c] * (ws[c] * xs);         \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < RB; r++) memcpy(out + r * STRIP, acc[r], sizeof acc[r]);          \
    }

#if defined(Q8_VNNI) || defined(Q8_AVX2)
/* Start each row's group sums: at -bias * sum(x) where VNNI multiplies weights stored plus
 * `bias` (128 for int8, 8 for int4), else at 0. qrows keeps 128 * sum(x). */
static inline void q_begin(int RB, const qrows *xq, int r0, int g, int bias, vi a[][CV]) {
    for (int r = 0; r < RB; r++) {
#ifdef Q8_VNNI
        const int32_t start = -xq->offset[(size_t)(r0 + r) * (xq->stride / GROUP) + g] /
                              (128 / bias);
#else
        const int32_t start = 0;
        (void)xq, (void)r0, (void)g, (void)bias;
#endif
        for (int c = 0; c < CV; c++) a[r][c] = (vi){0} + start;
    }
}

/* The integer sums as floats (exact: below 2^24). */
static inline void q_end(int RB, vi a[][CV], vf sums[][CV]) {
    for (int r = 0; r < RB; r++)
        for (int c = 0; c < CV; c++) sums[r][c] = __builtin_convertvector(a[r][c], vf);
}
#endif

#if !defined(Q8_VNNI) && !defined(Q8_AVX2)
/* Input i's weight in column c of a group's packed bytes, int8 (bits 8: quads of w + 128) or
 * int4 (bits 4: nibbles of w + 8, see q4_group): what the vector paths read, one at a time. */
static inline int32_t plain_weight(const uint8_t *Q, int bits, int i, int c) {
    if (bits == 8) return (int32_t)Q[(size_t)(i / 4) * 4 * STRIP + 4 * c + i % 4] - 128;
    const int byte = Q[(size_t)(i / 8) * 4 * STRIP + 4 * c + i % 4];
    return (i % 8 < 4 ? byte & 15 : byte >> 4) - 8;
}

/* A group's exact integer sums with plain loops, for any compiler and CPU. */
static void plain_group(int RB, const qrows *xq, int r0, int g, const uint8_t *Q, int bits,
                        vf sums[][CV]) {
    for (int r = 0; r < RB; r++) {
        const int8_t *x = xq->v + (size_t)(r0 + r) * xq->stride + g * GROUP;
        for (int c = 0; c < STRIP; c++) {
            int32_t dot = 0;
            for (int i = 0; i < GROUP; i++) dot += plain_weight(Q, bits, i, c) * x[i];
            sums[r][c / VL][c % VL] = (float)dot;
        }
    }
}
#endif

/* One group's exact integer sums, sums[r][c] = sum over its GROUP inputs of w * x (at most
 * 32 x 127 x 127: exact in float32 too), for RB rows from r0 and the strip's STRIP columns. */
static inline void q8_group(int RB, const qrows *xq, int r0, int g, const uint8_t *Q,
                            vf sums[][CV]) {
#if defined(Q8_VNNI) || defined(Q8_AVX2)
    vi a[Q8_RB][CV];
    q_begin(RB, xq, r0, g, 128, a);
    for (int k = 0; k < GROUP / 4; k++, Q += 4 * STRIP) {
        for (int r = 0; r < RB; r++) {
            int32_t x4;
            memcpy(&x4, xq->v + (size_t)(r0 + r) * xq->stride + g * GROUP + 4 * k, 4);
            for (int c = 0; c < CV; c++) a[r][c] = dot4(a[r][c], Q + 4 * VL * c, x4);
        }
    }
    q_end(RB, a, sums);
#else
    plain_group(RB, xq, r0, g, Q, 8, sums);
#endif
}

/* The int4 form (llama.cpp's Q4_0 weights, values in [-8, 7]), two weights a byte: for each
 * eight inputs of a group, [STRIP][4] bytes whose low nibbles are the first four inputs of a
 * column plus 8 and whose high nibbles the last four, so one load and two masks give two
 * vectors of quads. VNNI multiplies the unsigned nibbles (w + 8) and takes 8 * sum(x) off;
 * AVX2 takes the 8 off each byte first. */
static inline void q4_group(int RB, const qrows *xq, int r0, int g, const uint8_t *Q,
                            vf sums[][CV]) {
#if defined(Q8_VNNI) || defined(Q8_AVX2)
    vi a[Q8_RB][CV];
    q_begin(RB, xq, r0, g, 8, a);
    for (int p = 0; p < GROUP / 8; p++, Q += 4 * STRIP) {
        vb lo[CV], hi[CV];
        for (int c = 0; c < CV; c++) {
#ifdef Q8_VNNI
            const __m512i v = _mm512_loadu_si512(Q + 4 * VL * c), m = _mm512_set1_epi8(0x0F);
            lo[c] = _mm512_and_si512(v, m);
            hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
#else
            const __m256i v = _mm256_loadu_si256((const __m256i *)(Q + 4 * VL * c));
            const __m256i m = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
            lo[c] = _mm256_sub_epi8(_mm256_and_si256(v, m), eight);
            hi[c] = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), eight);
#endif
        }
        for (int r = 0; r < RB; r++) {
            int32_t xa, xb;
            const int8_t *x = xq->v + (size_t)(r0 + r) * xq->stride + g * GROUP + 8 * p;
            memcpy(&xa, x, 4);
            memcpy(&xb, x + 4, 4);
            for (int c = 0; c < CV; c++) {
#ifdef Q8_VNNI
                a[r][c] = dotu(dotu(a[r][c], lo[c], xa), hi[c], xb);
#else
                a[r][c] = dots(dots(a[r][c], lo[c], xa), hi[c], xb);
#endif
            }
        }
    }
    q_end(RB, a, sums);
#else
    plain_group(RB, xq, r0, g, Q, 4, sums);
#endif
}

#define DEFINE_QSTRIPS(RB)                                                                      \
    DEFINE_QSTRIP(q8strip, RB, q8_group, 8)                                                   \
    DEFINE_QSTRIP(q4strip, RB, q4_group, 4)
DEFINE_QSTRIPS(1)
DEFINE_QSTRIPS(2)
DEFINE_QSTRIPS(3)
DEFINE_QSTRIPS(4)
#if Q8_RB > 4
DEFINE_QSTRIPS(5)
DEFINE_QSTRIPS(6)
#endif

typedef void (*qstrip_fn)(int, const qrows *, int, const uint8_t *, const uint16_t *,
                          const float *, float *);
static const qstrip_fn Q8STRIPS[Q8_RB + 1] = {NULL, q8strip_1, q8strip_2, q8strip_3, q8strip_4,
#if Q8_RB > 4
                                              q8strip_5, q8strip_6,
#endif
};
static const qstrip_fn Q4STRIPS[Q8_RB + 1] = {NULL, q4strip_1, q4strip_2, q4strip_3, q4strip_4,
#if Q8_RB > 4
                                              q4strip_5, q4strip_6,
#endif
};

typedef void (*strip_fn)(int, const float *, const float *, const float *, float *,
                         const float *, unsigned);
static const strip_fn STRIPS[MAX_RB + 1] = {
    NULL, strip_1, strip_2, strip_3, strip_4, strip_5, strip_6,
#if MAX_RB > 6
    strip_7, strip_8, strip_9, strip_10, strip_11, strip_12,
#endif
};

int minigpt_strip(void) { return STRIP; }
int minigpt_group(void) { return GROUP; }

/* One or two leftover rows over two neighbouring strips at once (four vectors per row): a lone
 * row over one strip has only two sums in flight and waits on the multiply-add latency; over
 * two strips it has four (two rows: eight). Same operations per weight as DEFINE_STRIP. */
#define DEFINE_WIDE(RB)                                                                         \
    static void wide_##RB(int n_in, const float *x, const float *P0, const float *P1,         \
                          const float *bias, float *out0, float *out1, const float *pf,       \
                          unsigned pf_m) {                                                    \
        vf a[RB][4];                                                                          \
        for (int c = 0; c < 4; c++) {                                                         \
            const vf b0 = bias ? vload(bias + c * VL) : (vf){0};                              \
            for (int r = 0; r < RB; r++) a[r][c] = b0;                                        \
        }                                                                                     \
        for (int i = 0; i < n_in; i++, P0 += STRIP, P1 += STRIP) {                            \
            PF_LINES(pf, i, pf_m);                                                            \
            const vf w0 = vload(P0), w1 = vload(P0 + VL), w2 = vload(P1), w3 = vload(P1 + VL); \
            for (int r = 0; r < RB; r++) {                                                    \
                const float xr = x[(size_t)r * n_in + i];                                     \
                a[r][0] += xr * w0;                                                           \
                a[r][1] += xr * w1;                                                           \
                a[r][2] += xr * w2;                                                           \
                a[r][3] += xr * w3;                                                           \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < RB; r++)                                                          \
            for (int c = 0; c < 4; c++)                                                       \
                memcpy((c < 2 ? out0 : out1) + r * STRIP + (c % 2) * VL, &a[r][c], sizeof(vf)); \
    }
DEFINE_WIDE(1)
DEFINE_WIDE(2)

/* Apply a product's result to its destination columns [j, j + w) for every row. */
static void finish_strip(int B, int n_out, const float *acc, float *y, int j, int w, int op) {
    for (int b = 0; b < B; b++) {
        const float *restrict a = acc + b * STRIP;
        float *restrict out = y + (size_t)b * n_out + j;
        if (op == ADD) {
#pragma omp simd
            for (int c = 0; c < w; c++) out[c] += a[c];
        } else if (op == STORE_GELU) {
#pragma omp simd
            for (int c = 0; c < w; c++) out[c] = gelu_tanh(a[c]);
        } else if (op == STORE_RELU2) {
#pragma omp simd
            for (int c = 0; c < w; c++) out[c] = a[c] > 0.f ? a[c] * a[c] : 0.f;
        } else {
            memcpy(out, a, (size_t)w * sizeof(float));
        }
    }
}

/* This thread's share [lo, hi) of n units: contiguous, as `schedule(static)` gives, but known
 * to the thread, so it can fetch ahead the unit it does next and none that it does not. */
static void share(int n, int *lo, int *hi) {
    *lo = 0, *hi = n;
#ifdef _OPENMP
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int per = n / nt, extra = n % nt;
    *lo = t * per + (t < extra ? t : extra);
    *hi = *lo + per + (t < extra);
#endif
}

/* The int8 product (Q8_0, above): each thread quantizes a share of the rows into the shared
 * buffers (its own copy of their description: nothing shared is written but the rows), then,
 * after a barrier, takes a contiguous share of the strips, every row of each. Columns are
 * padded to whole strips, so there is no tail; the last strip writes only its real columns. */
static void q8_matvec(int B, int n_in, int n_out, const float *x, const uint8_t *Q, int bits,
                      const uint16_t *S, const float *bias, float *y, int op,
                      const qrows *buffers) {
    const qstrip_fn *kernels = bits == 4 ? Q4STRIPS : Q8STRIPS;
    const int groups = (n_in + GROUP - 1) / GROUP, strips = (n_out + STRIP - 1) / STRIP;
    qrows rows = *buffers;
    rows.stride = groups * GROUP;
    int lo, hi;
    share(B, &lo, &hi);
    quantize_rows(lo, hi, n_in, x, &rows);
#pragma omp barrier
    share(strips, &lo, &hi);
    for (int u = lo; u < hi; u++) {
        float acc[MAX_BATCH * STRIP], tail_bias[STRIP];
        const int j = u * STRIP, w = n_out - j < STRIP ? n_out - j : STRIP;
        const float *bs = bias ? bias + j : NULL;
        if (bias && w < STRIP) { /* the bias ends inside the last strip */
            for (int c = 0; c < STRIP; c++) tail_bias[c] = c < w ? bias[j + c] : 0.f;
            bs = tail_bias;
        }
        for (int b = 0, rb; b < B; b += rb) {
            rb = B - b < Q8_RB ? B - b : Q8_RB;
            kernels[rb](groups, &rows, b, Q + (size_t)u * groups * GROUP * STRIP * bits / 8,
                         S + (size_t)u * groups * STRIP, bs, acc + b * STRIP);
        }
        finish_strip(B, n_out, acc, y, j, w, op);
    }
#pragma omp barrier
}

/* y[b, :] (op)= x[b, :] @ W + bias for b < B. W is [n_in, n_out] row-major; P holds its whole
 * strips packed strip-major, [n_out / STRIP][n_in][STRIP] (the binding packs it once), so each
 * strip's weights are one contiguous run. An int8 matrix passes its strips as Q and their
 * scales as S instead (q8_matvec). Runs inside the step's parallel region: each thread takes
 * a contiguous share of the pairs of neighbouring strips, and each pair is done for every row
 * (blocks of MAX_RB rows per strip; one or two leftover rows across both strips) while its
 * weights are in cache, so W streams from memory once per step however many rows there are.
 * The last few columns (n_out % STRIP) are read from W one at a time. */
static void matvec(int B, int n_in, int n_out, const float *x, const float *P, const uint8_t *Q,
                   int bits, const uint16_t *S, const float *W, const float *bias, float *y,
                   int op, const qrows *xq) {
    if (Q) {
        q8_matvec(B, n_in, n_out, x, Q, bits, S, bias, y, op, xq);
        return;
    }
    const int full = n_out / STRIP, tail = n_out - full * STRIP;
    const int pairs = (full + 1) / 2;
    int lo, hi;
    share(pairs + (tail > 0), &lo, &hi);
    for (int u = lo; u < hi; u++) {
        float acc[2][MAX_BATCH * STRIP];
        if (u == pairs) { /* the tail */
            const int j = full * STRIP;
            for (int b = 0; b < B; b++)
                for (int c = 0; c < tail; c++) {
                    float a = bias ? bias[j + c] : 0.f;
                    for (int i = 0; i < n_in; i++)
                        a += x[(size_t)b * n_in + i] * W[(size_t)i * n_out + j + c];
                    acc[0][b * STRIP + c] = a;
                }
            finish_strip(B, n_out, acc[0], y, j, tail, op);
            continue;
        }
        const int s0 = 2 * u, ns = s0 + 1 < full ? 2 : 1;
        /* With a block of rows (3 or more), the pair this thread does next (2 * n_in lines
         * in one run) is fetched while this one is computed, spread evenly over this pair's
         * passes: memory then streams during every pass, the ones reading the pair from
         * cache included, instead of only during the first. 8 rows of GPT-2 124M: a step
         * 1.2-1.4x faster (docs/benchmarks.md §5b). With one or two rows the step is bound
         * by memory anyway and the hardware's own prefetcher does better alone. */
        const int rest = B % MAX_RB, wide = ns == 2 && rest > 0 && rest <= 2 ? rest : 0;
        const int nx = u + 1 < hi && s0 + 2 + 1 < full ? s0 + 2 : s0;
        const int blocks = (B - wide + MAX_RB - 1) / MAX_RB, passes = ns * blocks + (wide > 0);
        const unsigned pf_m = blocks > 0 ? (unsigned)((2u << 16) / (unsigned)passes) : 0u;
        const float *next = P + (size_t)nx * n_in * STRIP;
        int pass = 0;
        for (int k = 0; k < ns; k++) {
            const int j = (s0 + k) * STRIP;
            const float *bs = bias ? bias + j : NULL;
            /* Blocks as large as the registers allow; the last takes what is left, unless
             * it is one or two rows, which go across both strips below. */
            for (int b = 0, rb; b < B - wide; b += rb) {
                rb = B - wide - b < MAX_RB ? B - wide - b : MAX_RB;
                STRIPS[rb](n_in, x + (size_t)b * n_in, P + (size_t)(s0 + k) * n_in * STRIP, bs,
                           acc[k] + b * STRIP,
                           next + (size_t)(pass++ * 2 * n_in / passes) * STRIP, pf_m);
            }
        }
        if (wide) {
            const int b = B - wide, j = s0 * STRIP;
            const float *p0 = P + (size_t)s0 * n_in * STRIP, *p1 = p0 + (size_t)n_in * STRIP;
            (wide == 1 ? wide_1 : wide_2)(n_in, x + (size_t)b * n_in, p0, p1,
                                          bias ? bias + j : NULL, acc[0] + b * STRIP,
                                          acc[1] + b * STRIP,
                                          next + (size_t)(pass * 2 * n_in / passes) * STRIP,
                                          pf_m);
        }
        for (int k = 0; k < ns; k++) finish_strip(B, n_out, acc[k], y, (s0 + k) * STRIP, STRIP, op);
    }
#pragma omp barrier
}

/* LayerNorm (rms == 0) or RMSNorm (rms != 0: no centring, no shift) of B rows of width C;
 * eps is the model's own (GPT-2 and most Llamas: 1e-5; some Llamas 1e-6). One machine-code
 * copy for every call site (no inlining, no clone specialised for B = 1): copies may sum in
 * different orders, and a row's norm must round the same wherever a step is split (see
 * minigpt_decode_step; tests/inference/test_native.py checks the bits). */
#if defined(__clang__)
__attribute__((noinline))
#else
__attribute__((noipa))
#endif
static void layer_norm(int B, int C, const float *x, const float *g, const float *beta,
                       float *out, int rms, float eps) {
    for (int b = 0; b < B; b++) {
        const float *xr = x + (size_t)b * C;
        float *o = out + (size_t)b * C;
        float mean = 0.f, var = 0.f;
        if (!rms) {
#pragma omp simd reduction(+ : mean)
            for (int c = 0; c < C; c++) mean += xr[c];
            mean /= (float)C;
        }
#pragma omp simd reduction(+ : var)
        for (int c = 0; c < C; c++) var += (xr[c] - mean) * (xr[c] - mean);
        const float rstd = 1.f / sqrtf(var / (float)C + eps);
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
/* cos and sin of pos * theta^(-2i/D), i < D/2, for one row: its rotary angles, in float32
 * as minigpt_cli/model/layers.py computes them. Made once per step, used by every head and
 * layer. */
static void rotary_row(int D, int64_t pos, float theta, float *c, float *s) {
    for (int i = 0; i < D / 2; i++) {
        const float ang = (float)pos * powf(theta, -(float)(2 * i) / (float)D);
        c[i] = cosf(ang);
        s[i] = sinf(ang);
    }
}

/* Rotate each pair (i, i + D/2) of v [D] by its angle: the "rotate half" layout model/layers.py
 * uses. */
static void rotate(float *v, int D, const float *c, const float *s) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
    }
}

/* Each row's new query and key for every head, as the model shapes them before attention:
 * RMSNorm per head (qn, kn: NULL without query/key norm), then rotation to its position
 * (rc, rs: the rows' rotary tables, B x D/2 each; NULL for learned positions). In place. */
static void shape_qk(int B, int H, int D, float *qkv, const float *qn, const float *kn,
                     const float *rc, const float *rs, float eps) {
    const int C = H * D;
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        float *q = qkv + (size_t)b * 3 * C + (size_t)h * D, *k = q + C;
        if (qn) {
            layer_norm(1, D, q, qn, NULL, q, 1, eps);
            layer_norm(1, D, k, kn, NULL, k, 1, eps);
        }
        if (rc) {
            const size_t at = (size_t)b * (D / 2);
            rotate(q, D, rc + at, rs + at);
            rotate(k, D, rc + at, rs + at);
        }
    }
}

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

/* dims: n_layer, n_head, n_embd, vocab, rows, cache_len, n_slots, threads, then the
 * architecture (norm, rotary, mlp, qk_norm, mlp width: see the enum above), then the layers
 * this call runs, [first, end): all of them is a whole step. A call that starts past layer 0
 * takes the rows' residual stream from the first rows * n_embd floats of scratch, where a
 * call that stops short of the last layer leaves it; only a call that runs the last layer
 * computes logits. The engine uses this to let a request that arrives early in a step join
 * it (runner.py): its rows catch up to the step's layer, then both go on in one call. Every
 * row does the same operations in the same order either way, so the bits do not change.
 * fp: two floats, the rotary base (read only when rotary) and every norm's epsilon.
 * w: weight pointers (GLOBALS, then PER_LAYER per layer); pw: the same list with each matrix
 * (HEAD_T and the four per-layer products) packed by strips, see matvec; qw, qs: NULL, or the
 * same list with an int8 or int4 matrix's packed strips (see q8_group, q4_group) and float16
 * scales where pw has NULL; qbits: NULL, or each matrix's bits (8 or 4).
 * tokens, pos, slot, col: [rows]: row b feeds token tokens[b] at position pos[b], and writes
 * its key and value at column col[b] of cache slot slot[b]; kc, vc: the cache,
 * [layers, n_slots, heads, cache_len, head_dim]; want: [rows], nonzero where a row's logits are
 * needed, or NULL for all; logits: [rows wanted, vocab], in row order;
 * scratch: rows * (7 * n_embd + 3 * mlp width + 10 * ceil(max(n_embd, mlp width) / GROUP))
 * floats. Returns 0, or -1 on bad arguments. */
int minigpt_decode_step(const int64_t *dims, const float *fp, const float *const *w,
                        const float *const *pw, const uint8_t *const *qw,
                        const uint16_t *const *qs, const uint8_t *qbits, const int64_t *tokens,
                        const int64_t *pos,
                        const int64_t *slot, const int64_t *col, const uint8_t *want, float *kc,
                        float *vc, float *logits, float *scratch) {
    const int L = (int)dims[0], H = (int)dims[1], C = (int)dims[2], V = (int)dims[3];
    const int B = (int)dims[4], S = (int)dims[5], NS = (int)dims[6], nt = (int)dims[7];
    const int rms = (int)dims[8], rotary = (int)dims[9], mlp = (int)dims[10];
    const int qk_norm = (int)dims[11], F = (int)dims[12];
    const int l0 = (int)dims[13], l1 = (int)dims[14];
    if (B < 1 || B > MAX_BATCH || C % H || nt < 1 || F < 1 || mlp < 0 || mlp > MLP_RELU2 ||
        (rotary && ((C / H) % 2 || !(fp[0] > 0.f))) || !(fp[1] > 0.f) || l0 < 0 ||
        l1 > L || (l0 >= l1 && !(l0 == l1 && l1 == L)))
        return -1;
    for (int b = 0; b < B; b++)
        if (slot[b] < 0 || slot[b] >= NS || col[b] < 0 || col[b] >= S) return -1;
    const int D = C / H;
    const float rope = rotary ? fp[0] : 0.f, eps = fp[1];
    static const uint8_t *const NONE8[PER_LAYER] = {0};
    static const uint8_t NOBITS[PER_LAYER] = {0};
    static const uint16_t *const NONE16[PER_LAYER] = {0};
    int nw = 0; /* rows whose logits are wanted; shared by the threads below */
    float *x = scratch, *h = x + B * C, *att = h + B * C, *qkv = att + B * C;
    float *f = qkv + 3 * B * C; /* the MLP's first product: B * F, or B * 2F for SwiGLU */
    float *g = f + 2 * (size_t)B * F; /* SwiGLU's gated product, B * F */
    float *rc = rotary ? g + (size_t)B * F : NULL, *rs = rc ? rc + (size_t)B * (D / 2) : NULL;
    /* An int8 product's quantized rows (q8_matvec), after the rest: B rows of the widest
     * input, padded to whole groups. */
    const int widest = ((C > F ? C : F) + GROUP - 1) / GROUP;
    float *qa = scratch + (size_t)B * (7 * C + 3 * F);
    qrows xq = {(int8_t *)(qa + 2 * (size_t)B * widest), qa, (int32_t *)(qa + (size_t)B * widest),
                widest * GROUP};

    /* One parallel region for the whole step: every `omp for` below shares out its loop and
     * ends in a barrier, and `single` does the small serial parts. Forking threads once per
     * step instead of once per product matters when a product takes a few microseconds. */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp single
        for (int b = 0; b < B; b++) {
            if (l0 == 0) {
                const float *te = w[WTE] + (size_t)tokens[b] * C;
                const float *pe = rotary ? NULL : w[WPE] + (size_t)pos[b] * C;
                for (int c = 0; c < C; c++) x[b * C + c] = pe ? te[c] + pe[c] : te[c];
            }
            if (rc) {
                const size_t at = (size_t)b * (D / 2);
                rotary_row(D, pos[b], rope, rc + at, rs + at);
            }
            /* The first layer's norm (or, with no layer left, the final one). */
            const float *gain = l0 < L ? w[GLOBALS + (size_t)l0 * PER_LAYER + LN1_W] : w[LNF_W];
            const float *beta = l0 < L ? w[GLOBALS + (size_t)l0 * PER_LAYER + LN1_B] : w[LNF_B];
            if (L > 0) layer_norm(1, C, x + b * C, gain, beta, h + b * C, rms, eps);
        }
        for (int l = l0; l < l1; l++) {
            const float *const *p = w + GLOBALS + (size_t)l * PER_LAYER;
            const size_t at = GLOBALS + (size_t)l * PER_LAYER;
            const float *const *q = pw + at;
            const uint8_t *const *q8 = qw ? qw + at : NONE8;
            const uint8_t *bits = qbits ? qbits + at : NOBITS;
            const uint16_t *const *sc = qs ? qs + at : NONE16;
            const size_t layer_off = (size_t)l * NS * H * S * D;
            matvec(B, C, 3 * C, h, q[ATTN_W], q8[ATTN_W], bits[ATTN_W], sc[ATTN_W], p[ATTN_W],
                   p[ATTN_B], qkv, STORE, &xq);
            if (qk_norm || rotary)
                shape_qk(B, H, D, qkv, qk_norm ? p[QN_W] : NULL, p[KN_W], rc, rs, eps);
            attention(B, H, D, S, slot, col, qkv, kc + layer_off, vc + layer_off, att);
            matvec(B, C, C, att, q[APROJ_W], q8[APROJ_W], bits[APROJ_W], sc[APROJ_W], p[APROJ_W],
                   p[APROJ_B], x, ADD, &xq);
#pragma omp single
            layer_norm(B, C, x, p[LN2_W], p[LN2_B], h, rms, eps);
            if (mlp == MLP_SWIGLU) { /* gate and up in one product, then silu(gate) * up */
                matvec(B, C, 2 * F, h, q[FC_W], q8[FC_W], bits[FC_W], sc[FC_W], p[FC_W], p[FC_B],
                       f, STORE, &xq);
#pragma omp for schedule(static)
                for (int b = 0; b < B; b++) {
                    const float *gate = f + (size_t)b * 2 * F, *up = gate + F;
                    float *o = g + (size_t)b * F;
#pragma omp simd
                    for (int j = 0; j < F; j++) o[j] = silu(gate[j]) * up[j];
                }
            } else {
                matvec(B, C, F, h, q[FC_W], q8[FC_W], bits[FC_W], sc[FC_W], p[FC_W], p[FC_B], g,
                       mlp == MLP_RELU2 ? STORE_RELU2 : STORE_GELU, &xq);
            }
            matvec(B, F, C, g, q[MPROJ_W], q8[MPROJ_W], bits[MPROJ_W], sc[MPROJ_W], p[MPROJ_W],
                   p[MPROJ_B], x, ADD, &xq);
            /* The next layer's first norm, or the final one. */
            const float *gain = l + 1 < L ? p[PER_LAYER + LN1_W] : w[LNF_W];
            const float *beta = l + 1 < L ? p[PER_LAYER + LN1_B] : w[LNF_B];
#pragma omp single
            layer_norm(B, C, x, gain, beta, h, rms, eps);
        }
        if (L == 0) {
#pragma omp single
            layer_norm(B, C, x, w[LNF_W], w[LNF_B], h, rms, eps);
        }
        if (l1 == L) { /* else the residual stream stays in scratch for the next call */
            /* Logits only for the rows that want them (a prompt's last token, every decode
             * row): the head is a third of a small model's weights, and a prompt's earlier
             * rows only need their keys and values cached. */
#pragma omp single
            {
                nw = 0;
                for (int b = 0; b < B; b++)
                    if (!want || want[b])
                        memmove(att + (size_t)nw++ * C, h + (size_t)b * C, C * sizeof(float));
            }
            if (nw > 0)
                matvec(nw, C, V, att, pw[HEAD_T], qw ? qw[HEAD_T] : NULL,
                       qbits ? qbits[HEAD_T] : 0, qs ? qs[HEAD_T] : NULL, w[HEAD_T], NULL,
                       logits, STORE, &xq);
        }
    }
    return 0;
}

/* y = x @ W + bias for B rows through matvec, float (Q NULL), int8 or int4 (bits): the kernels
 * alone, for tests/model/test_int8.py to hold against a NumPy product. Returns -1 on bad
 * arguments. */
int minigpt_product(int B, int n_in, int n_out, const float *x, const float *P, const uint8_t *Q,
                    int bits, const uint16_t *S, const float *W, const float *bias, float *y,
                    int threads) {
    if (B < 1 || B > MAX_BATCH || n_in < 1 || n_out < 1 || threads < 1) return -1;
    const int groups = (n_in + GROUP - 1) / GROUP;
    float buf[MAX_BATCH * 2 * (4096 / GROUP)];
    int8_t values[MAX_BATCH * 4096];
    if (groups > 4096 / GROUP) return -1;
    qrows xq = {values, buf, (int32_t *)(buf + (size_t)MAX_BATCH * groups), groups * GROUP};
#pragma omp parallel num_threads(threads) if (threads > 1)
    matvec(B, n_in, n_out, x, P, Q, bits, S, W, bias, y, STORE, &xq);
    return 0;
}
