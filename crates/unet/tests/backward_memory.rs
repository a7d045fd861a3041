//! A training step's memory, counted by this binary's allocator: with the vendored candle's
//! release of saved values (stop 34), the graph must hold less after the forward pass (the up
//! path's inputs freed there) and the backward pass peak well below what it peaks at when every
//! saved value is kept to the end. Its own test binary, so
//! that no other test allocates while it counts.

use std::sync::atomic::Ordering;

use candle_core::backprop::set_release_saved_on_this_thread;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use unet::{Mode, UNet, UNetConfig};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{LIVE, PEAK};

/// (bytes the graph holds once the loss is computed, the backward pass's peak above the start),
/// and the gradient of every variable.
fn step(model: &UNet, vm: &VarMap, x: &Tensor, noise: &Tensor, t: &Tensor) -> (usize, usize, Vec<Vec<f32>>) {
    let before = LIVE.load(Ordering::Relaxed);
    let loss = (model.forward_t(x, t, Mode::Train { seed: 7 }).unwrap() - noise).unwrap().sqr().unwrap().mean_all().unwrap();
    let held = LIVE.load(Ordering::Relaxed) - before;
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let grads = loss.backward().unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let mut vars = vm.all_vars();
    vars.sort_by_key(|v| v.shape().dims().to_vec());
    let g = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    (held, peak, g)
}

#[test]
fn the_backward_pass_peaks_lower_when_it_releases_saved_values_with_the_same_gradients() {
    let cfg = UNetConfig { image_size: 32, ..UNetConfig::tiny() };
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = UNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
    let b = 4;
    let x = Tensor::randn(0f32, 1., (b, 3, 32, 32), &dev).unwrap();
    let noise = Tensor::randn(0f32, 1., (b, 3, 32, 32), &dev).unwrap();
    let t = Tensor::new(&[10u32, 200, 500, 999][..], &dev).unwrap();
    // A first step fills the caches (convolution scratch, kernels' weights), not counted.
    set_release_saved_on_this_thread(Some(false));
    step(&model, &vm, &x, &noise, &t);
    let (held_kept, peak_kept, g_kept) = step(&model, &vm, &x, &noise, &t);
    set_release_saved_on_this_thread(Some(true));
    step(&model, &vm, &x, &noise, &t);
    let (held, peak, g) = step(&model, &vm, &x, &noise, &t);
    set_release_saved_on_this_thread(None);
    println!("graph after the loss: {held} bytes ({held_kept} kept); backward peak: {peak} bytes released, {peak_kept} kept");
    // The up path's concatenated and upsampled inputs are freed in the forward pass
    // (`release_read_by`): the graph holds less. (A convolution's per-thread scratch may grow by
    // a buffer, ~0.3 MB, in either pass.)
    assert!(held + held_kept / 50 < held_kept, "the forward passes held {held} bytes released and {held_kept} kept");
    assert_eq!(g, g_kept, "the same gradients, bit for bit");
    // Kept, the peak is the whole graph plus the gradients in flight; released, the graph
    // shrinks as the gradients grow.
    assert!(peak_kept > held_kept + held_kept / 4, "the peak when kept ({peak_kept}) is not above the graph ({held_kept}): nothing to compare");
    assert!(peak * 10 < peak_kept * 9, "the backward peak: {peak} bytes released, {peak_kept} kept");
}
