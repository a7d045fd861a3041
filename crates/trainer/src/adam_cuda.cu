// Adam's two in-place passes on CUDA (f32), the same arithmetic as the CPU ops in adam.rs.
// Compiled at run time by NVRTC (adam_cuda.rs). Grid-stride loops: any grid covers any n.

extern "C" __global__ void adam_moment(float* m, const float* g, unsigned long long n, float beta, int square) {
    const float rest = 1.f - beta;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float gv = g[i];
        if (square) gv *= gv;
        m[i] = beta * m[i] + rest * gv;
    }
}

extern "C" __global__ void adam_update(float* p, const float* m, const float* v, unsigned long long n, float step_size, float bias2_sqrt, float eps) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        p[i] -= step_size * m[i] / (sqrtf(v[i]) / bias2_sqrt + eps);
    }
}
