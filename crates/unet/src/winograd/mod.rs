//! Winograd convolution for the CPU's 3x3, stride-1, padding-1 convolutions.
//!
//! Those convolutions carry almost all of the UNet's FLOPs. Winograd's minimal filtering
//! computes a tile of outputs from a slightly larger tile of inputs with one multiply per
//! channel pair and input-tile element; the tile transforms are additions and small multiplies.
//! Two tilings, the same code around them:
//!
//! - F(4x4, 3x3) (`f4`): 6x6 input tiles, 36 slots for 16 outputs, 2.25 multiplies per output
//!   and channel pair instead of im2col's 9; the tile transforms, which are bound by their
//!   stores, write 2.25 floats per pixel.
//! - F(2x2, 3x3) (`f2`): 4x4 input tiles, 16 slots for 4 outputs: 4 multiplies per output and
//!   4 floats per pixel, but only 16 slots of transformed kernel per channel pair against 36.
//!
//! F(2x2) is used where the batch has few pixels for its channels (the 8x8 levels of the
//! 256-channel reference model at small batches): there the kernel-side arrays (transformed
//! kernels, their gradient, each slots x C x O floats) outweigh the tile-side work
//! ([`choose`]); F(4x4) everywhere else.
//!
//! The input gradient of such a convolution is the same convolution of dY with the kernel
//! rotated 180 degrees and its channel axes swapped, so it goes through [`conv3x3`] too; the
//! weight gradient is one GEMM per slot over the tiles ([`conv3x3_weight_grad`]).
//!
//! Layout, per chunk of images whose tiles are the GEMMs' N dimension: transformed inputs
//! `V [C][S][N]`, transformed weights `U [S][O][C]`, products `M [O][S][N]` for `S` slots; the
//! `S` GEMMs `M[p] = U[p] V[p]` are independent and run in parallel.
//!
//! F(4x4)'s matrices (interpolation points 0, 1, -1, 2, -2, infinity; Lavin and Gray, 2016):
//! `B^T` rows `[4 0 -5 0 1 0] [0 -4 -4 1 1 0] [0 4 -4 -1 1 0] [0 -2 -1 2 1 0] [0 2 -1 -2 1 0]
//! [0 4 0 -5 0 1]`, `G` below, `A^T` rows `[1 1 1 1 1 0] [0 1 -1 2 -2 0] [0 1 1 4 4 0]
//! [0 1 -1 8 -8 1]`.

mod f2;
mod f4;

use rayon::prelude::*;
use std::cell::RefCell;

/// Outputs per tile side of F(4x4).
const OUT4: usize = 4;
/// GEMM width (tiles) a chunk of images aims for: wide enough to run the GEMM kernels well,
/// small enough that `V` and `M` stay within a few MB per chunk.
const TARGET_TILES: usize = 512;

const G4: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
const G2: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// Which tiling a convolution pass uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    F2,
    F4,
}

impl Variant {
    /// The interpolation matrix `G` (side x 3).
    fn g(self) -> &'static [[f32; 3]] {
        match self {
            Variant::F2 => &G2,
            Variant::F4 => &G4,
        }
    }

    /// Input tile side.
    fn side(self) -> usize {
        self.g().len()
    }

    fn slots(self) -> usize {
        self.side() * self.side()
    }

    fn tiles(self, h: usize, w: usize) -> (usize, usize) {
        let out = self.side() - 2;
        (h.div_ceil(out), w.div_ceil(out))
    }

    /// `B^T d B` of every tile of one plane into `v [S][n]` at columns `col0 + ty tw + tx`.
    #[allow(clippy::too_many_arguments)]
    fn input_plane(self, plane: &[f32], h: usize, w: usize, th: usize, tw: usize, v: &mut [f32], n: usize, col0: usize, scratch: &mut Vec<f32>) {
        match self {
            Variant::F2 => f2::transform_input_plane(plane, h, w, th, tw, v, n, col0, scratch),
            Variant::F4 => f4::transform_input_plane(plane, h, w, th, tw, v, n, col0, scratch),
        }
    }

    /// `A^T m A` (+ bias) of every tile of one output plane.
    #[allow(clippy::too_many_arguments)]
    fn output_plane(self, m: &[f32], n: usize, col0: usize, th: usize, tw: usize, h: usize, w: usize, bias: f32, dst: &mut [f32], scratch: &mut Vec<f32>) {
        match self {
            Variant::F2 => f2::transform_output_plane(m, n, col0, th, tw, h, w, bias, dst, scratch),
            Variant::F4 => f4::transform_output_plane(m, n, col0, th, tw, h, w, bias, dst, scratch),
        }
    }

    /// `A dY A^T` of every tile of one output-gradient plane.
    #[allow(clippy::too_many_arguments)]
    fn output_grad_plane(self, plane: &[f32], h: usize, w: usize, th: usize, tw: usize, m: &mut [f32], n: usize, col0: usize, scratch: &mut Vec<f32>) {
        match self {
            Variant::F2 => f2::transform_output_grad_plane(plane, h, w, th, tw, m, n, col0, scratch),
            Variant::F4 => f4::transform_output_grad_plane(plane, h, w, th, tw, m, n, col0, scratch),
        }
    }
}

/// Forces one tiling for every pass when `UNET_WINOGRAD` is `f2` or `f4` (for A/B benchmarks
/// and tests); otherwise `auto` picks it.
fn forced() -> Option<Variant> {
    static V: std::sync::OnceLock<Option<Variant>> = std::sync::OnceLock::new();
    *V.get_or_init(|| match std::env::var("UNET_WINOGRAD").as_deref() {
        Ok("f2") => Some(Variant::F2),
        Ok("f4") => Some(Variant::F4),
        _ => None,
    })
}

/// The tiling of a convolution (any of its three passes) over `b` images of `h x w` from `c`
/// to `o` channels. F(4x4) saves multiplies and tile-side traffic in proportion to the
/// batch's pixels and costs 20 more kernel-side floats per channel pair (its transformed
/// kernels, and in the backward pass their gradient), so it pays when the pixels outnumber
/// `c o / (c + o)` by enough. Measured with `examples/conv_shapes.rs` (docs/BENCHMARKS.md):
/// F(2x2) is ahead at 8x8 with 8 images of 256 or 512 input and 256 output channels, F(4x4)
/// at 16x16 and above, and at 8x8 with 32 images of 64-128 channels.
pub(crate) fn choose(b: usize, h: usize, w: usize, c: usize, o: usize) -> Variant {
    forced().unwrap_or(if b * h * w >= 8 * c * o / (c + o).max(1) { Variant::F4 } else { Variant::F2 })
}

/// `dst = sum of k * row over (k, row)`, skipping zero coefficients.
fn combine<'a>(dst: &mut [f32], terms: impl IntoIterator<Item = (f32, &'a [f32])>) {
    dst.fill(0.0);
    for (k, row) in terms {
        if k != 0.0 {
            for (d, &s) in dst.iter_mut().zip(row) {
                *d += k * s;
            }
        }
    }
}

/// `U [S][O][C]` of the convolution with kernel `w [O][C][3][3]`.
pub(crate) fn transform_weights(v: Variant, w: &[f32], o: usize, c: usize) -> Vec<f32> {
    transform_weights_with(v, o, c, |oi, taps| {
        for (ci, k) in w[oi * c * 9..(oi + 1) * c * 9].chunks_exact(9).enumerate() {
            for (tap, &x) in k.iter().enumerate() {
                taps[tap * c + ci] = x;
            }
        }
    })
}

/// `U [S][C][O]` of the input gradient of the convolution with kernel `w [O][C][3][3]`: that
/// gradient is the convolution of dY with the kernel rotated 180 degrees and its channel axes
/// swapped. (F(2x2)'s transform commutes with the rotation up to a slot permutation, F(4x4)'s
/// does not: its points 2 and -2 rotate to 1/2 and -1/2. The rotated kernel is transformed
/// afresh for both: S C O floats, small next to the convolution.)
pub(crate) fn transform_weights_input_grad(v: Variant, w: &[f32], o: usize, c: usize) -> Vec<f32> {
    transform_weights_with(v, c, o, |ci, taps| {
        for oi in 0..o {
            let k = &w[(oi * c + ci) * 9..(oi * c + ci) * 9 + 9];
            for (tap, &x) in k.iter().rev().enumerate() {
                taps[tap * o + oi] = x;
            }
        }
    })
}

/// `U [S][rows][cols] = G g G^T` per kernel, where `gather(r, taps)` writes row `r`'s kernels
/// as `taps [9][cols]` (tap-major, so that the transform runs along contiguous columns).
fn transform_weights_with(v: Variant, rows: usize, cols: usize, gather: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let (g, s) = (v.g(), v.side());
    let mut u = vec![0f32; v.slots() * rows * cols];
    let up = SyncPtr(u.as_mut_ptr());
    (0..rows).into_par_iter().for_each_init(Vec::new, |scratch: &mut Vec<f32>, r| {
        // taps [9][cols], then G g as [side][3][cols].
        scratch.resize((9 + 3 * s) * cols, 0.0);
        let (taps, gg) = scratch.split_at_mut(9 * cols);
        gather(r, taps);
        let taps = &*taps;
        for (i, gi) in g.iter().enumerate() {
            for j in 0..3 {
                combine(&mut gg[(i * 3 + j) * cols..(i * 3 + j + 1) * cols], (0..3).map(|k| (gi[k], &taps[(3 * k + j) * cols..(3 * k + j + 1) * cols])));
            }
        }
        let gg = &*gg;
        for i in 0..s {
            for (j, gj) in g.iter().enumerate() {
                // SAFETY: slot (i, j)'s row r is `cols` floats within u, and row r is this task's only.
                let dst = unsafe { std::slice::from_raw_parts_mut(up.ptr().add(((i * s + j) * rows + r) * cols), cols) };
                combine(dst, (0..3).map(|l| (gj[l], &gg[(i * 3 + l) * cols..(i * 3 + l + 1) * cols])));
            }
        }
    });
    u
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

/// `out [B][O][H][W] = conv3x3(x [B][C][H][W], padding 1) (+ bias)`, with `u [S][O][C]` from
/// [`transform_weights`] (or [`transform_weights_input_grad`]) of the same variant. Every
/// element of `out` is written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3(v: Variant, x: &[f32], b: usize, c: usize, h: usize, w: usize, u: &[f32], o: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    let slots = v.slots();
    assert_eq!(u.len(), slots * o * c, "transformed kernel of another shape or variant");
    let (th, tw) = v.tiles(h, w);
    let tiles = th * tw;
    for_each_chunk(v, x, b, c, h, w, o, |chunk, vt, m| {
        let (n, ns) = (chunk.n, chunk.ns);
        let mp = SyncPtr(m.as_mut_ptr());
        let vp = vt.as_ptr() as usize;
        (0..slots).into_par_iter().for_each(|p| {
            // SAFETY: slot p of M is [O][N] at row stride S ns; U[p] is [O][C]; V's slot p is
            // [C][N] at row stride S ns; all within the slices `for_each_chunk` sized.
            unsafe {
                gemm::gemm(
                    o, n, c,
                    mp.ptr().add(p * ns), 1, (slots * ns) as isize,
                    false,
                    u[p * o * c..].as_ptr(), 1, c as isize,
                    (vp as *const f32).add(p * ns), 1, (slots * ns) as isize,
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
            v.output_plane(&m[oi * slots * ns..(oi + 1) * slots * ns], ns, img * tiles, th, tw, h, w, bv, dst, scratch);
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
    /// Stride between the slots of a channel (`n` plus padding).
    ns: usize,
}

/// Splits the batch into chunks of about `TARGET_TILES` tiles and calls `f` for each with the
/// chunk's transformed input `V [C][S][ns]` and a buffer for `M [O][S][ns]`; both are kept
/// per thread across calls.
#[allow(clippy::too_many_arguments)]
fn for_each_chunk(v: Variant, x: &[f32], b: usize, c: usize, h: usize, w: usize, o: usize, mut f: impl FnMut(&Chunk, &[f32], &mut [f32])) {
    let slots = v.slots();
    let (th, tw) = v.tiles(h, w);
    let tiles = th * tw;
    let per_chunk = TARGET_TILES.div_ceil(tiles).clamp(1, b.max(1));
    // Taken out of their slots for the call, not borrowed (as `conv::with_scratch`): a call
    // nested through rayon's work stealing then gets buffers of its own instead of a panic.
    let (mut vb, mut mb) = (V_BUF.with(|b| b.take()), M_BUF.with(|b| b.take()));
    for (index, first) in (0..b).step_by(per_chunk).enumerate() {
        let imgs = per_chunk.min(b - first);
        let n = imgs * tiles;
        // Slot stride: slots an exact multiple of 4 KB apart would share L1 sets.
        let ns = n + 16;
        if vb.len() < c * slots * ns {
            vb.resize(c * slots * ns, 0.0);
        }
        if mb.len() < o * slots * ns {
            mb.resize(o * slots * ns, 0.0);
        }
        let vt = &mut vb[..c * slots * ns];
        let xs = &x[first * c * h * w..(first + imgs) * c * h * w];
        vt.par_chunks_mut(slots * ns).enumerate().for_each_init(Vec::new, |scratch, (ci, vc)| {
            for img in 0..imgs {
                let plane = &xs[(img * c + ci) * h * w..(img * c + ci + 1) * h * w];
                v.input_plane(plane, h, w, th, tw, vc, ns, img * tiles, scratch);
            }
        });
        f(&Chunk { index, first, imgs, n, ns }, vt, &mut mb[..o * slots * ns]);
    }
    for (slot, buf) in [(&V_BUF, vb), (&M_BUF, mb)] {
        slot.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < buf.len() {
                *s = buf;
            }
        });
    }
}

/// `out[k][i] = f([inp[0][i], inp[1][i], ..])[k]` for `i < len`, in blocks of eight lanes,
/// then four, then one at a time.
///
/// The results go through a local block: stored straight into the slices, LLVM would need
/// run-time overlap checks between all of them (up to twelve) and leaves the loop scalar.
#[inline(always)]
fn lanes<const I: usize, const O: usize>(len: usize, inp: [&[f32]; I], mut out: [&mut [f32]; O], f: impl Fn([f32; I]) -> [f32; O]) {
    let mut i = 0;
    while i + 8 <= len {
        lane_block::<8, I, O>(i, &inp, &mut out, &f);
        i += 8;
    }
    if i + 4 <= len {
        lane_block::<4, I, O>(i, &inp, &mut out, &f);
        i += 4;
    }
    for j in i..len {
        let v = f(std::array::from_fn(|k| inp[k][j]));
        for k in 0..O {
            out[k][j] = v[k];
        }
    }
}

/// Lanes `i .. i + L` of [`lanes`].
#[inline(always)]
fn lane_block<const L: usize, const I: usize, const O: usize>(i: usize, inp: &[&[f32]; I], out: &mut [&mut [f32]; O], f: &impl Fn([f32; I]) -> [f32; O]) {
    let a: [&[f32; L]; I] = std::array::from_fn(|k| inp[k][i..i + L].try_into().expect("L lanes"));
    let mut r = [[0f32; L]; O];
    for l in 0..L {
        let v = f(std::array::from_fn(|k| a[k][l]));
        for k in 0..O {
            r[k][l] = v[k];
        }
    }
    for k in 0..O {
        out[k][i..i + L].copy_from_slice(&r[k]);
    }
}

/// `len` elements at `start`, `start + step`, ..., `start + (K - 1) step` of `v`, as `K`
/// disjoint slices (`len <= step`), so that one loop writes all of them.
fn slots<const K: usize>(v: &mut [f32], start: usize, step: usize, len: usize) -> [&mut [f32]; K] {
    let mut rest = &mut v[start..start + (K - 1) * step + len];
    std::array::from_fn(|k| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(if k + 1 < K { step } else { len });
        rest = tail;
        &mut head[..len]
    })
}

/// The weight gradient `dW [O][C][3][3]` of [`conv3x3`] from its input `x [B][C][H][W]` and
/// output gradient `dy [B][O][H][W]`.
///
/// With `Y = A^T (U . V) A` per tile, `dU = sum over tiles (A dY A^T) . V` and `dW = G^T dU G`:
/// the slots are GEMMs `dU[p]^T = V[p] dM[p]^T` over the tiles, 2.25x (F(2x2)) or 4x (F(4x4))
/// fewer FLOPs than im2col's `cols dY^T`, with the same operand orientation (both contiguous
/// along tiles).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3_weight_grad(v: Variant, x: &[f32], dy: &[f32], b: usize, c: usize, h: usize, w: usize, o: usize) -> Vec<f32> {
    let (slots, s, g) = (v.slots(), v.side(), v.g());
    let (th, tw) = v.tiles(h, w);
    let tiles = th * tw;
    // dU^T [S][C][O], accumulated over chunks.
    let mut du = vec![0f32; slots * c * o];
    for_each_chunk(v, x, b, c, h, w, o, |chunk, vt, m| {
        let (n, ns) = (chunk.n, chunk.ns);
        let dys = &dy[chunk.first * o * h * w..(chunk.first + chunk.imgs) * o * h * w];
        m.par_chunks_mut(slots * ns).enumerate().for_each_init(Vec::new, |scratch, (oi, mc)| {
            for img in 0..chunk.imgs {
                let plane = &dys[(img * o + oi) * h * w..(img * o + oi + 1) * h * w];
                v.output_grad_plane(plane, h, w, th, tw, mc, ns, img * tiles, scratch);
            }
        });
        let dp = SyncPtr(du.as_mut_ptr());
        let (vp, mp) = (vt.as_ptr() as usize, m.as_ptr() as usize);
        (0..slots).into_par_iter().for_each(|p| {
            // SAFETY: slot p of dU^T is [C][O] (contiguous, disjoint per p); V's and dM's slots p
            // are [C][N] and [O][N] at row stride S ns, within the slices `for_each_chunk` sized.
            unsafe {
                gemm::gemm(
                    c, o, n,
                    dp.ptr().add(p * c * o), 1, o as isize,
                    chunk.index > 0,
                    (vp as *const f32).add(p * ns), 1, (slots * ns) as isize,
                    (mp as *const f32).add(p * ns), (slots * ns) as isize, 1,
                    1.0, 1.0,
                    false, false, false,
                    gemm::Parallelism::None,
                )
            }
        });
    });
    // dW = G^T dU G per (o, c). dU^T's slots are contiguous along o, so each task takes one
    // input channel and transforms its slot rows along o into a [C][9][O] staging copy; the
    // final transpose to [O][C][9] gathers 9 floats per kernel.
    let mut staged = vec![0f32; c * 9 * o];
    staged.par_chunks_mut(9 * o).enumerate().for_each_init(Vec::new, |t: &mut Vec<f32>, (ci, out)| {
        let row = |p: usize| &du[(p * c + ci) * o..(p * c + ci + 1) * o];
        // T = G^T dU as [3][side][o].
        t.resize(3 * s * o, 0.0);
        for a in 0..3 {
            for j in 0..s {
                combine(&mut t[(a * s + j) * o..(a * s + j + 1) * o], (0..s).map(|i| (g[i][a], row(i * s + j))));
            }
        }
        let t = &*t;
        for a in 0..3 {
            for bb in 0..3 {
                combine(&mut out[(a * 3 + bb) * o..(a * 3 + bb + 1) * o], (0..s).map(|j| (g[j][bb], &t[(a * s + j) * o..(a * s + j + 1) * o])));
            }
        }
    });
    let mut dw = vec![0f32; o * c * 9];
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(oi, row)| {
        for (ci, k) in row.chunks_exact_mut(9).enumerate() {
            for (tap, x) in k.iter_mut().enumerate() {
                *x = staged[(ci * 9 + tap) * o + oi];
            }
        }
    });
    dw
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [Variant; 2] = [Variant::F2, Variant::F4];

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
        let shapes = [(2usize, 3usize, 8usize, 8usize, 4usize), (3, 5, 7, 5, 2), (1, 2, 1, 1, 3), (2, 4, 6, 9, 6), (40, 2, 4, 4, 3), (2, 3, 3, 7, 2), (1, 4, 10, 11, 5), (2, 16, 12, 12, 3)];
        for (v, &(b, c, h, w, o)) in BOTH.iter().flat_map(|&v| shapes.iter().map(move |s| (v, s))) {
            let x = lcg(1, b * c * h * w);
            let k = lcg(2, o * c * 9);
            let bias = lcg(3, o);
            let mut out = vec![f32::NAN; b * o * h * w];
            conv3x3(v, &x, b, c, h, w, &transform_weights(v, &k, o, c), o, Some(&bias), &mut out);
            let want = direct(&x, b, c, h, w, &k, o, Some(&bias));
            for (i, (a, e)) in out.iter().zip(&want).enumerate() {
                // F(4x4)'s transforms round more (largest seen here 1.3e-5, F(2x2)'s 1.8e-6).
                let tol = if v == Variant::F2 { 1e-5 } else { 3e-5 };
                assert!((*a as f64 - e).abs() < tol * (1.0 + e.abs()), "{v:?} b{b} c{c} {h}x{w} o{o} at {i}: {a} vs {e}");
            }
        }
    }

    #[test]
    fn weight_gradient_matches_direct_sum() {
        let shapes = [(2usize, 3usize, 6usize, 6usize, 4usize), (3, 2, 5, 7, 3), (40, 2, 3, 2, 2), (2, 2, 9, 10, 3)];
        for (v, &(b, c, h, w, o)) in BOTH.iter().flat_map(|&v| shapes.iter().map(move |s| (v, s))) {
            let x = lcg(7, b * c * h * w);
            let dy = lcg(8, b * o * h * w);
            let dw = conv3x3_weight_grad(v, &x, &dy, b, c, h, w, o);
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
                            assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{v:?} b{b} c{c} {h}x{w} o{o} [{oi},{ci},{ky},{kx}]: {got} vs {want}");
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
        for v in BOTH {
            let x = lcg(4, b * c * h * w);
            let r = lcg(5, b * o * h * w);
            let k = lcg(6, o * c * 9);
            let mut y = vec![0f32; b * o * h * w];
            conv3x3(v, &x, b, c, h, w, &transform_weights(v, &k, o, c), o, None, &mut y);
            let mut dx = vec![0f32; b * c * h * w];
            conv3x3(v, &r, b, o, h, w, &transform_weights_input_grad(v, &k, o, c), c, None, &mut dx);
            let lhs: f64 = y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()), "{v:?}: {lhs} vs {rhs}");
        }
    }
}

