// Runs CUDA kernel sources on the CPU for tests: one block at a time, one std::thread per CUDA
// thread, real barriers for __syncthreads and per-warp barriers for the shuffles, so that the
// kernels' indexing and reductions are exercised as written (not their speed, nor memory races).
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
#include <memory>
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim3 threadIdx;
inline Dim3 blockIdx, blockDim, gridDim;
inline std::barrier<>* block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline float warp_buf[1024];
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { block_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  auto& b = *warp_bars[threadIdx.x >> 5];
  b.arrive_and_wait(); warp_buf[threadIdx.x] = v; b.arrive_and_wait();
  float r = warp_buf[(threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ (unsigned)o)];
  b.arrive_and_wait(); return r;
}
// CUDA has isfinite for float and double at global scope.
using std::isfinite;
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
// A grid of blocks_x x blocks_y blocks (y defaults to 1).
template <class F> void launch(unsigned blocks, unsigned threads, F f, unsigned blocks_y = 1) {
  blockDim.x = threads;
  gridDim.x = blocks;
  gridDim.y = blocks_y;
  for (unsigned by = 0; by < blocks_y; ++by)
  for (unsigned b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    blockIdx.y = by;
    std::barrier<> bb(threads); block_bar = &bb;
    warp_bars.clear(); for (unsigned w = 0; w < threads / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) ts.emplace_back([&, t] { threadIdx.x = t; f(); });
    for (auto& t : ts) t.join();
  }
}
