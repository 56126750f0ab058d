/* The bf16 LoRA term of a few tokens (a decode step), every token against its own slot's rank rows only.
 *
 * Built and loaded by lora_kernel.py. For token m of row i = m / T on slot u = row_slot[i] (-1: no adapter),
 * and each of the n layers j reading the same input x (q, k and v, say):
 *
 *     h_j[r] = w[i][r] * (x[m] . A_j[rows[u][r]])                  r < ranks[u]   (float32)
 *     y[m][out_off[j] + o] += sum_r h_j[r] * Bs_j[rows[u][r]][o]   o < out_dim[j] (float32, rounded once)
 *
 * A_j (P + 1, in) and Bs_j (P + 1, out_dim[j]) are layer j's pools (lora_layers.py: Bs = scale * B^T), read in
 * place; y (M, y_cols) is updated in place. Built with AVX512-BF16 where the CPU has it (dot products with
 * vdpbf16ps, 32 outputs per register pair in the expand), portable C elsewhere. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define SIMD 1

static float dot(const bf16 *x, const bf16 *a, int n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= n; k += 64) {
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(a + k));
        s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(x + k + 32), (__m512bh)_mm512_loadu_si512(a + k + 32));
    }
    for (; k + 32 <= n; k += 32)
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(a + k));
    float t = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    for (; k < n; k++) t += bf2f(x[k]) * bf2f(a[k]);
    return t;
}

static inline __m512 load16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void store16(bf16 *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }

/* yr[o] += sum_r h[r] * B[rows[r]][o]: 32 outputs at a time, held in registers across the ranks. */
static void expand(bf16 *yr, const float *h, const bf16 *B, const int *rows, int rank, int od, float *acc) {
    (void)acc;
    int o = 0;
    for (; o + 32 <= od; o += 32) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int r = 0; r < rank; r++) {
            const bf16 *b = B + (int64_t)rows[r] * od + o;
            __m512 hr = _mm512_set1_ps(h[r]);
            a0 = _mm512_fmadd_ps(hr, load16(b), a0);
            a1 = _mm512_fmadd_ps(hr, load16(b + 16), a1);
        }
        store16(yr + o, _mm512_add_ps(a0, load16(yr + o)));
        store16(yr + o + 16, _mm512_add_ps(a1, load16(yr + o + 16)));
    }
    for (; o < od; o++) {
        float s = 0;
        for (int r = 0; r < rank; r++) s += h[r] * bf2f(B[(int64_t)rows[r] * od + o]);
        yr[o] = f2bf(bf2f(yr[o]) + s);
    }
}

#else
#define SIMD 0

static float dot(const bf16 *x, const bf16 *a, int n) {
    float s[16] = {0}, t = 0;
    int k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) s[l] += bf2f(x[k + l]) * bf2f(a[k + l]);
    for (; k < n; k++) t += bf2f(x[k]) * bf2f(a[k]);
    for (int l = 0; l < 16; l++) t += s[l];
    return t;
}

static void expand(bf16 *yr, const float *h, const bf16 *B, const int *rows, int rank, int od, float *acc) {
    memset(acc, 0, sizeof(float) * od);
    for (int r = 0; r < rank; r++) {
        const bf16 *b = B + (int64_t)rows[r] * od;
        for (int o = 0; o < od; o++) acc[o] += h[r] * bf2f(b[o]);
    }
    for (int o = 0; o < od; o++) yr[o] = f2bf(bf2f(yr[o]) + acc[o]);
}
#endif

int lora_term_simd(void) { return SIMD; }

/* The slots' work is spread over the OpenMP threads, a slot at a time: each thread reads only its slots' rows
 * (the pools are cold in cache every step, so the term is bound by those reads). Built with -fopenmp, this library
 * binds to the libgomp already loaded (torch's: same soname), so it uses torch's threads, not a second pool.
 * Returns 0, or -1 when it could not allocate its scratch (y untouched then). */
int lora_term_bf16(int M, int T, int in, const bf16 *x, bf16 *y, int y_cols, int n, const int64_t *A_ptrs,
                   const int64_t *B_ptrs, const int *out_off, const int *out_dim, const int *row_slot, int U,
                   const int *rows, const int *ranks, int R, const float *w) {
    int max_out = 0, failed = 0;
    for (int j = 0; j < n; j++)
        if (out_dim[j] > max_out) max_out = out_dim[j];
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
    for (int u = 0; u < U; u++) {
        float *h = malloc(sizeof(float) * ((size_t)n * R + max_out)); /* (n, R) then the expand's (max_out,) */
        if (!h) {
            failed = 1;
            continue;
        }
        float *acc = h + (size_t)n * R;
        const int *ur = rows + (size_t)u * R;
        int rank = ranks[u];
        for (int m = 0; m < M; m++) {
            int i = m / T;
            if (row_slot[i] != u) continue;
            const float *wi = w + (size_t)i * R;
            const bf16 *xm = x + (int64_t)m * in;
            for (int j = 0; j < n; j++) {
                const bf16 *A = (const bf16 *)(intptr_t)A_ptrs[j];
                for (int r = 0; r < rank; r++) h[j * R + r] = wi[r] * dot(xm, A + (int64_t)ur[r] * in, in);
            }
            for (int j = 0; j < n; j++)
                expand(y + (int64_t)m * y_cols + out_off[j], h + j * R, (const bf16 *)(intptr_t)B_ptrs[j], ur,
                       rank, out_dim[j], acc);
        }
        free(h);
    }
    return failed ? -1 : 0;
}
