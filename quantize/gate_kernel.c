/* The quality gate's per-row sums over an artifact's logits, in one pass after the row's maximum:
   compiled once per machine by quantize/gate_kernel.py, which documents it. */
#include <math.h>
#include <stdint.h>

#define LOG2E 1.4426950408889634f
#define CHUNK 512 /* elements summed in float before the running double sums */

/* 2^t for t <= 0 (Cephes exp2f's polynomial on [-0.5, 0.5], relative error ~1.4e-7); 0 below -126. */
static inline float exp2_nonpositive(float t) {
    float k = t < -126.0f ? -127.0f : __builtin_rintf(t);  /* t = k + f, f in [-0.5, 0.5] */
    float f = t - k;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    union { int32_t i; float v; } s = { .i = ((int32_t)k + 127) << 23 };  /* 2^k; k = -127 gives 0 */
    return p * s.v;
}

/* For each of n rows of logits x and reference weights w (n_vocab floats each):
   top[r] = max x, sum2[r] = sum 2^((x - top) log2 e), dot[r] = sum w (x - top) log2 e. */
void gate_rows(const float *x, const float *w, int64_t n, int64_t n_vocab, int threads,
               float *top, double *sum2, double *dot) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * n_vocab, *wr = w + r * n_vocab;
        float m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (int64_t j = 0; j < n_vocab; j++) m = xr[j] > m ? xr[j] : m;
        float ms = m * LOG2E;
        double s2 = 0.0, sd = 0.0;
        for (int64_t j0 = 0; j0 < n_vocab; j0 += CHUNK) {
            int64_t j1 = j0 + CHUNK < n_vocab ? j0 + CHUNK : n_vocab;
            float ps = 0.0f, pd = 0.0f;
            #pragma omp simd reduction(+:ps, pd)
            for (int64_t j = j0; j < j1; j++) {
                float b = xr[j] * LOG2E - ms;
                ps += exp2_nonpositive(b);
                pd += wr[j] * b;
            }
            s2 += ps;
            sd += pd;
        }
        top[r] = m;
        sum2[r] = s2;
        dot[r] = sd;
    }
}
