/* Attention forward for bf16 on x86 CPUs with AVX-512 BF16 (vdpbf16ps) and no AMX: a frozen vision tower's
 * attention (no mask, not causal, no dropout, no gradient). Built and loaded by models/cpu_attention.py.
 *
 * Why hand-written: on such CPUs torch's SDPA (its CPU flash kernel) runs a 1,025-token, 64-wide-head attention
 * at about a fifth of the bf16 matmul rate, and no torch or oneDNN kernel does better (benchmarks/RESULTS.md).
 * Here, per (batch, head): K and V are packed once into the pair layout vdpbf16ps reads; per block of 48 query
 * rows the scores of all keys are computed in fp32 (8 rows x 32 keys a register tile), exponentiated in place
 * (exact softmax, no online rescaling: a block's scores stay in the core's cache), rounded to bf16 and multiplied
 * by V (6 rows x 64 columns a tile), then divided by the fp32 row sums. The head width is padded to a multiple
 * of 16 with zeros, so any even width works. Threads split the (batch, head) pairs.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>

typedef uint16_t bf16;

#define QB 48   /* query rows per block: a multiple of 8 (scores) and 6 (output) */
#define KT 32   /* keys per score tile */

static inline __m512 exp512(__m512 x) {
    /* e^x = 2^n * e^r, r = x - n ln2, |r| <= ln2 / 2; degree-6 polynomial */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

typedef struct {
    const bf16 *q, *k, *v; bf16 *o;
    int64_t B, H, N, M, D;      /* D: the real head width */
    int64_t qs[3], ks[3], vs[3], os[3];  /* strides (elements) of batch, head, row; the last dim is contiguous */
    float scale;
    int nthreads, tid, failed;
} job_t;

static void *worker(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t M = j->M, N = j->N;
    const int64_t Mp = (M + KT - 1) / KT * KT;      /* keys padded to the score tile */
    const int64_t Dp = (j->D + 15) / 16 * 16;       /* head width padded with zeros to whole vectors */
    const int64_t DP = Dp / 2, DH = j->D / 2;        /* d pairs: padded, real */
    /* K packed in VNNI tiles: [Mp/16][DP][16][2]; V packed: [Mp/2][D][2] */
    bf16 *kp = aligned_alloc(64, Mp * Dp * sizeof(bf16));
    bf16 *vp = aligned_alloc(64, Mp * Dp * sizeof(bf16));
    bf16 *qb = aligned_alloc(64, QB * Dp * sizeof(bf16));
    float *s = aligned_alloc(64, QB * Mp * sizeof(float));
    bf16 *p = aligned_alloc(64, QB * Mp * sizeof(bf16));
    float rowsum[QB];
    if (!kp || !vp || !qb || !s || !p) {
        j->failed = 1;
        free(kp); free(vp); free(qb); free(s); free(p);
        return NULL;
    }
    const int64_t BH = j->B * j->H;
    for (int64_t bh = j->tid; bh < BH; bh += j->nthreads) {
        const int64_t b = bh / j->H, h = bh % j->H;
        const bf16 *q = j->q + b * j->qs[0] + h * j->qs[1];
        const bf16 *k = j->k + b * j->ks[0] + h * j->ks[1];
        const bf16 *v = j->v + b * j->vs[0] + h * j->vs[1];
        bf16 *o = j->o + b * j->os[0] + h * j->os[1];
        /* pack K */
        for (int64_t kb = 0; kb < Mp / 16; kb++) {
            uint32_t *dst = (uint32_t *)(kp + kb * 16 * Dp);
            for (int64_t t = 0; t < 16; t++) {
                int64_t key = kb * 16 + t;
                if (key < M) {
                    const bf16 *kr = k + key * j->ks[2];
                    for (int64_t dp = 0; dp < DH; dp++) memcpy(dst + dp * 16 + t, kr + 2 * dp, 4);
                    for (int64_t dp = DH; dp < DP; dp++) dst[dp * 16 + t] = 0;
                } else {
                    for (int64_t dp = 0; dp < DP; dp++) dst[dp * 16 + t] = 0;
                }
            }
        }
        /* pack V: pairs of keys interleaved per column */
        for (int64_t kk = 0; kk < Mp; kk += 2) {
            bf16 *dst = vp + kk * Dp;
            const bf16 *v0 = kk < M ? v + kk * j->vs[2] : NULL;
            const bf16 *v1 = kk + 1 < M ? v + (kk + 1) * j->vs[2] : NULL;
            for (int64_t d = 0; d < Dp; d++) {
                dst[2 * d] = v0 && d < j->D ? v0[d] : 0;
                dst[2 * d + 1] = v1 && d < j->D ? v1[d] : 0;
            }
        }
        for (int64_t q0 = 0; q0 < N; q0 += QB) {
            const int64_t rows = N - q0 < QB ? N - q0 : QB;
            for (int64_t r = 0; r < QB; r++) {
                memset(qb + r * Dp, 0, Dp * sizeof(bf16));
                if (r < rows) memcpy(qb + r * Dp, q + (q0 + r) * j->qs[2], j->D * sizeof(bf16));
            }
            /* scores: s[r][key] = q . k, 8 rows x 32 keys a tile */
            for (int64_t r0 = 0; r0 < QB; r0 += 8) {
                for (int64_t kt = 0; kt < Mp; kt += KT) {
                    __m512 acc[8][2];
                    for (int a = 0; a < 8; a++) { acc[a][0] = _mm512_setzero_ps(); acc[a][1] = _mm512_setzero_ps(); }
                    const bf16 *k0 = kp + kt * Dp, *k1 = kp + (kt + 16) * Dp;
                    const uint32_t *qr = (const uint32_t *)(qb + r0 * Dp);
                    for (int64_t dp = 0; dp < DP; dp++) {
                        __m512bh b0 = (__m512bh)_mm512_load_si512(k0 + dp * 32);
                        __m512bh b1 = (__m512bh)_mm512_load_si512(k1 + dp * 32);
#pragma GCC unroll 8
                        for (int a = 0; a < 8; a++) {
                            __m512bh qa = (__m512bh)_mm512_set1_epi32(qr[a * DP + dp]);
                            acc[a][0] = _mm512_dpbf16_ps(acc[a][0], qa, b0);
                            acc[a][1] = _mm512_dpbf16_ps(acc[a][1], qa, b1);
                        }
                    }
                    for (int a = 0; a < 8; a++) {
                        _mm512_store_ps(s + (r0 + a) * Mp + kt, acc[a][0]);
                        _mm512_store_ps(s + (r0 + a) * Mp + kt + 16, acc[a][1]);
                    }
                }
            }
            /* softmax numerators in bf16, the sums kept in fp32 */
            const __m512 sc = _mm512_set1_ps(j->scale);
            for (int64_t r = 0; r < QB; r++) {
                float *sr = s + r * Mp;
                __m512 mx = _mm512_set1_ps(-INFINITY);
                int64_t c = 0;
                for (; c + 16 <= M; c += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(sr + c));
                __mmask16 tail = (__mmask16)((1u << (M - c)) - 1);
                if (M - c) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_load_ps(sr + c));
                float m = _mm512_reduce_max_ps(mx) * j->scale;
                __m512 mv = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
                bf16 *pr = p + r * Mp;
                for (c = 0; c < Mp; c += 16) {
                    __m512 e = exp512(_mm512_fmsub_ps(_mm512_load_ps(sr + c), sc, mv));
                    if (c + 16 > M) e = _mm512_maskz_mov_ps(c < M ? (__mmask16)((1u << (M - c)) - 1) : 0, e);
                    sum = _mm512_add_ps(sum, e);
                    _mm256_store_si256((__m256i *)(pr + c), (__m256i)_mm512_cvtneps_pbh(e));
                }
                rowsum[r] = _mm512_reduce_add_ps(sum);
            }
            /* output: o[r][:] = sum_key p[r][key] v[key][:], 6 rows x 64 columns a tile */
            for (int64_t r0 = 0; r0 < QB; r0 += 6) {
                for (int64_t c0 = 0; c0 < Dp; c0 += 64) {
                    const int nz = (Dp - c0) >= 64 ? 4 : (int)((Dp - c0) / 16);
                    __m512 acc[6][4];
                    for (int a = 0; a < 6; a++) for (int z = 0; z < 4; z++) acc[a][z] = _mm512_setzero_ps();
                    if (nz == 4) {
                        for (int64_t kk = 0; kk < Mp; kk += 2) {
                            const bf16 *vr = vp + kk * Dp + 2 * c0;
                            __m512bh v0 = (__m512bh)_mm512_load_si512(vr);
                            __m512bh v1 = (__m512bh)_mm512_load_si512(vr + 32);
                            __m512bh v2 = (__m512bh)_mm512_load_si512(vr + 64);
                            __m512bh v3 = (__m512bh)_mm512_load_si512(vr + 96);
#pragma GCC unroll 6
                            for (int a = 0; a < 6; a++) {
                                __m512bh pa = (__m512bh)_mm512_set1_epi32(*(const uint32_t *)(p + (r0 + a) * Mp + kk));
                                acc[a][0] = _mm512_dpbf16_ps(acc[a][0], pa, v0);
                                acc[a][1] = _mm512_dpbf16_ps(acc[a][1], pa, v1);
                                acc[a][2] = _mm512_dpbf16_ps(acc[a][2], pa, v2);
                                acc[a][3] = _mm512_dpbf16_ps(acc[a][3], pa, v3);
                            }
                        }
                    } else {
                        for (int64_t kk = 0; kk < Mp; kk += 2) {
                            const bf16 *vr = vp + kk * Dp + 2 * c0;
                            for (int z = 0; z < nz; z++) {
                                __m512bh vz = (__m512bh)_mm512_loadu_si512(vr + 32 * z);
                                for (int a = 0; a < 6; a++) {
                                    __m512bh pa = (__m512bh)_mm512_set1_epi32(*(const uint32_t *)(p + (r0 + a) * Mp + kk));
                                    acc[a][z] = _mm512_dpbf16_ps(acc[a][z], pa, vz);
                                }
                            }
                        }
                    }
                    for (int a = 0; a < 6; a++) {
                        if (r0 + a >= rows) break;
                        __m512 inv = _mm512_set1_ps(1.0f / rowsum[r0 + a]);
                        bf16 *orow = o + (q0 + r0 + a) * j->os[2] + c0;
                        for (int z = 0; z < nz; z++) {
                            const int64_t left = j->D - c0 - 16 * z;  /* real columns from here */
                            if (left <= 0) break;
                            __m256i out = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[a][z], inv));
                            if (left >= 16) _mm256_storeu_si256((__m256i *)(orow + 16 * z), out);
                            else _mm256_mask_storeu_epi16(orow + 16 * z, (__mmask16)((1u << left) - 1), out);
                        }
                    }
                }
            }
        }
    }
    free(kp); free(vp); free(qb); free(s); free(p);
    return NULL;
}

/* q: [B, H, N, D], k, v: [B, H, M, D], o: [B, H, N, D] in any strides (elements; batch, head, row) with a
   contiguous last dim; D even. Returns 0; 1 for sizes it does not take, 2 when memory ran out. */
int attn_fwd(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o,
             int64_t B, int64_t H, int64_t N, int64_t M, int64_t D,
             const int64_t *qs, const int64_t *ks, const int64_t *vs, const int64_t *os,
             float scale, int nthreads) {
    if (D % 2 || D < 2 || M < 1 || N < 1 || B < 1 || H < 1) return 1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > B * H) nthreads = (int)(B * H);
    job_t jobs[256];
    pthread_t th[256];
    if (nthreads > 256) nthreads = 256;
    for (int t = 0; t < nthreads; t++) {
        job_t *j = &jobs[t];
        j->q = q; j->k = k; j->v = v; j->o = o;
        j->B = B; j->H = H; j->N = N; j->M = M; j->D = D;
        memcpy(j->qs, qs, 3 * sizeof(int64_t)); memcpy(j->ks, ks, 3 * sizeof(int64_t));
        memcpy(j->vs, vs, 3 * sizeof(int64_t)); memcpy(j->os, os, 3 * sizeof(int64_t));
        j->scale = scale; j->nthreads = nthreads; j->tid = t; j->failed = 0;
    }
    int started[256] = {0};
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&th[t], NULL, worker, &jobs[t]) == 0;
    worker(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else worker(&jobs[t]);  /* no thread to be had: this one does its share */
    }
    for (int t = 0; t < nthreads; t++)
        if (jobs[t].failed) return 2;
    return 0;
}
