/* The sampling tail of a decoding step in one read of the logits (AVX-512).
 *
 * For each row of logits, held as column chunks the output head produced: the row's
 * maximum and the maxima of 64-token blocks, the softmax normaliser (float exponentials
 * summed per block, blocks summed in double), then the tokens whose probability reaches
 * the lowest rung of the ladder, read only from the blocks whose maximum can reach it,
 * while the row is still in cache. The rung whose tokens hold `target` of the mass is
 * chosen as in toxtests/nucleus.py, and its tokens come back sorted by descending
 * probability (ties by id). Built and loaded by toxtests/native.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 64

/* exp(x) for x <= 0: Cephes expf (within ~1.4 ulp), exactly 0 below -87. */
static inline __m512 exp_nonpositive(__m512 x) {
    const __m512 lowest = _mm512_set1_ps(-87.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lowest, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lowest);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(p, n));
}

/* Lanes of a block of `count` <= BLOCK tokens at x; missing lanes read as -inf. */
static inline void load_block(const float *x, long count, __m512 v[4]) {
    if (count == BLOCK) {
        for (int k = 0; k < 4; k++) v[k] = _mm512_loadu_ps(x + 16 * k);
        return;
    }
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    for (int k = 0; k < 4; k++) {
        long left = count - 16 * k;
        __mmask16 mask = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        v[k] = _mm512_mask_loadu_ps(minus_inf, mask, x + 16 * k);
    }
}

typedef struct {
    float value;
    int32_t id;
} candidate;

static int by_descending_value(const void *a, const void *b) {
    const candidate *x = a, *y = b;
    if (x->value != y->value) return x->value > y->value ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The candidates of row r: tokens at the largest rung whose tokens hold `target` of the
 * mass, sorted by descending probability (ties by id), into `sorted`; their count, or
 * -1 when no rung holds it or more than `room` - BLOCK tokens reach the lowest rung.
 * `values`/`ids`/`block_max` are scratch of room, room and (blocks) entries. */
static int64_t row_candidates(const float *const *chunks, const int64_t *widths, int32_t nchunks,
                              int64_t r, float scale, const float *ladder, int32_t rungs,
                              double target, int64_t room, float *values, int32_t *ids,
                              float *block_max, candidate *sorted, float *rung_out) {
    const __m512 s = _mm512_set1_ps(scale);
    const float floor_rung = ladder[rungs - 1];
    *rung_out = -1.0f;
    /* Pass 1: block maxima, running maximum, normaliser rescaled as the max grows. */
    float m = -INFINITY;
    __m512 vm = _mm512_set1_ps(m);
    __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
    int64_t b = 0;
    for (int c = 0; c < nchunks; c++) {
        const float *x = chunks[c] + r * widths[c];
        for (int64_t first = 0; first < widths[c]; first += BLOCK, b++) {
            __m512 v[4];
            load_block(x + first, widths[c] - first < BLOCK ? widths[c] - first : BLOCK, v);
            float top = _mm512_reduce_max_ps(
                _mm512_max_ps(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3])));
            block_max[b] = top;
            if (top > m) {
                double shrink = m == -INFINITY ? 0.0 : exp((double)(m - top) * scale);
                sum_lo = _mm512_mul_pd(sum_lo, _mm512_set1_pd(shrink));
                sum_hi = _mm512_mul_pd(sum_hi, _mm512_set1_pd(shrink));
                m = top;
                vm = _mm512_set1_ps(m);
            }
            __m512 e = _mm512_add_ps(
                _mm512_add_ps(exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(v[0], vm), s)),
                              exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(v[1], vm), s))),
                _mm512_add_ps(exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(v[2], vm), s)),
                              exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(v[3], vm), s))));
            sum_lo = _mm512_add_pd(sum_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
            sum_hi = _mm512_add_pd(sum_hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
        }
    }
    double total = _mm512_reduce_add_pd(_mm512_add_pd(sum_lo, sum_hi));
    if (!(total > 0.0) || !isfinite(m) || !isfinite(total)) return -1;
    /* Pass 2, with the row still in cache: the tokens with p >= the lowest rung, from
     * the blocks whose maximum can reach it (a relative slack of 1e-5 covers the
     * exponential's rounding), written branch-free by compress-stores. */
    const float inverse = (float)(1.0 / total);
    const __m512 vinv = _mm512_set1_ps(inverse), vfloor = _mm512_set1_ps(floor_rung);
    const float cutoff = m + (float)(log(floor_rung * total * (1.0 - 1e-5)) / scale);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t k = 0, offset = 0;
    b = 0;
    for (int c = 0; c < nchunks; c++) {
        const float *x = chunks[c] + r * widths[c];
        for (int64_t first = 0; first < widths[c]; first += BLOCK, b++) {
            if (block_max[b] < cutoff) continue;
            if (k + BLOCK > room) return -1;
            __m512 v[4];
            load_block(x + first, widths[c] - first < BLOCK ? widths[c] - first : BLOCK, v);
            for (int q = 0; q < 4; q++) {
                __m512 p =
                    _mm512_mul_ps(exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(v[q], vm), s)), vinv);
                __mmask16 keep = _mm512_cmp_ps_mask(p, vfloor, _CMP_GE_OQ);
                __m512i id = _mm512_add_epi32(
                    _mm512_set1_epi32((int32_t)(offset + first + 16 * q)), lanes);
                _mm512_mask_compressstoreu_ps(values + k, keep, p);
                _mm512_mask_compressstoreu_epi32(ids + k, keep, id);
                k += __builtin_popcount(keep);
            }
        }
        offset += widths[c];
    }
    /* The largest rung whose tokens hold the target mass (sums in double). */
    float rung = -1.0f;
    for (int level = 0; level < rungs && rung < 0; level++) {
        double mass = 0.0;
        for (int64_t i = 0; i < k; i++)
            if (values[i] >= ladder[level]) mass += values[i];
        if (mass >= target) rung = ladder[level];
    }
    *rung_out = rung;
    if (rung < 0) return -1;
    int64_t n = 0;
    for (int64_t i = 0; i < k; i++) {
        if (values[i] >= rung) {
            sorted[n].value = values[i];
            sorted[n].id = ids[i];
            n++;
        }
    }
    qsort(sorted, n, sizeof(candidate), by_descending_value);
    return n;
}

/* Inverse-CDF draw within the nucleus of n sorted candidates, step for step as
 * toxtests.sampling._nucleus_pick computes it with torch on a CPU: cumulative sums
 * accumulated in double and stored as float, comparisons in float. */
static int64_t nucleus_pick(const candidate *sorted, int64_t n, float uniform, float top_p) {
    double running = 0.0, kept_running = 0.0;
    int64_t last_kept = -1;
    float *cdf = malloc(sizeof(float) * (n ? n : 1));
    if (!cdf) return -2;
    for (int64_t i = 0; i < n; i++) {
        running += sorted[i].value;
        float cumulative = (float)running;
        int keep = (cumulative - sorted[i].value) < top_p;
        if (keep) last_kept = i;
        kept_running += keep ? sorted[i].value : 0.0f;
        cdf[i] = (float)kept_running;
    }
    float target = uniform * cdf[n - 1];
    int64_t lo = 0, hi = n; /* first i with cdf[i] > target */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (cdf[mid] > target) hi = mid;
        else lo = mid + 1;
    }
    free(cdf);
    if (lo > n - 1) lo = n - 1;
    if (lo > last_kept) lo = last_kept;
    return sorted[lo].id;
}

typedef struct {
    float *values;
    int32_t *ids;
    float *block_max;
    candidate *sorted;
} scratch;

static int scratch_alloc(scratch *w, const int64_t *widths, int32_t nchunks, int64_t room) {
    int64_t blocks = 0;
    for (int c = 0; c < nchunks; c++) blocks += (widths[c] + BLOCK - 1) / BLOCK;
    w->values = malloc(sizeof(float) * room);
    w->ids = malloc(sizeof(int32_t) * room);
    w->block_max = malloc(sizeof(float) * (blocks ? blocks : 1));
    w->sorted = malloc(sizeof(candidate) * room);
    return w->values && w->ids && w->block_max && w->sorted ? 0 : -1;
}

static void scratch_free(scratch *w) {
    free(w->values);
    free(w->ids);
    free(w->block_max);
    free(w->sorted);
}

/* Rows r0..r1 of logits (rows x vocab) held as nchunks column chunks, chunk c a
 * row-major (rows x widths[c]) block; probabilities are softmax(logits * scale).
 * Row r's candidates go to out_values/out_ids[r*room ...], their count to counts[r]
 * (-1: not found), its rung to chosen[r]. Returns 0, or -1 when out of memory. */
int top_p_candidates(const float *const *chunks, const int64_t *widths, int32_t nchunks,
                     int64_t r0, int64_t r1, float scale, const float *ladder, int32_t rungs,
                     double target, int64_t room, float *out_values, int32_t *out_ids,
                     int64_t *counts, float *chosen) {
    scratch w;
    if (scratch_alloc(&w, widths, nchunks, room)) {
        scratch_free(&w);
        return -1;
    }
    for (int64_t r = r0; r < r1; r++) {
        int64_t n = row_candidates(chunks, widths, nchunks, r, scale, ladder, rungs, target, room,
                                   w.values, w.ids, w.block_max, w.sorted, chosen + r);
        counts[r] = n;
        for (int64_t i = 0; i < n; i++) {
            out_values[r * room + i] = w.sorted[i].value;
            out_ids[r * room + i] = w.sorted[i].id;
        }
    }
    scratch_free(&w);
    return 0;
}

/* The same rows, each drawing its token from its candidates with its own uniform:
 * tokens[r] = the token, or -1 where the row has no candidates (the caller samples it
 * another way). Returns 0, or -1 when out of memory. */
int top_p_sample(const float *const *chunks, const int64_t *widths, int32_t nchunks, int64_t r0,
                 int64_t r1, float scale, const float *ladder, int32_t rungs, double target,
                 int64_t room, float top_p, const float *uniforms, int64_t *tokens) {
    scratch w;
    if (scratch_alloc(&w, widths, nchunks, room)) {
        scratch_free(&w);
        return -1;
    }
    int status = 0;
    for (int64_t r = r0; r < r1; r++) {
        float rung;
        int64_t n = row_candidates(chunks, widths, nchunks, r, scale, ladder, rungs, target, room,
                                   w.values, w.ids, w.block_max, w.sorted, &rung);
        tokens[r] = n > 0 ? nucleus_pick(w.sorted, n, uniforms[r], top_p) : -1;
        if (tokens[r] == -2) status = -1;
    }
    scratch_free(&w);
    return status;
}

/* Rows' candidates side by side: (rows x width), zero-padded, ids widened to int64. */
void pack_candidates(const float *values, const int32_t *ids, int64_t room, const int64_t *counts,
                     int64_t rows, int64_t width, float *packed_values, int64_t *packed_ids) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t n = counts[r] > 0 ? counts[r] : 0;
        for (int64_t j = 0; j < width; j++) {
            packed_values[r * width + j] = j < n ? values[r * room + j] : 0.0f;
            packed_ids[r * width + j] = j < n ? ids[r * room + j] : 0;
        }
    }
}
