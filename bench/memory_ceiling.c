/* The memory ceiling of an AdamW step on this machine: one bare loop over four flat fp32 buffers (read g, m, v,
   p; write m, v, p: 28 B per element, optgen's AdamW plan), built with optgen's C flags. No tables, no chunks,
   no per-tensor work: what any AdamW step over these bytes can at best reach. See memory_ceiling.py. */
#include <math.h>
#include <stdint.h>

void adamw_bare(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, int64_t n,
                float lr, float beta1, float beta2, float eps, float weight_decay, float bias1, float bias2_sqrt) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * (1.0f - lr * weight_decay) - lr / bias1 * mi / (sqrtf(vi) / bias2_sqrt + eps);
    }
}
