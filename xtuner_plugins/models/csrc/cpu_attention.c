/* Attention in bf16 for x86 CPUs with AVX-512 BF16 (vdpbf16ps) and no AMX: forward (with the log-sum-exp a
 * backward needs) and backward, optionally causal, with grouped key/value heads. Built and loaded by
 * models/cpu_attention.py, which says when it is used.
 *
 * Why hand-written: on such CPUs torch's SDPA (its CPU flash kernel) runs a 1,025-token, 64-wide-head attention
 * at about a fifth of the bf16 matmul rate, its backward little better, and no torch or oneDNN kernel does better
 * (benchmarks/RESULTS.md).
 *
 * How: per (batch, head), K and V are packed once into the pair layouts vdpbf16ps reads. Per block of QB query
 * rows, the scores against every key the block sees are computed in fp32 (8 rows x 32 keys a register tile) and
 * exponentiated in place: an exact softmax, no online rescaling, as a block's scores stay in the core's cache.
 * Products whose reduction runs over keys or rows (P V, dS K, dS^T Q, P^T dO) take 6 rows x 64 columns a tile
 * over pairs of the reduction; P and dS are rounded to bf16 for them, as flash attention does. The head width is
 * padded with zeros to a multiple of 16, so any even width works. Threads split the (batch, head) pairs; the
 * backward adds each head's dK and dV into its key/value head's fp32 sums under a lock.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

#define QB 48   /* query rows per block: a multiple of 8 (NT tiles) and 6 (NN tiles) */
#define KT 32   /* keys per NT tile */
#define MAXT 256

static inline int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

static inline __m512 exp512(__m512 x) {
    /* e^x = 2^n e^r, r = x - n ln2, |r| <= ln2 / 2: a degree-6 polynomial; e^-inf = 0; e^NaN = NaN (vmaxps
       returns its second operand when one is a NaN: a NaN score propagates, as in SDPA, rather than weighing 0) */
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
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

/* the first n of 16 lanes */
static inline __mmask16 first(int64_t n) { return n <= 0 ? 0 : n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }

static inline bf16 to_bf16(float x) {  /* round to nearest even, as vcvtneps2bf16 (a NaN stays a quiet NaN) */
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* ---------------------------------------------------------------------------------------------- packing */
/* rows [n][d] (row stride rs) -> NT layout [np/16][dp/2][16][2], zeros past n and d (np: a multiple of 32) */
static void pack_nt(const bf16 *src, int64_t rs, int64_t n, int64_t d, int64_t np, int64_t dp, bf16 *dst) {
    for (int64_t b = 0; b < np / 16; b++) {
        uint32_t *o = (uint32_t *)(dst + b * 16 * dp);
        for (int64_t t = 0; t < 16; t++) {
            const int64_t row = b * 16 + t;
            for (int64_t p = 0; p < dp / 2; p++) {
                uint32_t x = 0;
                if (row < n && 2 * p < d) memcpy(&x, src + row * rs + 2 * p, 4);
                o[p * 16 + t] = x;
            }
        }
    }
}

/* rows [n][d] (row stride rs) -> NN layout [np/2][dp][2] (pairs of rows interleaved), zeros past n and d */
static void pack_nn(const bf16 *src, int64_t rs, int64_t n, int64_t d, int64_t np, int64_t dp, bf16 *dst) {
    for (int64_t r = 0; r < np; r += 2) {
        bf16 *o = dst + r * dp;
        const bf16 *a = r < n ? src + r * rs : NULL, *b = r + 1 < n ? src + (r + 1) * rs : NULL;
        for (int64_t c = 0; c < dp; c++) {
            o[2 * c] = a && c < d ? a[c] : 0;
            o[2 * c + 1] = b && c < d ? b[c] : 0;
        }
    }
}

/* rows [n][d] (row stride rs) -> [QB][dp] row-major, zeros past n and d */
static void copy_rows(const bf16 *src, int64_t rs, int64_t n, int64_t d, int64_t dp, bf16 *dst) {
    for (int64_t r = 0; r < QB; r++) {
        memset(dst + r * dp, 0, dp * sizeof(bf16));
        if (r < n) memcpy(dst + r * dp, src + r * rs, d * sizeof(bf16));
    }
}

/* ---------------------------------------------------------------------------------------------- products */
/* C[r][c] = sum_k A[r][k] B[c][k]: A [rows][dp] bf16 (rows a multiple of 8), B in NT layout with np columns
 * (a multiple of 32), C fp32 with row stride ldc */
static void gemm_nt(const bf16 *a, int64_t rows, const bf16 *bp, int64_t np, int64_t dp, float *c, int64_t ldc) {
    const int64_t pairs = dp / 2;
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        const uint32_t *ar = (const uint32_t *)(a + r0 * dp);
        for (int64_t c0 = 0; c0 < np; c0 += KT) {
            __m512 acc[8][2];
            for (int i = 0; i < 8; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
            const bf16 *b0 = bp + c0 * dp, *b1 = bp + (c0 + 16) * dp;
            for (int64_t p = 0; p < pairs; p++) {
                __m512bh x0 = (__m512bh)_mm512_load_si512(b0 + p * 32);
                __m512bh x1 = (__m512bh)_mm512_load_si512(b1 + p * 32);
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    __m512bh ai = (__m512bh)_mm512_set1_epi32(ar[i * pairs + p]);
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, x0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, x1);
                }
            }
            for (int i = 0; i < 8; i++) {
                _mm512_storeu_ps(c + (r0 + i) * ldc + c0, acc[i][0]);
                _mm512_storeu_ps(c + (r0 + i) * ldc + c0 + 16, acc[i][1]);
            }
        }
    }
}

/* C[r][:] (+)= sum_t A[r][t] B[t][:]: A [rows][lda] bf16 (rows a multiple of 6, t < tn even), B in NN layout
 * [tn/2][dp][2], C fp32 [rows][ldc] (dp columns); accumulate: add to C, else overwrite */
static void gemm_nn(const bf16 *a, int64_t lda, int64_t rows, int64_t tn, const bf16 *bp, int64_t dp, float *c,
                    int64_t ldc, int accumulate) {
    for (int64_t r0 = 0; r0 < rows; r0 += 6) {
        for (int64_t c0 = 0; c0 < dp; c0 += 64) {
            const int nz = dp - c0 >= 64 ? 4 : (int)((dp - c0) / 16);
            __m512 acc[6][4];
            for (int i = 0; i < 6; i++)
                for (int z = 0; z < 4; z++)
                    acc[i][z] = accumulate && z < nz ? _mm512_loadu_ps(c + (r0 + i) * ldc + c0 + 16 * z)
                                                     : _mm512_setzero_ps();
            if (nz == 4) {
                for (int64_t t = 0; t < tn; t += 2) {
                    const bf16 *br = bp + t * dp + 2 * c0;
                    __m512bh x0 = (__m512bh)_mm512_loadu_si512(br);
                    __m512bh x1 = (__m512bh)_mm512_loadu_si512(br + 32);
                    __m512bh x2 = (__m512bh)_mm512_loadu_si512(br + 64);
                    __m512bh x3 = (__m512bh)_mm512_loadu_si512(br + 96);
#pragma GCC unroll 6
                    for (int i = 0; i < 6; i++) {
                        uint32_t pair;
                        memcpy(&pair, a + (r0 + i) * lda + t, 4);
                        __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
                        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, x0);
                        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, x1);
                        acc[i][2] = _mm512_dpbf16_ps(acc[i][2], ai, x2);
                        acc[i][3] = _mm512_dpbf16_ps(acc[i][3], ai, x3);
                    }
                }
            } else {
                for (int64_t t = 0; t < tn; t += 2) {
                    const bf16 *br = bp + t * dp + 2 * c0;
                    for (int z = 0; z < nz; z++) {
                        __m512bh xz = (__m512bh)_mm512_loadu_si512(br + 32 * z);
                        for (int i = 0; i < 6; i++) {
                            uint32_t pair;
                            memcpy(&pair, a + (r0 + i) * lda + t, 4);
                            acc[i][z] = _mm512_dpbf16_ps(acc[i][z], (__m512bh)_mm512_set1_epi32(pair), xz);
                        }
                    }
                }
            }
            for (int i = 0; i < 6; i++)
                for (int z = 0; z < nz; z++) _mm512_storeu_ps(c + (r0 + i) * ldc + c0 + 16 * z, acc[i][z]);
        }
    }
}

/* ---------------------------------------------------------------------------------------------- jobs */
/* a sequence attended on its own: row b's queries start..start+n and keys start..start+m (a sample of a packed row
 * with bounds; else the whole row, start 0) */
typedef struct {
    int64_t b, start, n, m;
} seq_t;

typedef struct {
    const bf16 *q, *k, *v, *o, *dout;
    bf16 *out, *dq;
    float *lse, *dk, *dv;            /* lse [B][H][N]; dk, dv [B][KVH][M][D] fp32 sums */
    int64_t B, H, KVH, N, M, D;
    int64_t qs[3], ks[3], vs[3], os[3], dos[3], dqs[3];  /* strides (elements) of batch, head, row */
    float scale;
    int causal, nthreads, tid, failed;
    const seq_t *seqs;               /* the sequences, longest first; tasks are (sequence, head) pairs */
    int64_t nseq, maxn, maxm;
    int64_t *next;                   /* the next task: threads take them in turn */
    pthread_mutex_t *locks;          /* one per (sequence, key/value head) */
} job_t;

/* the keys row r of a block starting at q0 sees, of m: all, or causally those up to its own position */
static inline int64_t seen(int causal, int64_t m, int64_t q0, int64_t r) {
    return causal ? (q0 + r + 1 < m ? q0 + r + 1 : m) : m;
}

static inline int64_t take(job_t *j) { return __atomic_fetch_add(j->next, 1, __ATOMIC_RELAXED); }

static void *forward_worker(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t D = j->D, Dp = up(D, 16), MP = up(j->maxm, KT);
    bf16 *kp = aligned_alloc(64, MP * Dp * 2), *vp = aligned_alloc(64, MP * Dp * 2);
    bf16 *qb = aligned_alloc(64, QB * Dp * 2), *p = aligned_alloc(64, QB * MP * 2);
    float *s = aligned_alloc(64, QB * MP * 4), *o = aligned_alloc(64, QB * Dp * 4);
    float rowsum[QB];
    if (!kp || !vp || !qb || !p || !s || !o) {
        j->failed = 1;
        goto done;
    }
    for (int64_t t = take(j); t < j->nseq * j->H; t = take(j)) {
        const seq_t *sq = &j->seqs[t / j->H];
        const int64_t b = sq->b, h = t % j->H, g = h / (j->H / j->KVH), N = sq->n, M = sq->m, s0 = sq->start;
        const int64_t mp = up(M, KT);
        const bf16 *q = j->q + b * j->qs[0] + h * j->qs[1] + s0 * j->qs[2];
        pack_nt(j->k + b * j->ks[0] + g * j->ks[1] + s0 * j->ks[2], j->ks[2], M, D, mp, Dp, kp);
        pack_nn(j->v + b * j->vs[0] + g * j->vs[1] + s0 * j->vs[2], j->vs[2], M, D, mp, Dp, vp);
        for (int64_t q0 = 0; q0 < N; q0 += QB) {
            const int64_t rows = N - q0 < QB ? N - q0 : QB;
            const int64_t kl = seen(j->causal, M, q0, rows - 1), klp = up(kl, KT);
            copy_rows(q + q0 * j->qs[2], j->qs[2], rows, D, Dp, qb);
            gemm_nt(qb, QB, kp, klp, Dp, s, klp);
            const __m512 sc = _mm512_set1_ps(j->scale);
            for (int64_t r = 0; r < QB; r++) {
                float *sr = s + r * klp;
                bf16 *pr = p + r * klp;
                const int64_t lim = r < rows ? seen(j->causal, M, q0, r) : 0;
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int64_t c = 0; c < lim; c += 16) {
                    const __mmask16 m = first(lim - c);
                    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(sr + c));
                }
                const float mrow = lim ? _mm512_reduce_max_ps(mx) * j->scale : 0.0f;
                __m512 mv = _mm512_set1_ps(mrow), sum = _mm512_setzero_ps();
                for (int64_t c = 0; c < klp; c += 16) {
                    const __mmask16 m = first(lim - c);
                    __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_fmsub_ps(_mm512_loadu_ps(sr + c), sc, mv)));
                    sum = _mm512_add_ps(sum, e);
                    _mm256_storeu_si256((__m256i *)(pr + c), (__m256i)_mm512_cvtneps_pbh(e));
                }
                rowsum[r] = _mm512_reduce_add_ps(sum);
                if (j->lse && r < rows) j->lse[(b * j->H + h) * j->N + s0 + q0 + r] = mrow + logf(rowsum[r]);
            }
            gemm_nn(p, klp, QB, klp, vp, Dp, o, Dp, 0);
            for (int64_t r = 0; r < rows; r++) {
                bf16 *orow = j->out + b * j->os[0] + h * j->os[1] + (s0 + q0 + r) * j->os[2];
                const float inv = 1.0f / rowsum[r];
                for (int64_t c = 0; c < D; c++) orow[c] = to_bf16(o[r * Dp + c] * inv);
            }
        }
    }
done:
    free(kp); free(vp); free(qb); free(p); free(s); free(o);
    return NULL;
}

/* Backward, key-major: per block of KB keys, every query block that sees them (QBB queries) gives S^T and dP^T
 * with keys as rows, so dV += P^T dO and dK += dS^T Q read P^T and dS^T as they are computed; dQ^T += K^T dS^T
 * takes dS^T with pairs of key rows interleaved (built from two rows at once), summed over key blocks. */
#define KB 96    /* keys per backward block: a multiple of 8 (NT rows) and 6 (NN rows) */
#define QBB 64   /* queries per backward block: a multiple of 32 (NT columns) and 64 (NN columns) */

static void *backward_worker(void *arg) {
    job_t *j = (job_t *)arg;
    const int64_t D = j->D, Dp = up(D, 16), D6 = up(Dp, 6);
    const int64_t MPX = up(j->maxm, KB), NPX = up(j->maxn, QBB);   /* the buffers' rows: the longest sequence's */
    bf16 *qt = aligned_alloc(64, NPX * Dp * 2), *qn = aligned_alloc(64, NPX * Dp * 2);
    bf16 *dot = aligned_alloc(64, NPX * Dp * 2), *don = aligned_alloc(64, NPX * Dp * 2);
    bf16 *kr = aligned_alloc(64, MPX * Dp * 2), *vr = aligned_alloc(64, MPX * Dp * 2);
    bf16 *ktr = aligned_alloc(64, D6 * MPX * 2);
    float *s = aligned_alloc(64, KB * QBB * 4), *dp = aligned_alloc(64, KB * QBB * 4);
    bf16 *pb = aligned_alloc(64, KB * QBB * 2), *dsb = aligned_alloc(64, KB * QBB * 2);
    bf16 *dsn = aligned_alloc(64, KB * QBB * 2);
    float *dqt = aligned_alloc(64, D6 * NPX * 4), *dkl = aligned_alloc(64, MPX * Dp * 4);
    float *dvl = aligned_alloc(64, MPX * Dp * 4), *lse = aligned_alloc(64, NPX * 4), *dd = aligned_alloc(64, NPX * 4);
    if (!qt || !qn || !dot || !don || !kr || !vr || !ktr || !s || !dp || !pb || !dsb || !dsn || !dqt || !dkl || !dvl
        || !lse || !dd) {
        j->failed = 1;
        goto done;
    }
    for (int64_t t = take(j); t < j->nseq * j->H; t = take(j)) {
        const int64_t si = t / j->H;
        const seq_t *sq = &j->seqs[si];
        const int64_t b = sq->b, h = t % j->H, g = h / (j->H / j->KVH), N = sq->n, M = sq->m, s0 = sq->start;
        const int64_t MP = up(M, KB), NP = up(N, QBB);
        const bf16 *q = j->q + b * j->qs[0] + h * j->qs[1] + s0 * j->qs[2];
        const bf16 *o = j->o + b * j->os[0] + h * j->os[1] + s0 * j->os[2];
        const bf16 *dout = j->dout + b * j->dos[0] + h * j->dos[1] + s0 * j->dos[2];
        const bf16 *k = j->k + b * j->ks[0] + g * j->ks[1] + s0 * j->ks[2];
        const bf16 *v = j->v + b * j->vs[0] + g * j->vs[1] + s0 * j->vs[2];
        pack_nt(q, j->qs[2], N, D, NP, Dp, qt);
        pack_nn(q, j->qs[2], N, D, NP, Dp, qn);
        pack_nt(dout, j->dos[2], N, D, NP, Dp, dot);
        pack_nn(dout, j->dos[2], N, D, NP, Dp, don);
        for (int64_t r = 0; r < MP; r++) {
            memset(kr + r * Dp, 0, Dp * 2);
            memset(vr + r * Dp, 0, Dp * 2);
            if (r < M) {
                memcpy(kr + r * Dp, k + r * j->ks[2], D * 2);
                memcpy(vr + r * Dp, v + r * j->vs[2], D * 2);
            }
        }
        for (int64_t c = 0; c < D6; c++)
            for (int64_t r = 0; r < MP; r++) ktr[c * MP + r] = c < D && r < M ? k[r * j->ks[2] + c] : 0;
        for (int64_t i = 0; i < NP; i++) {
            float acc = 0.0f;
            if (i < N) {
                const bf16 *orow = o + i * j->os[2], *drow = dout + i * j->dos[2];
                for (int64_t c = 0; c < D; c++) {
                    uint32_t x = (uint32_t)orow[c] << 16, y = (uint32_t)drow[c] << 16;
                    float fx, fy;
                    memcpy(&fx, &x, 4);
                    memcpy(&fy, &y, 4);
                    acc += fx * fy;
                }
            }
            dd[i] = acc;
            lse[i] = i < N ? j->lse[(b * j->H + h) * j->N + s0 + i] : 0.0f;
        }
        memset(dqt, 0, D6 * NP * 4);
        memset(dkl, 0, MP * Dp * 4);
        memset(dvl, 0, MP * Dp * 4);
        const __m512 sc = _mm512_set1_ps(j->scale);
        for (int64_t k0 = 0; k0 < MP; k0 += KB) {
            for (int64_t q0 = j->causal ? k0 / QBB * QBB : 0; q0 < NP; q0 += QBB) {
                gemm_nt(kr + k0 * Dp, KB, qt + q0 * Dp, QBB, Dp, s, QBB);    /* S^T */
                gemm_nt(vr + k0 * Dp, KB, dot + q0 * Dp, QBB, Dp, dp, QBB);  /* dP^T = V dO^T */
                for (int64_t r = 0; r < KB; r++) {
                    const int64_t key = k0 + r;
                    for (int64_t c = 0; c < QBB; c += 16) {
                        /* query q0 + c + t is seen by this key when it is a real query and key (and, causally,
                           the key is not after it) */
                        int64_t from = j->causal ? key - (q0 + c) : 0;
                        if (from < 0) from = 0;
                        const __mmask16 m = key < M ? first(N - (q0 + c)) & ~first(from) : 0;
                        __m512 pv = _mm512_maskz_mov_ps(m, exp512(_mm512_fmsub_ps(
                            _mm512_loadu_ps(s + r * QBB + c), sc, _mm512_loadu_ps(lse + q0 + c))));
                        __m512 dsv = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dp + r * QBB + c),
                                                                     _mm512_loadu_ps(dd + q0 + c)));
                        _mm256_storeu_si256((__m256i *)(pb + r * QBB + c), (__m256i)_mm512_cvtneps_pbh(pv));
                        _mm256_storeu_si256((__m256i *)(dsb + r * QBB + c), (__m256i)_mm512_cvtneps_pbh(dsv));
                    }
                }
                /* dS^T with pairs of key rows interleaved: [KB/2][QBB][2] */
                for (int64_t r = 0; r < KB; r += 2)
                    for (int64_t c = 0; c < QBB; c += 16) {
                        __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(dsb + r * QBB + c)));
                        __m512i hi = _mm512_cvtepu16_epi32(
                            _mm256_loadu_si256((const __m256i *)(dsb + (r + 1) * QBB + c)));
                        _mm512_storeu_si512(dsn + r * QBB + 2 * c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                    }
                gemm_nn(pb, QBB, KB, QBB, don + q0 * Dp, Dp, dvl + k0 * Dp, Dp, 1);   /* dV += P^T dO */
                gemm_nn(dsb, QBB, KB, QBB, qn + q0 * Dp, Dp, dkl + k0 * Dp, Dp, 1);   /* dK += dS^T Q */
                gemm_nn(ktr + k0, MP, D6, KB, dsn, QBB, dqt + q0, NP, 1);             /* dQ^T += K^T dS^T */
            }
        }
        for (int64_t i = 0; i < N; i++) {
            bf16 *drow = j->dq + b * j->dqs[0] + h * j->dqs[1] + (s0 + i) * j->dqs[2];
            for (int64_t c = 0; c < D; c++) drow[c] = to_bf16(dqt[c * NP + i] * j->scale);
        }
        pthread_mutex_lock(&j->locks[si * j->KVH + g]);
        float *dks = j->dk + ((b * j->KVH + g) * j->M + s0) * D, *dvs = j->dv + ((b * j->KVH + g) * j->M + s0) * D;
        for (int64_t r = 0; r < M; r++)
            for (int64_t c = 0; c < D; c++) {
                dks[r * D + c] += dkl[r * Dp + c] * j->scale;
                dvs[r * D + c] += dvl[r * Dp + c];
            }
        pthread_mutex_unlock(&j->locks[si * j->KVH + g]);
    }
done:
    free(qt); free(qn); free(dot); free(don); free(kr); free(vr); free(ktr); free(s); free(dp); free(pb); free(dsb);
    free(dsn); free(dqt); free(dkl); free(dvl); free(lse); free(dd);
    return NULL;
}

static int run(job_t *proto, void *(*fn)(void *), int nthreads) {
    job_t jobs[MAXT];
    pthread_t th[MAXT];
    int started[MAXT] = {0};
    int64_t next = 0;
    proto->next = &next;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if (nthreads > proto->nseq * proto->H) nthreads = (int)(proto->nseq * proto->H);
    for (int t = 0; t < nthreads; t++) {
        jobs[t] = *proto;
        jobs[t].nthreads = nthreads;
        jobs[t].tid = t;
        jobs[t].failed = 0;
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&th[t], NULL, fn, &jobs[t]) == 0;
    fn(&jobs[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else fn(&jobs[t]);  /* no thread to be had: this one takes the tasks left, if any */
    }
    for (int t = 0; t < nthreads; t++)
        if (jobs[t].failed) return 2;
    return 0;
}

static int bad(int64_t B, int64_t H, int64_t KVH, int64_t N, int64_t M, int64_t D, int causal) {
    return D % 2 || D < 2 || M < 1 || N < 1 || B < 1 || H < 1 || KVH < 1 || H % KVH || (causal && N != M);
}

static int longest_first(const void *x, const void *y) {
    const seq_t *a = x, *b = y;
    if (a->n != b->n) return a->n < b->n ? 1 : -1;
    if (a->b != b->b) return a->b < b->b ? -1 : 1;
    return a->start < b->start ? -1 : a->start > b->start;
}

/* The sequences of j (B rows; with bounds, [B][nb] each row's sample bounds, 0 .. N ascending, a self-attention
 * N == M: each sample on its own; empty ones left out), longest first; NULL and j->nseq 0 for bounds that are not
 * such, j->nseq -1 when memory ran out. */
static seq_t *sequences(job_t *j, const int64_t *bounds, int64_t nb) {
    seq_t *seqs = malloc((bounds ? j->B * (nb > 1 ? nb - 1 : 1) : j->B) * sizeof(seq_t));
    j->nseq = 0;
    j->maxn = j->maxm = 0;
    if (!seqs) {
        j->nseq = -1;
        return NULL;
    }
    if (bounds && (nb < 2 || j->N != j->M)) {
        free(seqs);
        return NULL;
    }
    for (int64_t b = 0; b < j->B; b++) {
        if (!bounds) {
            seqs[j->nseq++] = (seq_t){b, 0, j->N, j->M};
            continue;
        }
        const int64_t *row = bounds + b * nb;
        if (row[0] != 0 || row[nb - 1] != j->N) {
            free(seqs);
            j->nseq = 0;
            return NULL;
        }
        for (int64_t i = 0; i + 1 < nb; i++) {
            /* compared, not subtracted first: bounds near the int64 limits wrapped to a positive length */
            if (row[i + 1] < row[i] || row[i + 1] > j->N) {
                free(seqs);
                j->nseq = 0;
                return NULL;
            }
            const int64_t n = row[i + 1] - row[i];
            if (n) seqs[j->nseq++] = (seq_t){b, row[i], n, n};
        }
    }
    qsort(seqs, j->nseq, sizeof(seq_t), longest_first);
    for (int64_t i = 0; i < j->nseq; i++) {
        if (seqs[i].n > j->maxn) j->maxn = seqs[i].n;
        if (seqs[i].m > j->maxm) j->maxm = seqs[i].m;
    }
    return seqs;
}

/* q [B, H, N, D]; k, v [B, KVH, M, D]; out [B, H, N, D]: any strides (elements; batch, head, row) with a contiguous
 * last dim; lse (NULL: not wanted) [B, H, N] fp32, contiguous. causal: N == M, row i sees keys 0..i. D even.
 * bounds (NULL: none) [B][nb] int64: each row's samples (0 = bounds[0] <= ... <= bounds[nb - 1] = N; N == M),
 * each attended on its own (causally within it when causal). Returns 0; 1 for sizes it does not take, 2 when
 * memory ran out. */
int attn_fwd(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, float *lse, int64_t B, int64_t H, int64_t KVH,
             int64_t N, int64_t M, int64_t D, const int64_t *qs, const int64_t *ks, const int64_t *vs,
             const int64_t *os, float scale, int causal, int nthreads, const int64_t *bounds, int64_t nb) {
    if (bad(B, H, KVH, N, M, D, causal)) return 1;
    job_t j;
    memset(&j, 0, sizeof j);
    j.q = q; j.k = k; j.v = v; j.out = out; j.lse = lse;
    j.B = B; j.H = H; j.KVH = KVH; j.N = N; j.M = M; j.D = D;
    memcpy(j.qs, qs, 24); memcpy(j.ks, ks, 24); memcpy(j.vs, vs, 24); memcpy(j.os, os, 24);
    j.scale = scale; j.causal = causal;
    seq_t *seqs = sequences(&j, bounds, nb);
    if (!seqs) return j.nseq < 0 ? 2 : 1;
    j.seqs = seqs;
    const int rc = j.nseq ? run(&j, forward_worker, nthreads) : 0;
    free(seqs);
    return rc;
}

/* The backward of attn_fwd: dq [B, H, N, D] bf16 written; dk, dv [B, KVH, M, D] fp32, contiguous, added to (zero
 * them first); o, dout in the strides given, lse as attn_fwd wrote it, bounds as attn_fwd took them. */
int attn_bwd(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *o, const bf16 *dout, const float *lse,
             bf16 *dq, float *dk, float *dv, int64_t B, int64_t H, int64_t KVH, int64_t N, int64_t M, int64_t D,
             const int64_t *qs, const int64_t *ks, const int64_t *vs, const int64_t *os, const int64_t *dos,
             const int64_t *dqs, float scale, int causal, int nthreads, const int64_t *bounds, int64_t nb) {
    if (bad(B, H, KVH, N, M, D, causal)) return 1;
    job_t j;
    memset(&j, 0, sizeof j);
    j.q = q; j.k = k; j.v = v; j.o = o; j.dout = dout; j.lse = (float *)lse; j.dq = dq; j.dk = dk; j.dv = dv;
    j.B = B; j.H = H; j.KVH = KVH; j.N = N; j.M = M; j.D = D;
    memcpy(j.qs, qs, 24); memcpy(j.ks, ks, 24); memcpy(j.vs, vs, 24); memcpy(j.os, os, 24);
    memcpy(j.dos, dos, 24); memcpy(j.dqs, dqs, 24);
    j.scale = scale; j.causal = causal;
    seq_t *seqs = sequences(&j, bounds, nb);
    if (!seqs) return j.nseq < 0 ? 2 : 1;
    pthread_mutex_t *locks = malloc((j.nseq ? j.nseq : 1) * KVH * sizeof(pthread_mutex_t));
    if (!locks) {
        free(seqs);
        return 2;
    }
    for (int64_t i = 0; i < j.nseq * KVH; i++) pthread_mutex_init(&locks[i], NULL);
    j.seqs = seqs; j.locks = locks;
    const int rc = j.nseq ? run(&j, backward_worker, nthreads) : 0;
    for (int64_t i = 0; i < j.nseq * KVH; i++) pthread_mutex_destroy(&locks[i]);
    free(locks);
    free(seqs);
    return rc;
}
