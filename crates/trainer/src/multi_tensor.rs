//! The launch plan of the multi-tensor optimizer kernels (`adam_cuda.cu`: `adam_multi`,
//! `sumsq_multi`): the variables' buffers go to a kernel by value, [`MT_MAX`] tensors a launch,
//! each tensor cut into chunks of `chunk` elements, one block a chunk. PyTorch's Adam does the
//! same on CUDA (its `foreach` implementation); per variable, the 331 variables of the
//! reference network cost hundreds of launches a step for the gradient norm and the update.
//!
//! Kept apart from the CUDA code so that it builds, and is tested, without CUDA: the kernel
//! emulation test (`tests/cuda_adam_emulated.rs`) runs the kernels on plans made here.

/// Tensors per launch. With six address lists, the block table and two counts the argument is
/// 3,344 bytes, under CUDA's 4,096 bytes of kernel parameters (`MT_MAX` in `adam_cuda.cu`).
pub const MT_MAX: usize = 64;

/// The kernels' argument, laid out as `struct MtArgs` in `adam_cuda.cu`: device addresses (0 for
/// an absent list: `e` without EMA, all but `g` for the sum of squares), element counts, and the
/// first block of each tensor (`first_block[count]` is the launch's block count).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MtArgs {
    pub p: [u64; MT_MAX],
    pub g: [u64; MT_MAX],
    pub m: [u64; MT_MAX],
    pub v: [u64; MT_MAX],
    pub e: [u64; MT_MAX],
    pub n: [u64; MT_MAX],
    pub first_block: [u32; MT_MAX + 1],
    pub count: u32,
    pub chunk: u32,
}

/// One tensor's buffers (device addresses) and element count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffers {
    pub p: u64,
    pub g: u64,
    pub m: u64,
    pub v: u64,
    pub e: u64,
    pub n: usize,
}

/// The launches for `tensors`, in order: each argument with its block count (0 only when all
/// of its tensors are empty). `chunk` > 0.
pub fn plan(tensors: &[Buffers], chunk: u32) -> Vec<(MtArgs, u32)> {
    assert!(chunk > 0, "multi-tensor plan: chunk must be positive");
    tensors
        .chunks(MT_MAX)
        .map(|group| {
            let mut a = MtArgs {
                p: [0; MT_MAX],
                g: [0; MT_MAX],
                m: [0; MT_MAX],
                v: [0; MT_MAX],
                e: [0; MT_MAX],
                n: [0; MT_MAX],
                first_block: [0; MT_MAX + 1],
                count: group.len() as u32,
                chunk,
            };
            let mut blocks = 0u32;
            for (i, t) in group.iter().enumerate() {
                (a.p[i], a.g[i], a.m[i], a.v[i], a.e[i], a.n[i]) = (t.p, t.g, t.m, t.v, t.e, t.n as u64);
                a.first_block[i] = blocks;
                let need = u32::try_from(t.n.div_ceil(chunk as usize)).expect("multi-tensor plan: more than 2^32 blocks");
                blocks = blocks.checked_add(need).expect("multi-tensor plan: more than 2^32 blocks");
            }
            // Past the group's last tensor, so that the kernels' search stops there.
            for f in &mut a.first_block[group.len()..] {
                *f = blocks;
            }
            (a, blocks)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernels_struct() {
        // adam_cuda.cu static_asserts the same size; the emulation test passes these bytes.
        assert_eq!(std::mem::size_of::<MtArgs>(), 3344);
        assert_eq!(std::mem::align_of::<MtArgs>(), 8);
    }

    #[test]
    fn groups_tensors_and_counts_chunks() {
        let sizes: Vec<usize> = (0..150).map(|i| [0, 1, 99, 100, 101, 1000][i % 6]).collect();
        let ts: Vec<Buffers> = sizes.iter().enumerate().map(|(i, &n)| Buffers { p: 8 * i as u64 + 8, g: 1, n, ..Default::default() }).collect();
        let launches = plan(&ts, 100);
        assert_eq!(launches.iter().map(|(a, _)| a.count).collect::<Vec<_>>(), [64, 64, 22]);
        let mut k = 0;
        for (a, blocks) in &launches {
            let c = a.count as usize;
            assert_eq!(a.first_block[c], *blocks);
            assert!(a.first_block[c..].iter().all(|&f| f == *blocks));
            for i in 0..c {
                assert_eq!(a.p[i], 8 * k as u64 + 8);
                assert_eq!(a.n[i], sizes[k] as u64);
                let want = sizes[k].div_ceil(100) as u32;
                assert_eq!(a.first_block[i + 1] - a.first_block[i], want, "tensor {k}");
                k += 1;
            }
            assert!(a.p[c..].iter().all(|&p| p == 0));
        }
        assert_eq!(k, 150);
        // 25 each of 0, 1, 99, 100, 101 and 1000 elements: 0 + 25 + 25 + 25 + 50 + 250 blocks.
        assert_eq!(launches.iter().map(|(_, b)| b).sum::<u32>(), 375);
        assert!(plan(&[], 100).is_empty());
    }
}
