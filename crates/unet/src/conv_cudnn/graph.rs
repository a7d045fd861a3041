//! The convolution passes through cuDNN's backend (graph) API, with one execution plan per
//! (pass, element type, shape), built once and kept, as PyTorch's cuDNN v8 path does.
//!
//! Why: through the legacy calls (`cudnnConvolutionForward` and the two backward ones), cuDNN 9
//! picks an engine on every call (`EngineHeuristics::setHeuristicsResult` among the host's top
//! symbols in the H100 profile of stop 25, where cuDNN's libraries held about 16% of the host's
//! samples, some 38 ms a training step). A finalized plan runs with one variant pack per call.
//!
//! Opt-in (`UNET_CUDNN_API=graph`) until a GPU run has measured it: nothing here has run on a
//! GPU yet (a review checked it against cudnn-frontend and PyTorch's `Conv_v8.cpp`). Engines
//! are filtered as PyTorch does: none that converts its inputs to a narrower type, and none that
//! compiles at run time; a plan wanting more than 256 MiB of workspace is passed over. Exact f32
//! (TF32 off, the self-test's 1e-3 checks) stays on the legacy calls, which passed on the H100.
//! A pass whose plan cannot be built, or whose buffers are not 16-byte aligned (the alignment the
//! plans are built for), or whose workspace cannot be had on the call, runs the legacy calls.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::cuda_backend::cudarc::cudnn::result::CudnnError;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDevice, DeviceId};

use super::find::Geometry4;
use super::{AlgoKey, Pass};

use sys::cudnnBackendAttributeName_t as A;
use sys::cudnnBackendAttributeType_t as T;
use sys::cudnnBackendDescriptorType_t as D;

/// Whether the passes go through execution plans (`UNET_CUDNN_API=graph`).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_CUDNN_API").is_ok_and(|v| v == "graph"))
}

/// The byte alignment the plans are built for; buffers less aligned take the legacy calls.
const ALIGNMENT: u64 = 16;
/// Engine configurations read from the heuristics, and of those (the ones whose notes pass)
/// tried in order, before giving up on a shape.
const MAX_OFFERED: i64 = 64;
const MAX_TRIED: usize = 8;
/// A plan's scratch space at most, as for Find (`find::MAX_WORKSPACE`).
const MAX_WORKSPACE: usize = 256 << 20;
/// cuDNN's numerical and behaviour note values (`cudnnBackendNumericalNote_t`,
/// `cudnnBackendBehaviorNote_t`), read as plain integers: a newer cuDNN may return values that
/// the bindings' enums do not have.
const NOTE_DOWN_CONVERT_INPUTS: u32 = 1;
const NOTE_RUNTIME_COMPILATION: u32 = 0;
/// The tensors' ids in an operation and in its variant pack.
const UID_X: i64 = 1;
const UID_W: i64 = 2;
const UID_Y: i64 = 3;

type PlanKey = (DeviceId, AlgoKey);

thread_local! {
    // One plan per device and key (a plan belongs to the handle it was built with); `None`: no
    // plan could be built for it, the legacy calls serve it.
    static PLANS: RefCell<HashMap<PlanKey, Option<Rc<Plan>>>> = RefCell::new(HashMap::new());
    pub(super) static FAILURES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// A backend descriptor, destroyed when dropped.
struct Desc(sys::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by `create` and destroyed once, here.
            let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
        }
    }
}

fn create(kind: sys::cudnnBackendDescriptorType_t) -> Result<Desc, CudnnError> {
    let mut d: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
    // SAFETY: `d` receives a new descriptor of `kind`.
    unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut d) }.result()?;
    Ok(Desc(d))
}

/// Sets an attribute to `values`, whose Rust type must be the C type that `ty` names (i64 for
/// INT64, f32 for FLOAT, a descriptor or pointer for BACKEND_DESCRIPTOR / VOID_PTR / HANDLE, the
/// enum for DATA_TYPE and the modes).
fn set<V>(d: &Desc, name: A, ty: T, values: &[V]) -> Result<(), CudnnError> {
    // SAFETY: cuDNN reads `values.len()` elements of the type `ty` names, which the callers
    // below pass (see above); the descriptor is alive.
    unsafe { sys::cudnnBackendSetAttribute(d.0, name, ty, values.len() as i64, values.as_ptr() as *const c_void) }.result()
}

fn finalize(d: &Desc) -> Result<(), CudnnError> {
    // SAFETY: the descriptor is alive and its required attributes were set.
    unsafe { sys::cudnnBackendFinalize(d.0) }.result()
}

/// A finalized execution plan with every descriptor it was built from (kept alive for it, and
/// destroyed after it, in the reverse of their creation).
pub(super) struct Plan {
    descriptors: Vec<Desc>,
    plan: sys::cudnnBackendDescriptor_t,
    workspace: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        while let Some(d) = self.descriptors.pop() {
            drop(d);
        }
    }
}

/// The strides of a contiguous NCHW tensor (or OIHW filter).
fn contiguous_strides(dims: [i32; 4]) -> [i64; 4] {
    let d = dims.map(|x| x as i64);
    [d[1] * d[2] * d[3], d[2] * d[3], d[3], 1]
}

/// The call's pointers in uid order (x-side, w-side, y-side) for the pass's operation, from
/// `a`, `b` and `out` as `run_typed` passes them: forward (x, w, y) = (a, b, out); input
/// gradient (dx, w, dy) = (out, b, a); weight gradient (x, dw, dy) = (a, out, b).
fn by_uid<P: Copy>(pass: Pass, a: P, b: P, out: P) -> [P; 3] {
    match pass {
        Pass::Forward => [a, b, out],
        Pass::InputGrad => [out, b, a],
        Pass::WeightGrad => [a, out, b],
    }
}

fn tensor(uid: i64, dims: [i32; 4], data: sys::cudnnDataType_t) -> Result<Desc, CudnnError> {
    let d = dims.map(|x| x as i64);
    let strides = contiguous_strides(dims);
    let t = create(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    set(&t, A::CUDNN_ATTR_TENSOR_DATA_TYPE, T::CUDNN_TYPE_DATA_TYPE, &[data])?;
    set(&t, A::CUDNN_ATTR_TENSOR_DIMENSIONS, T::CUDNN_TYPE_INT64, &d)?;
    set(&t, A::CUDNN_ATTR_TENSOR_STRIDES, T::CUDNN_TYPE_INT64, &strides)?;
    set(&t, A::CUDNN_ATTR_TENSOR_UNIQUE_ID, T::CUDNN_TYPE_INT64, &[uid])?;
    set(&t, A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, T::CUDNN_TYPE_INT64, &[ALIGNMENT as i64])?;
    finalize(&t)?;
    Ok(t)
}

/// An engine configuration's numerical and behaviour notes, as integers.
fn notes(cfg: &Desc) -> Result<(Vec<u32>, Vec<u32>), CudnnError> {
    let engine = create(D::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
    let mut n: i64 = 0;
    let mut raw = engine.0;
    // SAFETY: one descriptor, created above, which cuDNN fills with the configuration's engine.
    unsafe { sys::cudnnBackendGetAttribute(cfg.0, A::CUDNN_ATTR_ENGINECFG_ENGINE, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &mut n, &mut raw as *mut _ as *mut c_void) }.result()?;
    let read = |name: A, ty: T| -> Result<Vec<u32>, CudnnError> {
        let mut values = [0u32; 32];
        let mut count: i64 = 0;
        // SAFETY: at most 32 enum values (4 bytes each) written into `values`.
        unsafe { sys::cudnnBackendGetAttribute(raw, name, ty, values.len() as i64, &mut count, values.as_mut_ptr() as *mut c_void) }.result()?;
        Ok(values[..count.clamp(0, values.len() as i64) as usize].to_vec())
    };
    Ok((read(A::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, T::CUDNN_TYPE_NUMERICAL_NOTE)?, read(A::CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE, T::CUDNN_TYPE_BEHAVIOR_NOTE)?))
}

/// Builds the plan of one pass: tensors, convolution, operation, graph, the heuristics' engine
/// configurations, and the first of those whose plan finalizes.
fn build(pass: Pass, g: &Geometry4, handle: sys::cudnnHandle_t) -> Result<Plan, String> {
    let e = |what: &'static str| move |err: CudnnError| format!("{what}: {err:?}");
    // x (or dx), w (or dw), y (or dy), by the uids the variant pack uses.
    let x = tensor(UID_X, g.x, g.data).map_err(e("tensor x"))?;
    let w = tensor(UID_W, g.w, g.data).map_err(e("tensor w"))?;
    let y = tensor(UID_Y, g.y, g.data).map_err(e("tensor y"))?;
    let conv = (|| {
        let c = create(D::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        let (p, s) = (g.pad as i64, g.stride as i64);
        set(&c, A::CUDNN_ATTR_CONVOLUTION_COMP_TYPE, T::CUDNN_TYPE_DATA_TYPE, &[g.compute])?;
        set(&c, A::CUDNN_ATTR_CONVOLUTION_CONV_MODE, T::CUDNN_TYPE_CONVOLUTION_MODE, &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION])?;
        set(&c, A::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, T::CUDNN_TYPE_INT64, &[2i64])?;
        set(&c, A::CUDNN_ATTR_CONVOLUTION_DILATIONS, T::CUDNN_TYPE_INT64, &[1i64, 1])?;
        set(&c, A::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, T::CUDNN_TYPE_INT64, &[s, s])?;
        set(&c, A::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, T::CUDNN_TYPE_INT64, &[p, p])?;
        set(&c, A::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, T::CUDNN_TYPE_INT64, &[p, p])?;
        finalize(&c)?;
        Ok(c)
    })()
    .map_err(e("convolution"))?;
    let op = (|| {
        // (operation kind, x-side, w-side, y-side, conv, alpha, beta) attribute names per pass.
        let (kind, ax, aw, ay, ac, aa, ab) = match pass {
            Pass::Forward => (
                D::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            ),
            Pass::InputGrad => (
                D::CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA,
            ),
            Pass::WeightGrad => (
                D::CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,
                A::CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA,
            ),
        };
        let o = create(kind)?;
        let bd = T::CUDNN_TYPE_BACKEND_DESCRIPTOR;
        set(&o, ax, bd, &[x.0])?;
        set(&o, aw, bd, &[w.0])?;
        set(&o, ay, bd, &[y.0])?;
        set(&o, ac, bd, &[conv.0])?;
        // The compute type is f32 for every element type here (cuDNN's "pseudo" half configs).
        set(&o, aa, T::CUDNN_TYPE_FLOAT, &[1.0f32])?;
        set(&o, ab, T::CUDNN_TYPE_FLOAT, &[0.0f32])?;
        finalize(&o)?;
        Ok(o)
    })()
    .map_err(e("operation"))?;
    let graph = (|| {
        let gr = create(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        set(&gr, A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, T::CUDNN_TYPE_HANDLE, &[handle])?;
        set(&gr, A::CUDNN_ATTR_OPERATIONGRAPH_OPS, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[op.0])?;
        finalize(&gr)?;
        Ok(gr)
    })()
    .map_err(e("operation graph"))?;
    let heur = (|| {
        let h = create(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        set(&h, A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[graph.0])?;
        set(&h, A::CUDNN_ATTR_ENGINEHEUR_MODE, T::CUDNN_TYPE_HEUR_MODE, &[sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_INSTANT])?;
        finalize(&h)?;
        Ok(h)
    })()
    .map_err(e("engine heuristics"))?;
    // The heuristics' engine configurations, best first: cuDNN fills descriptors made here.
    let mut count: i64 = 0;
    // SAFETY: a count query (no elements requested, none written).
    unsafe { sys::cudnnBackendGetAttribute(heur.0, A::CUDNN_ATTR_ENGINEHEUR_RESULTS, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &mut count, std::ptr::null_mut()) }
        .result()
        .map_err(e("engine configurations, count"))?;
    let wanted = count.clamp(0, MAX_OFFERED);
    let offered: Vec<Desc> = (0..wanted).map(|_| create(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)).collect::<Result<_, _>>().map_err(e("engine configuration"))?;
    let mut raw: Vec<sys::cudnnBackendDescriptor_t> = offered.iter().map(|c| c.0).collect();
    let mut got: i64 = 0;
    if wanted > 0 {
        // SAFETY: `raw` holds `wanted` descriptors of the element type asked for, which cuDNN
        // fills in place.
        unsafe { sys::cudnnBackendGetAttribute(heur.0, A::CUDNN_ATTR_ENGINEHEUR_RESULTS, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, wanted, &mut got, raw.as_mut_ptr() as *mut c_void) }
            .result()
            .map_err(e("engine configurations"))?;
    }
    // As PyTorch's v8 path filters them: no engine that converts its inputs to a narrower type
    // (f16 tensor cores for f32 or bf16 data: less range and precision than asked for), and none
    // that compiles at run time (seconds on a shape's first call).
    let mut skipped = Vec::new();
    let mut configs: Vec<Desc> = Vec::new();
    for (i, cfg) in offered.into_iter().enumerate().take(got.clamp(0, wanted) as usize) {
        match notes(&cfg) {
            Ok((numerical, _)) if numerical.contains(&NOTE_DOWN_CONVERT_INPUTS) => skipped.push(format!("configuration {i}: converts its inputs down")),
            Ok((_, behaviour)) if behaviour.contains(&NOTE_RUNTIME_COMPILATION) => skipped.push(format!("configuration {i}: compiles at run time")),
            Ok(_) => configs.push(cfg),
            Err(err) => skipped.push(format!("configuration {i}, notes: {err:?}")),
        }
        if configs.len() == MAX_TRIED {
            break;
        }
    }
    let mut refusals = skipped;
    let mut found: Option<(Desc, usize)> = None;
    for (i, cfg) in configs.iter().enumerate() {
        let plan = match (|| {
            let p = create(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
            set(&p, A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, T::CUDNN_TYPE_HANDLE, &[handle])?;
            set(&p, A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[cfg.0])?;
            finalize(&p)?;
            Ok::<_, CudnnError>(p)
        })() {
            Ok(p) => p,
            Err(err) => {
                refusals.push(format!("configuration {i}: {err:?}"));
                continue;
            }
        };
        let mut n: i64 = 0;
        let mut bytes: i64 = 0;
        // SAFETY: one INT64 written into `bytes`.
        match unsafe { sys::cudnnBackendGetAttribute(plan.0, A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, T::CUDNN_TYPE_INT64, 1, &mut n, &mut bytes as *mut i64 as *mut c_void) }.result() {
            Ok(()) if bytes.max(0) as usize > MAX_WORKSPACE => refusals.push(format!("plan {i}: {bytes} bytes of workspace")),
            Ok(()) => {
                found = Some((plan, bytes.max(0) as usize));
                break;
            }
            Err(err) => refusals.push(format!("configuration {i}, workspace size: {err:?}")),
        }
    }
    let Some((plan, workspace)) = found else {
        return Err(format!("no engine configuration gave a plan ({count} offered{}{})", if refusals.is_empty() { "" } else { ": " }, refusals.join("; ")));
    };
    let raw_plan = plan.0;
    let mut descriptors = vec![x, w, y, conv, op, graph, heur];
    descriptors.extend(configs);
    descriptors.push(plan);
    Ok(Plan { descriptors, plan: raw_plan, workspace })
}

/// Runs `pass` on the call's buffers through its plan (built on the first call of the key).
/// `Ok(false)`: not for this call (a plan could not be built for the key, or a buffer is less
/// aligned than plans assume); the caller runs the legacy calls.
#[allow(clippy::too_many_arguments)]
pub(super) fn run<V: DeviceRepr>(
    key: AlgoKey,
    pass: Pass,
    g: &Geometry4,
    dev: &CudaDevice,
    a: &CudaView<V>,
    b: &CudaView<V>,
    out: &mut CudaSlice<V>,
) -> candle_core::Result<bool> {
    let stream = dev.cuda_stream();
    let (ap, _ga) = a.device_ptr(&stream);
    let (bp, _gb) = b.device_ptr(&stream);
    let (op, _go) = out.device_ptr_mut(&stream);
    if [ap, bp, op].iter().any(|p| p % ALIGNMENT != 0) {
        return Ok(false);
    }
    let handle = super::find::handle(dev).map_err(candle_core::Error::wrap)?;
    let key = (dev.id(), key);
    let plan = PLANS.with(|m| {
        if let Some(p) = m.borrow().get(&key) {
            return p.clone();
        }
        let built = match build(pass, g, handle) {
            Ok(p) => Some(Rc::new(p)),
            Err(why) => {
                FAILURES.with(|f| f.borrow_mut().push(format!("{pass:?} x {:?} w {:?} {:?}: {why}", g.x, g.w, g.data)));
                None
            }
        };
        m.borrow_mut().insert(key, built.clone());
        built
    });
    let Some(plan) = plan else { return Ok(false) };
    let [px, pw, py] = by_uid(pass, ap, bp, op);
    let mut ws: Option<CudaSlice<u8>> = None;
    if plan.workspace > 0 {
        // SAFETY: scratch only: cuDNN writes it before reading it.
        match unsafe { dev.alloc::<u8>(plan.workspace) } {
            Ok(s) => ws = Some(s),
            // Short of memory for now: this call takes the legacy calls, the plan stays.
            Err(_) => return Ok(false),
        }
    }
    let (wp, _gw) = match ws.as_mut() {
        Some(s) => {
            let (p, guard) = s.device_ptr_mut(&stream);
            (p as *mut c_void, Some(guard))
        }
        None => (std::ptr::null_mut(), None),
    };
    let executed = (|| {
        let pack = create(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        set(&pack, A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, T::CUDNN_TYPE_INT64, &[UID_X, UID_W, UID_Y])?;
        set(&pack, A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, T::CUDNN_TYPE_VOID_PTR, &[px as *mut c_void, pw as *mut c_void, py as *mut c_void])?;
        set(&pack, A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE, T::CUDNN_TYPE_VOID_PTR, &[wp])?;
        finalize(&pack)?;
        // SAFETY: the plan was built for these shapes and types, the pack names the call's
        // buffers (alive until this returns: the guards above) and a workspace of the plan's
        // size; the handle's stream is the device's, so the pass runs in order with our other
        // work.
        unsafe { sys::cudnnBackendExecute(handle, plan.plan, pack.0) }.result()
    })();
    if let Err(err) = executed {
        // Refused at launch: this key goes to the legacy calls from now on.
        FAILURES.with(|f| f.borrow_mut().push(format!("{pass:?} x {:?} w {:?} {:?}: execute: {err:?}", g.x, g.w, g.data)));
        PLANS.with(|m| m.borrow_mut().insert(key, None));
        return Ok(false);
    }
    Ok(true)
}

/// The keys with a plan, and those that fell back, for [`super::choices`].
pub(super) fn planned() -> Vec<(AlgoKey, bool)> {
    PLANS.with(|m| m.borrow().iter().map(|((_, k), p)| (*k, p.is_some())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_those_of_a_contiguous_nchw_tensor() {
        assert_eq!(contiguous_strides([128, 64, 32, 16]), [64 * 32 * 16, 32 * 16, 16, 1]);
        assert_eq!(contiguous_strides([256, 128, 3, 3]), [128 * 9, 9, 3, 1]);
    }

    #[test]
    fn each_pass_names_its_buffers_by_the_uids_of_its_operation() {
        // (a, b, out) as run_typed passes them: (x, w, y), (dy, w, dx), (x, dy, dw).
        assert_eq!(by_uid(Pass::Forward, "x", "w", "y"), ["x", "w", "y"]);
        assert_eq!(by_uid(Pass::InputGrad, "dy", "w", "dx"), ["dx", "w", "dy"]);
        assert_eq!(by_uid(Pass::WeightGrad, "x", "dy", "dw"), ["x", "dw", "dy"]);
        // The uids the tensors carry, in the pack's order.
        assert_eq!([UID_X, UID_W, UID_Y], [1, 2, 3]);
    }
}
