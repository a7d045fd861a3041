//! Winograd F(2x2, 3x3): 4x4 input tiles, 16 slots, 2x2 outputs per tile. Used for the
//! convolutions whose batch has few pixels for their channels (see [`super::choose`]).

/// `B^T d B` for every 4x4 tile of one padded plane, into `v [16][n]` at columns
/// `col0 + ty * tw + tx`.
///
/// The transform is separable. The horizontal half `d B` is done once per input row (each
/// row belongs to two tile rows): with the padded row split into even and odd columns, tile
/// `tx` reads `(E[tx], O[tx], E[tx+1], O[tx+1])`, so it is four contiguous, vectorisable
/// loops. The vertical half `B^T (.)` then combines four of those rows per tile row.
#[allow(clippy::too_many_arguments)]
pub(super) fn transform_input_plane(plane: &[f32], h: usize, w: usize, th: usize, tw: usize, v: &mut [f32], n: usize, col0: usize, scratch: &mut Vec<f32>) {
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
pub(super) fn transform_output_plane(m: &[f32], n: usize, col0: usize, th: usize, tw: usize, h: usize, w: usize, bias: f32, dst: &mut [f32], scratch: &mut Vec<f32>) {
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

/// `A dY A^T` for every 2x2 tile of one output-gradient plane, into `m [16][n]` at columns
/// `col0 + ty * tw + tx`; positions past an odd edge are zeros (no output there).
#[allow(clippy::too_many_arguments)]
pub(super) fn transform_output_grad_plane(plane: &[f32], h: usize, w: usize, th: usize, tw: usize, m: &mut [f32], n: usize, col0: usize, scratch: &mut Vec<f32>) {
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
