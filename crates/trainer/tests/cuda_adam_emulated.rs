//! The CUDA Adam kernels (`src/adam_cuda.cu`) run on the CPU under unet's kernel emulator
//! (`crates/unet/tests/cuda_emu/shim.h`: a thread per CUDA thread), two steps on a grid much
//! smaller than the data (so every grid-stride loop goes round several times), against
//! `trainer::Adam` on the CPU. The launches themselves are checked on a GPU by
//! `cargo xtask self-test --device cuda`.
//!
//! Needs a C++20 compiler (`$CXX`, else `g++`): without one the test says so and skips.

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor, Var};
use trainer::{Adam, AdamParams};

const DRIVER: &str = r#"
#include "adam_cuda.cu"
#include <cstdio>
#include <cstdlib>
static std::vector<float> rd(const char* p, size_t n) {
    std::vector<float> v(n);
    FILE* f = fopen(p, "rb");
    if (!f || fread(v.data(), 4, n, f) != n) { fprintf(stderr, "cannot read %s\n", p); exit(2); }
    fclose(f);
    return v;
}
static void wr(const char* p, const std::vector<float>& v) { FILE* f = fopen(p, "wb"); fwrite(v.data(), 4, v.size(), f); fclose(f); }
// adam_main n b1 b2 eps step_size_1 bias2_sqrt_1 step_size_2 bias2_sqrt_2: two steps, one gradient.
int main(int argc, char** argv) {
    if (argc != 9) { fprintf(stderr, "usage: adam_main n b1 b2 eps step1 bias2_1 step2 bias2_2\n"); return 2; }
    unsigned long long n = strtoull(argv[1], 0, 10);
    float b1 = atof(argv[2]), b2 = atof(argv[3]), eps = atof(argv[4]);
    auto p = rd("p.bin", n), g = rd("g.bin", n);
    std::vector<float> m(n, 0.f), v(n, 0.f);
    for (int t = 0; t < 2; ++t) {
        float step = atof(argv[5 + 2 * t]), bias2 = atof(argv[6 + 2 * t]);
        launch(3, 64, [&] { adam_moment(m.data(), g.data(), n, b1, 0); });
        launch(3, 64, [&] { adam_moment(v.data(), g.data(), n, b2, 1); });
        launch(3, 64, [&] { adam_update(p.data(), m.data(), v.data(), n, step, bias2, eps); });
    }
    wr("p_out.bin", p); wr("m_out.bin", m); wr("v_out.bin", v);
}
"#;

fn write(path: &Path, v: &[f32]) {
    std::fs::write(path, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

fn read(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn adam_kernels_match_the_cpu_optimizer() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    std::fs::write(dir.path().join("adam_main.cpp"), DRIVER).unwrap();
    let exe = dir.path().join("adam_main");
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-include"])
        .arg(root.join("../unet/tests/cuda_emu/shim.h"))
        .arg("-I")
        .arg(root.join("src"))
        .arg(dir.path().join("adam_main.cpp"))
        .arg("-o")
        .arg(&exe)
        .status();
    match status {
        Ok(s) => assert!(s.success(), "{cxx} failed to build the Adam kernel emulator"),
        Err(e) => {
            eprintln!("SKIPPED: no C++ compiler '{cxx}' to emulate the CUDA kernels ({e})");
            return;
        }
    }

    // 1000 values on 3 blocks of 64 threads: each thread's loop runs 5 or 6 times.
    let n = 1000;
    let p0: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.02).collect();
    let g: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) * 1e-3).collect();
    write(&dir.path().join("p.bin"), &p0);
    write(&dir.path().join("g.bin"), &g);
    let params = AdamParams { lr: 1e-3, ..Default::default() };
    let scalars: Vec<String> = (1..=2)
        .flat_map(|t| {
            let step_size = params.lr / (1.0 - params.beta1.powi(t));
            let bias2_sqrt = (1.0 - params.beta2.powi(t)).sqrt();
            [(step_size as f32).to_string(), (bias2_sqrt as f32).to_string()]
        })
        .collect();
    let out = Command::new(&exe)
        .arg(n.to_string())
        .args([params.beta1 as f32, params.beta2 as f32, params.eps as f32].map(|v| v.to_string()))
        .args(&scalars)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "emulator failed: {}", String::from_utf8_lossy(&out.stderr));

    let var = Var::from_tensor(&Tensor::from_vec(p0.clone(), n, &Device::Cpu).unwrap()).unwrap();
    let mut opt = Adam::new(vec![("p".into(), var.clone())], params).unwrap();
    let gt = Tensor::from_vec(g, n, &Device::Cpu).unwrap();
    for _ in 0..2 {
        opt.step_with(std::slice::from_ref(&gt), params.lr).unwrap();
    }
    let state = opt.state_tensors().unwrap();
    let cpu = |t: &Tensor| t.to_vec1::<f32>().unwrap();
    let want_change: Vec<f32> = cpu(var.as_tensor()).iter().zip(&p0).map(|(a, b)| a - b).collect();
    let got_change: Vec<f32> = read(&dir.path().join("p_out.bin")).iter().zip(&p0).map(|(a, b)| a - b).collect();
    for (name, got, want) in [
        ("parameter change", got_change, want_change),
        ("first moment", read(&dir.path().join("m_out.bin")), cpu(&state["m.p"])),
        ("second moment", read(&dir.path().join("v_out.bin")), cpu(&state["v.p"])),
    ] {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).fold(0f32, |m, (g, w)| if (g - w).is_nan() { f32::INFINITY } else { m.max((g - w).abs()) });
        assert!(worst <= 1e-4 * scale, "{name}: largest difference {worst:e} against a largest value of {scale:e}");
    }
}
