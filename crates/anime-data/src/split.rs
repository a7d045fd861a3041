//! Seeded train/val/test split and per-epoch shuffling.
//!
//! Both use ChaCha8 streams and our own Fisher-Yates shuffle over `next_u64`, so the results
//! depend only on the arguments (not on the `rand` version's sampling algorithms).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Indices of the train, validation and test images (each sorted ascending).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

/// The reference's split seed.
pub const REFERENCE_SEED: u64 = 999;
/// The reference's validation fraction.
pub const REFERENCE_VAL_FRAC: f64 = 0.025;
/// The reference's test fraction.
pub const REFERENCE_TEST_FRAC: f64 = 0.025;

/// Uniform integer in `0..bound` (bound > 0) without modulo bias (Lemire's method).
fn below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(bound);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

fn shuffle(v: &mut [usize], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Seeded like the reference (seed 999, 95/2.5/2.5): deterministic for (n, seed, fracs).
///
/// A seeded permutation of `0..n` is cut into `floor(n * val_frac)` validation images,
/// `floor(n * test_frac)` test images and the rest for training; each part is then sorted.
/// Fractions that are negative, not finite, or add up to more than 1 are an error.
pub fn split_indices(n: usize, seed: u64, val_frac: f64, test_frac: f64) -> Result<Split, crate::DataError> {
    if !(val_frac.is_finite() && test_frac.is_finite() && val_frac >= 0.0 && test_frac >= 0.0 && val_frac + test_frac <= 1.0) {
        return Err(crate::DataError::Invalid(format!(
            "invalid split fractions val={val_frac} test={test_frac}: each must be >= 0 and together at most 1"
        )));
    }
    let n_val = ((n as f64 * val_frac).floor() as usize).min(n);
    let n_test = ((n as f64 * test_frac).floor() as usize).min(n - n_val);
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    shuffle(&mut perm, &mut rng);
    let mut val = perm[..n_val].to_vec();
    let mut test = perm[n_val..n_val + n_test].to_vec();
    let mut train = perm[n_val + n_test..].to_vec();
    val.sort_unstable();
    test.sort_unstable();
    train.sort_unstable();
    Ok(Split { train, val, test })
}

/// Deterministic shuffled order of `indices` for an epoch: depends only on (seed, epoch), so resuming needs just (epoch, position).
///
/// The permutation comes from ChaCha8 seeded with `seed`, stream `epoch + 1` (stream 0 is left
/// to [`split_indices`]).
pub fn epoch_order(indices: &[usize], seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_add(1));
    let mut v = indices.to_vec();
    shuffle(&mut v, &mut rng);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn split_sizes_and_disjointness() {
        let s = split_indices(63_565, REFERENCE_SEED, REFERENCE_VAL_FRAC, REFERENCE_TEST_FRAC).unwrap();
        assert_eq!(s.val.len(), 1589);
        assert_eq!(s.test.len(), 1589);
        assert_eq!(s.train.len(), 63_565 - 2 * 1589);
        let all: HashSet<usize> = s.train.iter().chain(&s.val).chain(&s.test).copied().collect();
        assert_eq!(all.len(), 63_565);
        assert!(all.iter().all(|&i| i < 63_565));
        assert!(s.val.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn split_is_deterministic_and_seeded() {
        let a = split_indices(1000, 999, 0.1, 0.05).unwrap();
        assert_eq!(a, split_indices(1000, 999, 0.1, 0.05).unwrap());
        assert_ne!(a, split_indices(1000, 1000, 0.1, 0.05).unwrap());
        assert_eq!((a.train.len(), a.val.len(), a.test.len()), (850, 100, 50));
        // The validation set is a random subset, not a prefix.
        assert_ne!(a.val, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn split_edge_cases() {
        let s = split_indices(0, 1, 0.025, 0.025).unwrap();
        assert!(s.train.is_empty() && s.val.is_empty() && s.test.is_empty());
        let s = split_indices(10, 1, 0.5, 0.5).unwrap();
        assert_eq!((s.train.len(), s.val.len(), s.test.len()), (0, 5, 5));
        let s = split_indices(3, 1, 0.025, 0.025).unwrap();
        assert_eq!(s.train, vec![0, 1, 2]);
    }

    #[test]
    fn split_rejects_bad_fractions() {
        for (v, t) in [(0.7, 0.5), (-0.1, 0.0), (f64::NAN, 0.0), (0.0, f64::INFINITY)] {
            let e = split_indices(10, 1, v, t).unwrap_err().to_string();
            assert!(e.contains("invalid split fractions"), "{e}");
        }
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let idx: Vec<usize> = (0..500).map(|i| i * 3).collect();
        let e0 = epoch_order(&idx, 7, 0);
        let e1 = epoch_order(&idx, 7, 1);
        assert_eq!(e0, epoch_order(&idx, 7, 0));
        assert_ne!(e0, e1);
        assert_ne!(e0, idx);
        assert_ne!(e0, epoch_order(&idx, 8, 0));
        let mut sorted = e1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, idx);
        assert!(epoch_order(&[], 7, 3).is_empty());
        assert_eq!(epoch_order(&[5], 7, 3), vec![5]);
    }
}
