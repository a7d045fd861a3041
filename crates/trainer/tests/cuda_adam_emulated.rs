//! The CUDA optimizer kernels (`src/adam_cuda.cu`) run on the CPU under unet's kernel emulator
//! (`crates/unet/tests/cuda_emu/shim.h`: a thread per CUDA thread), on launch plans made by
//! `trainer::multi_tensor::plan` (the same bytes the GPU gets), against `trainer::Adam` and
//! `trainer::adam::global_norm` on the CPU: two steps over more variables than one launch takes,
//! with chunks smaller than the variables, for Adam with clipping and EMA, AdamW, and Adam's L2
//! term; and behind `step_gate` (the update queued before the host has read the loss): the
//! clipping scale computed on the device, and a step with a non-finite loss or gradient that must
//! change nothing. The launches themselves are checked on a GPU by
//! `cargo xtask-cuda self-test --device cuda`.
//!
//! Needs a C++20 compiler (`$CXX`, else `g++`): without one the test says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor, Var};
use trainer::adam::{clip_scale, global_norm};
use trainer::multi_tensor::{plan, Buffers, MtArgs};
use trainer::{Adam, AdamParams};

const DRIVER: &str = r#"
#include "adam_cuda.cu"
#include <cstdio>
#include <cstdlib>
static std::vector<char> rd(const char* p) {
    FILE* f = fopen(p, "rb");
    if (!f) { fprintf(stderr, "cannot read %s\n", p); exit(2); }
    std::vector<char> v;
    char buf[65536];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, f)) > 0) v.insert(v.end(), buf, buf + k);
    fclose(f);
    return v;
}
// adam_main b1 r1 b2 r2 eps wd_l2 p_mul step_size bias2_sqrt gscale ema_d ema_r [clip_max loss]: one
// step, behind step_gate when clip_max and loss are given. The plan's addresses are byte offsets
// into arena.bin (0: absent). Writes arena_out.bin, the norm of the gradients (before the step)
// to norm.txt, and with the gate, its read-back values {loss, sum of squares} to readback.txt.
int main(int argc, char** argv) {
    if (argc != 13 && argc != 15) { fprintf(stderr, "usage: adam_main b1 r1 b2 r2 eps wd_l2 p_mul step_size bias2_sqrt gscale ema_d ema_r [clip_max loss]\n"); return 2; }
    float x[12];
    for (int i = 0; i < 12; ++i) x[i] = atof(argv[i + 1]);
    const bool gated = argc == 15;
    const double clip_max = gated ? strtod(argv[13], nullptr) : 0.0;
    const float loss = gated ? strtof(argv[14], nullptr) : 0.f;
    std::vector<char> arena = rd("arena.bin"), raw = rd("plan.bin");
    const size_t rec = sizeof(MtArgs) + 4;
    if (raw.size() % rec) { fprintf(stderr, "plan.bin is not a list of MtArgs + u32\n"); return 2; }
    std::vector<MtArgs> args(raw.size() / rec);
    std::vector<unsigned> blocks(args.size());
    unsigned total = 0;
    const unsigned long long base = (unsigned long long)arena.data();
    for (size_t k = 0; k < args.size(); ++k) {
        memcpy(&args[k], raw.data() + k * rec, sizeof(MtArgs));
        memcpy(&blocks[k], raw.data() + k * rec + sizeof(MtArgs), 4);
        total += blocks[k];
        for (unsigned long long* list : {args[k].p, args[k].g, args[k].m, args[k].v, args[k].e})
            for (int i = 0; i < MT_MAX; ++i) if (list[i]) list[i] += base;
    }
    // -1: a block that writes nothing shows in the sum.
    std::vector<double> partial(total, -1.0);
    double sum = -1.0;
    unsigned off = 0;
    for (size_t k = 0; k < args.size(); ++k) {
        launch(blocks[k], 32, [&] { sumsq_multi(args[k], partial.data() + off); });
        off += blocks[k];
    }
    launch(1, 32, [&] { sum_partials(partial.data(), total, &sum); });
    // Poisoned: what the gate does not write shows.
    float gate[2] = {-7.f, -7.f};
    double readback[2] = {-7.0, -7.0};
    if (gated) launch(1, 32, [&] { step_gate(&sum, (unsigned long long)&loss, clip_max, gate, readback); });
    const unsigned long long gate_addr = gated ? (unsigned long long)gate : 0ull;
    for (size_t k = 0; k < args.size(); ++k)
        launch(blocks[k], 32, [&] { adam_multi(args[k], x[0], x[1], x[2], x[3], x[7], x[8], x[4], x[9], x[5], x[6], x[10], x[11], gate_addr); });
    FILE* f = fopen("norm.txt", "w");
    fprintf(f, "%.17g\n", sqrt(sum));
    fclose(f);
    if (gated) {
        f = fopen("readback.txt", "w");
        fprintf(f, "%.17g %.17g\n", readback[0], readback[1]);
        fclose(f);
    }
    f = fopen("arena_out.bin", "wb");
    fwrite(arena.data(), 1, arena.size(), f);
    fclose(f);
}
"#;

fn build_driver(dir: &Path) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    std::fs::write(dir.join("adam_main.cpp"), DRIVER).unwrap();
    let exe = dir.join("adam_main");
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-include"])
        .arg(root.join("../unet/tests/cuda_emu/shim.h"))
        .arg("-I")
        .arg(root.join("src"))
        .arg(dir.join("adam_main.cpp"))
        .arg("-o")
        .arg(&exe)
        .status();
    match status {
        Ok(s) => {
            assert!(s.success(), "{cxx} failed to build the Adam kernel emulator");
            Some(exe)
        }
        Err(e) => {
            eprintln!("SKIPPED: no C++ compiler '{cxx}' to emulate the CUDA kernels ({e})");
            None
        }
    }
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn args_bytes(a: &MtArgs) -> &[u8] {
    // SAFETY: MtArgs is repr(C) plain integers with no padding (3,344 bytes: asserted in
    // multi_tensor's tests).
    unsafe { std::slice::from_raw_parts((a as *const MtArgs).cast::<u8>(), std::mem::size_of::<MtArgs>()) }
}

/// Largest difference over largest expected value.
fn rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).fold(0f32, |m, (g, w)| if (g - w).is_nan() { f32::INFINITY } else { m.max((g - w).abs()) });
    worst / scale.max(1e-30)
}

struct Case {
    name: &'static str,
    params: AdamParams,
    /// Per step: the clipping scale (with a gate: 1, the gate clips).
    grad_scale: [f64; 2],
    /// Per step: the EMA decay, when EMA is on.
    ema: Option<[f64; 2]>,
    /// The update behind `step_gate`, when given.
    gate: Option<GateCase>,
}

/// What the gate is given: the clipping threshold (0: none) and, per step, the loss and a
/// gradient value to replace (variable, index, value), if any.
#[derive(Clone, Copy)]
struct GateCase {
    clip_max: f64,
    loss: [f32; 2],
    poison: [Option<(usize, usize, f32)>; 2],
}

fn run_case(exe: &Path, dir: &Path, case: &Case) {
    // 70 variables (two launches: 64 + 6) of 1..=200 values in chunks of 37, so most variables
    // span several blocks, some end mid-chunk, and some fit in one; and empty ones (no blocks)
    // first, inside and last in a launch, and last of all.
    let sizes: Vec<usize> = (0..70).map(|i| if [0, 30, 63, 69].contains(&i) { 0 } else { (i * 29 + 11) % 200 + 1 }).collect();
    let p0: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(k, &n)| (0..n).map(|i| (((i * 37 + k * 11) % 101) as f32 - 50.0) * 0.02).collect()).collect();
    let grad = |k: usize, step: usize| -> Vec<f32> {
        (0..sizes[k]).map(|i| (((i * 53 + k * 7 + step * 13) % 97) as f32 - 48.0) * 1e-3 * (1 + k % 5) as f32).collect()
    };
    let ema0: Vec<Vec<f32>> = p0.iter().map(|p| p.iter().map(|x| x * 0.9 + 0.01).collect()).collect();

    // The arena: per variable p, m, v, e (with EMA) and g, at byte offsets from 64, so that 0
    // stays "absent".
    let mut arena: Vec<f32> = vec![0.0; 16];
    let mut put = |v: &[f32]| {
        let off = 4 * arena.len() as u64;
        arena.extend_from_slice(v);
        off
    };
    let bufs: Vec<Buffers> = (0..sizes.len())
        .map(|k| {
            let zeros = vec![0f32; sizes[k]];
            let (p, m, v) = (put(&p0[k]), put(&zeros), put(&zeros));
            let e = if case.ema.is_some() { put(&ema0[k]) } else { 0 };
            Buffers { p, g: put(&zeros), m, v, e, n: sizes[k] }
        })
        .collect();
    let launches = plan(&bufs, 37);
    assert_eq!(launches.iter().map(|(a, _)| a.count).collect::<Vec<_>>(), [64, 6]);
    let mut raw = Vec::new();
    for (a, blocks) in &launches {
        raw.extend_from_slice(args_bytes(a));
        raw.extend_from_slice(&blocks.to_le_bytes());
    }
    std::fs::write(dir.join("plan.bin"), &raw).unwrap();

    // The CPU optimizer, from the same values.
    let cpu = Device::Cpu;
    let vars: Vec<(String, Var)> =
        p0.iter().enumerate().map(|(k, p)| (format!("v{k:03}"), Var::from_tensor(&Tensor::new(p.as_slice(), &cpu).unwrap()).unwrap())).collect();
    let mut opt = Adam::new(vars, case.params).unwrap();
    let mut ema: Vec<Tensor> = ema0.iter().map(|e| Tensor::new(e.as_slice(), &cpu).unwrap()).collect();

    let AdamParams { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, decoupled } = case.params;
    let (wd_l2, p_mul) = if decoupled { (0.0, 1.0 - lr * wd) } else { (wd, 1.0) };
    for t in 0..2 {
        let mut grads: Vec<Vec<f32>> = (0..sizes.len()).map(|k| grad(k, t)).collect();
        if let Some((k, i, v)) = case.gate.and_then(|g| g.poison[t]) {
            grads[k][i] = v;
        }
        for (b, g) in bufs.iter().zip(&grads) {
            let at = b.g as usize / 4;
            arena[at..at + g.len()].copy_from_slice(g);
        }
        std::fs::write(dir.join("arena.bin"), bytes(&arena)).unwrap();
        let step = opt.step_count() as i32 + 1;
        let step_size = lr / (1.0 - b1.powi(step));
        let bias2_sqrt = (1.0 - b2.powi(step)).sqrt();
        let ema_d = case.ema.map_or(0.0, |d| d[t]);
        let mut args: Vec<String> =
            [b1, 1.0 - b1, b2, 1.0 - b2, eps, wd_l2, p_mul, step_size, bias2_sqrt, case.grad_scale[t], ema_d, 1.0 - ema_d].map(|v| format!("{:e}", v as f32)).to_vec();
        if let Some(g) = &case.gate {
            args.push(format!("{:e}", g.clip_max));
            args.push(format!("{:e}", g.loss[t]));
        }
        let out = Command::new(exe).args(&args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{}: emulator failed: {}", case.name, String::from_utf8_lossy(&out.stderr));
        let before = std::mem::replace(&mut arena, floats(&std::fs::read(dir.join("arena_out.bin")).unwrap()));

        let gt: Vec<Tensor> = grads.iter().map(|g| Tensor::new(g.as_slice(), &cpu).unwrap()).collect();
        let norm: f64 = std::fs::read_to_string(dir.join("norm.txt")).unwrap().trim().parse().unwrap();
        let want = global_norm(&gt).unwrap();
        let mut grad_scale = case.grad_scale[t];
        if let Some(g) = &case.gate {
            let rb: Vec<f64> = std::fs::read_to_string(dir.join("readback.txt")).unwrap().split_whitespace().map(|v| v.parse().unwrap()).collect();
            assert_eq!(rb[0].to_bits(), (g.loss[t] as f64).to_bits(), "{}: step {}: the loss read back", case.name, t + 1);
            assert!(rb[1].sqrt().to_bits() == norm.to_bits(), "{}: step {}: the sum of squares read back", case.name, t + 1);
            if !(g.loss[t].is_finite() && want.is_finite()) {
                // The host would have stopped here: nothing may change, to the bit.
                assert!(!norm.is_finite() || !g.loss[t].is_finite(), "{}: step {}: the emulator's norm {norm} is finite", case.name, t + 1);
                assert!(before.iter().zip(&arena).all(|(a, b)| a.to_bits() == b.to_bits()), "{}: step {}: a skipped step changed the state", case.name, t + 1);
                continue;
            }
            if g.clip_max > 0.0 {
                grad_scale = clip_scale(want, g.clip_max);
            }
        }
        assert!((norm - want).abs() <= 1e-6 * want, "{}: step {}: gradient norm {norm} against {want}", case.name, t + 1);
        let e = case.ema.map(|d| (ema.as_mut_slice(), d[t]));
        opt.step_full(&gt, lr, grad_scale, e).unwrap();
    }

    let state = opt.state_tensors().unwrap();
    let get = |off: u64, n: usize| arena[off as usize / 4..off as usize / 4 + n].to_vec();
    for (k, b) in bufs.iter().enumerate() {
        let name = &opt.names()[k];
        let p_cpu = opt.vars()[k].as_tensor().to_vec1::<f32>().unwrap();
        // The change of each parameter, not its value: the value's scale would hide an error in
        // updates a thousand times smaller.
        let change = |p: &[f32]| p.iter().zip(&p0[k]).map(|(a, b)| a - b).collect::<Vec<f32>>();
        let mut checks = vec![
            ("parameter change", rel(&change(&get(b.p, b.n)), &change(&p_cpu)), 1e-4),
            ("first moment", rel(&get(b.m, b.n), &state[&format!("m.{name}")].to_vec1::<f32>().unwrap()), 1e-5),
            ("second moment", rel(&get(b.v, b.n), &state[&format!("v.{name}")].to_vec1::<f32>().unwrap()), 1e-5),
        ];
        if case.ema.is_some() {
            checks.push(("EMA", rel(&get(b.e, b.n), &ema[k].to_vec1::<f32>().unwrap()), 1e-5));
        }
        for (what, d, tol) in checks {
            assert!(d <= tol, "{}: variable {k} ({} values): {what} differs by {d:e} of its largest value", case.name, b.n);
        }
    }
}

#[test]
fn optimizer_kernels_match_the_cpu_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let Some(exe) = build_driver(dir.path()) else { return };
    let base = AdamParams { lr: 1e-3, ..Default::default() };
    let no = [None, None];
    let cases = [
        Case { name: "Adam, clipping, EMA", params: base, grad_scale: [1.0, 0.25], ema: Some([0.5, 0.9]), gate: None },
        Case { name: "AdamW", params: AdamParams { weight_decay: 0.1, decoupled: true, ..base }, grad_scale: [1.0, 1.0], ema: None, gate: None },
        Case { name: "Adam, L2", params: AdamParams { weight_decay: 0.1, ..base }, grad_scale: [0.5, 1.0], ema: None, gate: None },
        // The gradients' norm is about 7.67 at both steps: scaled by about a half at 4, not at 100.
        Case { name: "gated, clipping on the device, EMA", params: base, grad_scale: [1.0; 2], ema: Some([0.5, 0.9]), gate: Some(GateCase { clip_max: 4.0, loss: [0.25, 0.5], poison: no }) },
        Case { name: "gated, a threshold above the norm", params: base, grad_scale: [1.0; 2], ema: None, gate: Some(GateCase { clip_max: 100.0, loss: [0.25, 0.5], poison: no }) },
        Case { name: "gated, a NaN loss", params: base, grad_scale: [1.0; 2], ema: Some([0.5, 0.9]), gate: Some(GateCase { clip_max: 0.7, loss: [0.25, f32::NAN], poison: no }) },
        Case { name: "gated, an infinite loss first", params: base, grad_scale: [1.0; 2], ema: None, gate: Some(GateCase { clip_max: 0.0, loss: [f32::INFINITY, 0.5], poison: no }) },
        Case {
            name: "gated, an infinite gradient",
            params: base,
            grad_scale: [1.0; 2],
            ema: Some([0.5, 0.9]),
            gate: Some(GateCase { clip_max: 0.0, loss: [0.25, 0.5], poison: [None, Some((40, 3, f32::INFINITY))] }),
        },
    ];
    for case in &cases {
        run_case(&exe, dir.path(), case);
    }
}
