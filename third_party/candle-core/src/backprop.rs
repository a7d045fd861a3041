//! Methods for backpropagation of gradients.
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::{Error, Result, Tensor, TensorId};
use std::collections::{hash_map::Entry, HashMap};

// arg has been reduced to node via reduce_dims, expand it back to arg.
// This has to handle keepdims.
fn broadcast_back(arg: &Tensor, node: &Tensor, reduced_dims: &[usize]) -> Result<Tensor> {
    if arg.rank() == node.rank() {
        // keepdim = true
        node.broadcast_as(arg.shape())
    } else {
        // keepdim = false
        // first expand the reduced dims.
        node.reshape(reduced_dims)?.broadcast_as(arg.shape())
    }
}

thread_local! {
    static CANDLE_GRAD_DO_NOT_DETACH: bool = {
        match std::env::var("CANDLE_GRAD_DO_NOT_DETACH") {
            Ok(s) => {
                !s.is_empty() && s != "0"
            },
            Err(_) => false,
        }
    }
}

impl Tensor {
    /// Return all the nodes that lead to this value in a topologically sorted vec, the first
    /// elements having dependencies on the latter ones, e.g. the first element if any is the
    /// argument.
    /// This assumes that the op graph is a DAG.
    ///
    /// Patched (stop 34): after a backward pass, nodes the caller held no handle on may have
    /// had their buffers released (`SavedRelease`); their values must not be read.
    pub fn sorted_nodes(&self) -> Vec<&Tensor> {
        // The vec of sorted nodes is passed as an owned value rather than a mutable reference
        // to get around some lifetime limitations.
        fn walk<'a>(
            node: &'a Tensor,
            nodes: Vec<&'a Tensor>,
            already_seen: &mut HashMap<TensorId, bool>,
        ) -> (bool, Vec<&'a Tensor>) {
            if let Some(&tg) = already_seen.get(&node.id()) {
                return (tg, nodes);
            }
            let mut track_grad = false;
            let mut nodes = if node.is_variable() {
                // Do not call recursively on the "leaf" nodes.
                track_grad = true;
                nodes
            } else if node.dtype().is_int() {
                nodes
            } else if let Some(op) = node.op() {
                match op {
                    Op::IndexAdd(t1, t2, t3, _)
                    | Op::Scatter(t1, t2, t3, _)
                    | Op::ScatterAdd(t1, t2, t3, _)
                    | Op::CustomOp3(t1, t2, t3, _)
                    | Op::WhereCond(t1, t2, t3) => {
                        let (tg, nodes) = walk(t1, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(t2, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(t3, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::Conv1D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::ConvTranspose1D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::Conv2D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::ConvTranspose2D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::CustomOp2(lhs, rhs, _)
                    | Op::Binary(lhs, rhs, _)
                    | Op::Gather(lhs, rhs, _)
                    | Op::IndexSelect(lhs, rhs, _)
                    | Op::Matmul(lhs, rhs)
                    | Op::SliceScatter0(lhs, rhs, _) => {
                        let (tg, nodes) = walk(lhs, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(rhs, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::Cat(args, _) => args.iter().fold(nodes, |nodes, arg| {
                        let (tg, nodes) = walk(arg, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }),
                    Op::Affine { arg, mul, .. } => {
                        if *mul == 0. {
                            nodes
                        } else {
                            let (tg, nodes) = walk(arg, nodes, already_seen);
                            track_grad |= tg;
                            nodes
                        }
                    }
                    Op::Unary(_node, UnaryOp::Ceil)
                    | Op::Unary(_node, UnaryOp::Floor)
                    | Op::Unary(_node, UnaryOp::Round)
                    | Op::Unary(_node, UnaryOp::Sign) => nodes,
                    Op::Reshape(node)
                    | Op::UpsampleNearest1D { arg: node, .. }
                    | Op::UpsampleNearest2D { arg: node, .. }
                    | Op::UpsampleBilinear2D { arg: node, .. }
                    | Op::AvgPool2D { arg: node, .. }
                    | Op::MaxPool2D { arg: node, .. }
                    | Op::Copy(node)
                    | Op::Broadcast(node)
                    | Op::Cmp(node, _)
                    | Op::Reduce(node, ReduceOp::Min | ReduceOp::Sum | ReduceOp::Max, _)
                    | Op::ToDevice(node)
                    | Op::Transpose(node, _, _)
                    | Op::Permute(node, _)
                    | Op::Narrow(node, _, _, _)
                    | Op::Unary(node, _)
                    | Op::Elu(node, _)
                    | Op::Powf(node, _)
                    | Op::CustomOp1(node, _) => {
                        let (tg, nodes) = walk(node, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::ToDType(node) => {
                        if node.dtype().is_float() {
                            let (tg, nodes) = walk(node, nodes, already_seen);
                            track_grad |= tg;
                            nodes
                        } else {
                            nodes
                        }
                    }
                    Op::Reduce(_, ReduceOp::ArgMin | ReduceOp::ArgMax, _) => nodes,
                }
            } else {
                nodes
            };
            already_seen.insert(node.id(), track_grad);
            if track_grad {
                nodes.push(node);
            }
            (track_grad, nodes)
        }
        let (_tg, mut nodes) = walk(self, vec![], &mut HashMap::new());
        nodes.reverse();
        nodes
    }

    pub fn backward(&self) -> Result<GradStore> {
        let sorted_nodes = self.sorted_nodes();
        // Patched (stop 34): see `SavedRelease`. Second-order gradients need both the graph
        // and the backward pass's own ops: nothing changes under CANDLE_GRAD_DO_NOT_DETACH.
        let mut release = if releases_saved_values() && !CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b) {
            Some(SavedRelease::new(&sorted_nodes)?)
        } else {
            None
        };
        let _not_recording = release.as_ref().map(|_| NotRecording::start());
        let mut grads = GradStore::new();
        grads.insert(self, self.ones_like()?.contiguous()?);
        for node in sorted_nodes.iter() {
            if node.is_variable() {
                continue;
            }
            let grad = grads
                .remove(node)
                .expect("candle internal error - grad not populated");
            // https://github.com/huggingface/candle/issues/1241
            // Ideally, we would make these operations in place where possible to ensure that we
            // do not have to allocate too often. Here we just call `.detach` to avoid computing
            // the backprop graph of the backprop itself. This would be an issue for second order
            // derivatives but these are out of scope at the moment.
            let do_not_detach = CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b);
            let grad = if do_not_detach { grad } else { grad.detach() };
            if let Some(op) = node.op() {
                match op {
                    Op::Binary(lhs, rhs, BinaryOp::Add) => {
                        grads.accumulate(lhs, &grad)?;
                        grads.accumulate(rhs, &grad)?;
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Sub) => {
                        grads.accumulate(lhs, &grad)?;
                        let rhs_sum_grad = grads.or_insert(rhs)?;
                        *rhs_sum_grad = rhs_sum_grad.sub(&grad)?;
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Mul) => {
                        // Patched: a constant factor (a dropout mask, say) gets no gradient.
                        if lhs.track_op() {
                            let lhs_grad = grad.mul(rhs)?;
                            grads.accumulate(lhs, &lhs_grad)?;
                        }
                        if rhs.track_op() {
                            let rhs_grad = grad.mul(lhs)?;
                            grads.accumulate(rhs, &rhs_grad)?;
                        }
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Div) => {
                        let lhs_grad = grad.div(rhs)?;
                        grads.accumulate(lhs, &lhs_grad)?;
                        let rhs_grad = grad.mul(lhs)?.div(&rhs.sqr()?)?;
                        let rhs_sum_grad = grads.or_insert(rhs)?;
                        *rhs_sum_grad = rhs_sum_grad.sub(&rhs_grad)?;
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Minimum)
                    | Op::Binary(lhs, rhs, BinaryOp::Maximum) => {
                        let mask_lhs = node.eq(lhs)?.to_dtype(grad.dtype())?;
                        let mask_rhs = node.eq(rhs)?.to_dtype(grad.dtype())?;

                        // If both masks are 1 one the same point, we want to scale the
                        // gradient by 0.5 rather than 1.
                        // Patched: as for `Mul`, a constant side (a clamp's bound) gets no
                        // gradient computed.
                        if lhs.track_op() {
                            let lhs_grad = mask_lhs.mul(&grad)?.div(&(&mask_rhs + 1.)?)?;
                            grads.accumulate(lhs, &lhs_grad)?;
                        }
                        if rhs.track_op() {
                            let rhs_grad = mask_rhs.mul(&grad)?.div(&(&mask_lhs + 1.)?)?;
                            grads.accumulate(rhs, &rhs_grad)?;
                        }
                    }
                    Op::WhereCond(pred, t, f) => {
                        let zeros = grad.zeros_like()?;
                        let t_sum_grad = grads.or_insert(t)?;
                        let t_grad = pred.where_cond(&grad, &zeros)?;
                        *t_sum_grad = t_sum_grad.add(&t_grad)?;
                        let f_sum_grad = grads.or_insert(f)?;
                        let f_grad = pred.where_cond(&zeros, &grad)?;
                        *f_sum_grad = f_sum_grad.add(&f_grad)?;
                    }
                    Op::Conv1D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                    } => {
                        // The output height for conv_transpose1d is:
                        // (l_in - 1) * stride - 2 * padding + dilation * (k_size - 1) + out_padding + 1
                        let grad_l_in = grad.dim(2)?;
                        let k_size = kernel.dim(2)?;
                        let out_size =
                            (grad_l_in - 1) * stride + dilation * (k_size - 1) + 1 - 2 * padding;
                        let out_padding = arg.dim(2)? - out_size;
                        let grad_arg = grad.conv_transpose1d(
                            kernel,
                            *padding,
                            out_padding,
                            *stride,
                            *dilation,
                            /* groups */ 1,
                        )?;
                        grads.accumulate(arg, &grad_arg)?;

                        let grad_kernel = arg
                            .transpose(0, 1)?
                            .conv1d(&grad.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                            .transpose(0, 1)?;
                        let sum_grad = grads.or_insert(kernel)?;
                        let (_, _, k0) = kernel.dims3()?;
                        let (_, _, g_k0) = grad_kernel.dims3()?;
                        let grad_kernel = if g_k0 != k0 {
                            grad_kernel.narrow(2, 0, k0)?
                        } else {
                            grad_kernel
                        };
                        *sum_grad = sum_grad.add(&grad_kernel)?;
                    }
                    Op::Conv2D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                    } => {
                        // The output height for conv_transpose2d is:
                        // (i_h - 1) * stride - 2 * padding + dilation * (k_h - 1) + out_padding + 1
                        let grad_h = grad.dim(2)?;
                        let k_h = kernel.dim(2)?;
                        let out_size =
                            (grad_h - 1) * stride + dilation * (k_h - 1) + 1 - 2 * padding;
                        let out_padding = arg.dim(2)? - out_size;
                        let grad_arg = grad.conv_transpose2d(
                            kernel,
                            *padding,
                            out_padding,
                            *stride,
                            *dilation,
                        )?;
                        grads.accumulate(arg, &grad_arg)?;

                        let grad_kernel = arg
                            .transpose(0, 1)?
                            .conv2d(&grad.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                            .transpose(0, 1)?;
                        let sum_grad = grads.or_insert(kernel)?;
                        let (_, _, k0, k1) = kernel.dims4()?;
                        let (_, _, g_k0, g_k1) = grad_kernel.dims4()?;
                        let grad_kernel = if g_k0 != k0 || g_k1 != k1 {
                            grad_kernel.narrow(2, 0, k0)?.narrow(3, 0, k1)?
                        } else {
                            grad_kernel
                        };
                        *sum_grad = sum_grad.add(&grad_kernel)?;
                    }
                    Op::ConvTranspose1D { .. } => Err(Error::BackwardNotSupported {
                        op: "conv-transpose1d",
                    })?,
                    Op::ConvTranspose2D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                        output_padding: _output_padding,
                    } => {
                        let grad_arg = grad.conv2d(kernel, *padding, *stride, *dilation, 1)?;
                        grads.accumulate(arg, &grad_arg)?;

                        let grad_kernel = grad
                            .transpose(0, 1)?
                            .conv2d(&arg.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                            .transpose(0, 1)?;
                        let sum_grad = grads.or_insert(kernel)?;
                        let (_, _, k0, k1) = kernel.dims4()?;
                        let (_, _, g_k0, g_k1) = grad_kernel.dims4()?;
                        let grad_kernel = if g_k0 != k0 || g_k1 != k1 {
                            grad_kernel.narrow(2, 0, k0)?.narrow(3, 0, k1)?
                        } else {
                            grad_kernel
                        };
                        *sum_grad = sum_grad.add(&grad_kernel)?;
                    }
                    Op::AvgPool2D {
                        arg,
                        kernel_size,
                        stride,
                    } => {
                        if kernel_size != stride {
                            crate::bail!("backward not supported for avgpool2d if ksize {kernel_size:?} != stride {stride:?}")
                        }
                        let (_n, _c, h, w) = arg.dims4()?;
                        let grad_arg = grad.upsample_nearest2d(h, w)?;
                        let grad_arg =
                            (grad_arg * (1f64 / (kernel_size.0 * kernel_size.1) as f64))?;
                        grads.accumulate(arg, &grad_arg)?;
                    }
                    Op::MaxPool2D {
                        arg,
                        kernel_size,
                        stride,
                    } => {
                        if kernel_size != stride {
                            crate::bail!("backward not supported for maxpool2d if ksize {kernel_size:?} != stride {stride:?}")
                        }
                        let (_n, _c, h, w) = arg.dims4()?;
                        // For computing the max-pool gradient, we compute a mask where a 1 means
                        // that the element is the maximum, then we apply this mask to the
                        // upsampled gradient (taking into account that multiple max may exist so
                        // we scale the gradient for this case).
                        let node_upsampled = node.upsample_nearest2d(h, w)?;
                        let mask = arg.eq(&node_upsampled)?.to_dtype(arg.dtype())?;
                        let avg = mask.avg_pool2d_with_stride(*kernel_size, *stride)?;
                        let grad_arg = ((grad * avg)?.upsample_nearest2d(h, w)? * mask)?;
                        grads.accumulate(arg, &grad_arg)?;
                    }
                    Op::UpsampleNearest1D { arg, target_size } => {
                        let (_n, c, size) = arg.dims3()?;
                        if target_size % size != 0 {
                            crate::bail!("backward not supported for non integer upscaling factors")
                        }
                        let scale = target_size / size;

                        let kernel = Tensor::ones((c, 1, scale), arg.dtype(), arg.device())?;
                        let conv_sum = grad.conv1d(&kernel, 0, scale, 1, c)?;
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = conv_sum;
                    }
                    Op::UpsampleNearest2D {
                        arg,
                        target_h,
                        target_w,
                    } => {
                        let (_n, c, h, w) = arg.dims4()?;
                        if target_h % h != 0 || target_w % w != 0 {
                            crate::bail!("backward not supported for non integer upscaling factors")
                        }
                        let scale_h = target_h / h;
                        let scale_w = target_w / w;

                        if scale_h != scale_w {
                            crate::bail!("backward not supported for non uniform upscaling factors")
                        };
                        let kernel =
                            Tensor::ones((c, 1, scale_h, scale_w), arg.dtype(), arg.device())?;
                        let conv_sum = grad.conv2d(&kernel, 0, scale_h, 1, c)?;
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = conv_sum;
                    }
                    Op::UpsampleBilinear2D { .. } => {
                        crate::bail!("backward not supported for upsample_bilinear2d")
                    }
                    Op::SliceScatter0(lhs, rhs, start_rhs) => {
                        let rhs_sum_grad = grads.or_insert(rhs)?;
                        let rhs_grad = grad.narrow(0, *start_rhs, rhs.dim(0)?)?;
                        *rhs_sum_grad = rhs_sum_grad.add(&rhs_grad)?;

                        let lhs_sum_grad = grads.or_insert(lhs)?;
                        let lhs_grad = grad.slice_scatter0(&rhs.zeros_like()?, *start_rhs)?;
                        *lhs_sum_grad = lhs_sum_grad.add(&lhs_grad)?
                    }
                    Op::Gather(arg, indexes, dim) => {
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = sum_grad.scatter_add(indexes, &grad, *dim)?;
                    }
                    Op::Scatter(init, indexes, src, dim) => {
                        grads.accumulate(init, &grad)?;

                        let src_grad = grad.gather(indexes, *dim)?;
                        grads.accumulate(src, &src_grad)?;
                    }
                    Op::ScatterAdd(init, indexes, src, dim) => {
                        let init_sum_grad = grads.or_insert(init)?;
                        let mask = init.ones_like()?;
                        let mask = mask.scatter(indexes, &mask.zeros_like()?, *dim)?;
                        *init_sum_grad = init_sum_grad.add(&grad.mul(&mask)?)?;

                        let src_grad = grad.gather(indexes, *dim)?;
                        grads.accumulate(src, &src_grad)?;
                    }
                    Op::IndexAdd(init, indexes, src, dim) => {
                        grads.accumulate(init, &grad)?;

                        let src_grad = grad.index_select(indexes, *dim)?;
                        grads.accumulate(src, &src_grad)?;
                    }
                    Op::IndexSelect(arg, indexes, dim) => {
                        let sum_grad = grads.or_insert(arg)?;
                        // index_select accepts strided ids but index_add requires contiguous ones.
                        let indexes = indexes.contiguous()?;
                        *sum_grad = sum_grad.index_add(&indexes, &grad, *dim)?;
                    }
                    Op::Matmul(lhs, rhs) => {
                        // Skipping checks, the op went ok, we can skip
                        // the matmul size checks for now.

                        let lhs_grad = grad.matmul(&rhs.t()?)?;
                        grads.accumulate(lhs, &lhs_grad)?;

                        let rhs_grad = lhs.t()?.matmul(&grad)?;
                        grads.accumulate(rhs, &rhs_grad)?;
                    }
                    Op::Cat(args, dim) => {
                        let mut start_idx = 0;
                        for arg in args {
                            let len = arg.dims()[*dim];
                            let arg_grad = grad.narrow(*dim, start_idx, len)?;
                            grads.accumulate(arg, &arg_grad)?;
                            start_idx += len;
                        }
                    }
                    Op::Broadcast(arg) => {
                        let arg_dims = arg.dims();
                        let node_dims = node.dims();
                        // The number of dims that have been inserted on the left.
                        let left_dims = node_dims.len() - arg_dims.len();
                        let mut sum_dims: Vec<usize> = (0..left_dims).collect();
                        for (dim, (node_dim, arg_dim)) in node_dims[left_dims..]
                            .iter()
                            .zip(arg_dims.iter())
                            .enumerate()
                        {
                            if node_dim != arg_dim {
                                sum_dims.push(dim + left_dims)
                            }
                        }

                        let mut arg_grad = grad.sum_keepdim(sum_dims.as_slice())?;
                        for _i in 0..left_dims {
                            arg_grad = arg_grad.squeeze(0)?
                        }
                        // Patched: the sum has the argument's shape, so it is stored as it
                        // is (upstream: zeros, then an addition, two more passes per node).
                        grads.accumulate(arg, &arg_grad)?;
                    }
                    Op::Reduce(arg, ReduceOp::Sum, reduced_dims) => {
                        let grad = broadcast_back(arg, &grad, reduced_dims)?;
                        grads.accumulate(arg, &grad)?;
                    }
                    Op::Reduce(arg, ReduceOp::Max, reduced_dims) => {
                        let node = broadcast_back(arg, node, reduced_dims)?;
                        let grad = broadcast_back(arg, &grad, reduced_dims)?;
                        let grad = node.eq(arg)?.to_dtype(grad.dtype())?.mul(&grad)?;
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = sum_grad.add(&grad.broadcast_as(sum_grad.dims())?)?;
                    }
                    Op::Reduce(arg, ReduceOp::Min, reduced_dims) => {
                        let node = broadcast_back(arg, node, reduced_dims)?;
                        let grad = broadcast_back(arg, &grad, reduced_dims)?;
                        let grad = node.eq(arg)?.to_dtype(grad.dtype())?.mul(&grad)?;
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = sum_grad.add(&grad.broadcast_as(sum_grad.dims())?)?;
                    }
                    Op::ToDType(arg) => {
                        grads.accumulate(arg, &grad.to_dtype(arg.dtype())?)?
                    }
                    Op::Copy(arg) => {
                        grads.accumulate(arg, &grad)?
                    }
                    Op::Affine { arg, mul, .. } => {
                        let arg_grad = grad.affine(*mul, 0.)?;
                        grads.accumulate(arg, &arg_grad)?
                    }
                    Op::Unary(arg, UnaryOp::Log) => {
                        grads.accumulate(arg, &(grad / arg)?)?
                    }
                    Op::Unary(arg, UnaryOp::Sin) => {
                        grads.accumulate(arg, &(&grad * arg.cos())?)?
                    }
                    Op::Unary(arg, UnaryOp::Cos) => {
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = sum_grad.sub(&(&grad * arg.sin())?)?
                    }
                    Op::Unary(arg, UnaryOp::Tanh) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let minus_dtanh = (node.sqr()? - 1.)?;
                        *sum_grad = sum_grad.sub(&(&grad * &minus_dtanh)?)?
                    }
                    Op::Unary(arg, UnaryOp::Abs) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let ones = arg.ones_like()?;
                        let abs_grad = arg.ge(&arg.zeros_like()?)?.where_cond(&ones, &ones.neg()?);
                        *sum_grad = sum_grad.add(&(&grad * abs_grad)?)?
                    }
                    Op::Unary(arg, UnaryOp::Exp) => {
                        grads.accumulate(arg, &(&grad * *node)?)?
                    }
                    Op::Unary(arg, UnaryOp::Neg) => {
                        let sum_grad = grads.or_insert(arg)?;
                        *sum_grad = sum_grad.sub(&grad)?
                    }
                    Op::Unary(arg, UnaryOp::Recip) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let grad = (grad / arg.sqr()?)?;
                        *sum_grad = sum_grad.sub(&grad)?
                    }
                    &Op::Narrow(ref arg, dim, start_idx, len)
                        if len < arg.dims()[dim]
                            && grads.accumulate_into_slice(arg, dim, start_idx, &grad)? => {}
                    &Op::Narrow(ref arg, dim, start_idx, len) => {
                        let arg_dims = arg.dims();
                        let left_pad = if start_idx == 0 {
                            None
                        } else {
                            let mut dims = arg_dims.to_vec();
                            dims[dim] = start_idx;
                            Some(Tensor::zeros(dims, grad.dtype(), grad.device())?)
                        };
                        let right_pad = arg_dims[dim] - start_idx - len;
                        let right_pad = if right_pad == 0 {
                            None
                        } else {
                            let mut dims = arg_dims.to_vec();
                            dims[dim] = right_pad;
                            Some(Tensor::zeros(dims, grad.dtype(), grad.device())?)
                        };
                        let arg_grad = match (left_pad, right_pad) {
                            (None, None) => grad,
                            (Some(l), None) => Tensor::cat(&[&l, &grad], dim)?,
                            (None, Some(r)) => Tensor::cat(&[&grad, &r], dim)?,
                            (Some(l), Some(r)) => Tensor::cat(&[&l, &grad, &r], dim)?,
                        };
                        grads.accumulate(arg, &arg_grad)?
                    }
                    Op::Unary(_, UnaryOp::Floor)
                    | Op::Unary(_, UnaryOp::Round)
                    | Op::Reduce(_, ReduceOp::ArgMin, _)
                    | Op::Reduce(_, ReduceOp::ArgMax, _)
                    | Op::Unary(_, UnaryOp::Sign)
                    | Op::Cmp(_, _) => {}
                    Op::Reshape(arg) => {
                        let arg_grad = grad.reshape(arg.dims())?;
                        grads.accumulate(arg, &arg_grad)?
                    }
                    Op::Unary(_, UnaryOp::Ceil) => Err(Error::BackwardNotSupported { op: "ceil" })?,
                    Op::Unary(arg, UnaryOp::Gelu) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let cube = arg.powf(3.)?;
                        let tanh = (0.0356774 * &cube + (0.797885 * arg)?)?.tanh()?;
                        let gelu_grad = (((0.5 * &tanh)?
                            + (0.0535161 * cube + (0.398942 * arg)?)? * (1. - tanh.powf(2.)?))?
                            + 0.5)?;
                        *sum_grad = sum_grad.add(&(&grad * gelu_grad)?)?
                    }
                    Op::Unary(arg, UnaryOp::Erf) => {
                        let sum_grad = grads.or_insert(arg)?;
                        // d/dx erf(x) = 2/sqrt(pi) * e^(-x^2)
                        let erf_grad =
                            (2. / std::f64::consts::PI.sqrt()) * (arg.sqr()?.neg()?).exp()?;
                        *sum_grad = sum_grad.add(&(&grad * erf_grad)?)?
                    }
                    Op::Unary(arg, UnaryOp::GeluErf) => {
                        let sum_grad = grads.or_insert(arg)?;
                        // d/dx gelu_erf(x) = 0.5 + 0.398942 e^(-x^2/2) x + 0.5 erf(x/sqrt(2))
                        let neg_half_square = (arg.sqr()?.neg()? / 2.)?;
                        let scaled_exp_arg = (0.398942 * neg_half_square.exp()? * arg)?;
                        let arg_scaled_sqrt = (arg / 2f64.sqrt())?;
                        let erf_scaled_sqrt = (0.5 * arg_scaled_sqrt.erf()?)?;
                        let gelu_erf_grad = (0.5 + scaled_exp_arg + erf_scaled_sqrt)?;
                        *sum_grad = sum_grad.add(&(&grad * gelu_erf_grad)?)?;
                    }
                    Op::Unary(arg, UnaryOp::Relu) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let relu_grad = arg.ge(&arg.zeros_like()?)?.to_dtype(arg.dtype())?;
                        *sum_grad = sum_grad.add(&(&grad * relu_grad)?)?
                    }
                    Op::Unary(arg, UnaryOp::Silu) => {
                        let sum_grad = grads.or_insert(arg)?;
                        // d/dx silu = sigmoid(x) * (1 + x * (1 - sigmoid(x))) = sigmoid(x) * (1 - node) + node
                        let sigmoid_arg = (arg.neg()?.exp()? + 1.)?.recip()?;
                        let silu_grad = &sigmoid_arg * (1. - *node) + *node;
                        *sum_grad = sum_grad.add(&(&grad * silu_grad)?)?
                    }
                    Op::Elu(arg, alpha) => {
                        // d/dx elu(x) = 1 for x > 0, alpha * e^x for x <= 0
                        let sum_grad = grads.or_insert(arg)?;
                        let zeros = arg.zeros_like()?;
                        let positive_mask = arg.gt(&zeros)?.to_dtype(arg.dtype())?;
                        let negative_mask = arg.le(&zeros)?.to_dtype(arg.dtype())?;
                        // node == alpha * (e^x - 1) for x <= 0, reuse it
                        let negative_exp_mask = (negative_mask * (*node + *alpha))?;
                        let combined_mask = (positive_mask + negative_exp_mask)?;
                        *sum_grad = sum_grad.add(&(grad * combined_mask)?)?
                    }
                    Op::Powf(arg, e) => {
                        let arg_grad = (&(grad * arg.powf(e - 1.)?)? * *e)?;
                        grads.accumulate(arg, &arg_grad)?
                    }
                    Op::CustomOp1(arg, c) => {
                        if let Some(arg_grad) = c.bwd(arg, node, &grad)? {
                            grads.accumulate(arg, &arg_grad)?
                        }
                    }
                    Op::CustomOp2(arg1, arg2, c) => {
                        let (arg_grad1, arg_grad2) = c.bwd(arg1, arg2, node, &grad)?;
                        if let Some(arg_grad1) = arg_grad1 {
                            grads.accumulate(arg1, &arg_grad1)?
                        }
                        if let Some(arg_grad2) = arg_grad2 {
                            grads.accumulate(arg2, &arg_grad2)?
                        }
                    }
                    Op::CustomOp3(arg1, arg2, arg3, c) => {
                        let (arg_grad1, arg_grad2, arg_grad3) =
                            c.bwd(arg1, arg2, arg3, node, &grad)?;
                        if let Some(arg_grad1) = arg_grad1 {
                            grads.accumulate(arg1, &arg_grad1)?
                        }
                        if let Some(arg_grad2) = arg_grad2 {
                            grads.accumulate(arg2, &arg_grad2)?
                        }
                        if let Some(arg_grad3) = arg_grad3 {
                            grads.accumulate(arg3, &arg_grad3)?
                        }
                    }
                    Op::Unary(arg, UnaryOp::Sqr) => {
                        let arg_grad = arg.mul(&grad)?.affine(2., 0.)?;
                        grads.accumulate(arg, &arg_grad)?
                    }
                    Op::Unary(arg, UnaryOp::Sqrt) => {
                        let arg_grad = grad.div(node)?.affine(0.5, 0.)?;
                        grads.accumulate(arg, &arg_grad)?
                    }
                    Op::ToDevice(arg) => {
                        let sum_grad = grads.or_insert(arg)?;
                        let arg_grad = grad.to_device(sum_grad.device())?;
                        *sum_grad = sum_grad.add(&arg_grad)?
                    }
                    Op::Transpose(arg, dim1, dim2) => {
                        let arg_grad = grad.transpose(*dim1, *dim2)?;
                        grads.accumulate(arg, &arg_grad)?
                    }
                    Op::Permute(arg, dims) => {
                        let mut inv_dims = vec![0; dims.len()];
                        for (i, &dim_idx) in dims.iter().enumerate() {
                            inv_dims[dim_idx] = i
                        }
                        let arg_grad = grad.permute(inv_dims)?;
                        grads.accumulate(arg, &arg_grad)?
                    }
                };
            }
            if let Some(release) = release.as_mut() {
                release.done(node)?;
            }
        }
        Ok(grads)
    }
}

/// Patched (stop 34): whether backward passes on this thread release the saved values they are
/// done with (see `SavedRelease`). `UNET_RELEASE_SAVED=0` keeps every one until the graph is
/// dropped and records the backward pass's ops, as upstream; [`set_release_saved_on_this_thread`]
/// overrides it for the calling thread.
pub fn releases_saved_values() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    RELEASE_OVERRIDE.with(|o| o.get()).unwrap_or_else(|| *ON.get_or_init(|| std::env::var("UNET_RELEASE_SAVED").map_or(true, |v| v != "0")))
}

thread_local! {
    static RELEASE_OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    static RECORDING_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Patched (stop 34): whether backward passes on this thread release saved values
/// (`Some(true)`), keep them (`Some(false)`) or follow `UNET_RELEASE_SAVED` (`None`), for tests
/// and A/B runs in one process.
pub fn set_release_saved_on_this_thread(on: Option<bool>) {
    RELEASE_OVERRIDE.with(|o| o.set(on));
}

/// Patched (stop 34): how many buffers backward passes have released, and their bytes, since
/// the process began (all threads).
pub fn released_saved() -> (usize, usize) {
    (RELEASED_BUFFERS.load(std::sync::atomic::Ordering::Relaxed), RELEASED_BYTES.load(std::sync::atomic::Ordering::Relaxed))
}

static RELEASED_BUFFERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static RELEASED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether new tensors record the op that made them (see [`NotRecording`]).
pub(crate) fn recording_ops() -> bool {
    !RECORDING_OFF.with(|r| r.get())
}

/// Patched (stop 34): while a backward pass runs (outside CANDLE_GRAD_DO_NOT_DETACH), the
/// tensors it makes record no op, as under PyTorch's `no_grad`. Upstream recorded them and
/// then detached every gradient before its use, so the records were never read; but each
/// stored gradient's record held its inputs (a weight's gradient held the layer's input and
/// output gradient) until the pass ended, and would have kept the buffers [`SavedRelease`]
/// frees alive.
struct NotRecording(bool);

impl NotRecording {
    fn start() -> Self {
        Self(RECORDING_OFF.with(|r| r.replace(true)))
    }
}

impl Drop for NotRecording {
    fn drop(&mut self) {
        RECORDING_OFF.with(|r| r.set(self.0));
    }
}

/// Patched (stop 34): frees the values a graph saved for its backward pass once nothing in the
/// pass will read them, as PyTorch does; upstream kept every one until the graph was dropped,
/// so the pass's peak was all the saved values plus the gradients in flight.
///
/// The loop visits a node only after every node that reads it (topological order), and a
/// node's own arm is the last to read its value. So once the loop has done every node that
/// shares a buffer (views, and in-place sums, share their input's), the buffer is dead to the
/// pass. It is released then, if nothing outside the graph can reach it: each sharer's handles
/// must all be held by the graph's ops (none by the caller, a custom op's state, or an op
/// outside the pass), and the buffer's by those sharers alone (no detached copy, no view off
/// the graph). Variables and the root are never released: the loop skips variables, and the
/// caller holds the root. Small buffers are kept: the stand-in costs a (tiny) allocation on
/// CUDA, and they are not where the memory is.
struct SavedRelease<'a> {
    /// Per storage: the nodes on it, and how many of them the loop has yet to do.
    storages: HashMap<usize, (Vec<&'a Tensor>, usize)>,
    /// Per node: the handles the graph's ops hold on it.
    graph_handles: HashMap<TensorId, usize>,
}

/// 64 KiB: a `[B, 512]` time embedding is kept, a feature map is released.
const RELEASE_MIN_BYTES: usize = 1 << 16;

impl<'a> SavedRelease<'a> {
    fn new(nodes: &[&'a Tensor]) -> Result<Self> {
        let mut storages: HashMap<usize, (Vec<&'a Tensor>, usize)> = HashMap::with_capacity(nodes.len());
        let mut graph_handles: HashMap<TensorId, usize> = HashMap::with_capacity(nodes.len());
        for node in nodes {
            if is_released(node) && !released_in_forward(node) {
                return Err(Error::Msg(
                    "backward pass through a graph whose saved values an earlier backward pass released \
                     (run one backward pass per graph, or set UNET_RELEASE_SAVED=0)"
                        .into(),
                ));
            }
            let e = storages.entry(node.storage_key()).or_default();
            e.0.push(node);
            e.1 += 1;
            if let Some(op) = node.op() {
                for_each_arg(op, &mut |arg| *graph_handles.entry(arg.id()).or_default() += 1);
            }
        }
        Ok(Self { storages, graph_handles })
    }

    /// After `node`'s arm: releases its buffer if that was the last node on it.
    fn done(&mut self, node: &Tensor) -> Result<()> {
        let key = node.storage_key();
        let Some((sharers, left)) = self.storages.get_mut(&key) else {
            return Ok(());
        };
        *left -= 1;
        if *left > 0 {
            return Ok(());
        }
        let sharers = std::mem::take(sharers);
        self.storages.remove(&key);
        let only_the_graph = sharers.iter().all(|t| {
            let (handles, on_storage) = t.handle_counts();
            handles == self.graph_handles.get(&t.id()).copied().unwrap_or(0) && on_storage == sharers.len()
        });
        if !only_the_graph || !node.dtype().is_float() {
            return Ok(());
        }
        let Some(elems) = buffer_elems(node) else {
            return Ok(());
        };
        let bytes = elems * node.dtype().size_in_bytes();
        if bytes < RELEASE_MIN_BYTES {
            return Ok(());
        }
        // Should the stand-in fail (memory exhausted), the buffer is kept: the pass goes on.
        if !swap_for_stand_in(node) {
            return Ok(());
        }
        RELEASED_BUFFERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        RELEASED_BYTES.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The element count of a float CPU or CUDA buffer (other devices: `None`, never released).
fn buffer_elems(t: &Tensor) -> Option<usize> {
    let (storage, _) = t.storage_and_layout();
    Some(match &*storage {
        crate::Storage::Cpu(crate::CpuStorage::F32(v)) => v.len(),
        crate::Storage::Cpu(crate::CpuStorage::F64(v)) => v.len(),
        crate::Storage::Cpu(crate::CpuStorage::BF16(v)) => v.len(),
        crate::Storage::Cpu(crate::CpuStorage::F16(v)) => v.len(),
        #[cfg(feature = "cuda")]
        crate::Storage::Cuda(s) => match &s.slice {
            crate::cuda_backend::CudaStorageSlice::F32(v) => v.len(),
            crate::cuda_backend::CudaStorageSlice::F64(v) => v.len(),
            crate::cuda_backend::CudaStorageSlice::BF16(v) => v.len(),
            crate::cuda_backend::CudaStorageSlice::F16(v) => v.len(),
            _ => return None,
        },
        _ => return None,
    })
}

/// Buffers freed in the forward pass by `Tensor::release_unread`: a graph holding them is not
/// one an earlier backward pass went through. Weak handles, so that a dropped graph's entries
/// die with it; those are pruned at each insertion.
static RELEASED_IN_FORWARD: std::sync::Mutex<Vec<std::sync::Weak<crate::tensor::StorageLock>>> = std::sync::Mutex::new(Vec::new());

/// Swaps `t`'s buffer for a stand-in and records it as freed in the forward pass: false if the
/// stand-in cannot be had (the buffer is kept) or the device is not the CPU or CUDA.
pub(crate) fn release_in_forward(t: &Tensor) -> bool {
    if buffer_elems(t).is_none() {
        return false;
    }
    if !swap_for_stand_in(t) {
        return false;
    }
    let mut list = RELEASED_IN_FORWARD.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|w| w.strong_count() > 0);
    list.push(std::sync::Arc::downgrade(t.storage_arc()));
    true
}

/// Swaps `t`'s buffer, for every tensor on it, for an empty one of its dtype and device; false,
/// with the buffer kept, if that cannot be allocated.
fn swap_for_stand_in(t: &Tensor) -> bool {
    // CUDA gets one element: cudarc's zero-byte allocations are not defined.
    let len = if t.device().is_cpu() { 0 } else { 1 };
    match unsafe { t.device().alloc_uninit(&crate::Shape::from(len), t.dtype()) } {
        Ok(stand_in) => {
            t.replace_storage(stand_in);
            true
        }
        Err(_) => false,
    }
}

fn released_in_forward(t: &Tensor) -> bool {
    let list = RELEASED_IN_FORWARD.lock().unwrap_or_else(|e| e.into_inner());
    // A weak handle keeps its allocation's address from being reused, dead or not.
    list.iter().any(|w| std::ptr::eq(w.as_ptr(), std::sync::Arc::as_ptr(t.storage_arc())))
}

/// Whether `t`'s buffer is a released one's stand-in: shorter than `t`'s layout reaches.
fn is_released(t: &Tensor) -> bool {
    let l = t.layout();
    if t.elem_count() == 0 || !t.dtype().is_float() {
        return false;
    }
    let reach = l.start_offset() + l.dims().iter().zip(l.stride()).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1;
    buffer_elems(t).is_some_and(|len| len < reach)
}

/// Calls `f` on every tensor `op` holds.
pub(crate) fn for_each_arg(op: &Op, f: &mut impl FnMut(&Tensor)) {
    match op {
        Op::IndexAdd(t1, t2, t3, _)
        | Op::Scatter(t1, t2, t3, _)
        | Op::ScatterAdd(t1, t2, t3, _)
        | Op::CustomOp3(t1, t2, t3, _)
        | Op::WhereCond(t1, t2, t3) => {
            f(t1);
            f(t2);
            f(t3);
        }
        Op::Conv1D { arg: lhs, kernel: rhs, .. }
        | Op::ConvTranspose1D { arg: lhs, kernel: rhs, .. }
        | Op::Conv2D { arg: lhs, kernel: rhs, .. }
        | Op::ConvTranspose2D { arg: lhs, kernel: rhs, .. }
        | Op::CustomOp2(lhs, rhs, _)
        | Op::Binary(lhs, rhs, _)
        | Op::Gather(lhs, rhs, _)
        | Op::IndexSelect(lhs, rhs, _)
        | Op::Matmul(lhs, rhs)
        | Op::SliceScatter0(lhs, rhs, _) => {
            f(lhs);
            f(rhs);
        }
        Op::Cat(args, _) => args.iter().for_each(f),
        Op::Affine { arg, .. }
        | Op::Reshape(arg)
        | Op::UpsampleNearest1D { arg, .. }
        | Op::UpsampleNearest2D { arg, .. }
        | Op::UpsampleBilinear2D { arg, .. }
        | Op::AvgPool2D { arg, .. }
        | Op::MaxPool2D { arg, .. }
        | Op::Copy(arg)
        | Op::Broadcast(arg)
        | Op::Cmp(arg, _)
        | Op::Reduce(arg, _, _)
        | Op::ToDevice(arg)
        | Op::ToDType(arg)
        | Op::Transpose(arg, _, _)
        | Op::Permute(arg, _)
        | Op::Narrow(arg, _, _, _)
        | Op::Unary(arg, _)
        | Op::Elu(arg, _)
        | Op::Powf(arg, _)
        | Op::CustomOp1(arg, _) => f(arg),
    }
}

/// A store for gradients, associating a tensor id to the corresponding gradient tensor, used for back propagation.
#[derive(Default, Debug)]
pub struct GradStore(HashMap<TensorId, Tensor>, HashMap<TensorId, SlicedSum>);

/// Patched: a gradient built only from narrows' slices ([`GradStore::accumulate_into_slice`]),
/// with the parts of `dim` written so far. A slice outside them is still zeros, so it is copied
/// in, not added: the 22 time-embedding projections are disjoint narrows of one product.
#[derive(Debug)]
struct SlicedSum {
    /// The id of the sum tensor the record describes: a replaced sum is not described.
    sum: TensorId,
    dim: usize,
    written: Vec<(usize, usize)>,
}

/// Whether `t` is, from its start, the whole of a CPU or CUDA buffer or all of it but a short
/// tail (at most 1/16 of `t`'s size more: a custom op's packed extra outputs, as GroupNorm's
/// per-channel sums after its input gradient), rather than a view into a larger one. On CUDA
/// unless `UNET_CUDA_GRADS=candle` (upstream's `zeros_like` + add for every first gradient: an
/// allocation, a memset and an addition per graph node, for A/B runs). Other devices: false,
/// which keeps upstream's behaviour there.
fn owns_its_storage(t: &Tensor) -> bool {
    if !t.is_contiguous() || t.layout().start_offset() != 0 {
        return false;
    }
    let n = t.elem_count();
    buffer_len(t).is_some_and(|len| len >= n && (len - n) * 16 <= n)
}

/// Patched: whether `t` is a contiguous view (any offset) of a buffer small enough that
/// keeping all of it alive with the view costs nothing worth a copy: a weight's gradient
/// narrowed from a stacked product, or a row of a `[dw; db]` reduction. Stored as they are,
/// where a compact copy cost an allocation and a launch per gradient. Same devices as
/// [`owns_its_storage`].
fn small_contiguous_view(t: &Tensor) -> bool {
    /// 16 MiB of f32.
    const SMALL: usize = 1 << 22;
    t.is_contiguous() && buffer_len(t).is_some_and(|len| len <= SMALL)
}

/// The element count of `t`'s whole buffer, on the devices whose first gradients may be
/// stored as they are ([`owns_its_storage`]).
fn buffer_len(t: &Tensor) -> Option<usize> {
    let (storage, _) = t.storage_and_layout();
    let len = match &*storage {
        crate::Storage::Cpu(crate::CpuStorage::F32(v)) => v.len(),
        crate::Storage::Cpu(crate::CpuStorage::F64(v)) => v.len(),
        crate::Storage::Cpu(crate::CpuStorage::BF16(v)) => v.len(),
        crate::Storage::Cpu(crate::CpuStorage::F16(v)) => v.len(),
        #[cfg(feature = "cuda")]
        crate::Storage::Cuda(s) if cuda_first_grad_as_is() => match &s.slice {
            crate::cuda_backend::CudaStorageSlice::F32(v) => v.len(),
            crate::cuda_backend::CudaStorageSlice::F64(v) => v.len(),
            crate::cuda_backend::CudaStorageSlice::BF16(v) => v.len(),
            crate::cuda_backend::CudaStorageSlice::F16(v) => v.len(),
            _ => return None,
        },
        _ => return None,
    };
    Some(len)
}

/// Whether a first gradient that is not stored as it is gets a compact copy instead of
/// upstream's `zeros + add`: on the CPU, and on CUDA unless `UNET_CUDA_GRADS=candle`.
fn compacts_views(t: &Tensor) -> bool {
    match t.device() {
        crate::Device::Cpu => true,
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => cuda_first_grad_as_is(),
        _ => false,
    }
}

/// Patched: `UNET_CUDA_GRADS=candle` restores upstream's first-gradient handling on CUDA.
#[cfg(feature = "cuda")]
fn cuda_first_grad_as_is() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("UNET_CUDA_GRADS").map_or(true, |v| v != "candle"))
}

/// `sum += grad` in `sum`'s own buffer, when this store holds the only handle on `sum` and on
/// its storage (a gradient shared with another entry, or a view, is not written), both are
/// compact f32 CPU tensors of the same shape. Returns false, having done nothing, otherwise.
/// Patched (see third_party/README.md): the sum of the gradients of a tensor used twice (every
/// skip connection) no longer allocates a new activation-sized buffer; the result is the same
/// IEEE addition, element for element.
fn add_in_place(sum: &Tensor, grad: &Tensor) -> bool {
    // Empty tensors go to upstream's add: their layouts may start past the end of an empty buffer.
    if !sum.device().is_cpu()
        || sum.elem_count() == 0
        || sum.dtype() != crate::DType::F32
        || grad.dtype() != crate::DType::F32
        || sum.shape() != grad.shape()
        || !grad.is_contiguous()
        || !owns_its_storage(sum)
        || !sum.is_sole_owner()
    {
        return false;
    }
    let (g_storage, g_layout) = grad.storage_and_layout();
    let crate::Storage::Cpu(crate::CpuStorage::F32(g)) = &*g_storage else {
        return false;
    };
    let start = g_layout.start_offset();
    let g = &g[start..start + grad.elem_count()];
    // A different lock from grad's: `sum` is the sole owner of its storage.
    let mut s_storage = sum.storage_mut();
    let crate::Storage::Cpu(crate::CpuStorage::F32(s)) = &mut *s_storage else {
        return false;
    };
    // The sum's own elements: its buffer may have a short tail (`owns_its_storage`).
    let n = sum.elem_count();
    let s = &mut s[..n];
    const CHUNK: usize = 16 * 1024;
    // As candle's element-wise ops: below 64K elements waking the pool costs more than it saves.
    if n < 4 * CHUNK {
        for (d, &v) in s.iter_mut().zip(g) {
            *d += v;
        }
        return true;
    }
    let ptr = s.as_mut_ptr() as usize;
    crate::utils::barrier_pool().execute_chunked(n.div_ceil(CHUNK), |range| {
        for unit in range {
            let (lo, hi) = (unit * CHUNK, n.min((unit + 1) * CHUNK));
            // SAFETY: units cover disjoint ranges of `s`, which the write lock above holds.
            let dst = unsafe { std::slice::from_raw_parts_mut((ptr as *mut f32).add(lo), hi - lo) };
            for (d, &v) in dst.iter_mut().zip(&g[lo..hi]) {
                *d += v;
            }
        }
    });
    true
}

impl GradStore {
    /// Create a new gradient store
    fn new() -> Self {
        Self::default()
    }

    /// Get the gradient tensor corresponding to the given tensor id
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.0.get(&id)
    }

    /// Get the gradient tensor associated with the given tensor
    pub fn get(&self, tensor: &Tensor) -> Option<&Tensor> {
        self.0.get(&tensor.id())
    }

    /// Remove the gradient tensor associated with the given tensor, returning it if it exists
    pub fn remove(&mut self, tensor: &Tensor) -> Option<Tensor> {
        self.1.remove(&tensor.id());
        self.0.remove(&tensor.id())
    }

    /// Insert a gradient tensor associated with the given tensor, returning the previous gradient tensor if it existed
    pub fn insert(&mut self, tensor: &Tensor, grad: Tensor) -> Option<Tensor> {
        self.1.remove(&tensor.id());
        self.0.insert(tensor.id(), grad)
    }

    /// Insert a gradient tensor associated with the given tensor id, returning the previous gradient tensor if it existed
    pub fn insert_id(&mut self, id: TensorId, grad: Tensor) -> Option<Tensor> {
        self.1.remove(&id);
        self.0.insert(id, grad)
    }

    /// Adds `grad` to the gradient of `tensor`. A first gradient is stored as it is, instead
    /// of `zeros_like` plus an addition (two extra passes over every activation-sized
    /// gradient). Patched in this vendored copy; see third_party/README.md.
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        // A constant (no variable behind it) never needs its gradient: do not keep one.
        if !tensor.track_op() {
            return Ok(());
        }
        match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => {
                // The whole sum changes: no part of it is known to be zeros any more.
                self.1.remove(&tensor.id());
                let sum = entry.into_mut();
                if !add_in_place(sum, grad) {
                    *sum = sum.add(grad)?;
                }
            }
            Entry::Vacant(entry) => {
                let fits = grad.shape() == tensor.shape() && grad.dtype() == tensor.dtype() && grad.device().same_device(tensor.device());
                if fits && (owns_its_storage(grad) || small_contiguous_view(grad)) {
                    entry.insert(grad.clone());
                } else if fits && compacts_views(grad) {
                    // A view (a narrow of a concatenation's gradient, say) would keep its whole
                    // buffer alive until this gradient is consumed: store a compact copy, one
                    // pass, where upstream's `zeros + add` made two and cleared a buffer.
                    entry.insert(grad.force_contiguous()?);
                } else {
                    // Upstream's way; a mismatch is reported by the addition, as upstream.
                    entry.insert(tensor.zeros_like()?.add(grad)?);
                }
            }
        }
        Ok(())
    }

    /// Patched: the gradient of a narrow (`grad`, `tensor`'s shape but along `dim`) added into
    /// its slice of `tensor`'s gradient. Upstream padded it with two zero tensors to the full
    /// shape (a concatenation: three copies), then added that whole: per narrow, a
    /// full-size allocation, clears, copies and an addition, where each of the reference
    /// network's time-embedding projections is a narrow of one product. Here a first gradient
    /// is one cleared buffer and one copy into it; a later one an addition of the slice and a
    /// copy back, in place, only when the store holds the sole handle on a compact sum (else
    /// `false`: the caller goes upstream's way).
    fn accumulate_into_slice(&mut self, tensor: &Tensor, dim: usize, start: usize, grad: &Tensor) -> Result<bool> {
        if !tensor.track_op() {
            return Ok(true);
        }
        if tensor.elem_count() == 0
            || grad.dtype() != tensor.dtype()
            || !grad.device().same_device(tensor.device())
            || grad.rank() != tensor.rank()
        {
            return Ok(false);
        }
        let grad = grad.contiguous()?;
        let len = grad.dim(dim)?;
        match self.0.entry(tensor.id()) {
            Entry::Vacant(entry) => {
                let sum = tensor.zeros_like()?;
                sum.slice_set(&grad, dim, start)?;
                self.1.insert(tensor.id(), SlicedSum { sum: sum.id(), dim, written: vec![(start, len)] });
                entry.insert(sum);
            }
            Entry::Occupied(entry) => {
                let sum = entry.get();
                if sum.shape() != tensor.shape()
                    || !sum.is_contiguous()
                    || sum.layout().start_offset() != 0
                    || !sum.is_sole_owner()
                {
                    return Ok(false);
                }
                let record = self.1.get_mut(&tensor.id()).filter(|r| r.sum == sum.id() && r.dim == dim);
                let untouched = record.as_ref().is_some_and(|r| r.written.iter().all(|&(s, l)| start + len <= s || s + l <= start));
                if untouched {
                    // Still zeros there: the slice is the gradient itself.
                    sum.slice_set(&grad, dim, start)?;
                } else {
                    let part = sum.narrow(dim, start, len)?.add(&grad)?;
                    sum.slice_set(&part, dim, start)?;
                }
                match record {
                    Some(r) => r.written.push((start, len)),
                    None => {
                        self.1.remove(&tensor.id());
                    }
                }
            }
        }
        Ok(true)
    }

    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,
    /// insert a tensor of zeroes, with the same shape and type as the given tensors and return it
    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {
        // The caller may change the sum as a whole.
        self.1.remove(&tensor.id());
        let grad = match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let grad = tensor.zeros_like()?;
                entry.insert(grad)
            }
        };
        Ok(grad)
    }

    /// Extend this gradient store with the contents of another.
    /// If an entry is already occupied, updates and ensures new tensor follows correct detach semantics.
    /// Otherwise simply inserts.
    pub fn extend(&mut self, other: Self) -> Result<()> {
        for (id, grad) in other.0 {
            match self.0.entry(id) {
                Entry::Occupied(mut entry) => {
                    let new_grad = entry.get().add(&grad)?;

                    let do_not_detach = CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b);
                    let new_grad = if do_not_detach {
                        new_grad
                    } else {
                        new_grad.detach()
                    };

                    *entry.get_mut() = new_grad;
                }
                Entry::Vacant(entry) => {
                    entry.insert(grad);
                }
            }
        }
        Ok(())
    }

    /// Get the tensor ids of the stored gradient tensors
    pub fn get_ids(&self) -> impl Iterator<Item = &TensorId> {
        self.0.keys()
    }
}
