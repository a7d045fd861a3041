//! Host-to-device copies of the values made on the host every step (noise, timesteps and
//! their factors, a batch's image ids) that do not wait for the device.
//!
//! A copy from pageable host memory to a CUDA device may wait until the stream has run all the
//! work queued before it: the driver stages such copies through pinned memory of its own, and
//! "may synchronize with the stream" to do so (CUDA's "API synchronization behavior"). Training
//! draws the next step's noise while the device still runs the step before it, and DDPM
//! sampling draws fresh noise at every step: each such wait idles the device while the host then
//! queues the next step's work. So on CUDA the values are written straight into page-locked
//! buffers, kept per CUDA context and reused once the copy that last read them has completed,
//! and the copy is queued without waiting. `DIFFUSION_UPLOAD=pageable` goes back to candle's
//! copies (for A/B runs, and a way out). Other devices, and copies queued while the stream is
//! being captured into a CUDA graph, take candle's path.

use candle_core::{Device, Shape, Tensor, WithDType};

/// The element types uploaded this way.
#[cfg(feature = "cuda")]
pub trait Upload: WithDType + candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr {}
/// The element types uploaded this way.
#[cfg(not(feature = "cuda"))]
pub trait Upload: WithDType {}
impl Upload for f32 {}
impl Upload for u32 {}

/// A `shape` tensor on `device` whose values `fill` writes, in row-major order, into a buffer
/// of `shape.elem_count()` zeros.
pub fn tensor_from_fn<T: Upload, S: Into<Shape>>(shape: S, device: &Device, fill: impl FnOnce(&mut [T])) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    #[cfg(feature = "cuda")]
    let fill = match device {
        Device::Cuda(dev) => match pinned::upload(dev, &shape, fill)? {
            Ok(t) => return Ok(t),
            Err(fill) => fill,
        },
        _ => fill,
    };
    let mut values = vec![T::from_f64(0.0); shape.elem_count()];
    fill(&mut values);
    Tensor::from_vec(values, shape, device)
}

/// `values` as a `shape` tensor on `device` (see [`tensor_from_fn`]).
pub fn tensor_from_slice<T: Upload, S: Into<Shape>>(values: &[T], shape: S, device: &Device) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    if values.len() != shape.elem_count() {
        candle_core::bail!("{} values for a tensor of shape {shape:?}", values.len());
    }
    tensor_from_fn(shape, device, |out: &mut [T]| out.copy_from_slice(values))
}

/// What an upload of `bytes` bytes uses, given the kept buffers that no upload is writing
/// (oldest use first: their sizes, and whether their last copy has completed), how many buffers
/// were made, and the most to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    /// That one, its copy done: the smallest that fits, so that small arrays leave the large
    /// buffers to the noise; else, with `max` made and none that fits, any done one (made again
    /// larger).
    Take(usize),
    /// A new one.
    Make,
    /// That one once its copy is done: the oldest that fits, or with none that fits the oldest
    /// (made again larger). Freeing page-locked memory to grow a buffer may itself wait for the
    /// device, so a buffer that fits is waited for first.
    WaitFor(usize),
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn choose(free: &[(usize, bool)], made: usize, max: usize, bytes: usize) -> Choice {
    let fits = |j: &usize| free[*j].0 >= bytes;
    let done = |j: &usize| free[*j].1;
    if let Some(j) = (0..free.len()).filter(done).filter(fits).min_by_key(|&j| free[j].0) {
        return Choice::Take(j);
    }
    // (With nothing free, every buffer is being written by another thread: one more.)
    if made < max || free.is_empty() {
        return Choice::Make;
    }
    if let Some(j) = (0..free.len()).find(fits) {
        return Choice::WaitFor(j);
    }
    match (0..free.len()).find(done) {
        Some(j) => Choice::Take(j),
        None => Choice::WaitFor(0),
    }
}

/// Page-locked buffers kept per CUDA context before an upload waits for a copy instead of
/// making one: a training step uploads six arrays (ids, flip mask, timesteps, noise, and the
/// two factors), and the device runs at most a step or two behind the host.
pub const KEPT_BUFFERS: usize = 16;

static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static WAITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Uploads made through the kept page-locked buffers so far, and how many of them waited for a
/// copy still running out of their buffer (for the GPU self-test).
pub fn pinned_counts() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (UPLOADS.load(Relaxed), WAITS.load(Relaxed))
}

/// Why the kept page-locked buffers are no longer used in this process (page-locked memory
/// could not be had), if so: candle's copies serve since.
pub fn pinned_failure() -> Option<String> {
    #[cfg(feature = "cuda")]
    return pinned::failure();
    #[cfg(not(feature = "cuda"))]
    None
}

/// Whether CUDA uploads go through the kept page-locked buffers: yes unless the environment has
/// `DIFFUSION_UPLOAD=pageable` (read once per process).
pub fn pinned_uploads() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DIFFUSION_UPLOAD").map_or(true, |v| v != "pageable"))
}

#[cfg(feature = "cuda")]
mod pinned {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream, PinnedHostSlice};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{Shape, Storage, Tensor};

    use super::Upload;

    use super::KEPT_BUFFERS;

    /// The smallest buffer made: page-locked memory comes in pages, and the few small arrays of
    /// a step (ids, flip mask, timesteps, factors) then never make a buffer grow.
    const MIN_BYTES: usize = 64 << 10;

    struct Staging {
        host: PinnedHostSlice<u8>,
        /// Recorded after the last copy out of `host`. (cudarc records a pinned slice's own
        /// event only when it manages synchronization between streams, which candle's
        /// per-thread streams do not use.)
        copied: CudaEvent,
    }

    struct Pool {
        ctx: Arc<CudaContext>,
        /// Not being written; oldest use first.
        free: VecDeque<Staging>,
        /// Buffers made, free or being written.
        made: usize,
    }

    /// Never dropped: the buffers live as long as the process, as does the CUDA context.
    static POOLS: Mutex<Vec<Pool>> = Mutex::new(Vec::new());

    /// Why the kept buffers are not used any more (see [`upload`]).
    static FAILED: Mutex<Option<String>> = Mutex::new(None);

    pub(super) fn failure() -> Option<String> {
        FAILED.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    enum Taken {
        Ready(Staging),
        /// A buffer whose copy may still be running.
        Wait(Staging),
        New,
    }

    /// `Err(fill)`, not calling it, when candle's path must be taken (see the module's doc).
    pub(super) fn upload<T: Upload, F: FnOnce(&mut [T])>(dev: &CudaDevice, shape: &Shape, fill: F) -> candle_core::Result<Result<Tensor, F>> {
        let n = shape.elem_count();
        let stream = dev.cuda_stream();
        if !super::pinned_uploads() || n == 0 || capturing(&stream) || failure().is_some() {
            return Ok(Err(fill));
        }
        let bytes = n * std::mem::size_of::<T>();
        let ctx = stream.context().clone();
        // Named, so that the check script can tell these errors from others.
        let named = |e: candle_core::Error| candle_core::Error::Msg(format!("pinned upload of {bytes} bytes: {e}"));
        let mut staging = match take(&ctx, bytes) {
            Ok(s) => s,
            Err(e) => {
                // No page-locked memory to be had (a container's limit, say): candle's copies
                // from here on, rather than a failed run.
                *FAILED.lock().unwrap_or_else(|e| e.into_inner()) = Some(named(e).to_string());
                return Ok(Err(fill));
            }
        };
        let queued = (|| {
            // SAFETY: `take` gives page-locked memory of at least `bytes` bytes that no copy
            // reads any more, aligned to a page (cuMemHostAlloc), and T is a plain number type
            // for which any bits are a value; the slice is dropped before the buffer is given back.
            let host: &mut [T] = unsafe { std::slice::from_raw_parts_mut(staging.host.as_mut_ptr().w()?.cast::<T>(), n) };
            host.fill(T::from_f64(0.0));
            fill(host);
            // SAFETY: written in full by the copy below before anything reads it.
            let mut dst = unsafe { dev.alloc::<T>(n) }?;
            stream.memcpy_htod(&*host, &mut dst).w()?;
            staging.copied.record(&stream).w()?;
            Ok::<_, candle_core::Error>(dst)
        })();
        if queued.is_err() {
            // A copy may have been queued without its event: let it finish before the buffer
            // is written again.
            let _ = stream.synchronize();
        }
        give_back(&ctx, staging);
        if queued.is_ok() {
            super::UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let storage = CudaStorage::wrap_cuda_slice(queued.map_err(named)?, dev.clone());
        Ok(Ok(Tensor::from_storage(Storage::Cuda(storage), shape.clone(), BackpropOp::none(), false)))
    }

    /// A copy queued during a capture would become a graph node reading this buffer at every
    /// replay; candle's path serves captures (its upload cache).
    fn capturing(stream: &CudaStream) -> bool {
        !matches!(stream.capture_status(), Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE))
    }

    /// A buffer of at least `bytes` bytes whose last copy has completed.
    fn take(ctx: &Arc<CudaContext>, bytes: usize) -> candle_core::Result<Staging> {
        let taken = {
            let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
            let i = match pools.iter().position(|p| Arc::ptr_eq(&p.ctx, ctx)) {
                Some(i) => i,
                None => {
                    pools.push(Pool { ctx: ctx.clone(), free: VecDeque::new(), made: 0 });
                    pools.len() - 1
                }
            };
            let pool = &mut pools[i];
            let state: Vec<(usize, bool)> = pool.free.iter().map(|b| (b.host.len(), b.copied.is_complete())).collect();
            match super::choose(&state, pool.made, KEPT_BUFFERS, bytes) {
                super::Choice::Take(j) => Taken::Ready(pool.free.remove(j).expect("index in range")),
                super::Choice::Make => {
                    pool.made += 1;
                    Taken::New
                }
                super::Choice::WaitFor(j) => Taken::Wait(pool.free.remove(j).expect("index in range")),
            }
        };
        let staging = match taken {
            Taken::Ready(s) => s,
            Taken::Wait(s) => {
                if !s.copied.is_complete() {
                    super::WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                s.copied.synchronize().w().inspect_err(|_| forget_one(ctx))?;
                s
            }
            Taken::New => return new_staging(ctx, bytes).inspect_err(|_| forget_one(ctx)),
        };
        if staging.host.len() >= bytes {
            return Ok(staging);
        }
        // Too small: replaced (its copy has completed, so freeing it is safe).
        drop(staging);
        new_staging(ctx, bytes).inspect_err(|_| forget_one(ctx))
    }

    fn new_staging(ctx: &Arc<CudaContext>, bytes: usize) -> candle_core::Result<Staging> {
        // Plain page-locked memory (flags 0): write-combined memory is slow for anything but
        // sequential writes, and `fill` is the caller's.
        // SAFETY: its contents are written (`upload`) before any copy reads them.
        let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes.max(MIN_BYTES), 0) }.w()?;
        // A blocking wait (the host only waits here when it is a pool's worth of uploads ahead);
        // cudarc takes one flag, so timing stays on.
        let copied = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC)).w()?;
        Ok(Staging { host, copied })
    }

    /// A buffer counted in `made` that was not made (or was dropped).
    fn forget_one(ctx: &Arc<CudaContext>) {
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.iter_mut().find(|p| Arc::ptr_eq(&p.ctx, ctx)) {
            p.made = p.made.saturating_sub(1);
        }
    }

    fn give_back(ctx: &Arc<CudaContext>, staging: Staging) {
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.iter_mut().find(|p| Arc::ptr_eq(&p.ctx, ctx)) {
            p.free.push_back(staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_arrive_in_row_major_order_with_their_shape() {
        let t = tensor_from_fn((2, 3), &Device::Cpu, |out: &mut [f32]| {
            for (i, v) in out.iter_mut().enumerate() {
                *v = i as f32;
            }
        })
        .unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        assert_eq!(t.to_vec2::<f32>().unwrap(), vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]);
        let u = tensor_from_slice(&[7u32, 8], 2, &Device::Cpu).unwrap();
        assert_eq!(u.to_vec1::<u32>().unwrap(), vec![7, 8]);
    }

    #[test]
    fn the_buffer_starts_as_zeros_and_empty_shapes_work() {
        let t = tensor_from_fn(4, &Device::Cpu, |out: &mut [f32]| out[1] = 5.0).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![0.0, 5.0, 0.0, 0.0]);
        let e = tensor_from_fn((0, 3), &Device::Cpu, |out: &mut [f32]| assert!(out.is_empty())).unwrap();
        assert_eq!(e.dims(), &[0, 3]);
    }

    #[test]
    fn kept_buffers_are_chosen_done_and_best_fitting_then_made_then_waited_for() {
        use Choice::*;
        // (size, copy done), oldest first.
        let free = [(100, true), (10, true), (50, false), (20, true)];
        assert_eq!(choose(&free, 4, 8, 15), Take(3), "the smallest done buffer that fits");
        assert_eq!(choose(&free, 4, 8, 10), Take(1));
        assert_eq!(choose(&free, 4, 8, 60), Take(0), "a buffer whose copy runs is never taken");
        assert_eq!(choose(&free, 4, 8, 200), Make, "none fits: another, while under the limit");
        assert_eq!(choose(&free, 8, 8, 200), Take(0), "at the limit, none fits: the first done one, made again larger");
        let some_busy = [(10, true), (50, false), (100, false), (30, true)];
        assert_eq!(choose(&some_busy, 8, 8, 40), WaitFor(1), "at the limit: the oldest that fits, waited for, before growing a done one");
        assert_eq!(choose(&some_busy, 8, 8, 20), Take(3));
        let busy = [(10, false), (100, false), (100, false)];
        assert_eq!(choose(&busy, 3, 8, 5), Make);
        assert_eq!(choose(&busy, 8, 8, 50), WaitFor(1), "at the limit with every copy running: the oldest that fits");
        assert_eq!(choose(&busy, 8, 8, 500), WaitFor(0), "and with none that fits, the oldest");
        assert_eq!(choose(&[], 8, 8, 5), Make, "all being written elsewhere");
        assert_eq!(choose(&[], 0, 8, 5), Make);
    }

    #[test]
    fn a_slice_of_the_wrong_length_is_refused() {
        let e = tensor_from_slice(&[1f32, 2.0, 3.0], (2, 2), &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("3 values for a tensor of shape [2, 2]"), "{e}");
    }
}
