/* Attention, each row over its own positions only (portable C): one decoding step
 * (decode_attention), or a prefill as one decoding step per query position
 * (prefill_attention).
 *
 * For every (row, key-value head) pair and each of its query heads: the scores over the
 * row's real key positions [first[row], length), a softmax, and the weighted sum of the
 * values. A row's arithmetic reads only its own query, keys and values, always in the
 * same order (dot products in LANES fixed lanes over the head dimension, positions one
 * after the other), so its bits do not depend on the batch, the padding before it, the
 * batch width or the thread that runs it. Built and loaded by toxtests/engines/torch/
 * native.py; the caller splits pairs across threads.
 *
 * Every number is computed by the same operations in the same order as the first
 * version of this kernel (tests/data/decode_attention_reference.c, the one the
 * generation cache's entries were written with); only independent sums now run side by
 * side: POSITIONS dot products at once (one alone is a chain of dependent additions,
 * which left the CPU waiting), and the weighted sums of all query heads of a key-value
 * head in one pass over its values. With -ffp-contract=off and no fast-math the compiler
 * may not reorder or fuse any of them, so the bits are the same.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define GROUPS 4 /* query heads summed side by side */
/* How many independent sums run side by side, sized to the vector registers: AVX-512
 * holds a LANES value in one of its 32; with AVX2 it takes two of 16, and the AVX-512
 * sizes spilled (an AMD EPYC with AVX2, 450 rows x 4 heads x 40 positions, one thread:
 * 18.4-20.2 ms a decode step with them, 9.2-10.3 ms with one block and one shared
 * position, 3.6-3.9 ms once lanes_t became two 8-float halves, with two blocks). Which
 * sums run side by side changes no sum's order, so no bit. */
#if defined(__AVX512F__)
#define POSITIONS 8 /* key positions scored side by side */
#define BLOCKS 2    /* blocks of LANES value columns summed side by side */
#define SHARED 4    /* key positions of grouped_dots */
#else
#define POSITIONS 4
#define BLOCKS 2
#define SHARED 1
#endif

/* LANES floats as one value, with the few operations the kernel needs: elementwise IEEE
 * arithmetic, whatever registers the compiler maps it to. With AVX-512 (or no AVX2) a
 * GCC / clang vector of LANES floats; with AVX2 two vectors of 8 (one register each):
 * GCC took a 64-byte vector's lane shuffles through memory there, and kept the sums of
 * several positions on the stack. Every lane gets the same operations either way. */
#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
typedef float half_t __attribute__((vector_size(8 * sizeof(float))));
typedef struct {
    half_t lo, hi;
} lanes_t;

static inline lanes_t zero(void) {
    lanes_t v = {{0}, {0}};
    return v;
}

static inline lanes_t load(const float *p) {
    lanes_t v;
    memcpy(&v.lo, p, sizeof v.lo);
    memcpy(&v.hi, p + 8, sizeof v.hi);
    return v;
}

static inline void store(float *p, lanes_t v) {
    memcpy(p, &v.lo, sizeof v.lo);
    memcpy(p + 8, &v.hi, sizeof v.hi);
}

/* acc + a * b, and acc + w * b */
static inline lanes_t mul_add(lanes_t acc, lanes_t a, lanes_t b) {
    acc.lo += a.lo * b.lo;
    acc.hi += a.hi * b.hi;
    return acc;
}

static inline lanes_t scale_add(lanes_t acc, float w, lanes_t b) {
    acc.lo += w * b.lo;
    acc.hi += w * b.hi;
    return acc;
}

/* lane l += lane l + width for l < width, width 8, 4, 2, 1; lane 0 */
static inline float tree(lanes_t v) {
    half_t eight = v.lo + v.hi;
    __m256 e;
    memcpy(&e, &eight, sizeof e);
    __m128 four = _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1));
    __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    __m128 one = _mm_add_ss(two, _mm_shuffle_ps(two, two, 1));
    return _mm_cvtss_f32(one);
}
#else
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));

static inline lanes_t zero(void) { return (lanes_t){0}; }

static inline lanes_t load(const float *p) {
    lanes_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, lanes_t v) { memcpy(p, &v, sizeof v); }

static inline lanes_t mul_add(lanes_t acc, lanes_t a, lanes_t b) { return acc + a * b; }

static inline lanes_t scale_add(lanes_t acc, float w, lanes_t b) { return acc + w * b; }

#if defined(__clang__)
#define HALVES(v, h)                                                                        \
    __builtin_shufflevector(v, v, h, h + 1, h + 2, h + 3, h + 4, h + 5, h + 6, h + 7, 8, 9, \
                            10, 11, 12, 13, 14, 15)
#else
typedef int32_t lane_index_t __attribute__((vector_size(LANES * sizeof(int32_t))));
#define HALVES(v, h)                                                                 \
    __builtin_shuffle(v, (lane_index_t){h, h + 1, h + 2, h + 3, h + 4, h + 5, h + 6, \
                                        h + 7, 8, 9, 10, 11, 12, 13, 14, 15})
#endif

/* lane l += lane l + width for l < width, width 8, 4, 2, 1 (the other lanes' sums are
 * never read); lane 0 */
static inline float tree(lanes_t v) {
    v += HALVES(v, 8);
    v += HALVES(v, 4);
    v += HALVES(v, 2);
    v += HALVES(v, 1);
    return v[0];
}
#endif

/* The lanes' sum in a fixed pairwise order (tree), the tail's products (tail < LANES)
 * first added into lanes 0..tail. */
static inline float lane_sum(lanes_t v, const float *tail_a, const float *tail_b,
                             int64_t tail) {
    if (tail) {
        float lanes[LANES];
        store(lanes, v);
        for (int64_t l = 0; l < tail; l++) lanes[l] += tail_a[l] * tail_b[l];
        v = load(lanes);
    }
    return tree(v);
}

/* The dot product in LANES lanes: lane l sums a[j] * b[j] for j = l mod LANES in
 * order, the last n mod LANES products into lanes 0.. after the others. */
static inline float dot(const float *a, const float *b, int64_t n) {
    lanes_t acc = zero();
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) acc = mul_add(acc, load(a + j), load(b + j));
    return lane_sum(acc, a + j, b + j, n - j);
}

/* out[p] = dot(a, keys + p * stride, n) for the POSITIONS positions p, side by side. */
static inline void dots(const float *a, const float *keys, int64_t stride, int64_t n,
                        float *out) {
    lanes_t acc[POSITIONS];
    for (int p = 0; p < POSITIONS; p++) acc[p] = zero();
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        lanes_t x = load(a + j);
        for (int p = 0; p < POSITIONS; p++) acc[p] = mul_add(acc[p], x, load(keys + p * stride + j));
    }
    for (int p = 0; p < POSITIONS; p++)
        out[p] = lane_sum(acc[p], a + j, keys + p * stride + j, n - j);
}

/* dots(...) for GROUPS queries at once over SHARED positions: out[g * length + p] =
 * dot(queries + g * dim, keys + p * stride, n); each key row is read once for all the
 * queries of its key-value head instead of once a query. */
static inline void grouped_dots(const float *queries, int64_t dim, const float *keys,
                                int64_t stride, int64_t n, float *out, int64_t length) {
    lanes_t acc[GROUPS][SHARED];
    for (int g = 0; g < GROUPS; g++)
        for (int p = 0; p < SHARED; p++) acc[g][p] = zero();
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        lanes_t k[SHARED];
        for (int p = 0; p < SHARED; p++) k[p] = load(keys + p * stride + j);
        for (int g = 0; g < GROUPS; g++) {
            lanes_t q = load(queries + g * dim + j);
            for (int p = 0; p < SHARED; p++) acc[g][p] = mul_add(acc[g][p], q, k[p]);
        }
    }
    for (int g = 0; g < GROUPS; g++)
        for (int p = 0; p < SHARED; p++)
            out[g * length + p] =
                lane_sum(acc[g][p], queries + g * dim + j, keys + p * stride + j, n - j);
}

/* For heads [0, count) (count 1 or GROUPS): out[g][c] = sum over positions t in order
 * of weights[g][t] * values[t][c], for the columns [c0, c0 + BLOCKS * LANES). */
static inline void weighted_block(const float *scores, int64_t length, int64_t count,
                                  const float *values, int64_t stride, int64_t from,
                                  int64_t c0, lanes_t sums[GROUPS][BLOCKS]) {
    for (int g = 0; g < GROUPS; g++)
        for (int b = 0; b < BLOCKS; b++) sums[g][b] = zero();
    for (int64_t t = from; t < length; t++) {
        const float *v = values + t * stride + c0;
        lanes_t row[BLOCKS];
        for (int b = 0; b < BLOCKS; b++) row[b] = load(v + b * LANES);
        if (count == GROUPS) {
            for (int g = 0; g < GROUPS; g++) {
                float w = scores[g * length + t];
                for (int b = 0; b < BLOCKS; b++) sums[g][b] = scale_add(sums[g][b], w, row[b]);
            }
        } else {
            float w = scores[t];
            for (int b = 0; b < BLOCKS; b++) sums[0][b] = scale_add(sums[0][b], w, row[b]);
        }
    }
}

/* One (row, key-value head) pair: its `groups` query heads (head g's query at
 * q + g * q_stride) over the key positions [from, length), head g's output written to
 * out + g * o_stride (zeros where there is no key). scores: room for groups * length
 * floats, totals for groups. */
static void attend_pair(const float *q, int64_t q_stride, const float *keys,
                        const float *values, float *out, int64_t o_stride, int64_t from,
                        int64_t length, int64_t groups, int64_t dim, int64_t value_dim,
                        int64_t key_stride, int64_t value_stride, float scale, float *scores,
                        float *totals) {
    int64_t scored = 0; /* query heads whose scores are in */
    int64_t t = from;
    for (; scored + GROUPS <= groups; scored += GROUPS) {
        const float *queries = q + scored * q_stride;
        for (t = from; t + SHARED <= length; t += SHARED)
            grouped_dots(queries, q_stride, keys + t * key_stride, key_stride, dim,
                         scores + scored * length + t, length);
        for (int64_t g = 0; g < GROUPS; g++)
            for (int64_t u = t; u < length; u++)
                scores[(scored + g) * length + u] =
                    dot(queries + g * q_stride, keys + u * key_stride, dim);
    }
    for (int64_t g = 0; g < groups; g++) {
        const float *query = q + g * q_stride;
        float *s = scores + g * length;
        if (g >= scored) {
            for (t = from; t + POSITIONS <= length; t += POSITIONS)
                dots(query, keys + t * key_stride, key_stride, dim, s + t);
            for (; t < length; t++) s[t] = dot(query, keys + t * key_stride, dim);
        }
        float top = -INFINITY;
        for (t = from; t < length; t++) {
            s[t] = s[t] * scale;
            if (s[t] > top) top = s[t];
        }
        float total = 0.0f;
        for (t = from; t < length; t++) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        totals[g] = total;
    }
    /* Each head's weighted sum over the positions in order, as one head alone:
     * GROUPS heads and BLOCKS * LANES columns at once where there are as many. */
    for (int64_t g0 = 0; g0 < groups;) {
        int64_t count = groups - g0 >= GROUPS ? GROUPS : 1;
        const float *s = scores + g0 * length;
        int64_t c0 = 0;
        for (; c0 + BLOCKS * LANES <= value_dim; c0 += BLOCKS * LANES) {
            lanes_t sums[GROUPS][BLOCKS];
            weighted_block(s, length, count, values, value_stride, from, c0, sums);
            for (int64_t g = 0; g < count; g++) {
                float *o = out + (g0 + g) * o_stride + c0;
                float column[BLOCKS * LANES];
                for (int b = 0; b < BLOCKS; b++) store(column + b * LANES, sums[g][b]);
                for (int c = 0; c < BLOCKS * LANES; c++)
                    o[c] = from >= length ? 0.0f : column[c] / totals[g0 + g];
            }
        }
        for (int64_t g = 0; g < count; g++) { /* the columns left over, one by one */
            float *o = out + (g0 + g) * o_stride;
            for (int64_t c = c0; c < value_dim; c++) {
                float sum = 0.0f;
                for (int64_t t = from; t < length; t++)
                    sum += s[g * length + t] * values[t * value_stride + c];
                o[c] = from >= length ? 0.0f : sum / totals[g0 + g];
            }
        }
        g0 += count;
    }
}

/* A prefill's attention: every query position of every row as its own decoding step.
 * query: (rows, heads, queries, dim) contiguous, its queries the last `queries` of the
 * `length` key positions; key, value as for decode_attention; out: (rows, heads,
 * queries, value_dim) contiguous. Query position p of a row attends to its keys
 * [first[row], p] (the last `window` of them where window > 0); a position before
 * first[row] (padding) gets zeros. Each position's numbers are those decode_attention
 * gives the same query over the same keys. */
int prefill_attention(const float *query, const float *key, const float *value, float *out,
                      const int64_t *first, int64_t heads, int64_t kv_heads, int64_t queries,
                      int64_t length, int64_t dim, int64_t value_dim,
                      const int64_t *key_strides, const int64_t *value_strides,
                      int64_t window, float scale, int64_t pair_from, int64_t pair_to) {
    int64_t groups = heads / kv_heads;
    float *scores = malloc(sizeof(float) * (size_t)(length > 0 ? length : 1) * (size_t)groups);
    float *totals = malloc(sizeof(float) * (size_t)(groups > 0 ? groups : 1));
    if (!scores || !totals) {
        free(scores);
        free(totals);
        return 1;
    }
    int64_t lag = length - queries; /* keys before the first query (an earlier prefill) */
    for (int64_t pair = pair_from; pair < pair_to; pair++) {
        int64_t row = pair / kv_heads, kv = pair % kv_heads;
        int64_t head = row * heads + kv * groups;
        const float *keys = key + row * key_strides[0] + kv * key_strides[1];
        const float *values = value + row * value_strides[0] + kv * value_strides[1];
        for (int64_t i = 0; i < queries; i++) {
            int64_t end = lag + i + 1;
            int64_t from = first[row];
            if (window > 0 && end - window > from) from = end - window;
            attend_pair(query + (head * queries + i) * dim, queries * dim, keys, values,
                        out + (head * queries + i) * value_dim, queries * value_dim, from, end,
                        groups, dim, value_dim, key_strides[2], value_strides[2], scale,
                        scores, totals);
        }
    }
    free(scores);
    free(totals);
    return 0;
}

/* One decoding step: the prefill of a single query, the last key position, with the
 * window already in first[]. query: (rows, heads, dim) contiguous; key, value: (rows,
 * kv_heads, positions, dim) with the given strides (in floats; the last dimension
 * contiguous); out: (rows, heads, value_dim) contiguous. first[row]: the row's first key
 * position to attend to. Pairs [pair_from, pair_to) of (row, kv head) are done; returns
 * 0, or 1 when out of memory. */
int decode_attention(const float *query, const float *key, const float *value, float *out,
                     const int64_t *first, int64_t heads, int64_t kv_heads, int64_t length,
                     int64_t dim, int64_t value_dim, const int64_t *key_strides,
                     const int64_t *value_strides, float scale, int64_t pair_from,
                     int64_t pair_to) {
    return prefill_attention(query, key, value, out, first, heads, kv_heads, 1, length, dim,
                             value_dim, key_strides, value_strides, 0, scale, pair_from,
                             pair_to);
}
