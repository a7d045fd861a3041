//! Seeded, resumable noise.
//!
//! candle's CPU backend cannot be seeded, so every random number of training and sampling is
//! drawn here from a ChaCha8 stream whose position can be saved and restored: a resumed run
//! continues the exact same stream.

use candle_core::{Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Above this many values, [`NoiseRng::normal_vec`] fills chunks of this size in parallel.
pub const NORMAL_CHUNK: usize = 1 << 15;

/// A ChaCha8 generator with Gaussian/uniform helpers that produce candle tensors.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    inner: ChaCha8Rng,
}

/// The generator's position, to store in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    /// Word position in the stream (a u128, kept as a string so JSON readers lose nothing).
    pub word_pos: String,
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self { inner: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// An independent stream derived from this seed, e.g. one for data order and one for noise.
    pub fn with_stream(seed: u64, stream: u64) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(stream);
        Self { inner }
    }

    pub fn state(&self) -> RngState {
        RngState {
            seed: self.inner.get_seed(),
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    pub fn from_state(state: &RngState) -> Result<Self, crate::DiffusionError> {
        let pos: u128 = state
            .word_pos
            .parse()
            .map_err(|_| crate::DiffusionError::Config(format!("bad RNG word position '{}'", state.word_pos)))?;
        let mut inner = ChaCha8Rng::from_seed(state.seed);
        inner.set_stream(state.stream);
        inner.set_word_pos(pos);
        Ok(Self { inner })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.random()
    }

    /// Uniform integer in `0..n` (an error for `n = 0`: the range is empty).
    pub fn below(&mut self, n: usize) -> Result<usize, crate::DiffusionError> {
        if n == 0 {
            return Err(crate::DiffusionError::Invalid("cannot draw from the empty range 0..0".into()));
        }
        Ok(self.inner.random_range(0..n))
    }

    /// `true` with probability `p`, which must be in [0, 1].
    pub fn bernoulli(&mut self, p: f64) -> Result<bool, crate::DiffusionError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(crate::DiffusionError::Invalid(format!("probability {p} is outside [0, 1]")));
        }
        Ok(self.inner.random_bool(p))
    }

    /// `n` standard normal values (see [`NoiseRng::fill_normal`]).
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        self.fill_normal(&mut out);
        out
    }

    /// `out.len()` standard normal values into `out`. Up to [`NORMAL_CHUNK`] they come straight
    /// from this stream; above, one `u64` drawn from it seeds a stream per chunk of
    /// `NORMAL_CHUNK` values, filled in parallel. The values depend on the stream's position
    /// and the length only, not on the thread count. Why: a training batch of 128 is 1.5 M
    /// values, ~11 ms on one core, and on a GPU the device waits for them at the start of every
    /// step.
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        if out.len() <= NORMAL_CHUNK {
            for v in out {
                *v = self.inner.sample(StandardNormal);
            }
            return;
        }
        let seed = self.next_u64();
        out.par_chunks_mut(NORMAL_CHUNK).enumerate().for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            for v in chunk {
                *v = rng.sample(StandardNormal);
            }
        });
    }

    /// Standard normal f32 tensor, drawn on the host and copied to `device` without waiting
    /// for the work queued there ([`crate::upload`]).
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> candle_core::Result<Tensor> {
        crate::upload::tensor_from_fn(shape, device, |out: &mut [f32]| self.fill_normal(out))
    }

    /// Uniform timesteps in `0..num_steps`, as a u32 tensor, and the same values on the host.
    pub fn timesteps(&mut self, batch: usize, num_steps: usize, device: &Device) -> candle_core::Result<(Vec<u32>, Tensor)> {
        if num_steps == 0 || num_steps > u32::MAX as usize {
            candle_core::bail!("timesteps: num_steps must be in 1..={}, got {num_steps}", u32::MAX);
        }
        let ts: Vec<u32> = (0..batch).map(|_| self.inner.random_range(0..num_steps) as u32).collect();
        let t = crate::upload::tensor_from_slice(&ts, batch, device)?;
        Ok((ts, t))
    }

    pub fn rng_mut(&mut self) -> &mut ChaCha8Rng {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = NoiseRng::new(999);
        let _ = a.normal_vec(17);
        let saved = a.state();
        let json = serde_json_like(&saved);
        let expect = a.normal_vec(5);
        let mut b = NoiseRng::from_state(&json).unwrap();
        assert_eq!(b.normal_vec(5), expect);
    }

    fn serde_json_like(s: &RngState) -> RngState {
        s.clone()
    }

    #[test]
    fn streams_differ() {
        let mut a = NoiseRng::with_stream(1, 0);
        let mut b = NoiseRng::with_stream(1, 1);
        assert_ne!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn parallel_normals_are_reproducible_resumable_and_independent() {
        let n = 3 * NORMAL_CHUNK + 17;
        let mut a = NoiseRng::new(5);
        let first = a.normal_vec(n);
        let saved = a.state();
        let second = a.normal_vec(n);
        assert_eq!(NoiseRng::new(5).normal_vec(n), first);
        assert_eq!(NoiseRng::from_state(&saved).unwrap().normal_vec(n), second);
        assert_ne!(first, second);
        // Each chunk has its own stream: no two chunks repeat each other.
        let chunks: Vec<&[f32]> = first.chunks(NORMAL_CHUNK).collect();
        for i in 0..chunks.len() {
            for j in i + 1..chunks.len() {
                let k = chunks[j].len().min(chunks[i].len());
                assert_ne!(chunks[i][..k], chunks[j][..k], "chunks {i} and {j}");
            }
        }
        // The same values with one thread as with many.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert_eq!(pool.install(|| NoiseRng::new(5).normal_vec(n)), first);
        let m = first.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = first.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.02 && (var - 1.0).abs() < 0.02, "{m} {var}");
    }

    #[test]
    fn normal_moments() {
        let mut r = NoiseRng::new(3);
        let v = r.normal_vec(100_000);
        let mean: f64 = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var: f64 = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }
}
