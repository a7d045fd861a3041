//! Per-image noise streams.
//!
//! Image `i` of a run seeded with `seed` draws every random number it needs (its x_T, the
//! forward-process noise of the recover experiment, then one `z` per stochastic reverse step)
//! from its own ChaCha8 stream `NoiseRng::with_stream(seed, i)`. Results therefore depend on
//! the seed and the image's index only: not on `--batch`, nor on how many images are drawn
//! (the first 16 of a 256-image run are the 16 of a 16-image run).

use candle_core::{Device, Tensor};
use diffusion::NoiseRng;
use rayon::prelude::*;

/// One stream per image, for a contiguous range of image indices.
#[derive(Debug, Clone)]
pub struct ImageStreams {
    rngs: Vec<NoiseRng>,
}

impl ImageStreams {
    /// Streams for images `range.start .. range.end` of a run seeded with `seed`.
    pub fn new(seed: u64, range: std::ops::Range<usize>) -> Self {
        Self { rngs: range.map(|i| NoiseRng::with_stream(seed, i as u64)).collect() }
    }

    pub fn len(&self) -> usize {
        self.rngs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rngs.is_empty()
    }

    /// `[B, dims...]` standard normal noise, image `b`'s slice from stream `b` (drawn in
    /// parallel on the host, then copied to `device` without waiting for the work queued
    /// there: `diffusion::upload`).
    pub fn randn(&mut self, dims: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let per: usize = dims.iter().product();
        let mut shape = vec![self.rngs.len()];
        shape.extend_from_slice(dims);
        let rngs = &mut self.rngs;
        diffusion::upload::tensor_from_fn(shape, device, |data: &mut [f32]| {
            data.par_chunks_mut(per.max(1)).zip(rngs.par_iter_mut()).for_each(|(dst, rng)| rng.fill_normal(dst));
        })
    }
}
