// The optimizer step on CUDA over many tensors a launch (the plan: multi_tensor.rs), in f32:
// the gradients' sum of squares (sumsq_multi, then sum_partials) and Adam with its clipping
// scale, weight decay and EMA in one pass over each variable (adam_multi). The arithmetic is
// that of the CPU ops in adam.rs. step_gate lets the update be queued before the host has read
// the loss and the norm. Compiled at run time by NVRTC (adam_cuda.rs).

#define MT_MAX 64

// Device addresses as integers: the same layout as multi_tensor::MtArgs in Rust.
struct MtArgs {
    unsigned long long p[MT_MAX], g[MT_MAX], m[MT_MAX], v[MT_MAX], e[MT_MAX];
    unsigned long long n[MT_MAX];
    unsigned int first_block[MT_MAX + 1];
    unsigned int count;
    unsigned int chunk;
};
static_assert(sizeof(MtArgs) == 3344, "MtArgs must match multi_tensor::MtArgs");

// The tensor whose chunks hold block b (first_block ascends; empty tensors are skipped).
__device__ __forceinline__ unsigned int mt_tensor(const MtArgs& a, unsigned int b) {
    unsigned int t = 0;
    while (t + 1 < a.count && a.first_block[t + 1] <= b) ++t;
    return t;
}

// g' = g * gscale (+ wd_l2 * p, Adam's L2 term); m, v = the moments of g'; p = p * p_mul (AdamW's
// decay) - step_size * m / (sqrt(v) / bias2_sqrt + eps); e = ema_d * e + (1 - ema_d) * p when
// the tensor has an EMA copy.
// r1, r2 and ema_r are 1 - b1, 1 - b2 and 1 - ema_d computed in double by the caller.
// gate_addr, when not 0, is step_gate's output: the update is skipped when gate[0] is 0, and
// gscale is multiplied by gate[1].
extern "C" __global__ void adam_multi(const MtArgs a, float b1, float r1, float b2, float r2, float step_size, float bias2_sqrt,
                                      float eps, float gscale, float wd_l2, float p_mul, float ema_d, float ema_r,
                                      unsigned long long gate_addr) {
    if (gate_addr) {
        const float* gate = (const float*)gate_addr;
        if (gate[0] == 0.f) return;
        gscale *= gate[1];
    }
    const unsigned int b = blockIdx.x, t = mt_tensor(a, b);
    const unsigned long long n = a.n[t];
    const unsigned long long start = (unsigned long long)(b - a.first_block[t]) * a.chunk;
    const unsigned long long end = start + a.chunk < n ? start + a.chunk : n;
    float* p = (float*)a.p[t];
    const float* g = (const float*)a.g[t];
    float* m = (float*)a.m[t];
    float* v = (float*)a.v[t];
    float* e = (float*)a.e[t];
    for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float pv = p[i];
        float gv = g[i] * gscale;
        if (wd_l2 != 0.f) gv += pv * wd_l2;
        const float mv = b1 * m[i] + r1 * gv;
        const float vv = b2 * v[i] + r2 * (gv * gv);
        m[i] = mv;
        v[i] = vv;
        pv = pv * p_mul - step_size * mv / (sqrtf(vv) / bias2_sqrt + eps);
        p[i] = pv;
        if (e) e[i] = ema_d * e[i] + ema_r * pv;
    }
}

// The block's reduction of one double a thread, in a fixed order (blockDim.x a power of two,
// at most 1024): the same inputs give the same bits on every run.
__device__ __forceinline__ double block_sum(double x) {
    __shared__ double sh[1024];
    sh[threadIdx.x] = x;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

// partial[b] = the sum of g^2 over block b's chunk (in double: ~25 M squares).
extern "C" __global__ void sumsq_multi(const MtArgs a, double* partial) {
    const unsigned int b = blockIdx.x, t = mt_tensor(a, b);
    const unsigned long long n = a.n[t];
    const unsigned long long start = (unsigned long long)(b - a.first_block[t]) * a.chunk;
    const unsigned long long end = start + a.chunk < n ? start + a.chunk : n;
    const float* g = (const float*)a.g[t];
    double acc = 0.0;
    for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const double x = g[i];
        acc += x * x;
    }
    const double s = block_sum(acc);
    if (threadIdx.x == 0) partial[b] = s;
}

// out[0] = the sum of partial[0..n], by one block.
extern "C" __global__ void sum_partials(const double* partial, unsigned int n, double* out) {
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    const double s = block_sum(acc);
    if (threadIdx.x == 0) out[0] = s;
}

// The gate of a step queued before the host has seen its loss and gradient norm (one thread):
// gate[0] = 1 when the loss and the norm sqrt(sumsq[0]) are both finite, else 0, and adam_multi
// then changes nothing, as the host's check would have stopped it; gate[1] = the clipping scale,
// min(1, clip_max / (norm + 1e-6)) in double, rounded once (clip_scale in adam.rs; 1 when
// clip_max is 0: no clipping). readback = {loss, sumsq}, for the host to read when it gets to it.
extern "C" __global__ void step_gate(const double* sumsq, unsigned long long loss_addr, double clip_max, float* gate, double* readback) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const double s = sumsq[0];
    const double norm = sqrt(s);
    const float loss = *(const float*)loss_addr;
    double scale = 1.0;
    if (clip_max > 0.0) {
        const double c = clip_max / (norm + 1e-6);
        scale = c < 1.0 ? c : 1.0;
    }
    gate[0] = isfinite(norm) && isfinite(loss) ? 1.f : 0.f;
    gate[1] = (float)scale;
    readback[0] = loss;
    readback[1] = s;
}
