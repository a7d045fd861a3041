//! Parity with PyTorch: the fixture checkpoints (written by an independent PyTorch port of the
//! reference, with its exact parameter names) must give the fixture outputs.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use diffusion::{FinalStepNoise, Schedule, Variance};
use unet::{Mode, ModelWeights, UNet, UNetConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(&format!("{name}_io.safetensors")), &Device::Cpu).unwrap()
}

fn load(name: &str) -> ModelWeights {
    unet::lightning::import(&fixture(&format!("{name}.ckpt"))).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn check_forward(name: &str, cfg: UNetConfig) {
    let w = load(name);
    assert_eq!(w.config, cfg, "config read from the checkpoint's hyper_parameters");
    let model = w.build(&Device::Cpu, false).unwrap();
    let io = io(name);
    let t = io["t"].to_dtype(DType::U32).unwrap();
    let (eps, inter) = model.forward_with_intermediates(&io["x"], &t, Mode::Eval).unwrap();
    let d = max_abs_diff(&eps, &io["eps"]);
    assert!(d < 1e-4, "{name}: eps differs by {d}");
    let d = max_abs_diff(&inter.temb, &io["temb"]);
    assert!(d < 1e-5, "{name}: temb differs by {d}");
    let d = max_abs_diff(&inter.mid, &io["mid"]);
    assert!(d < 1e-4, "{name}: mid differs by {d}");
}

#[test]
fn micro_forward_matches_pytorch() {
    check_forward("seed_micro", UNetConfig::micro());
}

#[test]
fn tiny_forward_matches_pytorch() {
    check_forward("seed_tiny", UNetConfig::tiny());
}

#[test]
fn computed_time_table_matches_the_checkpoint() {
    let w = load("seed_tiny");
    let table = unet::sinusoid_table(1000, 32, &Device::Cpu).unwrap();
    let d = max_abs_diff(&table, &w.tensors[unet::TIME_TABLE_KEY]);
    // f32 sin/cos of arguments up to 999 rad: libm and SLEEF round differently by an ulp or so.
    assert!(d < 1e-4, "time table differs by {d}");
}

#[test]
fn schedule_matches_pytorch() {
    let io = io("seed_tiny");
    let s = Schedule::reference();
    let arrays: [(&str, &Vec<f32>); 7] = [
        ("betas", &s.betas),
        ("alphas", &s.alphas),
        ("alphas_cumprod", &s.alphas_cumprod),
        ("alphas_cumprod_prev", &s.alphas_cumprod_prev),
        ("posterior_variance", &s.posterior_variance),
        ("alphas_cumprod_sqrt", &s.alphas_cumprod_sqrt),
        ("one_minus_alphas_cumprod_sqrt", &s.one_minus_alphas_cumprod_sqrt),
    ];
    for (key, ours) in arrays {
        let theirs = io[key].to_vec1::<f32>().unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let tol = 1e-6 * b.abs().max(1e-30);
            assert!((a - b).abs() <= tol, "{key}[{i}]: {a} vs {b}");
        }
    }
    // The documented recipe is bit-exact for the betas and the cumulative product.
    assert_eq!(s.betas, io["betas"].to_vec1::<f32>().unwrap());
    assert_eq!(s.alphas_cumprod, io["alphas_cumprod"].to_vec1::<f32>().unwrap());
}

#[test]
fn forward_noising_and_loss_match_pytorch() {
    let io = io("seed_tiny");
    let s = Schedule::reference();
    let t: Vec<u32> = io["t"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let x_t = s.q_sample(&io["x"], &t, &io["q_noise"]).unwrap();
    let d = max_abs_diff(&x_t, &io["q_x_t"]);
    assert!(d < 1e-6, "q_x_t differs by {d}");

    let model = load("seed_tiny").build(&Device::Cpu, false).unwrap();
    let pred = |x: &Tensor, t: &Tensor| model.forward_t(x, t, Mode::Eval);
    let loss = s.loss(&pred, &io["x"], &t, &io["q_noise"]).unwrap().to_scalar::<f32>().unwrap();
    let expect = io["loss_eval"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((loss - expect).abs() < 1e-5, "loss {loss} vs {expect}");
}

#[test]
fn reverse_steps_match_pytorch_for_both_variances() {
    let io = io("seed_tiny");
    let s = Schedule::reference();
    let model = load("seed_tiny").build(&Device::Cpu, false).unwrap();
    let x_t = &io["rs_x_t"];
    let z = &io["rs_z"];
    for (i, &t) in [999usize, 500, 1, 0].iter().enumerate() {
        // The reference passes t with shape [1], broadcast over the batch.
        let tt = Tensor::new(&[t as u32], &Device::Cpu).unwrap();
        let eps = model.forward_t(x_t, &tt, Mode::Eval).unwrap();
        let d = max_abs_diff(&eps, &io["rs_eps"].get(i).unwrap());
        assert!(d < 1e-4, "rs_eps t={t} differs by {d}");
        // Use the fixture's eps so the step itself is compared to float rounding.
        let eps = io["rs_eps"].get(i).unwrap();
        for (variance, key) in [(Variance::Beta, "rs_x_prev_beta"), (Variance::BetaTilde, "rs_x_prev_tilde")] {
            let ours = s.ddpm_step(&eps, x_t, t, Some(z), variance, FinalStepNoise::Reference).unwrap();
            let d = max_abs_diff(&ours, &io[key].get(i).unwrap());
            assert!(d < 2e-6, "{key} t={t} differs by {d}");
        }
    }
    // The paper's convention differs from the reference only at t = 0, by sigma_0 z.
    let eps = io["rs_eps"].get(3).unwrap();
    let paper = s.ddpm_step(&eps, x_t, 0, Some(z), Variance::Beta, FinalStepNoise::Paper).unwrap();
    let reference = s.ddpm_step(&eps, x_t, 0, Some(z), Variance::Beta, FinalStepNoise::Reference).unwrap();
    let d = max_abs_diff(&reference.sub(&paper).unwrap(), &z.affine(0.01, 0.0).unwrap());
    assert!(d < 1e-6);
}

#[test]
fn parameter_gradients_match_pytorch() {
    let w = load("seed_tiny");
    let io = io("seed_tiny");
    let s = Schedule::reference();
    // Trainable copies of every weight except the frozen time table.
    let mut vars: HashMap<String, Var> = HashMap::new();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in w.select(false) {
        if k == unet::TIME_TABLE_KEY {
            tensors.insert(k, v);
        } else {
            let var = Var::from_tensor(&v).unwrap();
            tensors.insert(k.clone(), var.as_tensor().clone());
            vars.insert(k, var);
        }
    }
    let model = UNet::new(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &w.config).unwrap();
    let t: Vec<u32> = io["t"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let pred = |x: &Tensor, t: &Tensor| model.forward_t(x, t, Mode::Eval);
    let loss = s.loss(&pred, &io["x"], &t, &io["q_noise"]).unwrap();
    let grads = loss.backward().unwrap();
    for key in ["head.weight", "tail.2.weight", "time_embedding.time_embedding.1.weight", "middle_blocks.0.attn.proj_q.weight"] {
        let g = grads.get(vars[key].as_tensor()).unwrap_or_else(|| panic!("no gradient for {key}"));
        let expect = &io[&format!("grad.{key}")];
        let scale = expect.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let d = max_abs_diff(g, expect);
        assert!(d <= 1e-4 * scale, "grad {key}: max diff {d}, max |grad| {scale}");
    }
    // The frozen table must not be a variable.
    assert!(!vars.contains_key(unet::TIME_TABLE_KEY));
}

#[test]
fn reference_parameter_count_and_names() {
    let (total, trainable) = unet::parameter_counts(&UNetConfig::reference()).unwrap();
    assert_eq!(total, 25_368_963);
    assert_eq!(trainable, 25_304_963);
    let shapes = unet::expected_shapes(&UNetConfig::reference()).unwrap();
    let listed = std::fs::read_to_string(fixture("seed_full_keys.txt")).unwrap();
    let mut theirs: Vec<(String, Vec<usize>)> = listed
        .lines()
        .map(|l| {
            let mut f = l.split('\t');
            let name = f.next().unwrap().strip_prefix("unet.").unwrap().to_string();
            let shape = f.next().unwrap().trim_matches(|c| c == '(' || c == ')').split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
            (name, shape)
        })
        .collect();
    let mut ours = shapes.clone();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn fresh_trainable_model_is_seeded_and_excludes_the_table() {
    let cfg = UNetConfig::micro();
    let (_, vm1) = unet::new_trainable(&cfg, &Device::Cpu, 999).unwrap();
    let (_, vm2) = unet::new_trainable(&cfg, &Device::Cpu, 999).unwrap();
    assert!(!vm1.data().lock().unwrap().contains_key(unet::TIME_TABLE_KEY));
    let x = vm1.data().lock().unwrap()["downblocks.0.block1.2.weight"].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let y = vm2.data().lock().unwrap()["downblocks.0.block1.2.weight"].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(x, y);
    let bound = 1.0 / ((32 * 9) as f32).sqrt();
    assert!(x.iter().all(|v| v.abs() <= bound));
    let gn = vm1.data().lock().unwrap()["downblocks.0.block1.0.weight"].as_tensor().to_vec1::<f32>().unwrap();
    assert!(gn.iter().all(|&v| v == 1.0));
    let (total, trainable) = unet::parameter_counts(&cfg).unwrap();
    let var_count: usize = vm1.all_vars().iter().map(|v| v.elem_count()).sum();
    assert_eq!(var_count, trainable);
    assert_eq!(total - trainable, 1000 * 32);
}
