// Driver for norm_cuda.cu's kernels under shim.h: reads x, w, b, mask, dy (f32, or bf16 bits for
// x, w, b, dy) from the working directory, writes y and the backward's packed f32 output.
//   gn_main N C HW G act use_mask bf16
#include "norm_cuda.cu"
#include <cstdio>
#include <cstdlib>

template <class T> std::vector<T> rd(const char* p, size_t n) {
    std::vector<T> v(n);
    FILE* f = fopen(p, "rb");
    if (!f || fread(v.data(), sizeof(T), n, f) != n) { fprintf(stderr, "cannot read %s\n", p); exit(2); }
    fclose(f);
    return v;
}
template <class T> void wr(const char* p, const std::vector<T>& v) {
    FILE* f = fopen(p, "wb");
    fwrite(v.data(), sizeof(T), v.size(), f);
    fclose(f);
}

template <class T, class Fwd, class Bwd>
void run(int N, int C, int HW, int G, int act, const float* m, Fwd fwd, Bwd bwd) {
    const float eps = 1e-5f;
    const size_t len = (size_t)N * C * HW;
    auto x = rd<T>("x.bin", len), w = rd<T>("w.bin", C), b = rd<T>("b.bin", C), dy = rd<T>("dy.bin", len);
    std::vector<T> y(len);
    std::vector<float> out(len + 2 * (size_t)N * C);
    launch(N * G, 256, [&] { fwd(x.data(), w.data(), b.data(), m, y.data(), C, HW, G, eps, act); });
    launch(N * G, 256, [&] { bwd(x.data(), w.data(), b.data(), m, dy.data(), out.data(), N, C, HW, G, eps, act); });
    wr("y.bin", y);
    wr("out.bin", out);
}

int main(int argc, char** argv) {
    if (argc != 8) { fprintf(stderr, "usage: gn_main N C HW G act use_mask bf16\n"); return 2; }
    int N = atoi(argv[1]), C = atoi(argv[2]), HW = atoi(argv[3]), G = atoi(argv[4]), act = atoi(argv[5]);
    auto mask = rd<float>("mask.bin", (size_t)N * C * HW);
    const float* m = atoi(argv[6]) ? mask.data() : nullptr;
    if (atoi(argv[7])) run<bf16_t>(N, C, HW, G, act, m, gn_fwd_bf16, gn_bwd_bf16);
    else run<float>(N, C, HW, G, act, m, gn_fwd_f32, gn_bwd_f32);
}
