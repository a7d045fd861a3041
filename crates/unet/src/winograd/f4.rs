//! Winograd F(4x4, 3x3): 6x6 input tiles, 36 slots, 4x4 outputs per tile.

use super::{lanes, slots, OUT4 as OUT};

/// `B^T d B` of six values (a column or a row of a tile).
#[inline(always)]
fn input_1d(d: [f32; 6]) -> [f32; 6] {
    let (a, b) = (d[4] - 4.0 * d[2], d[3] - 4.0 * d[1]);
    let (c, e) = (d[4] - d[2], 2.0 * (d[3] - d[1]));
    [4.0 * d[0] - 5.0 * d[2] + d[4], a + b, a - b, c + e, c - e, 4.0 * d[1] - 5.0 * d[3] + d[5]]
}

/// `B^T d B` for every 6x6 tile of one padded plane, into `v [36][n]` at columns
/// `col0 + ty * tw + tx`.
///
/// The transform is separable. The horizontal half `d B` is done once per input row (each
/// row belongs to one or two tile rows): with the padded rows split into their four column
/// phases `P [4][h][tw + 1]`, tile `tx` of row `iy` reads `(P0, P1, P2, P3)[iy][tx]` and
/// `(P0, P1)[iy][tx + 1]`, so the whole plane is six contiguous, vectorisable loops over
/// `iy (tw + 1) + tx` (the extra column per row is computed and never read). The vertical half
/// `B^T (.)` then combines six of those rows per tile row.
#[allow(clippy::too_many_arguments)]
pub(super) fn transform_input_plane(plane: &[f32], h: usize, w: usize, th: usize, tw: usize, v: &mut [f32], n: usize, col0: usize, scratch: &mut Vec<f32>) {
    let stride = tw + 1;
    let len = h * stride;
    // P [4][len + 1] (one spare so that `P[i + 1]` exists for the last i), H [6][len], and a
    // row of zeros for the padding rows.
    if scratch.len() < 4 * (len + 1) + 6 * len + tw {
        scratch.resize(4 * (len + 1) + 6 * len + tw, 0.0);
    }
    let (phases, rest) = scratch.split_at_mut(4 * (len + 1));
    let (hrows, zeros) = rest.split_at_mut(6 * len);
    let zeros = &mut zeros[..tw];
    zeros.fill(0.0);
    {
        let [p0, p1, p2, p3] = slots(phases, 0, len + 1, len + 1);
        // Padded column j = ix + 1 is phase j % 4, index j / 4; entries no column maps to
        // are zeros.
        for iy in 0..h {
            let (src, row) = (&plane[iy * w..(iy + 1) * w], iy * stride);
            let k = w / 4;
            p0[row] = 0.0;
            for (q, i) in src.chunks_exact(4).zip(row..) {
                p1[i] = q[0];
                p2[i] = q[1];
                p3[i] = q[2];
                p0[i + 1] = q[3];
            }
            let rem = &src[4 * k..];
            p1[row + k] = rem.first().copied().unwrap_or(0.0);
            p2[row + k] = rem.get(1).copied().unwrap_or(0.0);
            p3[row + k] = rem.get(2).copied().unwrap_or(0.0);
            for p in [&mut *p0, &mut *p1, &mut *p2, &mut *p3] {
                p[row + k + 1..row + stride].fill(0.0);
            }
        }
        p0[len] = 0.0;
        p1[len] = 0.0;
    }
    let (p0, p1, p2, p3) = (&phases[..len + 1], &phases[len + 1..2 * (len + 1)], &phases[2 * (len + 1)..3 * (len + 1)], &phases[3 * (len + 1)..]);
    {
        lanes(len, [p0, p1, p2, p3, &p0[1..], &p1[1..]], slots::<6>(hrows, 0, len, len), input_1d);
    }
    let zeros = &*zeros;
    for ty in 0..th {
        let base = col0 + ty * tw;
        for k in 0..6 {
            let hk = &hrows[k * len..(k + 1) * len];
            // Tile row ty covers padded rows 4 ty ..= 4 ty + 5, i.e. input rows 4 ty - 1 ..= 4 ty + 4.
            let row = |i: usize| match (OUT * ty + i).checked_sub(1) {
                Some(iy) if iy < h => &hk[iy * stride..iy * stride + tw],
                _ => zeros,
            };
            // Slots k, 6 + k, ..., 30 + k: rows 0..6 of B^T (.) for column k of the tile.
            lanes(tw, std::array::from_fn(row), slots::<6>(v, k * n + base, 6 * n, tw), input_1d);
        }
    }
}

/// `A^T m A` of six values.
#[inline(always)]
fn output_1d(m: [f32; 6]) -> [f32; 4] {
    let (p, q) = (m[1] + m[2], m[1] - m[2]);
    let (r, s) = (m[3] + m[4], m[3] - m[4]);
    [m[0] + p + r, q + 2.0 * s, p + 4.0 * r, q + 8.0 * s + m[5]]
}

/// `A^T m A` (+ bias) for every tile of one output plane, from `m [36][n]` at columns
/// `col0 + ty * tw + tx`; tiles hanging over an edge write only their inside.
///
/// The plane's tiles are contiguous in every slot, so the vertical half `A^T (.)` runs over
/// all of them at once; the horizontal half then writes each output row.
#[allow(clippy::too_many_arguments)]
pub(super) fn transform_output_plane(m: &[f32], n: usize, col0: usize, th: usize, tw: usize, h: usize, w: usize, bias: f32, dst: &mut [f32], scratch: &mut Vec<f32>) {
    let tiles = th * tw;
    // t [4][6][tiles]: row r of A^T m for tile column j; then one output row of 4 tw.
    let t_len = OUT * 6 * tiles;
    if scratch.len() < t_len + OUT * tw {
        scratch.resize(t_len + OUT * tw, 0.0);
    }
    let (t, y) = scratch.split_at_mut(t_len);
    let y = &mut y[..OUT * tw];
    for j in 0..6 {
        let slot = |i: usize| &m[(6 * i + j) * n + col0..(6 * i + j) * n + col0 + tiles];
        lanes(tiles, std::array::from_fn(slot), slots::<4>(t, j * tiles, 6 * tiles, tiles), output_1d);
    }
    for ty in 0..th {
        for r in 0..OUT.min(h - OUT * ty) {
            let col = |j: usize| &t[(r * 6 + j) * tiles + ty * tw..(r * 6 + j) * tiles + (ty + 1) * tw];
            let (c0, c1, c2, c3, c4, c5) = (col(0), col(1), col(2), col(3), col(4), col(5));
            for (tx, out) in y.chunks_exact_mut(OUT).enumerate() {
                let o = output_1d([c0[tx], c1[tx], c2[tx], c3[tx], c4[tx], c5[tx]]);
                for (d, v) in out.iter_mut().zip(o) {
                    *d = v + bias;
                }
            }
            let oy = OUT * ty + r;
            dst[oy * w..(oy + 1) * w].copy_from_slice(&y[..w]);
        }
    }
}

/// `A y` of four values (a column or a row of an output tile's gradient).
#[inline(always)]
fn output_grad_1d(y: [f32; 4]) -> [f32; 6] {
    let (p, q) = (y[0] + y[2], y[1] + y[3]);
    let (r, s) = (y[0] + 4.0 * y[2], 2.0 * y[1] + 8.0 * y[3]);
    [y[0], p + q, p - q, r + s, r - s, y[3]]
}

/// `A dY A^T` for every 4x4 tile of one output-gradient plane, into `m [36][n]` at columns
/// `col0 + ty * tw + tx`; positions past an edge are zeros (no output there).
#[allow(clippy::too_many_arguments)]
pub(super) fn transform_output_grad_plane(plane: &[f32], h: usize, w: usize, th: usize, tw: usize, m: &mut [f32], n: usize, col0: usize, scratch: &mut Vec<f32>) {
    // ph [4 rows][4 phases][tw]: the tile row's gradient rows split into column phases; then
    // z [6][4 phases][tw], the vertical half A (.).
    let (ph_len, z_len) = (OUT * OUT * tw, 6 * OUT * tw);
    if scratch.len() < ph_len + z_len {
        scratch.resize(ph_len + z_len, 0.0);
    }
    let (ph, z) = scratch.split_at_mut(ph_len);
    for ty in 0..th {
        ph.fill(0.0);
        for r in 0..OUT {
            let y = OUT * ty + r;
            if y >= h {
                break;
            }
            let src = &plane[y * w..(y + 1) * w];
            let [e0, e1, e2, e3] = slots(ph, r * OUT * tw, tw, tw);
            let mut quads = src.chunks_exact(OUT);
            for (k, q) in quads.by_ref().enumerate() {
                e0[k] = q[0];
                e1[k] = q[1];
                e2[k] = q[2];
                e3[k] = q[3];
            }
            for (e, &v) in [e0, e1, e2].into_iter().zip(quads.remainder()) {
                e[w / OUT] = v;
            }
        }
        {
            let row = |r: usize| &ph[r * OUT * tw..(r + 1) * OUT * tw];
            lanes(OUT * tw, std::array::from_fn(row), slots::<6>(z, 0, OUT * tw, OUT * tw), output_grad_1d);
        }
        let base = col0 + ty * tw;
        for i in 0..6 {
            let zi = &z[i * OUT * tw..(i + 1) * OUT * tw];
            lanes(tw, std::array::from_fn(|c| &zi[c * tw..(c + 1) * tw]), slots::<6>(m, i * 6 * n + base, n, tw), output_grad_1d);
        }
    }
}
