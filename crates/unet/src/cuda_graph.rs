//! Capturing candle work into a CUDA graph, for the callers that replay a fixed sequence of ops
//! (the sampler's forward pass, the trainer's step): [`capture`] records what a closure queues on
//! a device's stream and returns the instantiated graph with the closure's outputs.
//!
//! What the caller must have done first, since none of it may happen while capturing: one plain
//! run of the same closure on the same shapes, inside `enable_cuda_graph_htod_cache()` (which
//! must still be held during the capture), so that every kernel module, cuDNN choice, cuBLAS
//! workspace and candle shape/stride upload exists; inputs in buffers the caller keeps and
//! rewrites before each launch (a captured copy from the host would replay stale data).
//!
//! The memory the closure allocates comes from the graph (`AUTO_FREE_ON_LAUNCH`: freed and made
//! again at each launch), so the outputs keep their addresses and are overwritten by the next
//! launch. The graph is launched once here, so that the outputs' memory exists before anything
//! could free it. A failed capture ends the stream's capture mode by hand if cudarc could not
//! (an error it recorded meanwhile comes first) and forgets the outputs, whose memory belongs to
//! a graph that never ran.

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaGraph};
use candle_core::backend::BackendDevice;
use candle_core::{CudaDevice, Result};

/// Runs `f` under stream capture on `dev`'s stream and returns its outputs with the graph,
/// launched once and finished. Errors say which stage failed; the stream is out of capture mode
/// whatever happened.
pub fn capture<T>(dev: &CudaDevice, f: impl FnOnce() -> Result<T>) -> Result<(T, CudaGraph)> {
    let w = candle_core::Error::wrap;
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    // The graph's memory comes from its own pool: give back what the ordinary pool keeps (our
    // devices keep everything freed, `cuda_ops::tune_device`).
    // SAFETY: the device's default pool, trimmed of memory no allocation holds.
    unsafe {
        if let Ok(pool) = result::device::get_mem_pool(ctx.cu_device()) {
            let _ = result::mem_pool::trim_to(pool, 0);
        }
    }
    ctx.check_err().map_err(w)?;
    // The callers hold it already (their warm-up filled it); held here too, so that a capture
    // never reaches the per-thread map of plain ops' uploads, whose entries outlive a graph.
    let _cache = dev.enable_cuda_graph_htod_cache();
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(w)?;
    let out = f();
    // An error recorded during the capture (a free refused by an invalidated capture, say) would
    // make cudarc's `end_capture` return before ending it: take it first, and end a capture
    // still open by hand.
    let recorded = ctx.check_err();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    if !matches!(stream.capture_status(), Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)) {
        // SAFETY: ends this stream's own capture; the graph it returns, if any, is dropped.
        unsafe {
            if let Ok(g) = result::stream::end_capture(stream.cu_stream()) {
                if !g.is_null() {
                    let _ = result::graph::destroy(g);
                }
            }
        }
    }
    let failed = |why: String, out: Result<T>| {
        // The outputs' memory belongs to a graph that never ran: not ours to free.
        if let Ok(o) = out {
            std::mem::forget(o);
        }
        let _ = ctx.check_err();
        candle_core::Error::Msg(why)
    };
    if let Err(e) = recorded {
        return Err(failed(format!("during the capture: {e}"), out));
    }
    let graph = match graph {
        Ok(Some(g)) => g,
        Ok(None) => return Err(failed("the capture recorded nothing".into(), out)),
        Err(e) => return Err(failed(format!("ending the capture: {e}"), out)),
    };
    let out = match out {
        Ok(o) => o,
        Err(e) => return Err(failed(format!("the captured call: {e}"), Err(e))),
    };
    if let Err(e) = graph.upload().and_then(|_| graph.launch()).map_err(w).and_then(|_| dev.synchronize()) {
        return Err(failed(format!("the first launch: {e}"), Ok(out)));
    }
    Ok((out, graph))
}

/// Gives back the device memory of graphs that were dropped (the driver keeps a destroyed
/// graph's memory until trimmed), after waiting for the device: before a new capture's plain
/// warm-up, or plain calls after a failure, would otherwise need it twice.
pub fn trim_graph_memory(dev: &CudaDevice) -> Result<()> {
    dev.synchronize()?;
    let ctx = dev.cuda_stream().context().clone();
    // SAFETY: a plain driver call on this device; memory still in use by a live graph is kept.
    unsafe { sys::cuDeviceGraphMemTrim(ctx.cu_device()) }.result().map_err(candle_core::Error::wrap)
}

/// The device address of a tensor's first element (CUDA only), for kernels that read a value
/// the host rewrites between graph launches.
pub fn device_address(t: &candle_core::Tensor) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::Storage;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else { candle_core::bail!("device_address: the tensor is not on a CUDA device") };
    let stream = s.device.cuda_stream();
    let bytes = layout.start_offset() * t.dtype().size_in_bytes();
    let base = match t.dtype() {
        candle_core::DType::U32 => {
            let (p, _sync) = s.as_cuda_slice::<u32>()?.device_ptr(&stream);
            p
        }
        candle_core::DType::I64 => {
            let (p, _sync) = s.as_cuda_slice::<i64>()?.device_ptr(&stream);
            p
        }
        d => candle_core::bail!("device_address: {d:?} tensors are not supported (u32 or i64)"),
    };
    let at = base + bytes as u64;
    // The kernels read whole words there (a u64 seed).
    debug_assert!(at.is_multiple_of(8), "device_address: {at:#x} is not 8-byte aligned");
    Ok(at)
}
