//! Winograd F(2x2, 3x3) for the CPU's 3x3, stride-1, padding-1 convolutions.
//!
//! Those convolutions carry almost all of the UNet's FLOPs. Winograd's minimal filtering
//! computes each 2x2 output tile from a 4x4 input tile with 16 multiplies per channel pair
//! instead of 36, so the GEMMs shrink 2.25x; the tile transforms are additions only. The input
//! gradient of such a convolution is the same convolution of dY with the kernel rotated 180
//! degrees and its channel axes swapped, so it goes through here too. The weight gradient
//! stays an im2col GEMM (`conv`).
//!
//! Layout, per chunk of images whose tiles are the GEMMs' N dimension: transformed inputs
//! `V [C][16][N]`, transformed weights `U [16][O][C]`, products `M [O][16][N]`; the 16
//! GEMMs `M[p] = U[p] V[p]` are independent and run in parallel.

use rayon::prelude::*;
use std::cell::RefCell;

const TILE: usize = 16;
/// GEMM width (tiles) a chunk of images aims for: wide enough to run the GEMM kernels well,
/// small enough that `V` and `M` stay within a few MB per chunk.
const TARGET_TILES: usize = 1024;

/// `U [16][O][C]` from `w [O][C][3][3]`: `U = G g G^T`.
pub(crate) fn transform_weights(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; TILE * o * c];
    let up = SyncPtr(u.as_mut_ptr());
    (0..o).into_par_iter().for_each(|oi| {
        for ci in 0..c {
            let g = &w[(oi * c + ci) * 9..(oi * c + ci) * 9 + 9];
            let mut gg = [[0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, d) = (g[j], g[3 + j], g[6 + j]);
                gg[0][j] = a;
                gg[1][j] = 0.5 * (a + b + d);
                gg[2][j] = 0.5 * (a - b + d);
                gg[3][j] = d;
            }
            for (i, r) in gg.iter().enumerate() {
                let (a, b, d) = (r[0], r[1], r[2]);
                let row = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                for (j, v) in row.into_iter().enumerate() {
                    // SAFETY: index < 16 * o * c, and each (oi, ci) is written by one task only.
                    unsafe { *up.ptr().add(((i * 4 + j) * o + oi) * c + ci) = v };
                }
            }
        }
    });
    u
}

/// The transformed kernel a [`conv3x3`] multiplies by.
#[derive(Clone, Copy)]
pub(crate) enum Kernel<'a> {
    /// `U` of this convolution's own kernel, from [`transform_weights`].
    Forward(&'a [f32]),
    /// The input gradient of the convolution whose `U` this is: its kernel rotated 180
    /// degrees with the channel axes swapped. `G R = P G` (`R` reverses 3 taps, `P` swaps
    /// rows 0 and 3 of 4), so that kernel's transform is `P U P^T` transposed: the slots are
    /// permuted and each is read transposed, with no copy.
    InputGrad(&'a [f32]),
}

impl Kernel<'_> {
    /// Pointer and (column, row) strides of slot `p` as an `[out][in]` matrix.
    fn slot(&self, p: usize, out: usize, inp: usize) -> (*const f32, isize, isize) {
        match *self {
            Kernel::Forward(u) => (u[p * out * inp..].as_ptr(), 1, inp as isize),
            Kernel::InputGrad(u) => {
                const SWAP_0_3: [usize; 4] = [3, 1, 2, 0];
                let q = SWAP_0_3[p / 4] * 4 + SWAP_0_3[p % 4];
                (u[q * out * inp..].as_ptr(), out as isize, 1)
            }
        }
    }
}

thread_local! {
    static V_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static M_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: every task given this pointer writes its own disjoint set of elements.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Through a method, so that closures capture the whole (Send) wrapper, not the raw field.
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// `out [B][O][H][W] = conv3x3(x [B][C][H][W], padding 1) (+ bias)`. Every element of `out`
/// is written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3(x: &[f32], b: usize, c: usize, h: usize, w: usize, kernel: Kernel, o: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tiles = th * tw;
    for_each_chunk(x, b, c, h, w, o, |chunk, v, m| {
        let (n, ns) = (chunk.n, chunk.ns);
        let mp = SyncPtr(m.as_mut_ptr());
        let vp = v.as_ptr() as usize;
        (0..TILE).into_par_iter().for_each(|p| {
            let (up, u_cs, u_rs) = kernel.slot(p, o, c);
            // SAFETY: slot p of M is [O][N] at row stride 16 ns; U[p] is [O][C]; V's slot p is
            // [C][N] at row stride 16 ns; all within the slices `for_each_chunk` sized.
            unsafe {
                gemm::gemm(
                    o, n, c,
                    mp.ptr().add(p * ns), 1, (TILE * ns) as isize,
                    false,
                    up, u_cs, u_rs,
                    (vp as *const f32).add(p * ns), 1, (TILE * ns) as isize,
                    1.0, 1.0,
                    false, false, false,
                    gemm::Parallelism::None,
                )
            }
        });
        let m = &*m;
        out[chunk.first * o * h * w..(chunk.first + chunk.imgs) * o * h * w].par_chunks_mut(h * w).enumerate().for_each_init(Vec::new, |scratch, (idx, dst)| {
            let (img, oi) = (idx / o, idx % o);
            let bv = bias.map_or(0.0, |b| b[oi]);
            transform_output_plane(&m[oi * TILE * ns..(oi + 1) * TILE * ns], ns, img * tiles, th, tw, h, w, bv, dst, scratch);
        });
    });
}

/// One chunk of images: its tiles are the GEMMs' N dimension.
struct Chunk {
    index: usize,
    first: usize,
    imgs: usize,
    /// Tiles in the chunk.
    n: usize,
    /// Stride between the 16 slots of a channel (`n` plus padding).
    ns: usize,
}

/// Splits the batch into chunks of about `TARGET_TILES` tiles and calls `f` for each with the
/// chunk's transformed input `V [C][16][ns]` and a buffer for `M [O][16][ns]`; both are kept
/// per thread across calls.
#[allow(clippy::too_many_arguments)]
fn for_each_chunk(x: &[f32], b: usize, c: usize, h: usize, w: usize, o: usize, mut f: impl FnMut(&Chunk, &[f32], &mut [f32])) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tiles = th * tw;
    let per_chunk = TARGET_TILES.div_ceil(tiles).clamp(1, b.max(1));
    V_BUF.with(|vb| {
        M_BUF.with(|mb| {
            let (mut vb, mut mb) = (vb.borrow_mut(), mb.borrow_mut());
            for (index, first) in (0..b).step_by(per_chunk).enumerate() {
                let imgs = per_chunk.min(b - first);
                let n = imgs * tiles;
                // Slot stride: 16 slots exactly 4 KB apart (n = 1024) would share L1 sets.
                let ns = n + 16;
                if vb.len() < c * TILE * ns {
                    vb.resize(c * TILE * ns, 0.0);
                }
                if mb.len() < o * TILE * ns {
                    mb.resize(o * TILE * ns, 0.0);
                }
                let v = &mut vb[..c * TILE * ns];
                let xs = &x[first * c * h * w..(first + imgs) * c * h * w];
                v.par_chunks_mut(TILE * ns).enumerate().for_each_init(Vec::new, |scratch, (ci, vc)| {
                    for img in 0..imgs {
                        let plane = &xs[(img * c + ci) * h * w..(img * c + ci + 1) * h * w];
                        transform_input_plane(plane, h, w, th, tw, vc, ns, img * tiles, scratch);
                    }
                });
                f(&Chunk { index, first, imgs, n, ns }, v, &mut mb[..o * TILE * ns]);
            }
        })
    })
}

/// `B^T d B` for every 4x4 tile of one padded plane, into `v [16][n]` at columns
/// `col0 + ty * tw + tx`.
///
/// The transform is separable. The horizontal half `d B` is done once per input row (each
/// row belongs to two tile rows): with the padded row split into even and odd columns, tile
/// `tx` reads `(E[tx], O[tx], E[tx+1], O[tx+1])`, so it is four contiguous, vectorisable
/// loops. The vertical half `B^T (.)` then combines four of those rows per tile row.
#[allow(clippy::too_many_arguments)]
fn transform_input_plane(plane: &[f32], h: usize, w: usize, th: usize, tw: usize, v: &mut [f32], n: usize, col0: usize, scratch: &mut Vec<f32>) {
    let half = tw + 1;
    // Padded rows 0 ..= 2 th + 1 (input row iy is padded row iy + 1), each as 4 slots of tw.
    let rows = 2 * th + 2;
    let row_len = 4 * tw;
    if scratch.len() < rows * row_len + 2 * half {
        scratch.resize(rows * row_len + 2 * half, 0.0);
    }
    let (hrows, eo) = scratch.split_at_mut(rows * row_len);
    // Only the padding rows need zeros: every other row is written below.
    hrows[..row_len].fill(0.0);
    hrows[(h + 1) * row_len..].fill(0.0);
    let (even, odd) = eo.split_at_mut(half);
    for iy in 0..h {
        let src = &plane[iy * w..(iy + 1) * w];
        // Padded column j holds input column j - 1: odd columns are x[2k], even ones x[2k - 1].
        even[0] = 0.0;
        for (k, pair) in src.chunks_exact(2).enumerate() {
            odd[k] = pair[0];
            even[k + 1] = pair[1];
        }
        if w % 2 == 1 {
            odd[w / 2] = src[w - 1];
            even[w / 2 + 1] = 0.0;
            odd[w / 2 + 1..].fill(0.0);
        } else {
            odd[w / 2..].fill(0.0);
            even[w / 2 + 1..].fill(0.0);
        }
        let out = &mut hrows[(iy + 1) * row_len..(iy + 2) * row_len];
        let (h0, rest) = out.split_at_mut(tw);
        let (h1, rest) = rest.split_at_mut(tw);
        let (h2, h3) = rest.split_at_mut(tw);
        let (e0, e1, o0, o1) = (&even[..tw], &even[1..=tw], &odd[..tw], &odd[1..=tw]);
        for tx in 0..tw {
            h0[tx] = e0[tx] - e1[tx];
            h1[tx] = o0[tx] + e1[tx];
            h2[tx] = e1[tx] - o0[tx];
            h3[tx] = o0[tx] - o1[tx];
        }
    }
    for ty in 0..th {
        let base = col0 + ty * tw;
        let r = &hrows[2 * ty * row_len..(2 * ty + 4) * row_len];
        let (r0, rest) = r.split_at(row_len);
        let (r1, rest) = rest.split_at(row_len);
        let (r2, r3) = rest.split_at(row_len);
        for k in 0..4 {
            let cols = k * tw..(k + 1) * tw;
            let (a, b, c, d) = (&r0[cols.clone()], &r1[cols.clone()], &r2[cols.clone()], &r3[cols]);
            // Slots k, 4 + k, 8 + k, 12 + k: rows 0..4 of B^T (.) for column k of the tile.
            let [s0, s1, s2, s3] = four_slots(v, k * n + base, 4 * n, tw);
            for tx in 0..tw {
                s0[tx] = a[tx] - c[tx];
                s1[tx] = b[tx] + c[tx];
                s2[tx] = c[tx] - b[tx];
                s3[tx] = b[tx] - d[tx];
            }
        }
    }
}

/// `len` elements at `start`, `start + step`, `start + 2 step` and `start + 3 step` of `v`, as
/// four disjoint slices (`len <= step`), so that one loop writes all four.
fn four_slots(v: &mut [f32], start: usize, step: usize, len: usize) -> [&mut [f32]; 4] {
    let (s0, rest) = v[start..start + 3 * step + len].split_at_mut(step);
    let (s1, rest) = rest.split_at_mut(step);
    let (s2, s3) = rest.split_at_mut(step);
    [&mut s0[..len], &mut s1[..len], &mut s2[..len], s3]
}

/// `A^T m A` (+ bias) for every tile of one output plane, from `m [16][n]` at columns
/// `col0 + ty * tw + tx`; tiles hanging over an odd edge write only their inside.
#[allow(clippy::too_many_arguments)]
fn transform_output_plane(m: &[f32], n: usize, col0: usize, th: usize, tw: usize, h: usize, w: usize, bias: f32, dst: &mut [f32], scratch: &mut Vec<f32>) {
    // Every element of these is written before it is read, per tile row.
    if scratch.len() < 12 * tw {
        scratch.resize(12 * tw, 0.0);
    }
    let (t0, rest) = scratch.split_at_mut(4 * tw);
    let (t1, rest) = rest.split_at_mut(4 * tw);
    let (y0, y1) = rest[..4 * tw].split_at_mut(2 * tw);
    for ty in 0..th {
        let base = col0 + ty * tw;
        let slot = |p: usize| &m[p * n + base..p * n + base + tw];
        // Row transform: t0 = m0 + m1 + m2, t1 = m1 - m2 - m3 (per column j of the tile).
        for j in 0..4 {
            let (m0, m1, m2, m3) = (slot(j), slot(4 + j), slot(8 + j), slot(12 + j));
            let (a, b) = (&mut t0[j * tw..(j + 1) * tw], &mut t1[j * tw..(j + 1) * tw]);
            for tx in 0..tw {
                a[tx] = m0[tx] + m1[tx] + m2[tx];
                b[tx] = m1[tx] - m2[tx] - m3[tx];
            }
        }
        for (t, y) in [(&*t0, &mut *y0), (&*t1, &mut *y1)] {
            let (c0, c1, c2, c3) = (&t[..tw], &t[tw..2 * tw], &t[2 * tw..3 * tw], &t[3 * tw..]);
            for tx in 0..tw {
                y[2 * tx] = c0[tx] + c1[tx] + c2[tx] + bias;
                y[2 * tx + 1] = c1[tx] - c2[tx] - c3[tx] + bias;
            }
        }
        let oy = 2 * ty;
        dst[oy * w..(oy + 1) * w].copy_from_slice(&y0[..w]);
        if oy + 1 < h {
            dst[(oy + 1) * w..(oy + 2) * w].copy_from_slice(&y1[..w]);
        }
    }
}

/// The weight gradient `dW [O][C][3][3]` of [`conv3x3`] from its input `x [B][C][H][W]` and
/// output gradient `dy [B][O][H][W]`.
///
/// With `Y = A^T (U . V) A` per tile, `dU = sum over tiles (A dY A^T) . V` and `dW = G^T dU G`:
/// the 16 slots are GEMMs `dU[p]^T = V[p] dM[p]^T` over the tiles, 2.25x fewer FLOPs than
/// im2col's `cols dY^T`, with the same operand orientation (both contiguous along tiles).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3_weight_grad(x: &[f32], dy: &[f32], b: usize, c: usize, h: usize, w: usize, o: usize) -> Vec<f32> {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tiles = th * tw;
    // dU^T [16][C][O], accumulated over chunks.
    let mut du = vec![0f32; TILE * c * o];
    for_each_chunk(x, b, c, h, w, o, |chunk, v, m| {
        let (n, ns) = (chunk.n, chunk.ns);
        let dys = &dy[chunk.first * o * h * w..(chunk.first + chunk.imgs) * o * h * w];
        m.par_chunks_mut(TILE * ns).enumerate().for_each_init(Vec::new, |scratch, (oi, mc)| {
            for img in 0..chunk.imgs {
                let plane = &dys[(img * o + oi) * h * w..(img * o + oi + 1) * h * w];
                transform_output_grad_plane(plane, h, w, th, tw, mc, ns, img * tiles, scratch);
            }
        });
        let dp = SyncPtr(du.as_mut_ptr());
        let (vp, mp) = (v.as_ptr() as usize, m.as_ptr() as usize);
        (0..TILE).into_par_iter().for_each(|p| {
            // SAFETY: slot p of dU^T is [C][O] (contiguous, disjoint per p); V's and dM's slots p
            // are [C][N] and [O][N] at row stride 16 ns, within the slices `for_each_chunk` sized.
            unsafe {
                gemm::gemm(
                    c, o, n,
                    dp.ptr().add(p * c * o), 1, o as isize,
                    chunk.index > 0,
                    (vp as *const f32).add(p * ns), 1, (TILE * ns) as isize,
                    (mp as *const f32).add(p * ns), (TILE * ns) as isize, 1,
                    1.0, 1.0,
                    false, false, false,
                    gemm::Parallelism::None,
                )
            }
        });
    });
    // dW = G^T dU G per (o, c). dU^T's slots are contiguous along o, so each task takes one
    // input channel, reads its 16 slot rows in order and writes a [C][O][9] staging copy;
    // the final transpose to [O][C][9] moves 9-float blocks.
    let mut staged = vec![0f32; c * o * 9];
    staged.par_chunks_mut(o * 9).enumerate().for_each(|(ci, out)| {
        let rows: Vec<&[f32]> = (0..TILE).map(|p| &du[(p * c + ci) * o..(p * c + ci + 1) * o]).collect();
        for (oi, k) in out.chunks_exact_mut(9).enumerate() {
            // T = G^T dU (3x4), then T G (3x3).
            let mut t = [[0f32; 4]; 3];
            for j in 0..4 {
                let (a, b, cc, e) = (rows[j][oi], rows[4 + j][oi], rows[8 + j][oi], rows[12 + j][oi]);
                t[0][j] = a + 0.5 * (b + cc);
                t[1][j] = 0.5 * (b - cc);
                t[2][j] = 0.5 * (b + cc) + e;
            }
            for (i, r) in t.iter().enumerate() {
                let (a, b, cc, e) = (r[0], r[1], r[2], r[3]);
                k[i * 3] = a + 0.5 * (b + cc);
                k[i * 3 + 1] = 0.5 * (b - cc);
                k[i * 3 + 2] = 0.5 * (b + cc) + e;
            }
        }
    });
    let mut dw = vec![0f32; o * c * 9];
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(oi, row)| {
        for (ci, k) in row.chunks_exact_mut(9).enumerate() {
            k.copy_from_slice(&staged[(ci * o + oi) * 9..(ci * o + oi) * 9 + 9]);
        }
    });
    dw
}

/// `A dY A^T` for every 2x2 tile of one output-gradient plane, into `m [16][n]` at columns
/// `col0 + ty * tw + tx`; positions past an odd edge are zeros (no output there).
#[allow(clippy::too_many_arguments)]
fn transform_output_grad_plane(plane: &[f32], h: usize, w: usize, th: usize, tw: usize, m: &mut [f32], n: usize, col0: usize, scratch: &mut Vec<f32>) {
    // Each tile row's two gradient rows, split into even and odd columns.
    if scratch.len() < 4 * tw {
        scratch.resize(4 * tw, 0.0);
    }
    let eo = &mut scratch[..4 * tw];
    for ty in 0..th {
        eo.fill(0.0);
        for r in 0..2 {
            let y = 2 * ty + r;
            if y >= h {
                continue;
            }
            let src = &plane[y * w..(y + 1) * w];
            let (even, odd) = eo[r * 2 * tw..(r + 1) * 2 * tw].split_at_mut(tw);
            for (k, pair) in src.chunks_exact(2).enumerate() {
                even[k] = pair[0];
                odd[k] = pair[1];
            }
            if w % 2 == 1 {
                even[w / 2] = src[w - 1];
            }
        }
        let (e0, o0, e1, o1) = (&eo[..tw], &eo[tw..2 * tw], &eo[2 * tw..3 * tw], &eo[3 * tw..]);
        let base = col0 + ty * tw;
        // Rows of A dY: y0, y0 + y1, y0 - y1, -y1; then each row (a, b) -> (a, a + b, a - b, -b).
        for i in 0..4 {
            let slots = &mut m[i * 4 * n..(i * 4 + 4) * n];
            let (s0, rest) = slots.split_at_mut(n);
            let (s1, rest) = rest.split_at_mut(n);
            let (s2, s3) = rest.split_at_mut(n);
            let (s0, s1, s2, s3) = (&mut s0[base..base + tw], &mut s1[base..base + tw], &mut s2[base..base + tw], &mut s3[base..base + tw]);
            for tx in 0..tw {
                let (a, b) = match i {
                    0 => (e0[tx], o0[tx]),
                    1 => (e0[tx] + e1[tx], o0[tx] + o1[tx]),
                    2 => (e0[tx] - e1[tx], o0[tx] - o1[tx]),
                    _ => (-e1[tx], -o1[tx]),
                };
                s0[tx] = a;
                s1[tx] = a + b;
                s2[tx] = a - b;
                s3[tx] = -b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn direct(x: &[f32], b: usize, c: usize, h: usize, w: usize, k: &[f32], o: usize, bias: Option<&[f32]>) -> Vec<f64> {
        let mut out = vec![0f64; b * o * h * w];
        for bi in 0..b {
            for oi in 0..o {
                for y in 0..h {
                    for xx in 0..w {
                        let mut acc = bias.map_or(0.0, |b| b[oi] as f64);
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        acc += x[((bi * c + ci) * h + iy as usize) * w + ix as usize] as f64 * k[((oi * c + ci) * 3 + ky) * 3 + kx] as f64;
                                    }
                                }
                            }
                        }
                        out[((bi * o + oi) * h + y) * w + xx] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_direct_convolution_on_even_and_odd_sizes() {
        for &(b, c, h, w, o) in &[(2usize, 3usize, 8usize, 8usize, 4usize), (3, 5, 7, 5, 2), (1, 2, 1, 1, 3), (2, 4, 6, 9, 6), (40, 2, 4, 4, 3)] {
            let x = lcg(1, b * c * h * w);
            let k = lcg(2, o * c * 9);
            let bias = lcg(3, o);
            let mut out = vec![f32::NAN; b * o * h * w];
            conv3x3(&x, b, c, h, w, Kernel::Forward(&transform_weights(&k, o, c)), o, Some(&bias), &mut out);
            let want = direct(&x, b, c, h, w, &k, o, Some(&bias));
            for (i, (a, e)) in out.iter().zip(&want).enumerate() {
                assert!((*a as f64 - e).abs() < 1e-5 * (1.0 + e.abs()), "b{b} c{c} {h}x{w} o{o} at {i}: {a} vs {e}");
            }
        }
    }

    #[test]
    fn weight_gradient_matches_direct_sum() {
        for &(b, c, h, w, o) in &[(2usize, 3usize, 6usize, 6usize, 4usize), (3, 2, 5, 7, 3), (40, 2, 3, 2, 2)] {
            let x = lcg(7, b * c * h * w);
            let dy = lcg(8, b * o * h * w);
            let dw = conv3x3_weight_grad(&x, &dy, b, c, h, w, o);
            for oi in 0..o {
                for ci in 0..c {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let mut want = 0f64;
                            for bi in 0..b {
                                for y in 0..h {
                                    for xx in 0..w {
                                        let (iy, ix) = (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                            want += dy[((bi * o + oi) * h + y) * w + xx] as f64 * x[((bi * c + ci) * h + iy as usize) * w + ix as usize] as f64;
                                        }
                                    }
                                }
                            }
                            let got = dw[((oi * c + ci) * 3 + ky) * 3 + kx] as f64;
                            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "b{b} c{c} {h}x{w} o{o} [{oi},{ci},{ky},{kx}]: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn input_gradient_kernel_is_the_adjoint() {
        // <conv(x), r> == <x, conv_T(r)> for any x, r.
        let (b, c, h, w, o) = (2usize, 3usize, 5usize, 6usize, 4usize);
        let x = lcg(4, b * c * h * w);
        let r = lcg(5, b * o * h * w);
        let k = lcg(6, o * c * 9);
        let mut y = vec![0f32; b * o * h * w];
        conv3x3(&x, b, c, h, w, Kernel::Forward(&transform_weights(&k, o, c)), o, None, &mut y);
        let mut dx = vec![0f32; b * c * h * w];
        conv3x3(&r, b, o, h, w, Kernel::InputGrad(&transform_weights(&k, o, c)), c, None, &mut dx);
        let lhs: f64 = y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
    }
}

