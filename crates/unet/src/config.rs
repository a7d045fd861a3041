//! The UNet's hyper-parameters and presets.

use serde::{Deserialize, Serialize};

use crate::UNetError;

/// Architecture of the reference UNet (`[unet]` in the TOML configs). Field names follow the
/// reference's `hparams.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Image side in pixels (square images).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_channels")]
    pub image_channels: usize,
    /// Number of diffusion steps: rows of the frozen sinusoidal time table.
    pub num_steps: usize,
    /// Base channel count.
    pub ch: usize,
    /// Channel multiplier per resolution level.
    pub ch_mult: Vec<usize>,
    /// Levels (indices into `ch_mult`) whose ResBlocks carry self-attention.
    pub attn: Vec<usize>,
    pub num_res_blocks: usize,
    pub dropout: f32,
}

fn default_image_size() -> usize {
    64
}
fn default_channels() -> usize {
    3
}

/// GroupNorm groups everywhere in the network.
pub const GROUPS: usize = 32;

const MAX_IMAGE_SIZE: usize = 4096;
const MAX_LEVELS: usize = 12;
/// Base channels: the time embedding is `4 ch` wide, its second layer `(4 ch)^2` weights.
const MAX_BASE_CHANNELS: usize = 1024;
const MAX_CHANNELS: usize = 4096;
const MAX_RES_BLOCKS: usize = 64;
/// The same bound as `diffusion::MAX_NUM_STEPS` (this crate does not depend on `diffusion`).
const MAX_NUM_STEPS: usize = 100_000;

impl Default for UNetConfig {
    fn default() -> Self {
        Self::reference()
    }
}

impl UNetConfig {
    /// The reference's trained model: 25,368,963 parameters at 64x64.
    pub fn reference() -> Self {
        Self { image_size: 64, image_channels: 3, num_steps: 1000, ch: 64, ch_mult: vec![1, 2, 4, 4], attn: vec![2], num_res_blocks: 2, dropout: 0.1 }
    }

    /// The DDPM paper's CIFAR-10 model (35.7M parameters), here at 64x64 unless changed, with
    /// its attention at 16x16 as in the paper: level 2 at 64 px (the paper's level 1 at 32 px).
    pub fn cifar10() -> Self {
        Self { image_size: 64, image_channels: 3, num_steps: 1000, ch: 128, ch_mult: vec![1, 2, 2, 2], attn: vec![2], num_res_blocks: 2, dropout: 0.1 }
    }

    /// A small model for tests and the CPU demo (the fixtures' TINY config).
    pub fn tiny() -> Self {
        Self { image_size: 16, image_channels: 3, num_steps: 1000, ch: 32, ch_mult: vec![1, 2], attn: vec![1], num_res_blocks: 1, dropout: 0.1 }
    }

    /// The fixtures' MICRO config: one level pair, no resampling between attention levels.
    pub fn micro() -> Self {
        Self { image_size: 16, image_channels: 3, num_steps: 1000, ch: 32, ch_mult: vec![1, 1], attn: vec![1], num_res_blocks: 1, dropout: 0.1 }
    }

    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "reference" | "anime64" => Some(Self::reference()),
            "cifar10" => Some(Self::cifar10()),
            "tiny" => Some(Self::tiny()),
            "micro" => Some(Self::micro()),
            _ => None,
        }
    }

    pub fn time_dim(&self) -> usize {
        4 * self.ch
    }

    pub fn validate(&self) -> Result<(), UNetError> {
        let bad = |m: String| Err(UNetError::Config(m));
        // Upper bounds turn a typo or a hostile checkpoint (image_size 1e9) into this one-line
        // error instead of an allocation abort; each is far above any model this code serves.
        if !(1..=4).contains(&self.image_channels) {
            return bad(format!("image_channels must be in 1..=4, got {}", self.image_channels));
        }
        if self.image_size > MAX_IMAGE_SIZE {
            return bad(format!("image_size must be at most {MAX_IMAGE_SIZE}, got {}", self.image_size));
        }
        if self.ch_mult.len() > MAX_LEVELS {
            return bad(format!("ch_mult may have at most {MAX_LEVELS} levels, got {}", self.ch_mult.len()));
        }
        if self.ch > MAX_BASE_CHANNELS {
            return bad(format!("ch must be at most {MAX_BASE_CHANNELS}, got {}", self.ch));
        }
        let widest = self.ch.saturating_mul(self.ch_mult.iter().copied().max().unwrap_or(1));
        if widest > MAX_CHANNELS {
            return bad(format!("ch x max(ch_mult) must be at most {MAX_CHANNELS} channels, got {widest}"));
        }
        if self.num_res_blocks > MAX_RES_BLOCKS {
            return bad(format!("num_res_blocks must be at most {MAX_RES_BLOCKS}, got {}", self.num_res_blocks));
        }
        if self.num_steps > MAX_NUM_STEPS {
            return bad(format!("num_steps must be at most {MAX_NUM_STEPS}, got {}", self.num_steps));
        }
        if self.ch == 0 || !self.ch.is_multiple_of(GROUPS) {
            return bad(format!("ch must be a positive multiple of {GROUPS} (GroupNorm groups), got {}", self.ch));
        }
        if self.ch < 4 {
            return bad("ch must be at least 4 for the sinusoidal table".into());
        }
        if self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return bad(format!("ch_mult must be non-empty and positive, got {:?}", self.ch_mult));
        }
        if let Some(a) = self.attn.iter().find(|&&a| a >= self.ch_mult.len()) {
            return bad(format!("attn level {a} does not exist (ch_mult has {} levels)", self.ch_mult.len()));
        }
        if self.num_res_blocks == 0 {
            return bad("num_res_blocks must be at least 1".into());
        }
        if self.num_steps == 0 {
            return bad("num_steps must be positive".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        let down = 1usize << (self.ch_mult.len() - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(down) {
            return bad(format!("image_size must be positive and divisible by {down} ({} levels), got {}", self.ch_mult.len(), self.image_size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_pass_and_absurd_sizes_are_one_line_errors() {
        for name in ["reference", "cifar10", "tiny", "micro"] {
            UNetConfig::preset(name).unwrap().validate().unwrap();
        }
        type Edit = fn(&mut UNetConfig);
        let cases: [(&str, Edit); 9] = [
            ("image_channels", |c| c.image_channels = 0),
            ("image_channels", |c| c.image_channels = 5),
            ("image_size", |c| c.image_size = 1 << 30),
            ("ch_mult", |c| c.ch_mult = vec![1; 70]),
            ("ch must be at most", |c| c.ch = 3_200_000),
            ("ch x max(ch_mult)", |c| c.ch_mult = vec![1, 128]),
            ("ch x max(ch_mult)", |c| c.ch_mult = vec![1, usize::MAX]),
            ("num_res_blocks", |c| c.num_res_blocks = 1000),
            ("num_steps", |c| c.num_steps = 1_000_000_000),
        ];
        for (key, edit) in cases {
            let mut c = UNetConfig::reference();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key) && !e.contains('\n'), "{key}: {e}");
        }
        // The bounds themselves are allowed.
        let mut c = UNetConfig::reference();
        c.image_size = 4096;
        c.image_channels = 1;
        c.ch = 1024;
        c.num_steps = 100_000;
        c.validate().unwrap();
    }
}
