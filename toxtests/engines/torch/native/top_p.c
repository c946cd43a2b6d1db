/* The sampling tail of a decoding step in one read of the logits.
 *
 * For each row of logits, held as column chunks the output head produced: the row's
 * maximum and the maxima of 64-token blocks, the softmax normaliser (float exponentials
 * summed per block, blocks summed in double), then the tokens whose probability reaches
 * the lowest rung of the ladder, read only from the blocks whose maximum can reach it,
 * while the row is still in cache. The rung whose tokens hold `target` of the mass is
 * chosen as in toxtests/nucleus.py, and its tokens come back sorted by descending
 * probability (ties by id). Built and loaded by toxtests/native.py.
 *
 * One algorithm, three builds with the same bits: AVX-512 (one 16-lane register), AVX2
 * with FMA (two 8-lane halves) and portable C (16 scalar lanes, for other CPUs and as
 * the reference the tests hold the vector builds to). Every lane computes the same IEEE
 * operations in the same order (fused where the source says fmadd, nowhere else: built
 * with -ffp-contract=off), max keeps x86's rule (the second operand when either is NaN),
 * and the 16 lanes' double sums are added in one fixed tree. So the same logits give
 * the same draws on every kind of CPU.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define TOP_P_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define TOP_P_AVX2 1
#include <immintrin.h>
#endif

#define BLOCK 64
#define LANES 16

/* ---- 16 float lanes (vf), their comparison masks (vm), 16 double accumulators (vd) ---- */
#if TOP_P_AVX512
static const char flavour[] = "avx512";
typedef __m512 vf;
typedef __mmask16 vm;
typedef struct { __m512d lo, hi; } vd; /* lanes 0-7, 8-15 */
static inline vf vf_set1(float a) { return _mm512_set1_ps(a); }
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vf vf_round(vf a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/* p * 2^n for integral n in [-126, 0]. */
static inline vf vf_scale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
static inline vm vf_lt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline vm vf_ge(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
static inline vf vf_zero_where(vm m, vf a) { return _mm512_maskz_mov_ps((__mmask16)~m, a); }
static inline unsigned vm_bits(vm m) { return m; }
static inline float vf_max_all(vf a) { return _mm512_reduce_max_ps(a); }
static inline vd vd_zero(void) { return (vd){_mm512_setzero_pd(), _mm512_setzero_pd()}; }
static inline vd vd_add(vd s, vf e) {
    s.lo = _mm512_add_pd(s.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    s.hi = _mm512_add_pd(s.hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1)));
    return s;
}
static inline vd vd_scale(vd s, double a) {
    s.lo = _mm512_mul_pd(s.lo, _mm512_set1_pd(a));
    s.hi = _mm512_mul_pd(s.hi, _mm512_set1_pd(a));
    return s;
}
static inline void vd_store(double *p, vd s) {
    _mm512_storeu_pd(p, s.lo);
    _mm512_storeu_pd(p + 8, s.hi);
}
#elif TOP_P_AVX2
static const char flavour[] = "avx2";
typedef struct { __m256 lo, hi; } vf;
typedef struct { __m256 lo, hi; } vm;
typedef struct { __m256d a, b, c, d; } vd; /* lanes 0-3, 4-7, 8-11, 12-15 */
static inline vf vf_set1(float a) { return (vf){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
static inline vf vf_load(const float *p) { return (vf){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void vf_store(float *p, vf a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
#define VF2(name, op)                                                         \
    static inline vf name(vf a, vf b) { return (vf){op(a.lo, b.lo), op(a.hi, b.hi)}; }
VF2(vf_add, _mm256_add_ps)
VF2(vf_sub, _mm256_sub_ps)
VF2(vf_mul, _mm256_mul_ps)
VF2(vf_max, _mm256_max_ps)
static inline vf vf_fmadd(vf a, vf b, vf c) {
    return (vf){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline vf vf_fnmadd(vf a, vf b, vf c) {
    return (vf){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
static inline vf vf_round(vf a) {
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return (vf){_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
static inline __m256 pow2(__m256 n) { /* 2^n as its bits: n + 127 in the exponent field */
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
static inline vf vf_scale2(vf p, vf n) {
    return (vf){_mm256_mul_ps(p.lo, pow2(n.lo)), _mm256_mul_ps(p.hi, pow2(n.hi))};
}
static inline vm vf_lt(vf a, vf b) {
    return (vm){_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ)};
}
static inline vm vf_ge(vf a, vf b) {
    return (vm){_mm256_cmp_ps(a.lo, b.lo, _CMP_GE_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GE_OQ)};
}
static inline vf vf_zero_where(vm m, vf a) {
    return (vf){_mm256_andnot_ps(m.lo, a.lo), _mm256_andnot_ps(m.hi, a.hi)};
}
static inline unsigned vm_bits(vm m) {
    return (unsigned)_mm256_movemask_ps(m.lo) | (unsigned)_mm256_movemask_ps(m.hi) << 8;
}
static inline float vf_max_all(vf a) {
    float lanes[LANES], top;
    vf_store(lanes, a);
    top = lanes[0];
    for (int i = 1; i < LANES; i++) top = lanes[i] > top ? lanes[i] : top;
    return top;
}
static inline vd vd_zero(void) {
    __m256d z = _mm256_setzero_pd();
    return (vd){z, z, z, z};
}
static inline vd vd_add(vd s, vf e) {
    s.a = _mm256_add_pd(s.a, _mm256_cvtps_pd(_mm256_castps256_ps128(e.lo)));
    s.b = _mm256_add_pd(s.b, _mm256_cvtps_pd(_mm256_extractf128_ps(e.lo, 1)));
    s.c = _mm256_add_pd(s.c, _mm256_cvtps_pd(_mm256_castps256_ps128(e.hi)));
    s.d = _mm256_add_pd(s.d, _mm256_cvtps_pd(_mm256_extractf128_ps(e.hi, 1)));
    return s;
}
static inline vd vd_scale(vd s, double a) {
    __m256d v = _mm256_set1_pd(a);
    return (vd){_mm256_mul_pd(s.a, v), _mm256_mul_pd(s.b, v), _mm256_mul_pd(s.c, v),
                _mm256_mul_pd(s.d, v)};
}
static inline void vd_store(double *p, vd s) {
    _mm256_storeu_pd(p, s.a);
    _mm256_storeu_pd(p + 4, s.b);
    _mm256_storeu_pd(p + 8, s.c);
    _mm256_storeu_pd(p + 12, s.d);
}
#else
static const char flavour[] = "portable";
typedef struct { float f[LANES]; } vf;
typedef struct { unsigned bits; } vm;
typedef struct { double f[LANES]; } vd;
#define EACH for (int i = 0; i < LANES; i++)
static inline vf vf_set1(float a) { vf r; EACH r.f[i] = a; return r; }
static inline vf vf_load(const float *p) { vf r; memcpy(r.f, p, sizeof r.f); return r; }
static inline void vf_store(float *p, vf a) { memcpy(p, a.f, sizeof a.f); }
static inline vf vf_add(vf a, vf b) { EACH a.f[i] = a.f[i] + b.f[i]; return a; }
static inline vf vf_sub(vf a, vf b) { EACH a.f[i] = a.f[i] - b.f[i]; return a; }
static inline vf vf_mul(vf a, vf b) { EACH a.f[i] = a.f[i] * b.f[i]; return a; }
/* x86's maxps: a if a > b, else b (so b when either is NaN). */
static inline vf vf_max(vf a, vf b) { EACH a.f[i] = a.f[i] > b.f[i] ? a.f[i] : b.f[i]; return a; }
static inline vf vf_fmadd(vf a, vf b, vf c) { EACH a.f[i] = fmaf(a.f[i], b.f[i], c.f[i]); return a; }
static inline vf vf_fnmadd(vf a, vf b, vf c) { EACH a.f[i] = fmaf(-a.f[i], b.f[i], c.f[i]); return a; }
static inline vf vf_round(vf a) { EACH a.f[i] = nearbyintf(a.f[i]); return a; }
static inline vf vf_scale2(vf p, vf n) {
    EACH {
        uint32_t bits = (uint32_t)((int32_t)n.f[i] + 127) << 23;
        float two;
        memcpy(&two, &bits, sizeof two);
        p.f[i] = p.f[i] * two;
    }
    return p;
}
static inline vm vf_lt(vf a, vf b) { vm m = {0}; EACH m.bits |= (unsigned)(a.f[i] < b.f[i]) << i; return m; }
static inline vm vf_ge(vf a, vf b) { vm m = {0}; EACH m.bits |= (unsigned)(a.f[i] >= b.f[i]) << i; return m; }
static inline vf vf_zero_where(vm m, vf a) { EACH if (m.bits >> i & 1) a.f[i] = 0.0f; return a; }
static inline unsigned vm_bits(vm m) { return m.bits; }
static inline float vf_max_all(vf a) {
    float top = a.f[0];
    for (int i = 1; i < LANES; i++) top = a.f[i] > top ? a.f[i] : top;
    return top;
}
static inline vd vd_zero(void) { vd s; EACH s.f[i] = 0.0; return s; }
static inline vd vd_add(vd s, vf e) { EACH s.f[i] += (double)e.f[i]; return s; }
static inline vd vd_scale(vd s, double a) { EACH s.f[i] *= a; return s; }
static inline void vd_store(double *p, vd s) { memcpy(p, s.f, sizeof s.f); }
#undef EACH
#endif

/* The build's instruction set: "avx512", "avx2" or "portable". */
const char *top_p_flavour(void) { return flavour; }

/* The 16 lanes' sums in one fixed tree (lane i with i + 8, then halves, then the pair):
 * the order GCC's _mm512_reduce_add_pd gives the sum of two halves. */
static inline double vd_total(vd s) {
    double lanes[LANES], t[8];
    vd_store(lanes, s);
    for (int i = 0; i < 8; i++) t[i] = lanes[i] + lanes[i + 8];
    for (int i = 0; i < 4; i++) t[i] = t[i + 4] + t[i];
    for (int i = 0; i < 2; i++) t[i] = t[i + 2] + t[i];
    return t[0] + t[1];
}

/* exp(x) for x <= 0: Cephes expf (within ~1.4 ulp), exactly 0 below -87. */
static inline vf exp_nonpositive(vf x) {
    const vf lowest = vf_set1(-87.0f);
    vm under = vf_lt(x, lowest);
    x = vf_max(x, lowest);
    vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnmadd(n, vf_set1(0.693359375f), x);
    r = vf_fnmadd(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_fmadd(p, r, vf_set1(1.3981999507e-3f));
    p = vf_fmadd(p, r, vf_set1(8.3334519073e-3f));
    p = vf_fmadd(p, r, vf_set1(4.1665795894e-2f));
    p = vf_fmadd(p, r, vf_set1(1.6666665459e-1f));
    p = vf_fmadd(p, r, vf_set1(5.0000001201e-1f));
    p = vf_add(vf_fmadd(p, vf_mul(r, r), r), vf_set1(1.0f));
    return vf_zero_where(under, vf_scale2(p, n));
}

/* Lanes of a block of `count` <= BLOCK tokens at x; missing lanes read as -inf. */
static inline void load_block(const float *x, long count, vf v[4]) {
    if (count == BLOCK) {
        for (int k = 0; k < 4; k++) v[k] = vf_load(x + LANES * k);
        return;
    }
    float padded[BLOCK];
    for (long i = 0; i < BLOCK; i++) padded[i] = i < count ? x[i] : -INFINITY;
    for (int k = 0; k < 4; k++) v[k] = vf_load(padded + LANES * k);
}

/* The lanes of p whose bit is set in keep, in lane order, with ids first + lane. */
static inline int64_t compress(float *values, int32_t *ids, vf p, unsigned keep, int32_t first) {
#if TOP_P_AVX512
    _mm512_mask_compressstoreu_ps(values, (__mmask16)keep, p);
    __m512i id = _mm512_add_epi32(_mm512_set1_epi32(first),
                                  _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    _mm512_mask_compressstoreu_epi32(ids, (__mmask16)keep, id);
    return __builtin_popcount(keep);
#else
    float lanes[LANES];
    int64_t n = 0;
    vf_store(lanes, p);
    for (; keep; keep &= keep - 1, n++) {
        int lane = __builtin_ctz(keep);
        values[n] = lanes[lane];
        ids[n] = first + lane;
    }
    return n;
#endif
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
    const vf s = vf_set1(scale);
    const float floor_rung = ladder[rungs - 1];
    *rung_out = -1.0f;
    /* Pass 1: block maxima, running maximum, normaliser rescaled as the max grows. */
    float m = -INFINITY;
    vf vmax = vf_set1(m);
    vd sum = vd_zero();
    int64_t b = 0;
    for (int c = 0; c < nchunks; c++) {
        const float *x = chunks[c] + r * widths[c];
        for (int64_t first = 0; first < widths[c]; first += BLOCK, b++) {
            vf v[4];
            load_block(x + first, widths[c] - first < BLOCK ? widths[c] - first : BLOCK, v);
            float top = vf_max_all(vf_max(vf_max(v[0], v[1]), vf_max(v[2], v[3])));
            block_max[b] = top;
            if (top > m) {
                double shrink = m == -INFINITY ? 0.0 : exp((double)(m - top) * scale);
                sum = vd_scale(sum, shrink);
                m = top;
                vmax = vf_set1(m);
            }
            vf e = vf_add(vf_add(exp_nonpositive(vf_mul(vf_sub(v[0], vmax), s)),
                                 exp_nonpositive(vf_mul(vf_sub(v[1], vmax), s))),
                          vf_add(exp_nonpositive(vf_mul(vf_sub(v[2], vmax), s)),
                                 exp_nonpositive(vf_mul(vf_sub(v[3], vmax), s))));
            sum = vd_add(sum, e);
        }
    }
    double total = vd_total(sum);
    if (!(total > 0.0) || !isfinite(m) || !isfinite(total)) return -1;
    /* Pass 2, with the row still in cache: the tokens with p >= the lowest rung, from
     * the blocks whose maximum can reach it (a relative slack of 1e-5 covers the
     * exponential's rounding), kept in lane order (compress-stores on AVX-512). */
    const float inverse = (float)(1.0 / total);
    const vf vinv = vf_set1(inverse), vfloor = vf_set1(floor_rung);
    const float cutoff = m + (float)(log(floor_rung * total * (1.0 - 1e-5)) / scale);
    int64_t k = 0, offset = 0;
    b = 0;
    for (int c = 0; c < nchunks; c++) {
        const float *x = chunks[c] + r * widths[c];
        for (int64_t first = 0; first < widths[c]; first += BLOCK, b++) {
            if (block_max[b] < cutoff) continue;
            if (k + BLOCK > room) return -1;
            vf v[4];
            load_block(x + first, widths[c] - first < BLOCK ? widths[c] - first : BLOCK, v);
            for (int q = 0; q < 4; q++) {
                vf p = vf_mul(exp_nonpositive(vf_mul(vf_sub(v[q], vmax), s)), vinv);
                unsigned keep = vm_bits(vf_ge(p, vfloor));
                k += compress(values + k, ids + k, p, keep,
                              (int32_t)(offset + first + LANES * q));
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
