// The CUDA kernels of unet's fused ops, for f32 and bf16, compiled at run time by NVRTC
// (`cuda_ops.rs`), so no headers: bf16 is handled as its bits. Each follows the CPU op it
// stands for:
// - GroupNorm, optionally followed by Hardswish and dropout, forward and backward (`norm.rs`):
//   one block per (image, group), a group being one contiguous run of channels_per_group * H * W
//   values; statistics in two passes (mean, then the mean of squared deviations), recomputed in
//   the backward pass. Dropout is either a stored f32 mask or, with no mask, `norm::HashedDropout`:
//   each element's keep/drop recomputed from a hash of its index, in both passes. The forward
//   pass can save each group's statistics for the backward pass, which then skips their two
//   passes over x (PyTorch keeps them too); given none, it recomputes them, to the same bits.
//   The backward pass writes dx in the input's dtype, and its per-channel sums in f32 to a
//   second buffer.
// - softmax(scale * x) over the last dimension, forward and backward (`softmax.rs`): one block
//   per row.
// - nearest x2 upsampling and its adjoint, the sum of each 2x2 block (`upsample.rs`): one
//   thread per input (resp. output) value, grid-stride.
// - a convolution's bias (`conv.rs`): added in place to the cuDNN output, grid-stride, and its
//   gradient, the sum of dY per channel: per (image, channel) partial sums, then per channel;
//   or added in the residual sum that follows the convolution, in the same pass.
// Inside a group or an image, indices are 32-bit and the channel of an element comes from a
// multiply and a shift by the host's magic numbers for H * W (`int_div::magic`): the 64-bit
// division these kernels did per element cost more than its memory traffic (stop 25's H100
// profile: a bias add moved 1.4 TB/s in f32 and no faster in bf16, half the bytes).

typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        p[i] = (bf16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    p[i] = (bf16_t)(u >> 16);
}

struct SumOp {
    __device__ float operator()(float a, float b) const { return a + b; }
    __device__ float identity() const { return 0.f; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
    __device__ float identity() const { return __uint_as_float(0xff800000u); }  // -inf
};

// `op` over the block, returned to every thread. `sh` holds 32 floats.
template <typename Op>
__device__ float block_reduce(float v, float* sh, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // the previous call's readers of sh[0] are done
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? sh[lane] : op.identity();
        for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

__device__ __forceinline__ float block_sum(float v, float* sh) { return block_reduce(v, sh, SumOp()); }

// The sum over a warp, returned to every lane.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// n / d for 0 <= n < 2^31, given the host's magic numbers (m, s) for d (`int_div::magic`, the
// method of PyTorch's IntDivider).
__device__ __forceinline__ unsigned udiv(unsigned n, unsigned m, unsigned s) { return (__umulhi(n, m) + n) >> s; }

__device__ __forceinline__ float hardswish(float y) { return y * fminf(fmaxf(y + 3.f, 0.f), 6.f) / 6.f; }
// PyTorch's hardswish_backward: 0 below -3, y/3 + 1/2 up to 3, 1 above.
__device__ __forceinline__ float hardswish_grad(float y) { return y < -3.f ? 0.f : (y <= 3.f ? y / 3.f + 0.5f : 1.f); }

// splitmix64's output function; `drop_factor` must give exactly what `HashedDropout::factor`
// (norm.rs) gives: the CPU checks of these kernels build their masks with it.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Element i's dropout factor: 0 when the top 24 bits of its hash fall below `thr`, else `scale`.
__device__ __forceinline__ float drop_factor(unsigned long long key, long i, unsigned int thr, float scale) {
    const unsigned long long u = mix64(key + (unsigned long long)(i + 1) * 0x9E3779B97F4A7C15ull);
    return (unsigned int)(u >> 40) >= thr ? scale : 0.f;
}

// The dropout of a GroupNorm call: a stored mask, or (thr > 0) the hashed factors, or neither.
struct Drop {
    const float* mask;
    unsigned long long key;
    unsigned int thr;
    float scale;
    __device__ __forceinline__ float apply(float v, long i) const {
        if (mask) return v * mask[i];
        if (thr) return v * drop_factor(key, i, thr, scale);
        return v;
    }
};

// Element i of a group starting at `base`, plus its channel's shift (one value per image and
// channel, from `sbase` on) when there is one: the time embedding and the convolution's bias,
// folded into the norm that follows them (`GroupNorm::forward_hardswish_shifted`).
// (hw_m, hw_s): the magic numbers for HW.
template <typename T>
__device__ __forceinline__ float ld_shifted(const T* x, const T* shift, long base, long sbase, int i, unsigned hw_m, unsigned hw_s) {
    float v = ld(x, base + i);
    if (shift) v += ld(shift, sbase + udiv(i, hw_m, hw_s));
    return v;
}

// Group statistics: mean and 1/sqrt(var + eps), of x plus its shift.
template <typename T>
__device__ void stats(const T* x, const T* shift, long base, long sbase, unsigned hw_m, unsigned hw_s, int len, float eps, float* sh, float* mean, float* rstd) {
    float s = 0.f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) s += ld_shifted(x, shift, base, sbase, i, hw_m, hw_s);
    const float m = block_sum(s, sh) / (float)len;
    float v = 0.f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const float d = ld_shifted(x, shift, base, sbase, i, hw_m, hw_s) - m;
        v += d * d;
    }
    const float var = block_sum(v, sh) / (float)len;
    *mean = m;
    *rstd = 1.f / sqrtf(var + eps);
}

// One block per (image, group); the group's cpg * HW values are fewer than 2^31 (the host checks).
// `saved`: null, or where the group's mean and 1/std go (2 floats per block, in block order).
template <typename T>
__device__ void gn_fwd(const T* x, const T* w, const T* b, const T* shift, Drop drop, T* y, float* saved, int C, int HW, int G, float eps, int act, unsigned hw_m, unsigned hw_s) {
    __shared__ float sh[32];
    const int n = blockIdx.x / G, g = blockIdx.x % G, cpg = C / G, len = cpg * HW;
    const long base = ((long)n * C + (long)g * cpg) * HW, sbase = (long)n * C + (long)g * cpg;
    float mean, rstd;
    stats(x, shift, base, sbase, hw_m, hw_s, len, eps, sh, &mean, &rstd);
    if (saved && threadIdx.x == 0) {
        saved[2 * (long)blockIdx.x] = mean;
        saved[2 * (long)blockIdx.x + 1] = rstd;
    }
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const int c = g * cpg + (int)udiv(i, hw_m, hw_s);
        const float wc = ld(w, c);
        const float xv = ld(x, base + i) + (shift ? ld(shift, (long)n * C + c) : 0.f);
        float z = xv * (wc * rstd) + (ld(b, c) - mean * rstd * wc);
        if (act) z = hardswish(z);
        st(y, base + i, drop.apply(z, base + i));
    }
}

// One thread's part (values first, first + stride, ...) of channel c's sums of dL/dz, dL/dz * xhat
// and xhat (z: the normalised, affine output before the activation), the channel's values
// starting at cb and its shift (if any) at `at`.
template <typename T>
__device__ __forceinline__ void channel_sums(const T* x, const T* w, const T* b, const T* shift, Drop drop, const T* dy, int act, int c, long at, long cb, int HW, float mean, float rstd, int first, int stride, float* sg, float* sgx, float* sxh) {
    const float wc = ld(w, c), bc = ld(b, c);
    const float sc = shift ? ld(shift, at) : 0.f;
    float g = 0.f, gx = 0.f, xs = 0.f;
    for (int i = first; i < HW; i += stride) {
        const float xh = (ld(x, cb + i) + sc - mean) * rstd;
        float gz = drop.apply(ld(dy, cb + i), cb + i);
        if (act) gz *= hardswish_grad(xh * wc + bc);
        g += gz;
        gx += gz * xh;
        xs += xh;
    }
    *sg = g;
    *sgx = gx;
    *sxh = xs;
}

// dx, in x's dtype, and in `aux` (f32) per (image, channel) partial sums of dL/dz * xhat at aux
// and of dL/dz at aux + N*C (z: the normalised, affine output before the activation), summed
// over images by the caller; with a shift, also its gradient (the sum of dx over the channel's
// pixels, per image and channel) at aux + 2*N*C.
// `saved`: null, or the forward pass's statistics (gn_fwd's `saved`).
template <typename T>
__device__ void gn_bwd(const T* x, const T* w, const T* b, const T* shift, Drop drop, const T* dy, const float* saved, T* dx, float* aux, int N, int C, int HW, int G, float eps, int act, unsigned hw_m, unsigned hw_s) {
    __shared__ float sh[32];
    const int n = blockIdx.x / G, g = blockIdx.x % G, cpg = C / G, len = cpg * HW;
    const long base = ((long)n * C + (long)g * cpg) * HW, sbase = (long)n * C + (long)g * cpg;
    float* dw_part = aux;
    float* db_part = aux + (long)N * C;
    float* dshift = shift ? db_part + (long)N * C : nullptr;
    float mean, rstd;
    if (saved) {
        mean = saved[2 * (long)blockIdx.x];
        rstd = saved[2 * (long)blockIdx.x + 1];
    } else {
        stats(x, shift, base, sbase, hw_m, hw_s, len, eps, sh, &mean, &rstd);
    }
    // Each channel's sums of dL/dz, dL/dz * xhat (and xhat), into its (image, channel) slots: the
    // whole block on one channel at a time when a channel has a block's worth of values, else a
    // warp per channel (at 8x8, the block on a channel of 64 values left three quarters of its
    // threads idle, and paid three block-wide reductions a channel).
    if (HW >= (int)blockDim.x) {
        for (int ci = 0; ci < cpg; ++ci) {
            float sg, sgx, sxh;
            channel_sums(x, w, b, shift, drop, dy, act, g * cpg + ci, sbase + ci, base + (long)ci * HW, HW, mean, rstd, threadIdx.x, blockDim.x, &sg, &sgx, &sxh);
            sg = block_sum(sg, sh);
            sgx = block_sum(sgx, sh);
            if (dshift) sxh = block_sum(sxh, sh);
            if (threadIdx.x == 0) {
                dw_part[sbase + ci] = sgx;
                db_part[sbase + ci] = sg;
                // The channel's sum of xhat, until the group means below make it the shift's gradient.
                if (dshift) dshift[sbase + ci] = sxh;
            }
        }
    } else {
        const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
        for (int ci = threadIdx.x >> 5; ci < cpg; ci += warps) {
            float sg, sgx, sxh;
            channel_sums(x, w, b, shift, drop, dy, act, g * cpg + ci, sbase + ci, base + (long)ci * HW, HW, mean, rstd, lane, 32, &sg, &sgx, &sxh);
            sg = warp_sum(sg);
            sgx = warp_sum(sgx);
            if (dshift) sxh = warp_sum(sxh);
            if (lane == 0) {
                dw_part[sbase + ci] = sgx;
                db_part[sbase + ci] = sg;
                if (dshift) dshift[sbase + ci] = sxh;
            }
        }
    }
    // The slots written above, by whichever thread, are visible to the whole block after this.
    __syncthreads();
    float sum_g = 0.f, sum_gx = 0.f;  // group sums of dL/dxhat and dL/dxhat * xhat
    for (int ci = 0; ci < cpg; ++ci) {
        const float wc = ld(w, g * cpg + ci);
        sum_g += wc * db_part[sbase + ci];
        sum_gx += wc * dw_part[sbase + ci];
    }
    const float mg = sum_g / (float)len, mgx = sum_gx / (float)len;
    if (dshift && threadIdx.x == 0) {
        // sum over the channel of dx = rstd * (gz * w - mg - xhat * mgx) (the loop below).
        for (int ci = 0; ci < cpg; ++ci) {
            const long at = sbase + ci;
            dshift[at] = rstd * (ld(w, g * cpg + ci) * db_part[at] - (float)HW * mg - dshift[at] * mgx);
        }
    }
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const int ci = (int)udiv(i, hw_m, hw_s), c = g * cpg + ci;
        const float wc = ld(w, c), bc = ld(b, c);
        const float xh = ((ld(x, base + i) + (shift ? ld(shift, sbase + ci) : 0.f)) - mean) * rstd;
        float gz = drop.apply(ld(dy, base + i), base + i);
        if (act) gz *= hardswish_grad(xh * wc + bc);
        st(dx, base + i, rstd * (gz * wc - mg - xh * mgx));
    }
}

// Dropout arguments, last: the mask (or null), then the hash key, threshold (0: no hashed
// dropout) and scale, then where the pass's seed lives in device memory (or null) and the call
// site's mix. With a seed in memory the key is `mix64(seed ^ site_mix) + drop_key`, what
// `HashedDropout::resolve` (norm.rs) computes on the host: a CUDA graph replays the arguments it
// captured at every step, so a seed that changes from step to step has to be read from memory.
#define GN_DROP_ARGS const float *mask, unsigned long long drop_key, unsigned int drop_thr, float drop_scale, const unsigned long long *drop_seed_at, unsigned long long drop_site_mix
#define GN_DROP Drop{mask, drop_seed_at ? mix64(*drop_seed_at ^ drop_site_mix) + drop_key : drop_key, drop_thr, drop_scale}
// `shift`: null, or one value per image and channel added to x before the norm.
extern "C" __global__ void gn_fwd_f32(const float* x, const float* w, const float* b, const float* shift, float* y, float* saved, int C, int HW, int G, float eps, int act, unsigned hw_m, unsigned hw_s, GN_DROP_ARGS) {
    gn_fwd<float>(x, w, b, shift, GN_DROP, y, saved, C, HW, G, eps, act, hw_m, hw_s);
}
extern "C" __global__ void gn_fwd_bf16(const bf16_t* x, const bf16_t* w, const bf16_t* b, const bf16_t* shift, bf16_t* y, float* saved, int C, int HW, int G, float eps, int act, unsigned hw_m, unsigned hw_s, GN_DROP_ARGS) {
    gn_fwd<bf16_t>(x, w, b, shift, GN_DROP, y, saved, C, HW, G, eps, act, hw_m, hw_s);
}
extern "C" __global__ void gn_bwd_f32(const float* x, const float* w, const float* b, const float* shift, const float* dy, const float* saved, float* dx, float* aux, int N, int C, int HW, int G, float eps, int act, unsigned hw_m, unsigned hw_s, GN_DROP_ARGS) {
    gn_bwd<float>(x, w, b, shift, GN_DROP, dy, saved, dx, aux, N, C, HW, G, eps, act, hw_m, hw_s);
}
extern "C" __global__ void gn_bwd_bf16(const bf16_t* x, const bf16_t* w, const bf16_t* b, const bf16_t* shift, const bf16_t* dy, const float* saved, bf16_t* dx, float* aux, int N, int C, int HW, int G, float eps, int act, unsigned hw_m, unsigned hw_s, GN_DROP_ARGS) {
    gn_bwd<bf16_t>(x, w, b, shift, GN_DROP, dy, saved, dx, aux, N, C, HW, G, eps, act, hw_m, hw_s);
}

// y = softmax(scale * x) along rows of `len` values; one block per row.
template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int len, float scale) {
    __shared__ float sh[32];
    const long base = (long)blockIdx.x * len;
    float m = MaxOp().identity();
    for (int i = threadIdx.x; i < len; i += blockDim.x) m = fmaxf(m, ld(x, base + i) * scale);
    m = block_reduce(m, sh, MaxOp());
    float s = 0.f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) s += expf(ld(x, base + i) * scale - m);
    const float inv = 1.f / block_sum(s, sh);
    for (int i = threadIdx.x; i < len; i += blockDim.x) st(y, base + i, expf(ld(x, base + i) * scale - m) * inv);
}

// dx = scale * y * (dy - sum(dy * y)) along rows; one block per row.
template <typename T>
__device__ void softmax_bwd(const T* y, const T* dy, T* dx, int len, float scale) {
    __shared__ float sh[32];
    const long base = (long)blockIdx.x * len;
    float s = 0.f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) s += ld(dy, base + i) * ld(y, base + i);
    s = block_sum(s, sh);
    for (int i = threadIdx.x; i < len; i += blockDim.x) st(dx, base + i, scale * ld(y, base + i) * (ld(dy, base + i) - s));
}

extern "C" __global__ void softmax_fwd_f32(const float* x, float* y, int len, float scale) { softmax_fwd<float>(x, y, len, scale); }
extern "C" __global__ void softmax_fwd_bf16(const bf16_t* x, bf16_t* y, int len, float scale) { softmax_fwd<bf16_t>(x, y, len, scale); }
extern "C" __global__ void softmax_bwd_f32(const float* y, const float* dy, float* dx, int len, float scale) { softmax_bwd<float>(y, dy, dx, len, scale); }
extern "C" __global__ void softmax_bwd_bf16(const bf16_t* y, const bf16_t* dy, bf16_t* dx, int len, float scale) { softmax_bwd<bf16_t>(y, dy, dx, len, scale); }

// y [rows, 2, 2w] from x [rows, w] (rows = n*c*h): each value copied to its 2x2 block.
template <typename T>
__device__ void up2x(const T* x, T* y, long long n_in, int w) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_in; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / w, col = i % w;
        const long long o = row * 4 * w + 2 * col;
        const T v = x[i];
        y[o] = v;
        y[o + 1] = v;
        y[o + 2 * w] = v;
        y[o + 2 * w + 1] = v;
    }
}

// out [rows, w] = the sum of each 2x2 block of g [rows, 2, 2w], in the CPU op's order.
template <typename T>
__device__ void blocksum2x(const T* g, T* out, long long n_out, int w) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n_out; i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / w, col = i % w;
        const long long b = row * 4 * w + 2 * col;
        st(out, i, (ld(g, b) + ld(g, b + 1)) + (ld(g, b + 2 * w) + ld(g, b + 2 * w + 1)));
    }
}

extern "C" __global__ void up2x_f32(const float* x, float* y, long long n, int w) { up2x<float>(x, y, n, w); }
extern "C" __global__ void up2x_bf16(const bf16_t* x, bf16_t* y, long long n, int w) { up2x<bf16_t>(x, y, n, w); }
extern "C" __global__ void blocksum2x_f32(const float* g, float* out, long long n, int w) { blocksum2x<float>(g, out, n, w); }
extern "C" __global__ void blocksum2x_bf16(const bf16_t* g, bf16_t* out, long long n, int w) { blocksum2x<bf16_t>(g, out, n, w); }

// y[n, c, :] += b[n * b_stride + c] in place, y being N images of CHW = C * HW values: images
// along the grid's y (strided), each image's values along its x, the channel by the magic
// numbers for HW. b_stride 0: a convolution's bias, the same for every image; C: a value per
// image and channel (a ResBlock's time embedding, added to its first convolution's output).
template <typename T>
__device__ void bias_add(T* y, const T* b, int N, unsigned CHW, unsigned hw_m, unsigned hw_s, long long b_stride) {
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        T* yn = y + (long long)n * CHW;
        const T* bn = b + n * b_stride;
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < CHW; i += gridDim.x * blockDim.x)
            st(yn, i, ld(yn, i) + ld(bn, udiv(i, hw_m, hw_s)));
    }
}

// y += a in place, over n values: a residual sum written into the buffer of the convolution
// output it adds to (`conv::add_to_output`), so that buffer is not kept for a backward pass
// that never reads it. Each thread reads its own element before it writes it.
template <typename T>
__device__ void add_into(T* y, const T* a, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        st(y, i, ld(y, i) + ld(a, i));
}

// out = a + h + b[c] (a ResBlock's skip, its second convolution without bias, and the bias,
// with the shortcut convolution's when there is one: `conv::residual_add_with_bias`), laid out
// and launched as bias_add: one pass where the bias add and the residual add made two.
template <typename T>
__device__ void residual_bias_add(const T* a, const T* h, const T* b, T* out, int N, unsigned CHW, unsigned hw_m, unsigned hw_s) {
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const long long off = (long long)n * CHW;
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < CHW; i += gridDim.x * blockDim.x)
            st(out, off + i, ld(a, off + i) + (ld(h, off + i) + ld(b, udiv(i, hw_m, hw_s))));
    }
}

// A convolution's bias gradient, out[c] = the sum of dy[n, c, :] over n and the HW positions,
// in two launches so that the reads spread over the whole card: one warp per (image, channel)
// row sums its HW values into part[n * C + c] (f32, four running sums a lane so that several
// loads are in flight; a block per row, as before, left most of its threads idle at 8x8, where
// a bias gradient moved 0.19 TB/s on an H100); then one thread per channel adds its N partial
// sums in image order, the same bits on every run.
template <typename T>
__device__ void channel_partial(const T* dy, float* part, long long HW, long long rows) {
    const int lane = threadIdx.x & 31;
    const long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;  // the whole warp: its shuffles below are all or nothing
    const T* p = dy + r * HW;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    long long i = lane;
    for (; i + 96 < HW; i += 128) {
        s0 += ld(p, i);
        s1 += ld(p, i + 32);
        s2 += ld(p, i + 64);
        s3 += ld(p, i + 96);
    }
    for (; i < HW; i += 32) s0 += ld(p, i);
    const float s = warp_sum((s0 + s1) + (s2 + s3));
    if (lane == 0) part[r] = s;
}

template <typename T>
__device__ void channel_finish(const float* part, T* out, int N, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.f;
#pragma unroll 8
    for (int n = 0; n < N; ++n) s += part[(long long)n * C + c];
    st(out, c, s);
}

extern "C" __global__ void bias_add_f32(float* y, const float* b, int N, unsigned CHW, unsigned hw_m, unsigned hw_s, long long b_stride) { bias_add<float>(y, b, N, CHW, hw_m, hw_s, b_stride); }
extern "C" __global__ void bias_add_bf16(bf16_t* y, const bf16_t* b, int N, unsigned CHW, unsigned hw_m, unsigned hw_s, long long b_stride) { bias_add<bf16_t>(y, b, N, CHW, hw_m, hw_s, b_stride); }
extern "C" __global__ void add_into_f32(float* y, const float* a, long long n) { add_into<float>(y, a, n); }
extern "C" __global__ void add_into_bf16(bf16_t* y, const bf16_t* a, long long n) { add_into<bf16_t>(y, a, n); }
extern "C" __global__ void channel_partial_f32(const float* dy, float* part, long long HW, long long rows) { channel_partial<float>(dy, part, HW, rows); }
extern "C" __global__ void channel_partial_bf16(const bf16_t* dy, float* part, long long HW, long long rows) { channel_partial<bf16_t>(dy, part, HW, rows); }
extern "C" __global__ void channel_finish_f32(const float* part, float* out, int N, int C) { channel_finish<float>(part, out, N, C); }
extern "C" __global__ void channel_finish_bf16(const float* part, bf16_t* out, int N, int C) { channel_finish<bf16_t>(part, out, N, C); }
extern "C" __global__ void residual_bias_add_f32(const float* a, const float* h, const float* b, float* out, int N, unsigned CHW, unsigned hw_m, unsigned hw_s) { residual_bias_add<float>(a, h, b, out, N, CHW, hw_m, hw_s); }
extern "C" __global__ void residual_bias_add_bf16(const bf16_t* a, const bf16_t* h, const bf16_t* b, bf16_t* out, int N, unsigned CHW, unsigned hw_m, unsigned hw_s) { residual_bias_add<bf16_t>(a, h, b, out, N, CHW, hw_m, hw_s); }
