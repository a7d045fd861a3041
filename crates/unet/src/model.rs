//! The reference UNet, block by block, with the reference's parameter names.

use std::cell::Cell;

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use crate::bmm::bmm;
use crate::conv::Conv2d;
use crate::norm::{GroupNorm, HashedDropout};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use rand_chacha::ChaCha8Rng;

use crate::config::{UNetConfig, GROUPS};

/// Name of the frozen sinusoidal table in the reference's state dict.
pub const TIME_TABLE_KEY: &str = "time_embedding.time_embedding.0.weight";

const GN_EPS: f64 = 1e-5;

/// Whether dropout is active. Training masks are drawn from `seed` (per forward pass), so a
/// training step is reproducible: on CPU from ChaCha streams of the seed, bit for bit; on other
/// devices from `norm::HashedDropout`, a hash of the seed, the call site and the element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
    /// Part of a training batch, from its image `first_image` on (gradient accumulation): each
    /// image gets the dropout masks it would get in the whole batch's pass seeded with `seed`,
    /// so that the parts' gradients add up to the whole batch's. `Train { seed }` is the part
    /// from image 0.
    TrainPart { seed: u64, first_image: u64 },
    /// `TrainPart` with the seed in device memory: the 8 bytes at CUDA device address `seed_at`,
    /// read by the kernels when they run (CUDA only; the caller keeps that memory alive). A
    /// training step replayed from a CUDA graph runs with the captured arguments, so the seed,
    /// which changes every step, must be found there: the masks are those of
    /// `TrainPart { seed: <the value there>, first_image }`.
    TrainSeedAt { seed_at: u64, first_image: u64 },
}

/// Where a training pass's dropout seed is.
#[derive(Debug, Clone, Copy)]
enum Seed {
    Host(u64),
    /// A device address.
    At(u64),
}

/// Hands out one dropout mask per call site within a forward pass.
struct DropoutMasks {
    seed: Option<Seed>,
    first_image: u64,
    next_stream: Cell<u64>,
}

impl DropoutMasks {
    fn new(mode: Mode) -> Self {
        let (seed, first_image) = match mode {
            Mode::Eval => (None, 0),
            Mode::Train { seed } => (Some(Seed::Host(seed)), 0),
            Mode::TrainPart { seed, first_image } => (Some(Seed::Host(seed)), first_image),
            Mode::TrainSeedAt { seed_at, first_image } => (Some(Seed::At(seed_at)), first_image),
        };
        Self { seed, first_image, next_stream: Cell::new(0) }
    }

    /// Where `x`'s first element stands in the whole batch's tensor at this call site (the masks
    /// run over the batch image by image).
    fn element_offset(&self, x: &Tensor) -> Result<u64> {
        if self.first_image == 0 {
            return Ok(0);
        }
        let per_image = x.elem_count() / x.dim(0)?.max(1);
        Ok(self.first_image * per_image as u64)
    }

    /// The seed and the next call site's number, when dropout is on at rate `p`.
    fn next_site(&self, p: f32) -> Option<(Seed, u64)> {
        let seed = self.seed?;
        if p <= 0.0 {
            return None;
        }
        let stream = self.next_stream.get();
        self.next_stream.set(stream + 1);
        Some((seed, stream))
    }

    #[cfg(test)]
    fn apply(&self, x: &Tensor, p: f32) -> Result<Tensor> {
        match self.mask(x, p)? {
            Some(mask) => x.mul(&mask.to_dtype(x.dtype())?),
            None => Ok(x.clone()),
        }
    }

    /// `hardswish(gn(x))` with dropout, fused: on CPU with the ChaCha mask, elsewhere hashed (no
    /// mask stored on CUDA).
    fn apply_after_norm(&self, gn: &GroupNorm, x: &Tensor, p: f32) -> Result<Tensor> {
        if x.device().is_cpu() {
            return match self.mask(x, p)? {
                Some(mask) => gn.forward_hardswish_masked(x, &mask),
                None => gn.forward_hardswish(x),
            };
        }
        let hashed = match self.next_site(p) {
            Some((Seed::Host(seed), site)) => HashedDropout::new(seed, site, p),
            Some((Seed::At(at), site)) => HashedDropout::with_seed_at(at, site, p),
            None => return gn.forward_hardswish(x),
        };
        gn.forward_hardswish_dropout(x, hashed.from_element(self.element_offset(x)?))
    }

    /// `hardswish(gn(x + shift))` with dropout (`GroupNorm::forward_hardswish_shifted`): the
    /// same call site, and so the same masks, as [`DropoutMasks::apply_after_norm`] on `x + shift`.
    /// For devices other than the CPU (the CPU keeps the separate addition, `ResBlock::forward`).
    fn apply_after_norm_shifted(&self, gn: &GroupNorm, x: &Tensor, shift: &Tensor, p: f32) -> Result<Tensor> {
        let hashed = match self.next_site(p) {
            Some((Seed::Host(seed), site)) => Some(HashedDropout::new(seed, site, p)),
            Some((Seed::At(at), site)) => Some(HashedDropout::with_seed_at(at, site, p)),
            None => None,
        };
        let hashed = match hashed {
            Some(h) => Some(h.from_element(self.element_offset(x)?)),
            None => None,
        };
        gn.forward_hardswish_shifted(x, shift, hashed)
    }

    /// The next call site's mask (0 or 1/(1-p) per element), or `None` when dropout is off.
    fn mask(&self, x: &Tensor, p: f32) -> Result<Option<Tensor>> {
        let (seed, stream) = match self.next_site(p) {
            None => return Ok(None),
            Some((Seed::Host(seed), stream)) => (seed, stream),
            Some((Seed::At(_), _)) => candle_core::bail!("dropout with its seed in device memory (Mode::TrainSeedAt) needs a CUDA device and the fused GroupNorm"),
        };
        let keep = 1.0 / (1.0 - p);
        let first = self.element_offset(x)?;
        let mask = if x.device().is_cpu() {
            // In bulk and in parallel, the same words `random::<f32>()` would draw one by one
            // (its top 24 bits): each task seeks the stream to its first word.
            const WORDS_PER_TASK: usize = 1 << 16;
            let mut m = crate::output_buffer(x.elem_count(), 0);
            m.par_chunks_mut(WORDS_PER_TASK).enumerate().for_each_init(Vec::new, |words: &mut Vec<u32>, (i, out)| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(stream);
                rng.set_word_pos(first as u128 + (i * WORDS_PER_TASK) as u128);
                words.resize(out.len(), 0);
                rng.fill(&mut words[..]);
                // Writes every element of the buffer.
                for (o, &u) in out.iter_mut().zip(words.iter()) {
                    *o = if ((u >> 8) as f32) * (1.0 / (1u32 << 24) as f32) < p { 0.0 } else { keep };
                }
            });
            Tensor::from_vec(m, x.shape(), x.device())?
        } else {
            HashedDropout::new(seed, stream, p).from_element(first).mask(x.shape(), x.device())?
        };
        Ok(Some(mask))
    }
}

#[cfg(test)]
thread_local! {
    /// Tests run the folded path on the CPU (where the norm adds the shift first).
    static FOLD_FOR_TESTS: Cell<bool> = const { Cell::new(false) };
}

/// Whether `ResBlock::forward` folds the time embedding and conv1's bias into GroupNorm, and
/// conv2's (and the shortcut's) bias into the residual sum, as `AttnBlock` its projection's
/// (CUDA, `UNET_FOLD_TEMB=1`).
fn fold_temb(x: &Tensor) -> bool {
    #[cfg(test)]
    if FOLD_FOR_TESTS.with(|f| f.get()) {
        return true;
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::cuda_ops::fold_temb_enabled();
    }
    let _ = x;
    false
}

pub(crate) fn hardswish(x: &Tensor) -> Result<Tensor> {
    // PyTorch: x * relu6(x + 3) / 6
    x.mul(&x.affine(1.0, 3.0)?.clamp(0.0, 6.0)?.affine(1.0 / 6.0, 0.0)?)
}

/// The reference's sinusoid table: row t = [sin(t f_k) | cos(t f_k)], f_k = exp(-k ln(1e4)/(ch/2-1)),
/// computed in f32 like the reference.
pub fn sinusoid_table(num_steps: usize, dim: usize, device: &Device) -> Result<Tensor> {
    // The frequencies divide by half - 1: an odd or smaller dim has no table.
    if dim < 4 || !dim.is_multiple_of(2) {
        candle_core::bail!("sinusoid_table: dim must be even and at least 4, got {dim}");
    }
    let half = dim / 2;
    let scale = -(10000f64.ln() as f32) / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|k| (k as f32 * scale).exp()).collect();
    let mut data = Vec::with_capacity(num_steps * dim);
    for t in 0..num_steps {
        let angles = freqs.iter().map(|f| t as f32 * f);
        data.extend(angles.clone().map(f32::sin));
        data.extend(angles.map(f32::cos));
    }
    Tensor::from_vec(data, (num_steps, dim), device)
}

/// `time_embedding.time_embedding.{0,1,3}`: frozen table, Linear, Hardswish, Linear.
pub struct TimeEmbedding {
    table: Tensor,
    lin1: Linear,
    lin2: Linear,
}

impl TimeEmbedding {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let key = "0.weight";
        // The table is a constant: taken from a checkpoint when it carries one, computed otherwise,
        // and never a trainable variable.
        let table = if vb.contains_tensor(key) {
            vb.get((cfg.num_steps, cfg.ch), key)?.detach()
        } else {
            sinusoid_table(cfg.num_steps, cfg.ch, vb.device())?.to_dtype(vb.dtype())?
        };
        let lin1 = linear(cfg.ch, cfg.time_dim(), vb.pp("1"))?;
        let lin2 = linear(cfg.time_dim(), cfg.time_dim(), vb.pp("3"))?;
        Ok(Self { table, lin1, lin2 })
    }

    pub fn table(&self) -> &Tensor {
        &self.table
    }
}

impl Module for TimeEmbedding {
    fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let e = self.table.index_select(t, 0)?;
        self.lin2.forward(&hardswish(&self.lin1.forward(&e)?)?)
    }
}

/// Single-head spatial self-attention with a GroupNorm pre-norm and a residual.
pub struct AttnBlock {
    norm: GroupNorm,
    proj_q: Conv2d,
    proj_k: Conv2d,
    proj_v: Conv2d,
    proj: Conv2d,
    /// q, k and v's projections as one convolution, stacked once when the weights are
    /// [`stackable`] (as `UNet`'s time-embedding projections).
    qkv_stack: Option<Conv2d>,
}

impl AttnBlock {
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        let mut blk = Self {
            norm: GroupNorm::new(vb.pp("norm"), GROUPS, c, GN_EPS)?,
            proj_q: Conv2d::new(vb.pp("proj_q"), c, c, 1, 1, 0)?,
            proj_k: Conv2d::new(vb.pp("proj_k"), c, c, 1, 1, 0)?,
            proj_v: Conv2d::new(vb.pp("proj_v"), c, c, 1, 1, 0)?,
            proj: Conv2d::new(vb.pp("proj"), c, c, 1, 1, 0)?,
            qkv_stack: None,
        };
        let parts = [&blk.proj_q, &blk.proj_k, &blk.proj_v];
        if fused_qkv() && parts.iter().all(|p| stackable(p.weight()) && stackable(p.bias())) {
            blk.qkv_stack = Some(blk.stacked_qkv()?);
        }
        Ok(blk)
    }

    /// q, k and v's projections as one 1x1 convolution of 3C outputs: each output is the same
    /// dot product, where three convolutions cost three calls forward and six backward (and
    /// two additions of their input gradients), each with a cuDNN call's host time on a GPU.
    fn stacked_qkv(&self) -> Result<Conv2d> {
        let parts = [&self.proj_q, &self.proj_k, &self.proj_v];
        let w = Tensor::cat(&parts.map(|p| p.weight()), 0)?;
        let b = Tensor::cat(&parts.map(|p| p.bias()), 0)?;
        Ok(Conv2d::from_parts(w, b, 1, 0))
    }

    /// q, k, v of the normalised input `n`, each `[B, C, HW]`.
    fn qkv(&self, n: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, c, h, w) = n.dims4()?;
        if !fused_qkv() {
            let part = |p: &Conv2d| p.forward(n)?.reshape((b, c, h * w));
            return Ok((part(&self.proj_q)?, part(&self.proj_k)?, part(&self.proj_v)?));
        }
        let qkv = match &self.qkv_stack {
            Some(conv) => conv.forward(n)?,
            None => self.stacked_qkv()?.forward(n)?,
        };
        // Views, each image's q (k, v) rows contiguous, 3C x HW apart: bmm reads them so.
        let qkv = qkv.reshape((b, 3, c, h * w))?;
        let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1);
        Ok((part(0)?, part(1)?, part(2)?))
    }
}

/// Whether a weight may be stacked with others once, when the model is built: not a variable
/// (which the optimizer changes in place) and held in memory as it is (not a broadcast
/// placeholder of the shape recorder).
fn stackable(t: &Tensor) -> bool {
    !t.is_variable() && t.is_contiguous()
}

#[cfg(test)]
thread_local! {
    /// Tests run the three separate projections too.
    static SEPARATE_QKV_FOR_TESTS: Cell<bool> = const { Cell::new(false) };
}

/// Whether attention computes q, k and v with one stacked convolution: by default;
/// `UNET_FUSED_QKV=0` runs the reference's three (for A/B runs, and a way out on a GPU).
fn fused_qkv() -> bool {
    #[cfg(test)]
    if SEPARATE_QKV_FOR_TESTS.with(|f| f.get()) {
        return false;
    }
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_FUSED_QKV").map_or(true, |v| v != "0"))
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let (q, k, v) = self.qkv(&n)?;
        // scores[b, i, j] = sum_c q[b, c, i] k[b, c, j]
        let attn = crate::softmax::scaled_softmax_last_dim(&bmm(&q, true, &k, false)?, (c as f64).powf(-0.5))?;
        // out[b, c, i] = sum_j v[b, c, j] attn[b, i, j]
        let out = bmm(&v, false, &attn, true)?.reshape((b, c, h, w))?;
        if fold_temb(x) {
            // The projection's bias in the residual sum, as in `ResBlock`.
            return crate::conv::residual_add_with_bias(x, &self.proj.forward_without_bias(&out)?, self.proj.bias());
        }
        self.proj.forward_plus(&out, x)
    }
}

/// The reference's ResBlock (attention, when present, is applied after the residual add).
pub struct ResBlock {
    temb_proj: Linear,
    gn1: GroupNorm,
    conv1: Conv2d,
    gn2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    attn: Option<AttnBlock>,
    dropout: f32,
}

impl ResBlock {
    pub fn new(vb: VarBuilder, cin: usize, cout: usize, t_dim: usize, dropout: f32, use_attn: bool) -> Result<Self> {
        Ok(Self {
            temb_proj: linear(t_dim, cout, vb.pp("temb_proj.1"))?,
            gn1: GroupNorm::new(vb.pp("block1.0"), GROUPS, cin, GN_EPS)?,
            conv1: Conv2d::new(vb.pp("block1.2"), cin, cout, 3, 1, 1)?,
            gn2: GroupNorm::new(vb.pp("block2.0"), GROUPS, cout, GN_EPS)?,
            conv2: Conv2d::new(vb.pp("block2.3"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout { Some(Conv2d::new(vb.pp("shortcut"), cin, cout, 1, 1, 0)?) } else { None },
            attn: if use_attn { Some(AttnBlock::new(vb.pp("attn"), cout)?) } else { None },
            dropout,
        })
    }

    /// `t`: this block's `temb_proj` of the time embedding, `[B or 1, cout]`
    /// ([`UNet::temb_projections`] makes all the blocks' at once).
    fn forward(&self, x: &Tensor, t: &Tensor, masks: &DropoutMasks) -> Result<Tensor> {
        let a = self.gn1.forward_hardswish(x)?;
        let h = if fold_temb(x) {
            // conv1's bias and the time embedding, one value per image and channel, go into the
            // norm that follows: no full-size sum stored, no reductions for their gradients.
            let h = self.conv1.forward_without_bias(&a)?;
            let (n, c) = (h.dim(0)?, h.dim(1)?);
            // One step for the whole batch (`t` of shape [1]) gives one row: one per image here.
            let shift = t.broadcast_add(self.conv1.bias())?.broadcast_as((n, c))?.contiguous()?;
            masks.apply_after_norm_shifted(&self.gn2, &h, &shift, self.dropout)?
        } else {
            let h = self.conv1.forward_plus(&a, &t.unsqueeze(2)?.unsqueeze(3)?)?;
            masks.apply_after_norm(&self.gn2, &h, self.dropout)?
        };
        let out = if fold_temb(x) {
            // conv2's bias (and the shortcut's) go into the residual sum: one pass, not three.
            let h = self.conv2.forward_without_bias(&h)?;
            let (skip, bias) = match &self.shortcut {
                Some(s) => (s.forward_without_bias(x)?, self.conv2.bias().add(s.bias())?),
                None => (x.clone(), self.conv2.bias().clone()),
            };
            crate::conv::residual_add_with_bias(&skip, &h, &bias)?
        } else {
            let skip = match &self.shortcut {
                Some(s) => s.forward(x)?,
                None => x.clone(),
            };
            self.conv2.forward_plus(&h, &skip)?
        };
        match &self.attn {
            Some(a) => a.forward(&out),
            None => Ok(out),
        }
    }
}

/// 3x3 stride-2 convolution.
pub struct DownSample {
    net: Conv2d,
}

impl DownSample {
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self { net: Conv2d::new(vb.pp("net"), c, c, 3, 2, 1)? })
    }
}

impl Module for DownSample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.net.forward(x)
    }
}

/// Nearest-neighbour x2, then a 3x3 convolution.
pub struct UpSample {
    net: Conv2d,
}

impl UpSample {
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self { net: Conv2d::new(vb.pp("net"), c, c, 3, 1, 1)? })
    }
}

impl UpSample {
    /// The convolution, given the upsampled input.
    fn forward_upsampled(&self, up: &Tensor) -> Result<Tensor> {
        self.net.forward(up)
    }
}

impl Module for UpSample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_upsampled(&crate::upsample::upsample2x(x)?)
    }
}

/// Frees `h`'s buffer once `reader`, a concatenation or an upsampling of it and its only reader,
/// is made: the graph would otherwise hold it until the backward pass, which never reads it
/// (about 8 MB an image for the reference network's up path). Kept when anything else holds
/// `h` (the middle activations `forward_with_intermediates` returns) or with
/// `UNET_RELEASE_SAVED=0`.
fn release_read_by(h: Tensor, reader: &Tensor) {
    if !candle_core::backprop::releases_saved_values() {
        return;
    }
    // SAFETY: nothing reads `h`'s values after this. In the forward pass its one reader has run.
    // In the backward pass: a concatenation's and our upsampling's arms read only shapes and the
    // output's gradient; `h` is made by a block whose last op's arm reads no output value (an
    // addition, in place into a convolution's output or not; `residual_add_with_bias`; a
    // convolution, ours or candle's), and a convolution's arm reads its input and weight only.
    unsafe { h.release_unread(reader) };
}

/// One index of `downblocks` / `upblocks`.
pub enum Block {
    Res(Box<ResBlock>),
    Down(DownSample),
    Up(UpSample),
}

/// Activations besides the output, for parity tests.
pub struct Intermediates {
    pub temb: Tensor,
    pub mid: Tensor,
}

/// The reference UNet: predicts the noise in `x_t` at step `t`.
pub struct UNet {
    config: UNetConfig,
    time_embedding: TimeEmbedding,
    head: Conv2d,
    downblocks: Vec<Block>,
    middle_blocks: Vec<ResBlock>,
    upblocks: Vec<Block>,
    tail_norm: GroupNorm,
    tail_conv: Conv2d,
    /// The ResBlocks' `temb_proj` weights and biases stacked once, when none of them is a
    /// variable (a model for sampling, or a training step's bf16 casts): see
    /// [`UNet::temb_projections`].
    temb_stack: Option<(Tensor, Tensor)>,
}

impl UNet {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let t_dim = cfg.time_dim();
        let time_embedding = TimeEmbedding::new(vb.pp("time_embedding.time_embedding"), cfg)?;
        let head = Conv2d::new(vb.pp("head"), cfg.image_channels, cfg.ch, 3, 1, 1)?;

        let mut skip_ch = vec![cfg.ch];
        let mut c = cfg.ch;
        let mut downblocks = Vec::new();
        let vbd = vb.pp("downblocks");
        for (lvl, &m) in cfg.ch_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let i = downblocks.len();
                downblocks.push(Block::Res(Box::new(ResBlock::new(vbd.pp(i), c, cfg.ch * m, t_dim, cfg.dropout, cfg.attn.contains(&lvl))?)));
                c = cfg.ch * m;
                skip_ch.push(c);
            }
            if lvl + 1 < cfg.ch_mult.len() {
                let i = downblocks.len();
                downblocks.push(Block::Down(DownSample::new(vbd.pp(i), c)?));
                skip_ch.push(c);
            }
        }
        let vbm = vb.pp("middle_blocks");
        let middle_blocks = vec![
            ResBlock::new(vbm.pp(0), c, c, t_dim, cfg.dropout, true)?,
            ResBlock::new(vbm.pp(1), c, c, t_dim, cfg.dropout, false)?,
        ];
        let mut upblocks = Vec::new();
        let vbu = vb.pp("upblocks");
        for lvl in (0..cfg.ch_mult.len()).rev() {
            let cout = cfg.ch * cfg.ch_mult[lvl];
            for _ in 0..=cfg.num_res_blocks {
                let skip = skip_ch.pop().expect("the skip stack matches the down path");
                let i = upblocks.len();
                upblocks.push(Block::Res(Box::new(ResBlock::new(vbu.pp(i), c + skip, cout, t_dim, cfg.dropout, cfg.attn.contains(&lvl))?)));
                c = cout;
            }
            if lvl > 0 {
                let i = upblocks.len();
                upblocks.push(Block::Up(UpSample::new(vbu.pp(i), c)?));
            }
        }
        debug_assert!(skip_ch.is_empty());
        let tail_norm = GroupNorm::new(vb.pp("tail.0"), GROUPS, c, GN_EPS)?;
        let tail_conv = Conv2d::new(vb.pp("tail.2"), c, cfg.image_channels, 3, 1, 1)?;
        let mut net = Self { config: cfg.clone(), time_embedding, head, downblocks, middle_blocks, upblocks, tail_norm, tail_conv, temb_stack: None };
        // Variables change in place at every optimizer step, so a trainable model stacks them
        // at every forward pass. Other weights are a snapshot: stacked here, once, a model for
        // sampling saves 44 copies per network call (a UNet built from tensors that are later
        // changed in place would not see the change in these: build it again). Not for
        // broadcast placeholders (`weights::expected_shapes`), which stacking would fill in.
        let (ws, bs) = net.temb_weights()?;
        let stack = if ws.iter().chain(&bs).all(|t| stackable(t)) { Some((Tensor::cat(&ws, 0)?, Tensor::cat(&bs, 0)?)) } else { None };
        net.temb_stack = stack;
        Ok(net)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The frozen time table (saved under [`TIME_TABLE_KEY`] so checkpoints match the reference).
    pub fn time_table(&self) -> &Tensor {
        self.time_embedding.table()
    }

    /// The dtype of the weights (and so of the computation).
    pub fn dtype(&self) -> candle_core::DType {
        self.time_table().dtype()
    }

    /// `x`: `[B, C, H, W]` with B >= 1 and H, W divisible by 2^(levels - 1); `t`: u32/i64 steps
    /// in `0..num_steps`, of shape `[B]` (or `[1]`, broadcast over the batch). Steps are checked
    /// when `t` is on the CPU; on a GPU that would cost a synchronisation per call, so there an
    /// out-of-range step is the caller's error (the samplers and trainer make them on the host).
    pub fn forward_t(&self, x: &Tensor, t: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self.forward_with_intermediates(x, t, mode)?.0)
    }

    /// Shapes, dtypes and (on the CPU) step values, so that a wrong input is an error that says
    /// what is wrong instead of a shape error deep in the network, or a silently zero embedding.
    fn check_input(&self, x: &Tensor, t: &Tensor) -> Result<()> {
        let cfg = &self.config;
        let (b, c, h, w) = x.dims4().map_err(|_| candle_core::Error::Msg(format!("UNet input must be [B, C, H, W], got {:?}", x.dims())))?;
        let f = 1usize << (cfg.ch_mult.len() - 1);
        if b == 0 {
            candle_core::bail!("UNet input is an empty batch ({:?})", x.dims());
        }
        if c != cfg.image_channels {
            candle_core::bail!("UNet input has {c} channels, the model takes {}", cfg.image_channels);
        }
        if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            candle_core::bail!("UNet input is {h}x{w}: both sides must be positive multiples of {f} (2^(levels - 1))");
        }
        if x.dtype() != self.dtype() {
            candle_core::bail!("UNet input is {:?} but the model's weights are {:?}", x.dtype(), self.dtype());
        }
        if !matches!(t.dtype(), candle_core::DType::U32 | candle_core::DType::I64) {
            candle_core::bail!("UNet steps t must be u32 or i64, got {:?}", t.dtype());
        }
        let n = match t.dims() {
            [n] => *n,
            d => candle_core::bail!("UNet steps t must have shape [B] or [1], got {d:?}"),
        };
        if n != b && n != 1 {
            candle_core::bail!("UNet steps t has {n} values for a batch of {b}");
        }
        if t.device().is_cpu() {
            let bad = t.flatten_all()?.to_dtype(candle_core::DType::I64)?.to_vec1::<i64>()?.into_iter().find(|&s| s < 0 || s as u64 >= cfg.num_steps as u64);
            if let Some(s) = bad {
                candle_core::bail!("UNet step t = {s} is outside 0..{}", cfg.num_steps);
            }
        }
        Ok(())
    }

    /// The ResBlocks in the order the forward pass runs them.
    fn res_blocks(&self) -> impl Iterator<Item = &ResBlock> {
        fn res(b: &Block) -> Option<&ResBlock> {
            match b {
                Block::Res(r) => Some(r),
                _ => None,
            }
        }
        self.downblocks.iter().filter_map(res).chain(self.middle_blocks.iter()).chain(self.upblocks.iter().filter_map(res))
    }

    /// Every ResBlock's `temb_proj` (Hardswish, Linear) of `temb`, in [`Self::res_blocks`]'
    /// order: the Hardswish once, and the 22 Linears of the reference network as one product
    /// with their weights stacked, each block's output a narrow of it. The same sums as 22
    /// products (each output is one dot product either way), where those cost 22 GEMM calls
    /// in the forward pass and 44 in the backward one, with a bias pass and a reduction each:
    /// on a GPU, per-call host time. The stacking costs a copy of each weight and bias, and
    /// their gradients a copy back.
    fn temb_projections(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        let act = hardswish(temb)?;
        let (w, b) = match &self.temb_stack {
            Some((w, b)) => (w.clone(), b.clone()),
            None => {
                let (ws, bs) = self.temb_weights()?;
                (Tensor::cat(&ws, 0)?, Tensor::cat(&bs, 0)?)
            }
        };
        let all = Linear::new(w, Some(b)).forward(&act)?;
        let mut start = 0;
        let mut out = Vec::new();
        for blk in self.res_blocks() {
            let n = blk.temb_proj.weight().dim(0)?;
            out.push(all.narrow(1, start, n)?);
            start += n;
        }
        Ok(out)
    }

    /// The ResBlocks' `temb_proj` Linear weights and biases, in [`Self::res_blocks`]' order.
    fn temb_weights(&self) -> Result<(Vec<&Tensor>, Vec<&Tensor>)> {
        let mut ws = Vec::new();
        let mut bs = Vec::new();
        for blk in self.res_blocks() {
            ws.push(blk.temb_proj.weight());
            bs.push(blk.temb_proj.bias().ok_or_else(|| candle_core::Error::Msg("UNet: a temb_proj without its bias".into()))?);
        }
        Ok((ws, bs))
    }

    pub fn forward_with_intermediates(&self, x: &Tensor, t: &Tensor, mode: Mode) -> Result<(Tensor, Intermediates)> {
        self.check_input(x, t)?;
        let masks = DropoutMasks::new(mode);
        let temb = self.time_embedding.forward(t)?;
        let mut projections = self.temb_projections(&temb)?.into_iter();
        let mut next_t = || projections.next().ok_or_else(|| candle_core::Error::Msg("UNet: fewer time-embedding projections than ResBlocks".into()));
        let mut h = self.head.forward(x)?;
        let mut skips = vec![h.clone()];
        for blk in &self.downblocks {
            h = match blk {
                Block::Res(r) => r.forward(&h, &next_t()?, &masks)?,
                Block::Down(d) => d.forward(&h)?,
                Block::Up(_) => unreachable!("no upsampling on the down path"),
            };
            skips.push(h.clone());
        }
        for blk in &self.middle_blocks {
            h = blk.forward(&h, &next_t()?, &masks)?;
        }
        let mid = h.clone();
        for blk in &self.upblocks {
            h = match blk {
                Block::Res(r) => {
                    let skip = skips.pop().expect("the skip stack matches the up path");
                    let x = Tensor::cat(&[&h, &skip], 1)?;
                    release_read_by(h, &x);
                    r.forward(&x, &next_t()?, &masks)?
                }
                Block::Up(u) => {
                    let up = crate::upsample::upsample2x(&h)?;
                    release_read_by(h, &up);
                    u.forward_upsampled(&up)?
                }
                Block::Down(_) => unreachable!("no downsampling on the up path"),
            };
        }
        let out = self.tail_conv.forward(&self.tail_norm.forward_hardswish(&h)?)?;
        Ok((out, Intermediates { temb, mid }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    enum Wave {
        Sin,
        Cos,
    }

    /// A deterministic `[n, 3, s, s]` CPU batch: sin or cos of `step` times each element's index.
    fn wave_batch(n: usize, s: usize, step: f64, wave: Wave) -> Tensor {
        let i = Tensor::arange(0u32, (n * 3 * s * s) as u32, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().affine(step, 0.0).unwrap();
        match wave {
            Wave::Sin => i.sin(),
            Wave::Cos => i.cos(),
        }
        .unwrap()
        .reshape((n, 3, s, s))
        .unwrap()
    }

    #[test]
    fn wrong_inputs_are_errors_that_say_what_is_wrong() {
        let dev = Device::Cpu;
        let cfg = UNetConfig::tiny();
        let (net, _vars) = crate::new_trainable(&cfg, &dev, 0).unwrap();
        let s = cfg.image_size;
        let x = |b: usize, c: usize, h: usize, dt: DType| Tensor::zeros((b, c, h, h), dt, &dev).unwrap();
        let t = |v: &[u32]| Tensor::new(v, &dev).unwrap();
        let err = |x: &Tensor, t: &Tensor| net.forward_t(x, t, Mode::Eval).unwrap_err().to_string();
        assert!(err(&x(0, 3, s, DType::F32), &t(&[])).contains("empty batch"));
        assert!(err(&x(1, 1, s, DType::F32), &t(&[0])).contains("channels"));
        assert!(err(&x(1, 3, s + 1, DType::F32), &t(&[0])).contains("multiples"));
        assert!(err(&x(1, 3, s, DType::F64), &t(&[0])).contains("F64"));
        assert!(err(&x(2, 3, s, DType::F32), &t(&[0, 1, 2])).contains("3 values for a batch of 2"));
        assert!(err(&x(1, 3, s, DType::F32), &Tensor::new(&[0f32], &dev).unwrap()).contains("u32 or i64"));
        // u32::MAX used to index the time table as padding: a silently zero embedding.
        assert!(err(&x(1, 3, s, DType::F32), &t(&[u32::MAX])).contains("outside 0.."));
        assert!(err(&x(1, 3, s, DType::F32), &t(&[cfg.num_steps as u32])).contains("outside 0.."));
        assert!(net.forward_t(&x(2, 3, s, DType::F32), &t(&[cfg.num_steps as u32 - 1]), Mode::Eval).is_ok());
        // The blocks' own constructors and inputs.
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &dev);
        assert!(Conv2d::new(vb.pp("c"), 3, 4, 3, 0, 1).is_err());
        assert!(Conv2d::new(vb.pp("c"), 3, 4, 0, 1, 1).is_err());
        assert!(crate::conv::conv2d(&x(1, 3, 8, DType::F32), &Tensor::zeros((4, 3, 3, 3), DType::F32, &dev).unwrap(), 0, 1).is_err());
        assert!(GroupNorm::new(vb.pp("n"), 0, 32, 1e-5).is_err());
        let gn = GroupNorm::new(vb.pp("n"), 32, 32, 1e-5).unwrap();
        assert!(gn.forward(&x(1, 16, 4, DType::F32)).is_err());
        assert!(gn.forward(&x(1, 64, 4, DType::F32)).is_err());
        let d = crate::norm::HashedDropout::new(0, 0, 0.1);
        assert!(gn.forward_hardswish_dropout(&x(1, 16, 4, DType::F32), d).is_err());
        assert!(gn.forward_hardswish_masked(&x(1, 16, 4, DType::F32), &x(1, 16, 4, DType::F32)).is_err());
        assert!(gn.forward(&x(1, 32, 4, DType::F32)).is_ok());
        assert!(gn.forward(&Tensor::zeros(32, DType::F64, &dev).unwrap()).is_err());
        let k0 = Tensor::zeros((4, 3, 0, 0), DType::F32, &dev).unwrap();
        assert!(crate::conv::conv2d(&x(1, 3, 8, DType::F32), &k0, 1, 1).unwrap_err().to_string().contains("kernel [4, 3, 0, 0]"));
        // dim 2 divided by half - 1 = 0: a table of NaN.
        assert!(sinusoid_table(4, 2, &dev).is_err() && sinusoid_table(4, 5, &dev).is_err());
        assert!(sinusoid_table(4, 4, &dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn hardswish_matches_definition() {
        let x = Tensor::new(&[-4f32, -3.0, -1.5, 0.0, 1.0, 3.0, 5.0], &Device::Cpu).unwrap();
        let y = hardswish(&x).unwrap().to_vec1::<f32>().unwrap();
        let expect: Vec<f32> = [-4f32, -3.0, -1.5, 0.0, 1.0, 3.0, 5.0].iter().map(|&v| v * (v + 3.0).clamp(0.0, 6.0) / 6.0).collect();
        assert_eq!(y, expect);
    }

    #[test]
    fn dropout_masks_are_reproducible_and_scaled() {
        let x = Tensor::ones((4, 1000), DType::F32, &Device::Cpu).unwrap();
        let a = DropoutMasks::new(Mode::Train { seed: 7 });
        let b = DropoutMasks::new(Mode::Train { seed: 7 });
        let ya = a.apply(&x, 0.1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let yb = b.apply(&x, 0.1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ya, yb);
        let zeros = ya.iter().filter(|&&v| v == 0.0).count();
        assert!((300..500).contains(&zeros), "{zeros} of 4000 dropped");
        assert!(ya.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        // A second call site draws a different mask.
        let yc = a.apply(&x, 0.1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(ya, yc);
        let eval = DropoutMasks::new(Mode::Eval);
        assert_eq!(eval.apply(&x, 0.1).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 4000.0);
        // The bulk draw keeps the masks of the element-by-element one (same seeds, same runs),
        // also across the parallel tasks' boundaries (65536 words each).
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        rng.set_stream(0);
        let one_by_one: Vec<f32> = (0..4000).map(|_| if rng.random::<f32>() < 0.1 { 0.0 } else { 1.0 / 0.9 }).collect();
        assert_eq!(ya, one_by_one);
        let big = Tensor::ones((3, 50_001), DType::F32, &Device::Cpu).unwrap();
        let d = DropoutMasks::new(Mode::Train { seed: 11 });
        let yd = d.apply(&big, 0.3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        rng.set_stream(0);
        let one_by_one: Vec<f32> = (0..150_003).map(|_| if rng.random::<f32>() < 0.3 { 0.0 } else { 1.0 / 0.7 }).collect();
        assert_eq!(yd, one_by_one);
    }

    /// Gradient accumulation needs each part of a batch to draw the masks its images get in the
    /// whole batch, on both mask paths (ChaCha on the CPU, hashed elsewhere).
    #[test]
    fn a_part_of_a_batch_gets_the_masks_of_its_images_in_the_whole_batch() {
        let dev = Device::Cpu;
        // 50,001 values an image: the CPU's tasks (65,536 words) then start mid-image.
        let x = Tensor::ones((5, 3, 16_667), DType::F32, &dev).unwrap();
        let whole = DropoutMasks::new(Mode::Train { seed: 3 });
        let (w1, w2) = (whole.mask(&x, 0.2).unwrap().unwrap(), whole.mask(&x, 0.2).unwrap().unwrap());
        for (first, n) in [(0usize, 2usize), (2, 3), (4, 1)] {
            let part = DropoutMasks::new(Mode::TrainPart { seed: 3, first_image: first as u64 });
            let xp = x.narrow(0, first, n).unwrap();
            for w in [&w1, &w2] {
                let m = part.mask(&xp, 0.2).unwrap().unwrap();
                assert_eq!(m.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w.narrow(0, first, n).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), "images {first}.. of {n}");
            }
        }
        // The hashed masks (the CUDA kernels' factors, made on the host here).
        let site = HashedDropout::new(3, 1, 0.2);
        let full = site.mask(x.shape(), &dev).unwrap();
        let per_image = (x.elem_count() / 5) as u64;
        let tail = site.from_element(2 * per_image).mask(x.narrow(0, 2, 3).unwrap().shape(), &dev).unwrap();
        assert_eq!(tail.flatten_all().unwrap().to_vec1::<f32>().unwrap(), full.narrow(0, 2, 3).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn the_parts_of_a_training_batch_give_the_whole_batchs_output() {
        let dev = Device::Cpu;
        let mut cfg = UNetConfig::tiny();
        cfg.dropout = 0.3;
        let (net, _vars) = crate::new_trainable(&cfg, &dev, 1).unwrap();
        let s = cfg.image_size;
        // Deterministic: no generator to seed.
        let x = wave_batch(3, s, 0.37, Wave::Sin);
        let t = Tensor::new(&[5u32, 1, 9], &dev).unwrap();
        let whole = net.forward_t(&x, &t, Mode::Train { seed: 42 }).unwrap();
        let head = net.forward_t(&x.narrow(0, 0, 1).unwrap(), &t.narrow(0, 0, 1).unwrap(), Mode::TrainPart { seed: 42, first_image: 0 }).unwrap();
        let tail = net.forward_t(&x.narrow(0, 1, 2).unwrap(), &t.narrow(0, 1, 2).unwrap(), Mode::TrainPart { seed: 42, first_image: 1 }).unwrap();
        let parts = Tensor::cat(&[&head, &tail], 0).unwrap();
        let diff = (&whole - &parts).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let largest = whole.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Rounding only: the convolutions may block a batch of 3 and one of 2 differently.
        assert!(diff < 1e-4 * largest.max(1.0), "parts differ from the whole by {diff} (largest {largest})");
        // And the parts' masks are not those of image 0 again: a tail drawn as if from image 0
        // gives another output.
        let wrong = net.forward_t(&x.narrow(0, 1, 2).unwrap(), &t.narrow(0, 1, 2).unwrap(), Mode::Train { seed: 42 }).unwrap();
        let off = (whole.narrow(0, 1, 2).unwrap() - &wrong).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(off > 1e-3, "dropout made no difference ({off})");
    }

    /// Graph nodes of one training step of the tiny network (8 ResBlocks) at 16x16. On a GPU
    /// the step is host-bound: each node is at least one launch to queue. Counted at stop 28,
    /// after the time embedding's Hardswish went from one per block to one and its 8
    /// projections to one product; with the per-block versions of both, as before, 372. Stop 29
    /// stacked each attention block's q, k and v projections: 4 nodes more per block (two
    /// concatenations, three narrows and three squeezes, views but the concatenations, for two
    /// convolutions fewer), 335.
    const TINY_STEP_NODES: usize = 335;

    #[test]
    fn a_training_step_stays_within_its_graph_budget() {
        let dev = Device::Cpu;
        let cfg = UNetConfig::tiny();
        let (net, _vars) = crate::new_trainable(&cfg, &dev, 0).unwrap();
        let x = Tensor::zeros((2, 3, 16, 16), DType::F32, &dev).unwrap();
        let t = Tensor::new(&[3u32, 700], &dev).unwrap();
        let loss = net.forward_t(&x, &t, Mode::Train { seed: 1 }).unwrap().sqr().unwrap().mean_all().unwrap();
        let nodes = loss.sorted_nodes().len();
        assert!(
            nodes <= TINY_STEP_NODES,
            "a training step of the tiny network has {nodes} graph nodes, over its budget of {TINY_STEP_NODES}: \
             ops were added to the step (if on purpose, raise the budget)"
        );
    }

    /// A model of plain tensors (as sampling builds) with copies of `net`'s variables.
    fn plain_copy(net: &UNet, vars: &candle_nn::VarMap) -> UNet {
        let mut tensors: std::collections::HashMap<String, Tensor> = vars.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap())).collect();
        tensors.insert(crate::TIME_TABLE_KEY.to_string(), net.time_table().clone());
        UNet::new(VarBuilder::from_tensors(tensors, DType::F32, net.time_table().device()), net.config()).unwrap()
    }

    #[test]
    fn a_model_of_plain_weights_stacks_its_time_projections_once_with_the_same_outputs() {
        // Built from plain tensors (sampling), the model stacks the ResBlocks' temb_proj
        // weights at construction; from variables (training), at every forward pass, since the
        // optimizer changes them in place. Both give the same bits.
        let dev = Device::Cpu;
        let cfg = UNetConfig::tiny();
        let (net, vars) = crate::new_trainable(&cfg, &dev, 3).unwrap();
        assert!(net.temb_stack.is_none(), "a trainable model must not freeze its stacked weights");
        let plain = plain_copy(&net, &vars);
        let (w, b) = plain.temb_stack.as_ref().expect("a model of plain weights stacks them at construction");
        let rows: usize = plain.res_blocks().map(|r| r.temb_proj.weight().dim(0).unwrap()).sum();
        assert_eq!((w.dims(), b.dims()), (&[rows, cfg.time_dim()][..], &[rows][..]));
        let s = cfg.image_size;
        let x = wave_batch(2, s, 0.17, Wave::Sin);
        let t = Tensor::new(&[4u32, 77], &dev).unwrap();
        let bits = |m: &UNet| m.forward_t(&x, &t, Mode::Eval).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain), bits(&net));
    }

    #[test]
    fn stacked_qkv_projections_give_the_reference_outputs_and_gradients() {
        // One convolution of 3C outputs for q, k and v, against the reference's three: the same
        // outputs and gradients of every variable, trainable (stacked per pass) and from plain
        // weights (stacked once).
        let dev = Device::Cpu;
        let cfg = UNetConfig::tiny();
        let (net, vars) = crate::new_trainable(&cfg, &dev, 6).unwrap();
        let s = cfg.image_size;
        let x = wave_batch(2, s, 0.23, Wave::Cos);
        let t = Tensor::new(&[9u32, 410], &dev).unwrap();
        let run = |m: &UNet, separate: bool| {
            SEPARATE_QKV_FOR_TESTS.with(|f| f.set(separate));
            let y = m.forward_t(&x, &t, Mode::Eval);
            SEPARATE_QKV_FOR_TESTS.with(|f| f.set(false));
            y.unwrap()
        };
        let (fused, separate) = (run(&net, false), run(&net, true));
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&fused, &separate) < 1e-5, "outputs differ by {}", diff(&fused, &separate));
        let (gf, gs) = (fused.sqr().unwrap().sum_all().unwrap().backward().unwrap(), separate.sqr().unwrap().sum_all().unwrap().backward().unwrap());
        let data = vars.data().lock().unwrap();
        let mut checked = 0;
        for (name, v) in data.iter() {
            let (a, b) = (gf.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")), gs.get(v.as_tensor()).unwrap());
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-3);
            assert!(diff(a, b) <= 1e-4 * scale + 2e-5, "{name}: gradients differ by {} (scale {scale})", diff(a, b));
            checked += name.contains("proj_q") as usize;
        }
        assert!(checked > 0, "the tiny network has no attention to check");
        drop(data);
        let plain = plain_copy(&net, &vars);
        assert!(plain.res_blocks().filter_map(|r| r.attn.as_ref()).all(|a| a.qkv_stack.is_some()));
        assert!(net.res_blocks().filter_map(|r| r.attn.as_ref()).all(|a| a.qkv_stack.is_none()));
        let p = run(&plain, false);
        assert!(diff(&p, &separate) < 1e-5, "plain weights: outputs differ by {}", diff(&p, &separate));
    }

    #[test]
    fn the_folded_time_embedding_gives_the_same_outputs_and_gradients() {
        let dev = Device::Cpu;
        let cfg = UNetConfig::tiny();
        let (net, vars) = crate::new_trainable(&cfg, &dev, 4).unwrap();
        let s = cfg.image_size;
        let x = wave_batch(3, s, 0.29, Wave::Cos);
        // Per image, and one step for the whole batch (a [1, C] shift row, broadcast).
        for t in [Tensor::new(&[5u32, 1, 9], &dev).unwrap(), Tensor::new(&[7u32], &dev).unwrap()] {
            let run = |fold: bool| {
                FOLD_FOR_TESTS.with(|f| f.set(fold));
                let y = net.forward_t(&x, &t, Mode::Eval);
                FOLD_FOR_TESTS.with(|f| f.set(false));
                let y = y.unwrap();
                let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                (y, grads)
            };
            let ((plain, pg), (folded, fg)) = (run(false), run(true));
            let largest = plain.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (&plain - &folded).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * largest.max(1.0), "t {:?}: outputs differ by {diff}", t.dims());
            // Relative to the largest gradient of all: a bias whose channel is a group of its own
            // has a gradient of 0 but for rounding (the norm takes it out again).
            let vars = vars.data().lock().unwrap();
            let largest_of = |g: &candle_core::backprop::GradStore, v: &candle_core::Var| g.get(v.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = vars.values().map(|v| largest_of(&pg, v)).fold(0f32, f32::max);
            assert!(scale > 0.0);
            for (name, var) in vars.iter() {
                let (a, b) = (pg.get(var.as_tensor()).unwrap(), fg.get(var.as_tensor()).unwrap());
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d <= 1e-5 * scale, "t {:?}: gradient of {name} differs by {d} (largest gradient {scale})", t.dims());
            }
        }
    }

    #[test]
    fn a_seed_in_device_memory_is_refused_off_cuda() {
        let dev = Device::Cpu;
        let mut cfg = UNetConfig::tiny();
        cfg.dropout = 0.1;
        let (net, _vars) = crate::new_trainable(&cfg, &dev, 1).unwrap();
        let s = cfg.image_size;
        let x = Tensor::zeros((1, 3, s, s), DType::F32, &dev).unwrap();
        let t = Tensor::new(&[5u32], &dev).unwrap();
        let e = net.forward_t(&x, &t, Mode::TrainSeedAt { seed_at: 0x1000, first_image: 0 }).unwrap_err();
        assert!(e.to_string().contains("needs a CUDA device"), "{e}");
        // Without dropout no seed is read, so nothing is refused.
        cfg.dropout = 0.0;
        let (net, _vars) = crate::new_trainable(&cfg, &dev, 1).unwrap();
        assert!(net.forward_t(&x, &t, Mode::TrainSeedAt { seed_at: 0x1000, first_image: 0 }).is_ok());
    }
}
