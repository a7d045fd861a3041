// Driver for kernels.cu under shim.h, reading its inputs from and writing its outputs to the
// working directory (f32, or bf16 bits where the kernel takes bf16):
//   main gn N C HW G act drop bf16 hw_m hw_s [key thr scale [seed site_mix]]
//                                        x, w, b, mask, dy -> y, saved (the statistics), dx, aux (the
//                                        backward's f32 sums), dx_recomputed, aux_recomputed (the
//                                        backward's, recomputing the statistics);
//                                        (hw_m, hw_s): int_div::magic(HW), as the launches pass;
//                                        drop: 0 none, 1 mask.bin, 2 hashed (key thr scale),
//                                        3 hashed with the seed in (device) memory (+ seed site_mix)
//   main softmax ROWS LEN SCALE bf16     x, dy -> y, dx
//   main up ROWS W bf16                  x [ROWS, W], g [ROWS, 2, 2W] -> y (x upsampled), dx (g's block sums)
//   main bias N C HW bf16 hw_m hw_s      y [N, C, HW], b [C], h [N, C, HW], e [N, C + 3] -> ya (y + b,
//                                        in place), cs (y's sums per channel), ra (y + (h + b), the
//                                        residual sum), he (h + e[n, c], in place), hy (h + y, in place)
#include "kernels.cu"
#include <cstdio>
#include <cstdlib>
#include <string>

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

struct DropArg { const float* m; unsigned long long key; unsigned int thr; float scale; const unsigned long long* seed_at; unsigned long long site_mix; };

// With EMU_SHIFT=1 in the environment, shift.bin (N*C values) is added to x per image and
// channel, and `aux` has its gradient appended.
template <class T, class Fwd, class Bwd>
void run(int N, int C, int HW, int G, int act, unsigned hw_m, unsigned hw_s, DropArg d, Fwd fwd, Bwd bwd) {
    const float eps = 1e-5f;
    const size_t len = (size_t)N * C * HW;
    const bool shifted = getenv("EMU_SHIFT") && std::string(getenv("EMU_SHIFT")) == "1";
    auto x = rd<T>("x.bin", len), w = rd<T>("w.bin", C), b = rd<T>("b.bin", C), dy = rd<T>("dy.bin", len);
    std::vector<T> shift = shifted ? rd<T>("shift.bin", (size_t)N * C) : std::vector<T>();
    const T* sp = shifted ? shift.data() : nullptr;
    std::vector<T> y(len), dx(len), dx2(len);
    std::vector<float> aux((shifted ? 3 : 2) * (size_t)N * C), aux2(aux.size()), saved(2 * (size_t)N * G);
    launch(N * G, 256, [&] { fwd(x.data(), w.data(), b.data(), sp, y.data(), saved.data(), C, HW, G, eps, act, hw_m, hw_s, d.m, d.key, d.thr, d.scale, d.seed_at, d.site_mix); });
    launch(N * G, 256, [&] { bwd(x.data(), w.data(), b.data(), sp, dy.data(), saved.data(), dx.data(), aux.data(), N, C, HW, G, eps, act, hw_m, hw_s, d.m, d.key, d.thr, d.scale, d.seed_at, d.site_mix); });
    // And with the statistics recomputed: the same bits expected.
    launch(N * G, 256, [&] { bwd(x.data(), w.data(), b.data(), sp, dy.data(), nullptr, dx2.data(), aux2.data(), N, C, HW, G, eps, act, hw_m, hw_s, d.m, d.key, d.thr, d.scale, d.seed_at, d.site_mix); });
    // And with wrong statistics (every mean off by one): other gradients, if they are read at all.
    std::vector<float> off = saved;
    for (size_t k = 0; k < off.size(); k += 2) off[k] += 1.f;
    std::vector<T> dx3(len);
    std::vector<float> aux3(aux.size());
    launch(N * G, 256, [&] { bwd(x.data(), w.data(), b.data(), sp, dy.data(), off.data(), dx3.data(), aux3.data(), N, C, HW, G, eps, act, hw_m, hw_s, d.m, d.key, d.thr, d.scale, d.seed_at, d.site_mix); });
    wr("dx_off.bin", dx3);
    wr("y.bin", y);
    wr("dx.bin", dx);
    wr("aux.bin", aux);
    wr("dx_recomputed.bin", dx2);
    wr("aux_recomputed.bin", aux2);
    wr("saved.bin", saved);
}

template <class T, class Fwd, class Bwd>
void run_softmax(int rows, int len, float scale, Fwd fwd, Bwd bwd) {
    const size_t total = (size_t)rows * len;
    auto x = rd<T>("x.bin", total), dy = rd<T>("dy.bin", total);
    std::vector<T> y(total), dx(total);
    launch(rows, 256, [&] { fwd(x.data(), y.data(), len, scale); });
    launch(rows, 256, [&] { bwd(y.data(), dy.data(), dx.data(), len, scale); });
    wr("y.bin", y);
    wr("dx.bin", dx);
}

template <class T, class Up, class Sum>
void run_up(int rows, int w, Up up, Sum sum) {
    const long long n = (long long)rows * w;
    auto x = rd<T>("x.bin", n), g = rd<T>("g.bin", 4 * n);
    std::vector<T> y(4 * n), dx(n);
    // A grid much smaller than the data: every grid-stride loop goes round several times.
    launch(2, 64, [&] { up(x.data(), y.data(), n, w); });
    launch(2, 64, [&] { sum(g.data(), dx.data(), n, w); });
    wr("y.bin", y);
    wr("dx.bin", dx);
}

template <class T, class Add, class Partial, class Finish, class Resid, class Into>
void run_bias(int N, int C, long long HW, unsigned hw_m, unsigned hw_s, Add add, Partial partial, Finish finish, Resid resid, Into into) {
    const long long total = (long long)N * C * HW, rows = (long long)N * C;
    // e: a value per image and channel, its rows C + 3 apart (a narrow of a wider product).
    const long long es = C + 3;
    auto y = rd<T>("y.bin", total), b = rd<T>("b.bin", C), h = rd<T>("h.bin", total), e = rd<T>("e.bin", N * es);
    std::vector<T> cs(C), ra(total);
    launch(2, 64, [&] { resid(y.data(), h.data(), b.data(), ra.data(), N, (unsigned)(C * HW), hw_m, hw_s); }, 2);
    wr("ra.bin", ra);
    // In place, as `conv::Conv2d::forward_plus` adds into a convolution's output: he = h + e
    // per image and channel, hy = h + y.
    std::vector<T> he(h), hy(h);
    launch(2, 64, [&] { add(he.data(), e.data(), N, (unsigned)(C * HW), hw_m, hw_s, es); }, 2);
    launch(3, 64, [&] { into(hy.data(), y.data(), total); });
    wr("he.bin", he);
    wr("hy.bin", hy);
    std::vector<float> part(N * C);
    // The channel sums read y before the in-place add changes it; launched as cuda_ops.rs does:
    // a warp per (image, channel), 8 to a block, then ceil(C / 256) blocks of 256 threads.
    launch((unsigned)((rows + 7) / 8), 256, [&] { partial(y.data(), part.data(), HW, rows); });
    launch((C + 255) / 256, 256, [&] { finish(part.data(), cs.data(), N, C); });
    // A grid much smaller than the data, 2 x 2 blocks: both grid-stride loops go round.
    launch(2, 64, [&] { add(y.data(), b.data(), N, (unsigned)(C * HW), hw_m, hw_s, 0); }, 2);
    wr("ya.bin", y);
    wr("cs.bin", cs);
}

int main(int argc, char** argv) {
    std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "gn" && (argc == 11 || argc == 14 || argc == 16)) {
        int N = atoi(argv[2]), C = atoi(argv[3]), HW = atoi(argv[4]), G = atoi(argv[5]), act = atoi(argv[6]), drop = atoi(argv[7]);
        unsigned hw_m = (unsigned)strtoul(argv[9], nullptr, 10), hw_s = (unsigned)strtoul(argv[10], nullptr, 10);
        auto mask = rd<float>("mask.bin", (size_t)N * C * HW);
        DropArg d{drop == 1 ? mask.data() : nullptr, 0, 0, 1.f, nullptr, 0};
        unsigned long long seed = 0;
        if (drop == 2 || drop == 3) {
            if (argc != (drop == 2 ? 14 : 16)) { fprintf(stderr, "hashed dropout needs key thr scale (and seed site_mix with drop 3)\n"); return 2; }
            d.key = strtoull(argv[11], nullptr, 10);
            d.thr = (unsigned int)strtoul(argv[12], nullptr, 10);
            d.scale = (float)atof(argv[13]);
        }
        if (drop == 3) {
            seed = strtoull(argv[14], nullptr, 10);
            d.seed_at = &seed;
            d.site_mix = strtoull(argv[15], nullptr, 10);
        }
        if (atoi(argv[8])) run<bf16_t>(N, C, HW, G, act, hw_m, hw_s, d, gn_fwd_bf16, gn_bwd_bf16);
        else run<float>(N, C, HW, G, act, hw_m, hw_s, d, gn_fwd_f32, gn_bwd_f32);
        return 0;
    }
    if (mode == "softmax" && argc == 6) {
        int rows = atoi(argv[2]), len = atoi(argv[3]);
        float scale = (float)atof(argv[4]);
        if (atoi(argv[5])) run_softmax<bf16_t>(rows, len, scale, softmax_fwd_bf16, softmax_bwd_bf16);
        else run_softmax<float>(rows, len, scale, softmax_fwd_f32, softmax_bwd_f32);
        return 0;
    }
    if (mode == "up" && argc == 5) {
        int rows = atoi(argv[2]), w = atoi(argv[3]);
        if (atoi(argv[4])) run_up<bf16_t>(rows, w, up2x_bf16, blocksum2x_bf16);
        else run_up<float>(rows, w, up2x_f32, blocksum2x_f32);
        return 0;
    }
    if (mode == "bias" && argc == 8) {
        int N = atoi(argv[2]), C = atoi(argv[3]);
        long long HW = atoll(argv[4]);
        unsigned hw_m = (unsigned)strtoul(argv[6], nullptr, 10), hw_s = (unsigned)strtoul(argv[7], nullptr, 10);
        if (atoi(argv[5])) run_bias<bf16_t>(N, C, HW, hw_m, hw_s, bias_add_bf16, channel_partial_bf16, channel_finish_bf16, residual_bias_add_bf16, add_into_bf16);
        else run_bias<float>(N, C, HW, hw_m, hw_s, bias_add_f32, channel_partial_f32, channel_finish_f32, residual_bias_add_f32, add_into_f32);
        return 0;
    }
    fprintf(stderr, "usage: main gn N C HW G act drop bf16 hw_m hw_s [key thr scale [seed site_mix]] | main softmax ROWS LEN SCALE bf16 | main up ROWS W bf16 | main bias N C HW bf16 hw_m hw_s\n");
    return 2;
}
