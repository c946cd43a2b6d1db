/* One decoding step of attention, each row over its own positions only (portable C).
 *
 * For every (row, key-value head) pair and each of its query heads: the scores over the
 * row's real key positions [first[row], length), a softmax, and the weighted sum of the
 * values. A row's arithmetic reads only its own query, keys and values, always in the
 * same order (dot products in LANES fixed lanes over the head dimension, positions one
 * after the other), so its bits do not depend on the batch, the padding before it, the
 * batch width or the thread that runs it. Built and loaded by toxtests/engines/torch/
 * native.py; the caller splits pairs across threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LANES 16

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[j + l] * b[j + l];
    for (int64_t l = 0; j < n; j++, l++) acc[l] += a[j] * b[j];
    /* A fixed pairwise sum of the lanes. */
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) acc[l] += acc[l + width];
    return acc[0];
}

/* query: (rows, heads, dim) contiguous; key, value: (rows, kv_heads, positions, dim)
 * with the given strides (in floats; the last dimension contiguous); out: (rows, heads,
 * value_dim) contiguous. first[row]: the row's first key position to attend to.
 * Pairs [pair_from, pair_to) of (row, kv head) are done; returns 0, or 1 when out of
 * memory. */
int decode_attention(const float *query, const float *key, const float *value, float *out,
                     const int64_t *first, int64_t heads, int64_t kv_heads, int64_t length,
                     int64_t dim, int64_t value_dim, const int64_t *key_strides,
                     const int64_t *value_strides, float scale, int64_t pair_from,
                     int64_t pair_to) {
    int64_t groups = heads / kv_heads;
    float *scores = malloc(sizeof(float) * (size_t)(length > 0 ? length : 1) * (size_t)groups);
    float *sums = malloc(sizeof(float) * (size_t)value_dim);
    if (!scores || !sums) {
        free(scores);
        free(sums);
        return 1;
    }
    for (int64_t pair = pair_from; pair < pair_to; pair++) {
        int64_t row = pair / kv_heads, kv = pair % kv_heads;
        int64_t from = first[row];
        const float *keys = key + row * key_strides[0] + kv * key_strides[1];
        const float *values = value + row * value_strides[0] + kv * value_strides[1];
        for (int64_t g = 0; g < groups; g++) {
            int64_t head = kv * groups + g;
            const float *q = query + (row * heads + head) * dim;
            float *s = scores + g * length;
            float top = -INFINITY;
            for (int64_t t = from; t < length; t++) {
                s[t] = dot(q, keys + t * key_strides[2], dim) * scale;
                if (s[t] > top) top = s[t];
            }
            float total = 0.0f;
            for (int64_t t = from; t < length; t++) {
                s[t] = expf(s[t] - top);
                total += s[t];
            }
            for (int64_t c = 0; c < value_dim; c++) sums[c] = 0.0f;
            for (int64_t t = from; t < length; t++) {
                const float *v = values + t * value_strides[2];
                float weight = s[t];
                for (int64_t c = 0; c < value_dim; c++) sums[c] += weight * v[c];
            }
            float *o = out + (row * heads + head) * value_dim;
            if (from >= length) { /* no key at all: zeros, as a fully masked row */
                for (int64_t c = 0; c < value_dim; c++) o[c] = 0.0f;
                continue;
            }
            for (int64_t c = 0; c < value_dim; c++) o[c] = sums[c] / total;
        }
    }
    free(scores);
    free(sums);
    return 0;
}
