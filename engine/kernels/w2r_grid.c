/* The W2R branch of one image x N captions in one pass: the w2r_grid graph (engine/graphs.py), fused. For each
 * block of MR captions and each word t: the attention logits (the word against the image's regions_attn), the
 * softmax over the D regions, ONE register-blocked GEMM [a_t, h] x [G; W_hh^T] started from gates_words[:, t], and
 * the LSTM cell; h stays in the block's rows (L1/L2), nothing is written per step; then the MLP on the state at
 * each caption's last real word: Y [N]. Pooled pairs (each caption row with its own image row, the w2r_pair graph's
 * work) take the same path with every word's attention and a_t G made first, per row.
 * Same math as the graphs; parity is checked by tests/engine/test_kernels.py (graphs, numpy, three instruction sets).
 *
 * Built per machine (-O3 -march=native): engine/kernels/__init__.py (`python -m engine.kernels build`) or
 * CMakeLists.txt. Plain C11 + GCC/Clang vector extensions; no BLAS, no ONNX Runtime headers.
 * Thread safety: no global state; every call allocates its own workspace (called with the GIL released).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VW 16 /* floats per vector */
#define MR 8  /* caption rows per block: MR x 2 accumulators + 2 B vectors + 1 broadcast <= 32 registers */
#else
#define VW 8
#define MR 6 /* 16 registers (AVX2): 12 accumulators */
#endif
#define NR (2 * VW) /* columns per packed panel */
#define MAX_DEPTH 8
#define SUPER 4 /* MR-row tiles advanced together (1, 2, 4 and 8 measured within 10% of each other, session 8) */

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf loadu(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void storeu(float *p, vf v) { memcpy(p, &v, sizeof v); }
#if VW == 16
#define SPLAT(x) ((vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x})
#else
#define SPLAT(x) ((vf){x, x, x, x, x, x, x, x})
#endif
static inline vf splat(float x) { return SPLAT(x); }
static inline vf vselect(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }
static inline vf vmax(vf x, vf y) { return vselect((vi)(x > y), x, y); }
static inline vf vmin(vf x, vf y) { return vselect((vi)(x < y), x, y); }

/* exp(x) for a vector (Cephes' expf polynomial: relative error ~1e-7 over [-87, 88]). */
static inline vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.3f));
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);
  vf tf = __builtin_convertvector(n, vf);
  n = n + (vi)(tf > fx); /* truncation -> floor: (tf > fx) is -1 where the truncation rounded up */
  tf = __builtin_convertvector(n, vf);
  x = x - tf * 0.693359375f + tf * 2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  vi bits = (n + 127) << 23;
  return y * (vf)bits;
}
/* 1 / x: the hardware estimate and one Newton step (~22 bits; a division costs ~10x more) */
static inline vf vrecip(vf x) {
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)x);
  return r * (2.0f - x * r);
#elif defined(__AVX__)
  const vf r = (vf)_mm256_rcp_ps((__m256)x);
  return r * (2.0f - x * r);
#else
  return 1.0f / x; /* no estimate instruction in the vector width used: a division */
#endif
}
static inline vf vsigmoid(vf x) { return vrecip(1.0f + vexp(-x)); }
static inline vf vtanh(vf x) { return 2.0f * vrecip(1.0f + vexp(-2.0f * x)) - 1.0f; }

/* One IEEE half (its bits) as a float, exactly: normals, subnormals, zeros, infinities, NaNs (no _Float16: older
 * compilers lack it on x86) */
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0 && mant == 0) {
    bits = sign;
  } else if (exp == 0) { /* subnormal: mant x 2^-24, normalised */
    exp = 127 - 15 + 1;
    while (!(mant & 0x400u)) { mant <<= 1; exp--; }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

/* dst[0:n] = the fp16 values src[0:n] widened to fp32: vcvtph2ps, 16 or 8 at a time where the CPU has it (a plain
 * _Float16 loop was left scalar by GCC, one vcvtsh2ss a value: ~17 us a pair at the reference sizes), the rest one by one */
static void widen_half(const uint16_t *src, float *dst, size_t n) {
  size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
  for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

/* sum_i x[i] y[i] */
static inline float dot(const float *x, const float *y, int n) {
  vf acc0 = splat(0.0f), acc1 = splat(0.0f);
  int i = 0;
  for (; i + 2 * VW <= n; i += 2 * VW) {
    acc0 += loadu(x + i) * loadu(y + i);
    acc1 += loadu(x + i + VW) * loadu(y + i + VW);
  }
  for (; i + VW <= n; i += VW) acc0 += loadu(x + i) * loadu(y + i);
  acc0 += acc1;
  float sum = 0.0f;
  for (int k = 0; k < VW; k++) sum += acc0[k];
  for (; i < n; i++) sum += x[i] * y[i];
  return sum;
}

/* y += alpha x */
static inline void axpy(float alpha, const float *x, float *y, int n) {
  const vf va = splat(alpha);
  int i = 0;
  for (; i + VW <= n; i += VW) storeu(y + i, loadu(y + i) + va * loadu(x + i));
  for (; i < n; i++) y[i] += alpha * x[i];
}

/* out[r, 0:NR] = (c0 ? c0[r] : 0) + sum_k a[r][k] * bp[k * ldb, 0:NR] for r < MR; bp one panel [K, NR] with row stride
 * ldb (NR when packed). */
static inline void micro_ld(int K, const float *const *a, const float *bp, int ldb, const float *const *c0, float *out, int ldo) {
  vf acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) {
    acc[r][0] = c0[r] ? loadu(c0[r]) : splat(0.0f);
    acc[r][1] = c0[r] ? loadu(c0[r] + VW) : splat(0.0f);
  }
  for (int k = 0; k < K; k++) {
    vf b0 = loadu(bp + (size_t)k * ldb), b1 = loadu(bp + (size_t)k * ldb + VW);
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
      vf ar = splat(a[r][k]);
      acc[r][0] += ar * b0;
      acc[r][1] += ar * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; r++) {
    storeu(out + (size_t)r * ldo, acc[r][0]);
    storeu(out + (size_t)r * ldo + VW, acc[r][1]);
  }
}

static inline void micro(int K, const float *const *a, const float *bp, const float *const *c0, float *out, int ldo) {
  micro_ld(K, a, bp, NR, c0, out, ldo);
}

/* The lane sums of 16 vectors acc[0..15], in that order, into sums[0..15]: log2(VW) levels of pairwise half-swaps and
 * adds (15 x (2 shuffles + 1 add) at VW 16) instead of 16 x (VW - 1) scalar adds: ~3% a pooled pair, session 15.
 * Without __builtin_shufflevector (GCC < 12) the scalar sums, as before */
static inline void sum16(const vf *acc, float *sums) {
#if !(defined(__clang__) || __GNUC__ >= 12) || !(VW == 16 || VW == 8)
  for (int v = 0; v < 16; v++) {
    float sum = 0.0f;
    for (int i = 0; i < VW; i++) sum += acc[v][i];
    sums[v] = sum;
  }
#elif VW == 16
  vf l1[8], l2[4], l3[2];
  for (int i = 0; i < 8; i++)
    l1[i] = __builtin_shufflevector(acc[2 * i], acc[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(acc[2 * i], acc[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; i++)
    l2[i] = __builtin_shufflevector(l1[2 * i], l1[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(l1[2 * i], l1[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; i++)
    l3[i] = __builtin_shufflevector(l2[2 * i], l2[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
            __builtin_shufflevector(l2[2 * i], l2[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  storeu(sums, __builtin_shufflevector(l3[0], l3[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
               __builtin_shufflevector(l3[0], l3[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
#else
  for (int h = 0; h < 2; h++) {
    const vf *a = acc + 8 * h;
    vf l1[4], l2[2];
    for (int i = 0; i < 4; i++)
      l1[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
              __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int i = 0; i < 2; i++)
      l2[i] = __builtin_shufflevector(l1[2 * i], l1[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
              __builtin_shufflevector(l1[2 * i], l1[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    storeu(sums + 8 * h, __builtin_shufflevector(l2[0], l2[1], 0, 2, 4, 6, 8, 10, 12, 14) +
                         __builtin_shufflevector(l2[0], l2[1], 1, 3, 5, 7, 9, 11, 13, 15));
  }
#endif
}

/* out[t * ldo + j] = words[t] . keys[j] for t < T, j < D: 4 words x 4 regions per pass, so each loaded vector serves 4 FMAs */
static void logits_rows(const float *words, int T, const float *keys, int D, int E, float *out, int ldo) {
  int t0 = 0;
  for (; t0 + 4 <= T; t0 += 4) {
    int j0 = 0;
    for (; j0 + 4 <= D; j0 += 4) {
      vf acc[4][4];
      for (int u = 0; u < 4; u++)
        for (int v = 0; v < 4; v++) acc[u][v] = splat(0.0f);
      int e = 0;
      for (; e + VW <= E; e += VW) {
        vf w[4], k[4];
        for (int u = 0; u < 4; u++) w[u] = loadu(words + (size_t)(t0 + u) * E + e);
        for (int v = 0; v < 4; v++) k[v] = loadu(keys + (size_t)(j0 + v) * E + e);
        for (int u = 0; u < 4; u++)
          for (int v = 0; v < 4; v++) acc[u][v] += w[u] * k[v];
      }
      float sums[16];
      sum16(&acc[0][0], sums);
      for (int u = 0; u < 4; u++)
        for (int v = 0; v < 4; v++) {
          float sum = sums[4 * u + v];
          for (int i = e; i < E; i++) sum += words[(size_t)(t0 + u) * E + i] * keys[(size_t)(j0 + v) * E + i];
          out[(size_t)(t0 + u) * ldo + j0 + v] = sum;
        }
    }
    for (; j0 < D; j0++)
      for (int u = 0; u < 4; u++) out[(size_t)(t0 + u) * ldo + j0] = dot(words + (size_t)(t0 + u) * E, keys + (size_t)j0 * E, E);
  }
  for (; t0 < T; t0++)
    for (int j = 0; j < D; j++) out[(size_t)t0 * ldo + j] = dot(words + (size_t)t0 * E, keys + (size_t)j * E, E);
}

/* Pack B [K, cols] (row stride ldb; B[k, j] = src[k * ldb + j], or src[j * ldb + k] when transposed) into
 * ceil(cols / NR) panels [K, NR], zero past cols. */
static void pack(const float *src, int K, int cols, int ldb, int transposed, float *dst) {
  int panels = (cols + NR - 1) / NR;
  for (int p = 0; p < panels; p++)
    for (int k = 0; k < K; k++)
      for (int j = 0; j < NR; j++) {
        int col = p * NR + j;
        dst[((size_t)p * K + k) * NR + j] = col < cols ? (transposed ? src[(size_t)col * ldb + k] : src[(size_t)k * ldb + col]) : 0.0f;
      }
}

/* out[0:D] = softmax(bounded ? tanh(lg + bias) : lg + bias) over lg[0:D]; lg [dpad] is scratch (dpad a multiple of VW) */
static inline void softmax_row(float *lg, int D, int dpad, float attn_bias, int bounded, float *out) {
  float mx = -INFINITY, sum = 0.0f;
  for (int j = 0; j < D; j++) {
    const float v = lg[j] + attn_bias;
    lg[j] = bounded ? tanhf(v) : v;
    mx = lg[j] > mx ? lg[j] : mx;
  }
  for (int j = D; j < dpad; j++) lg[j] = -INFINITY; /* exp -> 0 past the regions */
  vf vs = splat(0.0f);
  for (int j = 0; j < dpad; j += VW) { vf e = vexp(loadu(lg + j) - mx); storeu(lg + j, e); vs += e; }
  for (int i = 0; i < VW; i++) sum += vs[i];
  const float inv = 1.0f / sum;
  for (int j = 0; j < D; j++) out[j] = lg[j] * inv;
}

int bssan_w2r_simd_width(void) { return VW; }
int bssan_w2r_block_rows(void) { return MR; }

/* Returns 0, or a negative code: -1 bad sizes, -2 out of memory, -3 a caption's words outside the word rows,
 * -4 an image row outside [0, I). keys and values are float32, or fp16 (IEEE half, uint16 bits) when `half`: a
 * gallery that stores them at half the memory; each image's rows are widened into an fp32 scratch once per call
 * (grid) or per run of pairs on the same image (pooled pairs), and the math after is the fp32 kernel's.
 *   I, image_rows            NULL: ONE image x every caption row (a grid block; I = 1). Else the pairs' images:
 *                            caption row n is scored with image image_rows[n] of keys/values [I, ...] (a re-rank's
 *                            pooled pairs: the W_hh product stays one GEMM over the rows, the attention and a_t G
 *                            are per row)
 *   keys        [I, D, E]    regions_attn (temperature folded in)
 *   values      [I, D, 4H]   regions_values (G = R W_ih_u^T)
 *   words       [T, E]       word rows: caption n's word t is row offsets[n] + t (a padded block [N, L, E] is
 *                            T = N * L rows with offsets n * L; a caption cache's ragged rows need no copy)
 *   gates_words [T, 4H]      T W_ih_t^T + b_ih + b_hh, the same rows
 *   offsets     [N]          each caption's first word row
 *   lengths     [N]          real words per caption, >= 1, offsets[n] + lengths[n] <= T
 *   weight_hh_t [H, 4H]      W_hh^T, gate order i, f, g, o (nn.LSTM)
 *   attn_bias, bounded       logits + attn_bias, then tanh when bounded (the paper's form)
 *   depth, widths            the MLP on h: depth Linear layers, widths[0] = H ... widths[depth] = 1, tanh between
 *   mlp_weights, mlp_biases  layer l's W [widths[l], widths[l+1]] (input-major: y = x W + b) and b, concatenated
 *   scores      [N]          Y of each caption row
 *   h_out       [N, H]       the state after each caption's last real word (NULL: not wanted) */
int bssan_w2r_grid(int D, int E, int H, int64_t T, int N, int I, const int64_t *image_rows, const void *keys_in,
                   const void *values_in, const float *words, const float *gates_words, const int64_t *offsets,
                   const int64_t *lengths, const float *weight_hh_t, float attn_bias, int bounded,
                   int depth, const int *widths, const float *mlp_weights, const float *mlp_biases, float *scores, float *h_out,
                   int half) {
  const float *keys = (const float *)keys_in, *values = (const float *)values_in;
  if (D < 1 || E < 1 || H < 1 || T < 0 || N < 0 || I < 1 || (!image_rows && I != 1) || depth < 1 || depth > MAX_DEPTH || widths[0] != H ||
      widths[depth] != 1)
    return -1;
  for (int l = 1; l <= depth; l++)
    if (widths[l] < 1) return -1;
  for (int n = 0; n < N; n++)
    if (lengths[n] < 1 || offsets[n] < 0 || offsets[n] + lengths[n] > T) return -3;
  if (image_rows)
    for (int n = 0; n < N; n++)
      if (image_rows[n] < 0 || image_rows[n] >= I) return -4;
  const int pairs = image_rows != NULL;
#if defined(__SSE__)
  /* denormals to zero in and out (as the engine's ONNX Runtime sessions: set_denormal_as_zero): a trained model's
   * focused attention makes softmax weights below 1e-38, and x86 multiplies denormals ~100x slower */
  const unsigned int csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040u); /* FTZ | DAZ */
#endif
  const int G4 = 4 * H, K = D + H, KS = pairs ? H : K /* rows of the step GEMM's B */, dpanels = (D + NR - 1) / NR, dpad = dpanels * NR, gpanels = (G4 + NR - 1) / NR,
            gpad = gpanels * NR;
  const size_t SB = (size_t)SUPER * MR; /* captions advanced together: a packed panel is loaded once per SUPER tiles */
  int lmax = 1; /* pairs: every row's gate inputs of every step are made before the recurrence (each image read once) */
  if (pairs)
    for (int n = 0; n < N; n++) lmax = lengths[n] > lmax ? (int)lengths[n] : lmax;
  lmax = (lmax + MR - 1) / MR * MR; /* the a_t G tiles write whole MR-row tiles */
  float *pre = pairs ? aligned_alloc(64, sizeof(float) * SB * lmax * gpad) : NULL;   /* [SB, lmax, 4H padded] */
  float *lgall = pairs ? aligned_alloc(64, sizeof(float) * (size_t)lmax * dpad) : NULL; /* [lmax, D padded] */
  /* one image (grid): its keys packed, the GEMM's start gw, the logits; pairs: pre and lgall above */
  float *keys_p = pairs ? NULL : aligned_alloc(64, sizeof(float) * (size_t)E * dpad);
  float *gw = pairs ? NULL : aligned_alloc(64, sizeof(float) * SB * gpad);       /* [SB, 4H padded]: gates_words[:, t] */
  float *logits = pairs ? NULL : aligned_alloc(64, sizeof(float) * SB * dpad);   /* [SB, D padded] */
  const float **wrow = pairs ? NULL : malloc(sizeof(float *) * SB), **none = pairs ? NULL : calloc(SB, sizeof(float *));
  /* one image's keys and values as fp32 in a scratch: half, widened (grid: the image; pairs: the current run's
   * image); pairs at fp32, copied (one sequential read of ~175 KB that the prefetchers follow, then the strided
   * a_t G panels hit L2: 3-4% a pair over fresh images, session 15) */
  float *keys_w = half || pairs ? aligned_alloc(64, sizeof(float) * ((size_t)D * E + VW)) : NULL;
  float *values_w = half || pairs ? aligned_alloc(64, sizeof(float) * ((size_t)D * G4 + VW)) : NULL;
  float *step_p = aligned_alloc(64, sizeof(float) * (size_t)KS * gpad);
  float *a = aligned_alloc(64, sizeof(float) * SB * K);          /* [SB, D + H]: attention of word t, then h */
  float *cell = aligned_alloc(64, sizeof(float) * SB * H);       /* [SB, H] */
  float *gates = aligned_alloc(64, sizeof(float) * SB * gpad);   /* [SB, 4H padded] */
  float *zero_row = calloc((size_t)(E > G4 ? E : G4) + dpad + NR, sizeof(float));
  const float **grow = malloc(sizeof(float *) * SB), **arow = malloc(sizeof(float *) * SB), **crow = malloc(sizeof(float *) * SB);
  /* the MLP's layers, packed like B; each layer's output [SB, padded width] */
  float *mlp_p[MAX_DEPTH] = {0}, *bias_p[MAX_DEPTH] = {0}, *act[MAX_DEPTH] = {0};
  int mpanels[MAX_DEPTH], mpad[MAX_DEPTH], mlp_ok = 1;
  {
    size_t woff = 0, boff = 0;
    for (int l = 0; l < depth; l++) {
      const int kin = widths[l], mout = widths[l + 1];
      mpanels[l] = (mout + NR - 1) / NR;
      mpad[l] = mpanels[l] * NR;
      mlp_p[l] = aligned_alloc(64, sizeof(float) * (size_t)kin * mpad[l]);
      bias_p[l] = calloc((size_t)mpad[l], sizeof(float));
      act[l] = aligned_alloc(64, sizeof(float) * SB * mpad[l]);
      if (!mlp_p[l] || !bias_p[l] || !act[l]) { mlp_ok = 0; break; }
      pack(mlp_weights + woff, kin, mout, mout, 0, mlp_p[l]);
      memcpy(bias_p[l], mlp_biases + boff, sizeof(float) * (size_t)mout);
      woff += (size_t)kin * mout;
      boff += (size_t)mout;
    }
  }
  int rc = 0;
  if (!mlp_ok || (pairs ? !pre || !lgall : !keys_p || !gw || !logits || !wrow || !none) || !step_p || !a || !cell || !gates ||
      !zero_row || !grow || !arow || !crow || ((half || pairs) && (!keys_w || !values_w))) {
    rc = -2;
    goto done;
  }
  if (half && !pairs) { /* grid: the one image, widened once */
    widen_half((const uint16_t *)keys_in, keys_w, (size_t)D * E);
    widen_half((const uint16_t *)values_in, values_w, (size_t)D * G4);
    keys = keys_w;
    values = values_w;
  }
  if (pairs) { /* B = W_hh^T [H, 4H]; the attention and a_t G are per row */
    pack(weight_hh_t, H, G4, G4, 0, step_p);
    for (size_t r = 0; r < SB; r++) arow[r] = a + r * K + D;
  } else {
    pack(keys, E, D, E, 1, keys_p); /* B[e, j] = keys[j, e] */
    float *tmp = malloc(sizeof(float) * (size_t)K * G4); /* B = [G; W_hh^T] [D + H, 4H], packed */
    if (!tmp) { rc = -2; goto done; }
    memcpy(tmp, values, sizeof(float) * (size_t)D * G4);
    memcpy(tmp + (size_t)D * G4, weight_hh_t, sizeof(float) * (size_t)H * G4);
    pack(tmp, K, G4, G4, 0, step_p);
    free(tmp);
    for (size_t r = 0; r < SB; r++) arow[r] = a + r * K;
  }
  for (int n0 = 0; n0 < N; n0 += (int)SB) {
    const int rows = N - n0 < (int)SB ? N - n0 : (int)SB, tiles = (rows + MR - 1) / MR;
    int steps = 0;
    for (int r = 0; r < rows; r++) steps = lengths[n0 + r] > steps ? (int)lengths[n0 + r] : steps;
    memset(a, 0, sizeof(float) * SB * K);
    memset(cell, 0, sizeof(float) * SB * H);
    if (pairs) /* each row's gate inputs of every step: gates_words + a_t G of its image (keys and G streamed once) */
      for (int r = 0; r < rows; r++) {
        const int len = (int)lengths[n0 + r];
        const float *ki = keys_w, *gi = values_w, *wr = words + (size_t)offsets[n0 + r] * E;
        if (r == 0 || image_rows[n0 + r] != image_rows[n0 + r - 1]) { /* once per run of the same image */
          const size_t image = (size_t)image_rows[n0 + r];
          if (half) {
            widen_half((const uint16_t *)keys_in + image * D * E, keys_w, (size_t)D * E);
            widen_half((const uint16_t *)values_in + image * D * G4, values_w, (size_t)D * G4);
          } else {
            memcpy(keys_w, keys + image * D * E, sizeof(float) * (size_t)D * E);
            memcpy(values_w, values + image * D * G4, sizeof(float) * (size_t)D * G4);
          }
        }
        logits_rows(wr, len, ki, D, E, lgall, dpad);
        float *pr = pre + (size_t)r * lmax * gpad;
        for (int t = 0; t < len; t++) {
          float *lg = lgall + (size_t)t * dpad;
          softmax_row(lg, D, dpad, attn_bias, bounded, lg);
          memcpy(pr + (size_t)t * gpad, gates_words + (size_t)(offsets[n0 + r] + t) * G4, sizeof(float) * G4);
          memset(pr + (size_t)t * gpad + G4, 0, sizeof(float) * (gpad - G4));
        }
        if (G4 % NR == 0) { /* += a_t G as tiles of MR words x NR gate columns (G read in place: row stride 4H) */
          for (int t0 = 0; t0 < len; t0 += MR) {
            const float *arows[MR], *crows[MR];
            for (int u = 0; u < MR; u++) arows[u] = t0 + u < len ? lgall + (size_t)(t0 + u) * dpad : zero_row;
            for (int p = 0; p < gpanels; p++) {
              for (int u = 0; u < MR; u++) crows[u] = t0 + u < len ? pr + (size_t)(t0 + u) * gpad + p * NR : zero_row;
              micro_ld(D, arows, gi + p * NR, G4, crows, pr + (size_t)t0 * gpad + p * NR, gpad);
            }
          }
        } else {
          for (int j = 0; j < D; j++)
            for (int t = 0; t < len; t++) axpy(lgall[(size_t)t * dpad + j], gi + (size_t)j * G4, pr + (size_t)t * gpad, G4);
        }
      }
    for (int t = 0; t < steps; t++) {
      for (int r = 0; r < tiles * MR && pairs; r++)
        grow[r] = r < rows && t < lengths[n0 + r] ? pre + ((size_t)r * lmax + t) * gpad : zero_row;
      for (int r = 0; r < tiles * MR && !pairs; r++) {
        const int live = r < rows && t < lengths[n0 + r];
        wrow[r] = live ? words + (size_t)(offsets[n0 + r] + t) * E : zero_row;
        float *dst = gw + (size_t)r * gpad;
        if (live)
          memcpy(dst, gates_words + (size_t)(offsets[n0 + r] + t) * G4, sizeof(float) * G4);
        else
          memset(dst, 0, sizeof(float) * G4);
        memset(dst + G4, 0, sizeof(float) * (gpad - G4));
        grow[r] = dst;
      }
      if (!pairs) { /* logits [rows, D]: word t of each caption against every region (panel outside, tiles inside) */
        for (int p = 0; p < dpanels; p++)
          for (int s = 0; s < tiles; s++)
            micro(E, wrow + s * MR, keys_p + (size_t)p * E * NR, none, logits + (size_t)s * MR * dpad + p * NR, dpad);
        for (int r = 0; r < rows; r++) softmax_row(logits + (size_t)r * dpad, D, dpad, attn_bias, bounded, a + (size_t)r * K);
      }
      /* gates [rows, 4H] = gates_words[:, t] + [a_t, h] x [G; W_hh^T] (pairs: the start has a_t G; h x W_hh^T) */
      for (int p = 0; p < gpanels; p++)
        for (int s = 0; s < tiles; s++) {
          for (int r = 0; r < MR; r++) crow[s * MR + r] = grow[s * MR + r] + p * NR;
          micro(KS, arow + s * MR, step_p + (size_t)p * KS * NR, crow + s * MR, gates + (size_t)s * MR * gpad + p * NR, gpad);
        }
      /* the LSTM cell (gate order i, f, g, o), only for the rows still inside their caption */
      for (int r = 0; r < rows; r++) {
        if (t >= lengths[n0 + r]) continue;
        float *g = gates + (size_t)r * gpad, *c = cell + (size_t)r * H, *h = a + (size_t)r * K + D;
        int j = 0;
        for (; j + VW <= H; j += VW) {
          vf ig = vsigmoid(loadu(g + j)), fg = vsigmoid(loadu(g + H + j)), gg = vtanh(loadu(g + 2 * H + j)),
             og = vsigmoid(loadu(g + 3 * H + j));
          vf cn = fg * loadu(c + j) + ig * gg;
          storeu(c + j, cn);
          storeu(h + j, og * vtanh(cn));
        }
        for (; j < H; j++) { /* H not a multiple of the vector width */
          const float ig = 1.0f / (1.0f + expf(-g[j])), fg = 1.0f / (1.0f + expf(-g[H + j])), gg = tanhf(g[2 * H + j]),
                      og = 1.0f / (1.0f + expf(-g[3 * H + j]));
          c[j] = fg * c[j] + ig * gg;
          h[j] = og * tanhf(c[j]);
        }
      }
    }
    if (h_out)
      for (int r = 0; r < rows; r++) memcpy(h_out + (size_t)(n0 + r) * H, a + (size_t)r * K + D, sizeof(float) * H);
    /* the MLP: layer l reads layer l-1's output (tanh applied in place; h for layer 0), bias as the GEMM's start */
    for (int l = 0; l < depth; l++) {
      const float *in_rows[SUPER * MR], *bias_rows[SUPER * MR];
      for (int r = 0; r < tiles * MR; r++)
        in_rows[r] = l == 0 ? a + (size_t)r * K + D : act[l - 1] + (size_t)r * mpad[l - 1];
      if (l > 0)
        for (int r = 0; r < tiles * MR; r++)
          for (int j = 0; j < mpad[l - 1]; j += VW) storeu(act[l - 1] + (size_t)r * mpad[l - 1] + j, vtanh(loadu(act[l - 1] + (size_t)r * mpad[l - 1] + j)));
      for (int p = 0; p < mpanels[l]; p++) {
        for (int r = 0; r < tiles * MR; r++) bias_rows[r] = bias_p[l] + p * NR;
        for (int s = 0; s < tiles; s++)
          micro(widths[l], in_rows + s * MR, mlp_p[l] + (size_t)p * widths[l] * NR, bias_rows + s * MR,
                act[l] + (size_t)s * MR * mpad[l] + p * NR, mpad[l]);
      }
    }
    for (int r = 0; r < rows; r++) scores[n0 + r] = act[depth - 1][(size_t)r * mpad[depth - 1]];
  }
done:
#if defined(__SSE__)
  _mm_setcsr(csr);
#endif
  free(keys_w); free(values_w);
  free(pre); free(lgall);
  free(keys_p); free(step_p); free(gw); free(a); free(cell); free(gates); free(logits); free(zero_row);
  free(wrow); free(grow); free(arow); free(crow); free(none);
  for (int l = 0; l < depth; l++) { free(mlp_p[l]); free(bias_p[l]); free(act[l]); }
  return rc;
}

/* The O2W branch of one image x N captions: the o2w_grid graph (engine/graphs.py), in place on a caption cache's
 * ragged word rows (no padded copy). Per caption, every object's attention over the caption's real words (softmax
 * of objects_attn[j] . s_w + b, tanh first when bounded; eq. 9), v_j = sum_w b[j, w] s_w (eq. 11) as one small GEMM
 * read from the word rows, then for a block of captions x objects at once: z_j = objects_mlp[j] + v_j first_states_t,
 * the MLP's remaining layers (tanh between) and the mean over the P objects (eq. 13-14).
 * With states_mlp (each word row's s_w first_states_t, made once per caption by the caller), z_j = objects_mlp[j] +
 * sum_w b[j, w] (s_w first_states_t) is ONE small GEMM [P, len] x [len, h1] per pair, the same sum by linearity: the
 * pair's P x H2 x h1 product (the most of its work at the reference sizes) is gone.
 * Returns 0, or -1 bad sizes, -2 out of memory, -3 a caption's words outside the word rows, -4 an image row outside [0, I).
 *   I, image_rows            NULL: ONE image x every caption row (I = 1). Else pooled pairs: caption row n with image
 *                            image_rows[n] of objects_* [I, ...], read in place
 *   objects_attn   [I, P, H2]   O W' of the images
 *   objects_mlp    [I, P, h1]   O W1_o^T + b1 (BatchNorm folded)
 *   states         [T, H2]   Bi-LSTM states, word rows as bssan_w2r_grid's words (offsets, lengths)
 *   first_states_t [H2, h1]  the first layer's state half, input-major
 *   states_mlp     [T, h1]   NULL, or states x first_states_t (the same word rows)
 *   depth, widths            the layers after the first: widths[0] = h1 ... widths[depth] = 1, tanh before each
 *   mlp_weights, mlp_biases  those layers' W [widths[l], widths[l+1]] (input-major) and b, concatenated
 *   scores         [N]       Y' of each caption row */
int bssan_o2w_grid(int P, int H2, int64_t T, int N, int I, const int64_t *image_rows, const float *objects_attn,
                   const float *objects_mlp, const float *states, const int64_t *offsets, const int64_t *lengths, float attn_bias,
                   int bounded, const float *first_states_t, const float *states_mlp, int depth, const int *widths,
                   const float *mlp_weights, const float *mlp_biases, float *scores) {
  if (P < 1 || H2 < 1 || T < 0 || N < 0 || I < 1 || (!image_rows && I != 1) || depth < 1 || depth > MAX_DEPTH || widths[0] < 1 ||
      widths[depth] != 1)
    return -1;
  if (image_rows)
    for (int n = 0; n < N; n++)
      if (image_rows[n] < 0 || image_rows[n] >= I) return -4;
  for (int l = 1; l <= depth; l++)
    if (widths[l] < 1) return -1;
  int lmax = 1;
  for (int n = 0; n < N; n++) {
    if (lengths[n] < 1 || offsets[n] < 0 || offsets[n] + lengths[n] > T) return -3;
    lmax = lengths[n] > lmax ? (int)lengths[n] : lmax;
  }
#if defined(__SSE__)
  const unsigned int csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040u); /* FTZ | DAZ, as bssan_w2r_grid */
#endif
  const int h1 = widths[0], lpad = (lmax + VW - 1) / VW * VW, ptiles = (P + MR - 1) / MR, in_place = H2 % NR == 0;
  const int CB = P >= 64 ? 1 : 64 / P;                                     /* captions per block */
  const int rows_max = CB * P, RB = (rows_max + MR - 1) / MR * MR + ptiles * MR; /* + spill of the last caption's tiles */
  const int hpad = (H2 + NR - 1) / NR * NR, h1panels = (h1 + NR - 1) / NR, h1pad = h1panels * NR;
  const int projected = states_mlp && h1 % NR == 0; /* z straight from the projected rows (read in place: whole panels) */
  float *lg = aligned_alloc(64, sizeof(float) * (size_t)ptiles * MR * lpad); /* [P padded, lpad] logits, then weights */
  float *v = aligned_alloc(64, sizeof(float) * (size_t)RB * hpad);          /* [RB, H2 padded]: v_j of the block */
  float *first_p = aligned_alloc(64, sizeof(float) * (size_t)H2 * h1pad);
  float *om = calloc((size_t)CB * P * h1pad + NR, sizeof(float));            /* the block's objects_mlp rows, padded */
  float *zero_row = calloc((size_t)(H2 > lpad ? H2 : lpad) + hpad + NR, sizeof(float));
  float *mlp_p[MAX_DEPTH] = {0}, *bias_p[MAX_DEPTH] = {0}, *act[MAX_DEPTH + 1] = {0};
  int mpanels[MAX_DEPTH + 1], mpad[MAX_DEPTH + 1], rc = 0;
  mpanels[0] = h1panels;
  mpad[0] = h1pad;
  act[0] = aligned_alloc(64, sizeof(float) * (size_t)RB * h1pad);
  int ok = lg && v && first_p && om && zero_row && act[0];
  size_t woff = 0, boff = 0;
  for (int l = 0; l < depth && ok; l++) { /* layer l + 1 of the MLP: widths[l] -> widths[l + 1] */
    const int kin = widths[l], mout = widths[l + 1];
    mpanels[l + 1] = (mout + NR - 1) / NR;
    mpad[l + 1] = mpanels[l + 1] * NR;
    mlp_p[l] = aligned_alloc(64, sizeof(float) * (size_t)kin * mpad[l + 1]);
    bias_p[l] = calloc((size_t)mpad[l + 1], sizeof(float));
    act[l + 1] = aligned_alloc(64, sizeof(float) * (size_t)RB * mpad[l + 1]);
    if (!mlp_p[l] || !bias_p[l] || !act[l + 1]) { ok = 0; break; }
    pack(mlp_weights + woff, kin, mout, mout, 0, mlp_p[l]);
    memcpy(bias_p[l], mlp_biases + boff, sizeof(float) * (size_t)mout);
    woff += (size_t)kin * mout;
    boff += (size_t)mout;
  }
  if (!ok) { rc = -2; goto done; }
  if (!projected) pack(first_states_t, H2, h1, h1, 0, first_p); /* the projected rows already hold it */
  if (!image_rows) /* one image: its rows once for every caption slot of a block */
    for (int r = 0; r < CB * P; r++) memcpy(om + (size_t)r * h1pad, objects_mlp + (size_t)(r % P) * h1, sizeof(float) * (size_t)h1);
  memset(lg, 0, sizeof(float) * (size_t)ptiles * MR * lpad);
  for (int n0 = 0; n0 < N; n0 += CB) {
    const int caps = N - n0 < CB ? N - n0 : CB, rows = caps * P, tiles = (rows + MR - 1) / MR;
    for (int c = 0; c < caps; c++) {
      const int len = (int)lengths[n0 + c], dpad = (len + VW - 1) / VW * VW;
      const size_t image = image_rows ? (size_t)image_rows[n0 + c] : 0;
      const float *s = states + (size_t)offsets[n0 + c] * H2;
      if (image_rows)
        for (int j = 0; j < P; j++)
          memcpy(om + ((size_t)c * P + j) * h1pad, objects_mlp + (image * P + j) * h1, sizeof(float) * (size_t)h1);
      logits_rows(objects_attn + image * P * H2, P, s, len, H2, lg, lpad); /* lg[j, w] = o_j W' . s_w */
      for (int j = 0; j < P; j++) softmax_row(lg + (size_t)j * lpad, len, dpad, attn_bias, bounded, lg + (size_t)j * lpad);
      if (projected) { /* z [P, h1] = objects_mlp rows + b [P, len] x states_mlp [len, h1], tiles of MR objects */
        const float *sp = states_mlp + (size_t)offsets[n0 + c] * h1;
        for (int t = 0; t < ptiles; t++) {
          const float *arows[MR], *crows[MR];
          for (int u = 0; u < MR; u++) arows[u] = t * MR + u < P ? lg + (size_t)(t * MR + u) * lpad : zero_row;
          for (int q = 0; q < h1panels; q++) {
            for (int u = 0; u < MR; u++) crows[u] = t * MR + u < P ? om + ((size_t)c * P + t * MR + u) * h1pad + q * NR : NULL;
            micro_ld(len, arows, sp + q * NR, h1, crows, act[0] + ((size_t)c * P + t * MR) * h1pad + q * NR, h1pad); /* rows past P spill */
          }
        }
        continue;
      }
      float *vc = v + (size_t)c * P * hpad;
      if (in_place) { /* v [P, H2] = b [P, len] x S [len, H2], S read in place (row stride H2), tiles of MR objects */
        for (int t = 0; t < ptiles; t++) {
          const float *arows[MR], *none_rows[MR] = {0};
          for (int u = 0; u < MR; u++) arows[u] = t * MR + u < P ? lg + (size_t)(t * MR + u) * lpad : zero_row;
          for (int p = 0; p < hpad / NR; p++)
            micro_ld(len, arows, s + p * NR, H2, none_rows, vc + (size_t)t * MR * hpad + p * NR, hpad); /* rows past P spill */
        }
      } else {
        for (int j = 0; j < P; j++) {
          float *vj = vc + (size_t)j * hpad;
          memset(vj, 0, sizeof(float) * (size_t)hpad);
          for (int w = 0; w < len; w++) axpy(lg[(size_t)j * lpad + w], s + (size_t)w * H2, vj, H2);
        }
      }
    }
    if (!projected) { /* z [rows, h1] = objects_mlp[row % P] + v first_states_t */
      const float *in_rows[MR], *start[MR];
      for (int p = 0; p < h1panels; p++)
        for (int t = 0; t < tiles; t++) {
          for (int u = 0; u < MR; u++) {
            const int r = t * MR + u;
            in_rows[u] = r < rows ? v + (size_t)r * hpad : zero_row;
            start[u] = r < rows ? om + (size_t)r * h1pad + p * NR : NULL;
          }
          micro(H2, in_rows, first_p + (size_t)p * H2 * NR, start, act[0] + (size_t)t * MR * h1pad + p * NR, h1pad);
        }
    }
    for (int l = 0; l < depth; l++) { /* tanh, then layer l + 1 with its bias as the GEMM's start */
      const int kin = widths[l];
      for (int r = 0; r < tiles * MR; r++)
        for (int j = 0; j < mpad[l]; j += VW) storeu(act[l] + (size_t)r * mpad[l] + j, vtanh(loadu(act[l] + (size_t)r * mpad[l] + j)));
      const float *in_rows[MR], *start[MR];
      for (int p = 0; p < mpanels[l + 1]; p++)
        for (int t = 0; t < tiles; t++) {
          for (int u = 0; u < MR; u++) {
            in_rows[u] = act[l] + (size_t)(t * MR + u) * mpad[l];
            start[u] = bias_p[l] + p * NR;
          }
          micro(kin, in_rows, mlp_p[l] + (size_t)p * kin * NR, start, act[l + 1] + (size_t)t * MR * mpad[l + 1] + p * NR, mpad[l + 1]);
        }
    }
    for (int c = 0; c < caps; c++) { /* the mean over the P objects (eq. 14) */
      float sum = 0.0f;
      for (int j = 0; j < P; j++) sum += act[depth][(size_t)(c * P + j) * mpad[depth]];
      scores[n0 + c] = sum / (float)P;
    }
  }
done:
#if defined(__SSE__)
  _mm_setcsr(csr);
#endif
  free(lg); free(v); free(first_p); free(om); free(zero_row);
  for (int l = 0; l <= depth; l++) free(act[l]);
  for (int l = 0; l < depth; l++) { free(mlp_p[l]); free(bias_p[l]); }
  return rc;
}
