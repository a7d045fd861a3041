//! unet's CUDA kernels (`src/kernels.cu`: GroupNorm, softmax, x2 upsampling) run on the CPU under a small
//! emulator (`tests/cuda_emu`: a thread per CUDA thread, real barriers and warp shuffles),
//! against the CPU ops, forward and backward, in f32 and bf16. Their indexing, block
//! reductions and bf16 rounding are checked here, where there is no GPU; the GPU itself is
//! checked by `cargo xtask-cuda self-test --device cuda`.
//!
//! Needs a C++20 compiler (`$CXX`, else `g++`): without one the test says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use unet::norm::{GroupNorm, HashedDropout};

fn compile(dir: &Path) -> Option<PathBuf> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = dir.join("kernels_main");
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-include"])
        .arg(root.join("tests/cuda_emu/shim.h"))
        .arg("-I")
        .arg(root.join("src"))
        .arg(root.join("tests/cuda_emu/main.cpp"))
        .arg("-o")
        .arg(&exe)
        .status();
    match status {
        Ok(s) if s.success() => Some(exe),
        Ok(s) => panic!("{cxx} failed to build the kernel emulator ({s}): the kernel source or the shim does not compile"),
        Err(e) => {
            eprintln!("SKIPPED: no C++ compiler '{cxx}' to emulate the CUDA kernels ({e})");
            None
        }
    }
}

fn values(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale + offset
        })
        .collect()
}

fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| (x.to_bits() >> 16) as u16).collect()
}

fn from_bf16_bits(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect()
}

fn write_f32(path: PathBuf, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn write_u16(path: PathBuf, v: &[u16]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn read_f32(path: PathBuf) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn read_u16(path: PathBuf) -> Vec<u16> {
    std::fs::read(path).unwrap().chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Writes each input to `dir/<name>`: as bf16 bits when `bf16`, after rounding the values in
/// place so that the reference sees exactly what the kernels read; else as f32.
fn write_inputs(dir: &Path, bf16: bool, inputs: &mut [(&str, &mut Vec<f32>)]) {
    for (name, v) in inputs.iter_mut() {
        if bf16 {
            **v = from_bf16_bits(&to_bf16_bits(v));
            write_u16(dir.join(name), &to_bf16_bits(v));
        } else {
            write_f32(dir.join(name), v);
        }
    }
}

/// An output of the emulator, as f32 values.
fn read_output(dir: &Path, name: &str, bf16: bool) -> Vec<f32> {
    if bf16 { from_bf16_bits(&read_u16(dir.join(name))) } else { read_f32(dir.join(name)) }
}

/// Largest difference over the largest reference value (infinite for a NaN or infinity, which
/// `f32::max` would skip).
fn rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    if got.iter().any(|v| !v.is_finite()) {
        return f32::INFINITY;
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale
}

/// The dropout a GroupNorm case runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Drop {
    None,
    /// A stored mask.
    Mask,
    /// `HashedDropout` (the CUDA training path): the kernels recompute it from the index.
    Hashed,
    /// The same with the pass's seed in device memory (a training step replayed from a CUDA
    /// graph), from an element offset: the kernels read the seed and make the key.
    SeedInMemory,
}

#[allow(clippy::too_many_arguments)]
fn case(exe: &Path, dir: &Path, n: usize, c: usize, hw: usize, groups: usize, act: bool, drop: Drop, bf16: bool, shifted: bool) {
    let len = n * c * hw;
    let seed = (n * 1000 + c * 10 + hw) as u64;
    let (mut x, mut w, mut b, mut dy) = (values(len, seed, 2.0, 0.5), values(c, seed + 1, 0.5, 1.0), values(c, seed + 2, 0.5, 0.0), values(len, seed + 3, 1.0, 0.0));
    // One value per image and channel, added to x inside the kernels (`forward_hardswish_shifted`),
    // large enough to move each channel's share of the group statistics.
    let mut shift = values(n * c, seed + 5, 1.5, 0.2);
    let hashed = HashedDropout::new(seed, 2, 0.3);
    // The kernel gets a pointer to `seed`, the site's mix and the offset's key; the host resolves
    // the same dropout with the seed in hand.
    let in_memory = HashedDropout::with_seed_at(1, 2, 0.3).from_element(77);
    let mask: Vec<f32> = match drop {
        Drop::Hashed => (0..len as u64).map(|i| hashed.factor(i)).collect(),
        Drop::SeedInMemory => (0..len as u64).map(|i| in_memory.resolve(seed).factor(i)).collect(),
        _ => values(len, seed + 4, 1.0, 0.0).iter().map(|&u| if u > -0.8 { 1.0 / 0.9 } else { 0.0 }).collect(),
    };
    write_inputs(dir, bf16, &mut [("x.bin", &mut x), ("w.bin", &mut w), ("b.bin", &mut b), ("dy.bin", &mut dy), ("shift.bin", &mut shift)]);
    write_f32(dir.join("mask.bin"), &mask);
    let (hw_m, hw_s) = unet::int_div::magic(hw as u32);
    let mut args = [n, c, hw, groups, act as usize, drop as usize, bf16 as usize, hw_m as usize, hw_s as usize].map(|v| v.to_string()).to_vec();
    if drop == Drop::Hashed {
        // The kernels get the key, not the mask: they must draw the same factors as `factor`.
        args.extend([hashed.key.to_string(), hashed.threshold.to_string(), hashed.scale.to_string()]);
    }
    if drop == Drop::SeedInMemory {
        let d = in_memory;
        args.extend([d.key.to_string(), d.threshold.to_string(), d.scale.to_string(), seed.to_string(), d.site_mix.to_string()]);
    }
    let out = Command::new(exe).arg("gn").args(&args).env("EMU_SHIFT", if shifted { "1" } else { "0" }).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "emulator failed: {}", String::from_utf8_lossy(&out.stderr));
    let y = read_output(dir, "y.bin", bf16);
    // dx in the input's dtype; the per-image sums in f32.
    let dx = read_output(dir, "dx.bin", bf16);
    let aux = read_f32(dir.join("aux.bin"));
    assert_eq!((dx.len(), aux.len()), (len, (2 + shifted as usize) * n * c));
    // The backward pass given the forward pass's statistics, and recomputing them: the same bits.
    let (dx_re, aux_re) = (read_output(dir, "dx_recomputed.bin", bf16), read_f32(dir.join("aux_recomputed.bin")));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert!(bits(&dx) == bits(&dx_re) && bits(&aux) == bits(&aux_re), "n={n} c={c} hw={hw}: the saved statistics give other gradients than recomputed ones");
    assert!(bits(&read_output(dir, "dx_off.bin", bf16)) != bits(&dx), "n={n} c={c} hw={hw}: the backward pass ignores the statistics it is given");
    let saved = read_f32(dir.join("saved.bin"));
    assert_eq!(saved.len(), 2 * n * groups);
    assert!(saved.chunks(2).all(|s| s[0].is_finite() && s[1] > 0.0), "the saved statistics are not (mean, 1/std) pairs");
    let sum_images = |part: &[f32]| (0..c).map(|ch| (0..n).map(|i| part[i * c + ch]).sum::<f32>()).collect::<Vec<f32>>();
    let dw = sum_images(&aux[..n * c]);
    let db = sum_images(&aux[n * c..2 * n * c]);
    let dshift = &aux[2 * n * c..];

    let dev = Device::Cpu;
    let xv = Var::from_tensor(&Tensor::from_vec(x, (n, c, hw), &dev).unwrap()).unwrap();
    let wv = Var::from_tensor(&Tensor::from_vec(w, c, &dev).unwrap()).unwrap();
    let bv = Var::from_tensor(&Tensor::from_vec(b, c, &dev).unwrap()).unwrap();
    let vb = VarBuilder::from_tensors([("weight".to_string(), wv.as_tensor().clone()), ("bias".to_string(), bv.as_tensor().clone())].into(), DType::F32, &dev);
    let gn = GroupNorm::new(vb, groups, c, 1e-5).unwrap();
    let mask_t = Tensor::from_vec(mask, (n, c, hw), &dev).unwrap();
    let sv = Var::from_tensor(&Tensor::from_vec(shift, (n, c), &dev).unwrap()).unwrap();
    let input = if shifted { xv.as_tensor().broadcast_add(&sv.as_tensor().unsqueeze(2).unwrap()).unwrap() } else { xv.as_tensor().clone() };
    let want = match (act, drop) {
        (false, Drop::None) => gn.forward(&input).unwrap(),
        (true, Drop::None) => gn.forward_hardswish(&input).unwrap(),
        (true, _) => gn.forward_hardswish_masked(&input, &mask_t).unwrap(),
        (false, _) => unreachable!("the network never drops out of a bare GroupNorm"),
    };
    let dy_t = Tensor::from_vec(dy, (n, c, hw), &dev).unwrap();
    let grads = want.mul(&dy_t).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (y_tol, g_tol) = if bf16 { (8e-3, 1e-4) } else { (1e-5, 1e-5) };
    let label = format!("n={n} c={c} hw={hw} groups={groups} act={act} drop={drop:?} bf16={bf16} shifted={shifted}");
    let want_dx = flat(grads.get(xv.as_tensor()).unwrap());
    if bf16 {
        assert_bf16_rounded(&format!("{label} y"), &y, &flat(&want));
        // dx is computed in f32, as on the CPU, then rounded: within a bf16 step (2^-7 of the
        // value), as the two f32 results may round either side of a midpoint.
        let scale = want_dx.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in dx.iter().zip(&want_dx).enumerate() {
            assert!((g - w).abs() <= w.abs() * 2f32.powi(-7) + 1e-5 * scale, "{label}: dx[{i}] = {g} is not {w} in bf16");
        }
    }
    let dx_tol = if bf16 { 2f32.powi(-7) + 1e-5 } else { g_tol };
    for (name, got, want, tol) in [
        ("y", &y[..], flat(&want), y_tol),
        ("dx", &dx[..], want_dx.clone(), dx_tol),
        ("dw", &dw[..], flat(grads.get(wv.as_tensor()).unwrap()), g_tol),
        ("db", &db[..], flat(grads.get(bv.as_tensor()).unwrap()), g_tol),
    ] {
        let d = rel(got, &want);
        assert!(d <= tol, "{label}: {name} differs by {d:e} (relative to its largest value), tolerance {tol:e}");
    }
    if shifted {
        // The sum of dx over each image and channel, made from the group sums in the kernel;
        // relative to dx's largest value, as its cancellations are dx's.
        let want = flat(grads.get(sv.as_tensor()).unwrap());
        let scale = want_dx.iter().fold(0f32, |m, v| m.max(v.abs())) * hw as f32;
        let d = dshift.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale;
        assert!(d <= g_tol, "{label}: dshift differs by {d:e} (relative to the largest dx times the pixels), tolerance {g_tol:e}");
        // (With one channel a group the norm takes each shift out again: its gradient is 0.)
        if groups < c {
            assert!(want.iter().any(|v| v.abs() > 1e-3 * scale), "{label}: the shift's gradient is all but zero: the check would not see a wrong one");
        }
    }
}

/// Rounded to nearest: within half a bf16 step (2^-8 of the value: 7 stored mantissa bits) of
/// the f32 result, with a little room for the f32 result's own rounding.
fn assert_bf16_rounded(label: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= w.abs() * 2f32.powi(-8) * 1.01 + 1e-6 * scale, "{label}: [{i}] = {g} is not {w} rounded to bf16");
    }
}

/// `x` uniform in `offset +- 6`.
#[allow(clippy::too_many_arguments)]
fn softmax_case(exe: &Path, dir: &Path, rows: usize, len: usize, scale: f32, offset: f32, bf16: bool) {
    let total = rows * len;
    let seed = (rows * 100 + len) as u64;
    let (mut x, mut dy) = (values(total, seed, 6.0, offset), values(total, seed + 1, 1.0, 0.0));
    write_inputs(dir, bf16, &mut [("x.bin", &mut x), ("dy.bin", &mut dy)]);
    let args = [rows.to_string(), len.to_string(), scale.to_string(), (bf16 as u8).to_string()];
    let out = Command::new(exe).arg("softmax").args(&args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "emulator failed: {}", String::from_utf8_lossy(&out.stderr));
    let (y, dx) = (read_output(dir, "y.bin", bf16), read_output(dir, "dx.bin", bf16));

    let dev = Device::Cpu;
    let xv = Var::from_tensor(&Tensor::from_vec(x, (rows, len), &dev).unwrap()).unwrap();
    let want = unet::softmax::scaled_softmax_last_dim(xv.as_tensor(), scale as f64).unwrap();
    let dy_t = Tensor::from_vec(dy.clone(), (rows, len), &dev).unwrap();
    let grads = want.mul(&dy_t).unwrap().sum_all().unwrap().backward().unwrap();
    let want_y = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let label = format!("softmax rows={rows} len={len} scale={scale} bf16={bf16}");
    let want_dx = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    if bf16 {
        assert_bf16_rounded(&format!("{label} y"), &y, &want_y);
        // dx is computed in f32 from the bf16 y the forward kernel wrote, then rounded: the
        // same formula on those y values is the reference.
        let dot: Vec<f32> = y.chunks(len).zip(dy.chunks(len)).map(|(a, b)| a.iter().zip(b).map(|(p, q)| p * q).sum()).collect();
        let want_dx: Vec<f32> = (0..total).map(|i| scale * y[i] * (dy[i] - dot[i / len])).collect();
        assert_bf16_rounded(&format!("{label} dx"), &dx, &want_dx);
    } else {
        for (name, got, want) in [("y", &y, &want_y), ("dx", &dx, &want_dx)] {
            let d = rel(got, want);
            assert!(d <= 1e-5, "{label}: {name} differs by {d:e} (relative to its largest value)");
        }
    }
}

#[test]
fn upsample_kernels_match_the_cpu_op() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = compile(dir.path()) else { return };
    for bf16 in [false, true] {
        let (n, c, h, w) = (2, 3, 5, 7);
        let rows = n * c * h;
        let (mut x, mut g) = (values(rows * w, 11, 3.0, 0.5), values(rows * w * 4, 12, 1.0, 0.0));
        write_inputs(dir.path(), bf16, &mut [("x.bin", &mut x), ("g.bin", &mut g)]);
        let out = Command::new(&exe).args(["up", &rows.to_string(), &w.to_string(), &(bf16 as u8).to_string()]).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "emulator failed: {}", String::from_utf8_lossy(&out.stderr));
        let (y, dx) = (read_output(dir.path(), "y.bin", bf16), read_output(dir.path(), "dx.bin", bf16));

        let xv = Var::from_tensor(&Tensor::from_vec(x, (n, c, h, w), &Device::Cpu).unwrap()).unwrap();
        let up = unet::upsample::upsample2x(xv.as_tensor()).unwrap();
        let gt = Tensor::from_vec(g, (n, c, 2 * h, 2 * w), &Device::Cpu).unwrap();
        let grads = up.mul(&gt).unwrap().sum_all().unwrap().backward().unwrap();
        let want_y = up.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want_dx = grads.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Copies are exact; the block sums are the same four additions in the same order.
        assert_eq!(y, want_y, "upsampling, bf16={bf16}");
        if bf16 {
            assert_bf16_rounded("block sums", &dx, &want_dx);
        } else {
            assert_eq!(dx, want_dx, "block sums");
        }
    }
}

#[test]
fn conv_bias_kernels_match_the_cpu_op() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = compile(dir.path()) else { return };
    // A map shorter than the block, and one long enough for the four-way unrolled loop and
    // its tail (33 x 33 = 1089 = 4 x 256 + 65).
    // (A warp a row, 8 rows a block: 15 rows leave the last block a warp short; 3 images on a
    // grid 2 high make the add's image loop go round.)
    for (bf16, (n, c, h, w)) in [(false, (3, 5, 6, 7)), (true, (3, 5, 6, 7)), (false, (2, 3, 33, 33)), (true, (2, 3, 33, 33)), (false, (3, 5, 8, 8)), (true, (1, 9, 16, 16))] {
        let total = n * c * h * w;
        let (mut y, mut b, mut h2) = (values(total, 21, 2.0, 0.3), values(c, 22, 1.0, 0.0), values(total, 23, 1.5, -0.2));
        let mut e = values(n * (c + 3), 24, 1.0, 0.1);
        write_inputs(dir.path(), bf16, &mut [("y.bin", &mut y), ("b.bin", &mut b), ("h.bin", &mut h2), ("e.bin", &mut e)]);
        let (hw_m, hw_s) = unet::int_div::magic((h * w) as u32);
        let args = ["bias".to_string(), n.to_string(), c.to_string(), (h * w).to_string(), (bf16 as u8).to_string(), hw_m.to_string(), hw_s.to_string()];
        let out = Command::new(&exe).args(&args).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "emulator failed: {}", String::from_utf8_lossy(&out.stderr));
        let (ya, cs, ra) = (read_output(dir.path(), "ya.bin", bf16), read_output(dir.path(), "cs.bin", bf16), read_output(dir.path(), "ra.bin", bf16));
        // The in-place sums of `Conv2d::forward_plus`: a value per image and channel from rows
        // c + 3 apart, and a residual. One addition each: exact in f32, one rounding in bf16.
        let (he, hy) = (read_output(dir.path(), "he.bin", bf16), read_output(dir.path(), "hy.bin", bf16));
        let hw = h * w;
        let want_he: Vec<f32> = (0..total).map(|i| h2[i] + e[(i / (c * hw)) * (c + 3) + (i / hw) % c]).collect();
        let want_hy: Vec<f32> = (0..total).map(|i| h2[i] + y[i]).collect();
        if bf16 {
            assert_bf16_rounded("time embedding add", &he, &want_he);
            assert_bf16_rounded("residual add in place", &hy, &want_hy);
        } else {
            assert_eq!(he, want_he, "time embedding add");
            assert_eq!(hy, want_hy, "residual add in place");
        }
        // The residual sum with the bias, against the CPU op (f32) on the same values.
        let (yt, ht) = (Tensor::from_vec(y.clone(), (n, c, h, w), &Device::Cpu).unwrap(), Tensor::from_vec(h2.clone(), (n, c, h, w), &Device::Cpu).unwrap());
        let bt = Tensor::from_vec(b.clone(), c, &Device::Cpu).unwrap();
        let want_ra = unet::conv::residual_add_with_bias(&yt, &ht, &bt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if bf16 {
            assert_bf16_rounded("residual add", &ra, &want_ra);
        } else {
            assert_eq!(ra, want_ra, "residual add: the same two additions in the same order");
        }

        // The CPU module: the biased convolution's output and its bias gradient, through a 1x1
        // identity convolution (output = input + bias; dbias = per-channel sums of dY).
        let dev = Device::Cpu;
        let eye: Vec<f32> = (0..c * c).map(|i| if i / c == i % c { 1.0 } else { 0.0 }).collect();
        let bv = Var::from_tensor(&Tensor::from_vec(b, c, &dev).unwrap()).unwrap();
        let tensors = [("weight".to_string(), Tensor::from_vec(eye, (c, c, 1, 1), &dev).unwrap()), ("bias".to_string(), bv.as_tensor().clone())].into();
        let conv = unet::conv::Conv2d::new(VarBuilder::from_tensors(tensors, DType::F32, &dev), c, c, 1, 1, 0).unwrap();
        let yt = Tensor::from_vec(y.clone(), (n, c, h, w), &dev).unwrap();
        let want = candle_core::Module::forward(&conv, &yt).unwrap();
        let grads = want.mul(&yt).unwrap().sum_all().unwrap().backward().unwrap();
        let want_y = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want_cs = grads.get(bv.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        if bf16 {
            assert_bf16_rounded("bias add", &ya, &want_y);
            assert_bf16_rounded("channel sums", &cs, &want_cs);
        } else {
            assert_eq!(ya, want_y, "bias add");
            let d = rel(&cs, &want_cs);
            assert!(d <= 1e-6, "channel sums differ by {d:e}");
        }
    }
}

#[test]
fn softmax_kernels_match_the_cpu_op() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = compile(dir.path()) else { return };
    // Rows shorter and longer than the block; the attention's 1024 at 32x32.
    softmax_case(&exe, dir.path(), 3, 1024, 0.0625, 1.0, false);
    softmax_case(&exe, dir.path(), 4, 37, 0.5, 1.0, false);
    softmax_case(&exe, dir.path(), 3, 300, 0.1, 1.0, true);
    // exp(scale * x) alone would overflow f32: the row maximum must be taken out first.
    softmax_case(&exe, dir.path(), 2, 64, 1.0, 200.0, false);
}

#[test]
fn group_norm_kernels_match_the_cpu_op() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = compile(dir.path()) else { return };
    // Group lengths below, at and above the block's 256 threads; odd sizes; every variant.
    case(&exe, dir.path(), 2, 8, 100, 4, true, Drop::Mask, false, false);
    case(&exe, dir.path(), 3, 8, 1000, 4, false, Drop::None, false, false);
    case(&exe, dir.path(), 2, 4, 64, 2, true, Drop::None, false, false);
    case(&exe, dir.path(), 2, 8, 300, 4, true, Drop::Mask, true, false);
    case(&exe, dir.path(), 1, 6, 17, 3, true, Drop::None, true, false);
    case(&exe, dir.path(), 2, 8, 300, 4, true, Drop::Hashed, false, false);
    case(&exe, dir.path(), 2, 6, 50, 3, true, Drop::Hashed, true, false);
    case(&exe, dir.path(), 2, 8, 300, 4, true, Drop::SeedInMemory, false, false);
    case(&exe, dir.path(), 2, 6, 50, 3, true, Drop::SeedInMemory, true, false);
    // The shift (a ResBlock's time embedding and bias) inside the kernels: groups of one and of
    // several channels, with and without dropout, f32 and bf16.
    case(&exe, dir.path(), 2, 8, 300, 4, true, Drop::SeedInMemory, false, true);
    case(&exe, dir.path(), 3, 8, 100, 8, true, Drop::None, false, true);
    case(&exe, dir.path(), 2, 6, 50, 3, true, Drop::Hashed, true, true);
    case(&exe, dir.path(), 1, 4, 1000, 2, true, Drop::None, true, true);
    // Channels shorter than the block go a warp each (HW < 256): more channels a group than
    // warps a block, so that a warp takes several; 255 and 256 either side of the switch.
    case(&exe, dir.path(), 2, 40, 50, 2, true, Drop::Hashed, false, true);
    case(&exe, dir.path(), 1, 24, 64, 2, true, Drop::SeedInMemory, true, false);
    case(&exe, dir.path(), 2, 4, 255, 2, true, Drop::Mask, false, true);
    case(&exe, dir.path(), 2, 4, 256, 2, false, Drop::None, false, false);
}
