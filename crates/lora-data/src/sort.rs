//! minGPT's `SortDataset` (demo.ipynb): learn to sort `length` digits from `{0, .., num_digits-1}`.
//!
//! The train/test split is minGPT's `hash(pickle.dumps(seq)) % 4 == 0 -> test`, pinned to the
//! `PYTHONHASHSEED=0` partition: SipHash-1-3 with a zero key over pickle protocol-4 bytes.

use rand::Rng;
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// Which half of the partition to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Sequences whose hash is not 0 mod 4.
    Train,
    /// Sequences whose hash is 0 mod 4.
    Test,
}

/// `pickle.dumps(list_of_small_ints, protocol=4)`.
pub fn pickle_int_list(seq: &[u8]) -> Vec<u8> {
    let n = seq.len() as u64;
    let mut out = vec![0x80, 0x04, 0x95];
    out.extend_from_slice(&(2 * n + 5).to_le_bytes());
    out.extend_from_slice(&[0x5d, 0x94, 0x28]);
    for &d in seq {
        out.extend_from_slice(&[0x4b, d]);
    }
    out.extend_from_slice(&[0x65, 0x2e]);
    out
}

/// CPython (≥ 3.11) `hash(bytes)` under `PYTHONHASHSEED=0`.
pub fn py_hash_bytes_seed0(data: &[u8]) -> i64 {
    if data.is_empty() {
        return 0;
    }
    let mut h = SipHasher13::new_with_keys(0, 0);
    h.write(data);
    match h.finish() as i64 {
        -1 => -2,
        v => v,
    }
}

/// minGPT's split rule for one sequence (pinned to `PYTHONHASHSEED=0`).
pub fn split_of(seq: &[u8]) -> Split {
    if py_hash_bytes_seed0(&pickle_int_list(seq)).rem_euclid(4) == 0 {
        Split::Test
    } else {
        Split::Train
    }
}

/// minGPT's `SortDataset(split, length, num_digits)`; every draw is a fresh random sequence.
#[derive(Debug, Clone)]
pub struct SortDataset {
    /// Which split to draw from.
    pub split: Split,
    /// Number of digits to sort.
    pub length: usize,
    /// Vocabulary size.
    pub num_digits: u8,
}

impl SortDataset {
    /// New dataset of `length` digits in `0..num_digits` (minGPT default `num_digits = 3`).
    pub fn new(split: Split, length: usize, num_digits: u8) -> Self {
        assert!(
            length > 0 && num_digits > 0,
            "SortDataset needs length > 0 and num_digits > 0"
        );
        Self {
            split,
            length,
            num_digits,
        }
    }

    /// Tokens per example: `2 * length - 1`.
    pub fn block_size(&self) -> usize {
        2 * self.length - 1
    }

    /// One unsorted sequence of this split, by minGPT's rejection sampling: half the draws must
    /// have at most `length / 2` distinct digits.
    pub fn sample_sequence(&self, rng: &mut impl Rng) -> Vec<u8> {
        loop {
            let seq: Vec<u8> = (0..self.length)
                .map(|_| rng.random_range(0..self.num_digits))
                .collect();
            if rng.random::<f64>() < 0.5 {
                let mut seen = [false; 256];
                seq.iter().for_each(|&d| seen[d as usize] = true);
                if seen.iter().filter(|&&s| s).count() > self.length / 2 {
                    continue;
                }
            }
            if split_of(&seq) == self.split {
                return seq;
            }
        }
    }

    /// `(x, y)` for one sequence: `x = (seq ++ sorted)[..-1]`, `y = (seq ++ sorted)[1..]` with the
    /// first `length - 1` targets `-1` (ignored).
    pub fn example(&self, seq: &[u8]) -> (Vec<i64>, Vec<i64>) {
        let mut sorted = seq.to_vec();
        sorted.sort_unstable();
        let cat: Vec<i64> = seq.iter().chain(&sorted).map(|&d| d as i64).collect();
        let x = cat[..cat.len() - 1].to_vec();
        let mut y = cat[1..].to_vec();
        y[..self.length - 1].iter_mut().for_each(|t| *t = -1);
        (x, y)
    }

    /// A batch, row-major: `x` and `y` are `[batch, 2 * length - 1]`.
    pub fn batch(&self, batch: usize, rng: &mut impl Rng) -> (Vec<i64>, Vec<i64>) {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..batch {
            let (x, y) = self.example(&self.sample_sequence(rng));
            xs.extend(x);
            ys.extend(y);
        }
        (xs, ys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_test(length: u32) -> usize {
        (0..3usize.pow(length))
            .filter(|&i| {
                let seq: Vec<u8> = (0..length)
                    .map(|k| ((i / 3usize.pow(length - 1 - k)) % 3) as u8)
                    .collect();
                split_of(&seq) == Split::Test
            })
            .count()
    }

    #[test]
    fn split_counts_match_pythonhashseed0() {
        assert_eq!(count_test(6), 189);
        assert_eq!(count_test(10), 14_835);
    }

    #[test]
    fn pickle_bytes_layout() {
        assert_eq!(
            pickle_int_list(&[1, 2]),
            vec![
                0x80, 4, 0x95, 9, 0, 0, 0, 0, 0, 0, 0, 0x5d, 0x94, 0x28, 0x4b, 1, 0x4b, 2, 0x65,
                0x2e
            ]
        );
    }

    #[test]
    fn examples_have_mingpt_layout() {
        let ds = SortDataset::new(Split::Train, 6, 3);
        let (x, y) = ds.example(&[2, 0, 1, 1, 0, 2]);
        assert_eq!(x, vec![2, 0, 1, 1, 0, 2, 0, 0, 1, 1, 2]);
        assert_eq!(y, vec![-1, -1, -1, -1, -1, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn samples_stay_in_their_split() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        for split in [Split::Train, Split::Test] {
            let ds = SortDataset::new(split, 6, 3);
            for _ in 0..200 {
                assert_eq!(split_of(&ds.sample_sequence(&mut rng)), split);
            }
        }
    }
}
