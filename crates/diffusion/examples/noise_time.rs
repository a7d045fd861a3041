//! Time to draw a batch's Gaussian noise on the host (`NoiseRng::normal_vec`), with one thread
//! and with all of them: `cargo run --release -p diffusion --example noise_time`.
//! On a GPU the device waits for this at the start of every training step.
use std::time::Instant;

use diffusion::NoiseRng;

fn main() {
    let all = rayon::current_num_threads();
    for threads in [1, all] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
        for (what, n) in [("training batch 128 (64x64x3)", 128 * 3 * 64 * 64), ("sampling batch 256", 256 * 3 * 64 * 64)] {
            let mut rng = NoiseRng::new(0);
            let _ = pool.install(|| rng.normal_vec(n)); // warm-up
            let t0 = Instant::now();
            let reps = 5;
            for _ in 0..reps {
                std::hint::black_box(pool.install(|| rng.normal_vec(n)));
            }
            println!("{what}: {n} values, {threads} thread(s): {:.1} ms", t0.elapsed().as_secs_f64() * 1e3 / reps as f64);
        }
    }
}
