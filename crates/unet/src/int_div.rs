//! The magic numbers of the CUDA kernels' divisions by a map's H * W (`kernels.cu`'s `udiv`):
//! a multiply-high, an add and a shift in place of an integer division per element, which cost
//! the memory-bound kernels more than their memory traffic. Not CUDA-gated, so that the
//! kernels' CPU emulation (`tests/cuda_kernels_emulated.rs`) runs with the very numbers the
//! launches pass.

/// `(m, s)` such that `n / d == (umulhi(n, m) + n) >> s` for every `n` in `0..2^31` (the method
/// of PyTorch's `IntDivider`: `s` is the smallest with `2^s >= d`); `d` must be in `1..2^31`.
pub fn magic(d: u32) -> (u32, u32) {
    assert!((1..1 << 31).contains(&d), "int_div::magic: divisor {d} is outside 1..2^31");
    let s = 32 - (d - 1).leading_zeros();
    // d > 2^(s-1) (or d = 1), so 2^s - d < d and m fits in 32 bits; 2^32 (2^s - d) < 2^63.
    let m = ((1u64 << 32) * ((1u64 << s) - d as u64)) / d as u64 + 1;
    (u32::try_from(m).expect("the magic multiplier fits 32 bits"), s)
}

/// What the kernels compute from [`magic`]'s numbers, for `n` in `0..2^31`.
pub fn div(n: u32, (m, s): (u32, u32)) -> u32 {
    let hi = (n as u64 * m as u64) >> 32;
    ((hi + n as u64) >> s) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divides_exactly_over_the_whole_range() {
        let mut divisors: Vec<u32> = (1..=4200).collect();
        // Powers of two, their neighbours, the maps' sizes and the extremes.
        for k in 1..31 {
            divisors.extend([(1u32 << k) - 1, 1 << k, (1 << k) + 1]);
        }
        divisors.extend([64 * 64, 48 * 48, 12 * 12, 1_000_003, (1 << 31) - 1]);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for d in divisors {
            let mg = magic(d);
            let check = |n: u32| assert_eq!(div(n, mg), n / d, "{n} / {d} with {mg:?}");
            for n in [0, 1, d - 1, d, d.saturating_add(1), 2 * d.min(1 << 30) - 1, (1 << 31) - 1, (1 << 31) - 2] {
                if n < 1 << 31 {
                    check(n);
                }
            }
            // Every multiple's neighbours near the top of the range, where the add is largest.
            let top = ((1u32 << 31) - 1) / d * d;
            for n in [top.saturating_sub(1), top, top.saturating_sub(d), top.saturating_sub(d).saturating_sub(1)] {
                check(n);
            }
            for _ in 0..64 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                check((state >> 33) as u32);
            }
        }
        // One small divisor, every n up to 2^20.
        let mg = magic(4096);
        for n in 0..1 << 20 {
            assert_eq!(div(n, mg), n / 4096);
        }
    }

    #[test]
    #[should_panic(expected = "outside 1..2^31")]
    fn zero_is_refused() {
        magic(0);
    }
}
