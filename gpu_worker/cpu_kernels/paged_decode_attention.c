/* Decode attention straight from the paged KV cache, for CPU.
 *
 * One query token per sequence attends to its whole context through the sequence's block table.
 * Every key and value row is read once from the cache, for all query heads that share its KV
 * head; nothing is gathered into a contiguous copy first (that copy, made by torch.index_select
 * and read again by SDPA, was three passes over memory-bound data). Work items are
 * whole sequences (a token's keys for all KV heads are one contiguous row), spread over the
 * OpenMP threads of torch's own runtime.
 *
 * Layouts (row-major): q [T, num_heads, D] with a token stride; caches
 * [num_blocks, block_size, num_kv_heads, D]; out like q. Query head i reads KV head
 * i / (num_heads / num_kv_heads), as in Hugging Face's repeat_kv.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float bf16_to_f32(bf16_t x) {
    union { uint32_t u; float f; } v = { (uint32_t)x << 16 };
    return v.f;
}

static inline bf16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((v.u >> 16) | 0x40u);  /* NaN */
    return (bf16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* A cache row as floats: float32 rows are read in place, bfloat16 rows converted into `buf`. */
static inline const float *as_floats_f32(const float *x, float *buf, int64_t n) {
    (void)buf; (void)n;
    return x;
}

static inline const float *as_floats_bf16(const bf16_t *x, float *buf, int64_t n) {
    for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_f32(x[i]);
    return buf;
}

#define DEFINE_KERNEL(NAME, T, LOAD, STORE, as_floats)                                           \
int NAME(const T *q, int64_t q_stride, const T *k_cache, const T *v_cache,                        \
         const int64_t *block_tables, int64_t block_table_stride, const int64_t *context_lens,    \
         const int64_t *token_index, T *out, int64_t out_stride, int64_t num_seqs,                \
         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,           \
         int64_t sliding_window, float scale, int num_threads) {                                  \
    const int64_t group = num_heads / num_kv_heads;                                               \
    const int64_t row_len = num_kv_heads * head_dim;    /* one token's keys, all KV heads */      \
    const int64_t block_stride = block_size * row_len;                                            \
    int64_t max_ctx = 1;                                                                          \
    for (int64_t s = 0; s < num_seqs; ++s)                                                        \
        if (context_lens[s] > max_ctx) max_ctx = context_lens[s];                                 \
    int failed = 0;                                                                               \
    _Pragma("omp parallel num_threads(num_threads)")                                              \
    {                                                                                             \
        float *scores = malloc(sizeof(float) * (size_t)(num_heads * max_ctx));                    \
        float *qf = malloc(sizeof(float) * (size_t)(num_heads * head_dim));                       \
        float *acc = malloc(sizeof(float) * (size_t)(num_heads * head_dim));                      \
        float *row = malloc(sizeof(float) * (size_t)row_len);                                     \
        if (!scores || !qf || !acc || !row) {                                                     \
            _Pragma("omp atomic write") failed = 1;                                               \
        } else {                                                                                  \
            _Pragma("omp for schedule(dynamic, 1)")                                               \
            for (int64_t s = 0; s < num_seqs; ++s) {                                              \
                const int64_t ctx = context_lens[s];                                              \
                const int64_t first = sliding_window > 0 && ctx > sliding_window                  \
                                          ? ctx - sliding_window : 0;                             \
                const int64_t n = ctx - first;                                                    \
                const int64_t *table = block_tables + s * block_table_stride;                     \
                const T *qs = q + token_index[s] * q_stride;                                      \
                for (int64_t i = 0; i < num_heads * head_dim; ++i) qf[i] = LOAD(qs[i]);           \
                /* scores[head][j] = scale * q[head] . k[j][head / group] */                     \
                for (int64_t j = 0; j < n; ++j) {                                                 \
                    const int64_t pos = first + j;                                                \
                    const T *k = k_cache + table[pos / block_size] * block_stride                 \
                                 + (pos % block_size) * row_len;                                  \
                    const float *kr = as_floats(k, row, row_len);                                 \
                    for (int64_t hq = 0; hq < num_heads; ++hq) {                                  \
                        const float *qh = qf + hq * head_dim, *kh = kr + (hq / group) * head_dim; \
                        float dot = 0.f;                                                          \
                        _Pragma("omp simd reduction(+:dot)")                                      \
                        for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * kh[d];              \
                        scores[hq * max_ctx + j] = dot * scale;                                   \
                    }                                                                             \
                }                                                                                 \
                for (int64_t hq = 0; hq < num_heads; ++hq) {                                      \
                    float *sh = scores + hq * max_ctx, m = -INFINITY, sum = 0.f;                  \
                    for (int64_t j = 0; j < n; ++j) m = sh[j] > m ? sh[j] : m;                    \
                    for (int64_t j = 0; j < n; ++j) { sh[j] = expf(sh[j] - m); sum += sh[j]; }    \
                    const float inv = 1.f / sum;                                                  \
                    for (int64_t j = 0; j < n; ++j) sh[j] *= inv;                                 \
                }                                                                                 \
                memset(acc, 0, sizeof(float) * (size_t)(num_heads * head_dim));                  \
                for (int64_t j = 0; j < n; ++j) {                                                 \
                    const int64_t pos = first + j;                                                \
                    const T *v = v_cache + table[pos / block_size] * block_stride                 \
                                 + (pos % block_size) * row_len;                                  \
                    const float *vr = as_floats(v, row, row_len);                                 \
                    for (int64_t hq = 0; hq < num_heads; ++hq) {                                  \
                        const float p = scores[hq * max_ctx + j];                                 \
                        const float *vh = vr + (hq / group) * head_dim;                           \
                        float *ah = acc + hq * head_dim;                                          \
                        _Pragma("omp simd")                                                       \
                        for (int64_t d = 0; d < head_dim; ++d) ah[d] += p * vh[d];                \
                    }                                                                             \
                }                                                                                 \
                T *os = out + token_index[s] * out_stride;                                        \
                for (int64_t i = 0; i < num_heads * head_dim; ++i) os[i] = STORE(acc[i]);         \
            }                                                                                     \
        }                                                                                         \
        free(scores); free(qf); free(acc); free(row);                                             \
    }                                                                                             \
    return failed ? -1 : 0;                                                                       \
}

#define IDENTITY(x) (x)
DEFINE_KERNEL(paged_decode_attention_f32, float, IDENTITY, IDENTITY, as_floats_f32)
DEFINE_KERNEL(paged_decode_attention_bf16, bf16_t, bf16_to_f32, f32_to_bf16, as_floats_bf16)
