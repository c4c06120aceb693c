//! Plain text (recipe E, Tiny Shakespeare; recipe C's concatenated articles): one token stream cut
//! into blocks.

/// Cut `ids` into consecutive blocks of `block_size` tokens, dropping the last partial block
/// (HF `TextDataset`). Each block is a causal-LM example: labels = inputs, shifted by the model.
pub fn blocks(ids: &[u32], block_size: usize) -> Vec<Vec<u32>> {
    assert!(block_size > 0, "block_size must be positive");
    ids.chunks_exact(block_size).map(<[u32]>::to_vec).collect()
}

/// Split a token stream by position: the first `1 - val_fraction` for training, the rest for
/// validation (nanoGPT / labml's 90/10 split of Tiny Shakespeare).
pub fn split_by_position(ids: &[u32], val_fraction: f64) -> (&[u32], &[u32]) {
    let n_train = ((ids.len() as f64) * (1.0 - val_fraction.clamp(0.0, 1.0))).round() as usize;
    ids.split_at(n_train.min(ids.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_drop_the_partial_tail() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(blocks(&ids, 4), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert!(blocks(&ids[..3], 4).is_empty());
    }

    #[test]
    fn ninety_ten_split() {
        let ids: Vec<u32> = (0..100).collect();
        let (train, val) = split_by_position(&ids, 0.1);
        assert_eq!((train.len(), val.len()), (90, 10));
        assert_eq!(val[0], 90);
    }
}
