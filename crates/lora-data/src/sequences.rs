//! Causal-LM training sequences stored compactly: one token stream (4 bytes a token, the top bit
//! marking "no loss") and the layout that cuts it into sequences on demand. A 43 MB Alpaca file
//! (~10 M tokens) is ~40 MB here, where materialised `Sequence`s would take ~120 MB.

/// Top bit of a stored token: no loss is taken where this token is the target.
const NO_LOSS: u32 = 1 << 31;

/// A training sequence: `input` ids and next-token `targets` (−1 = ignored), both `len` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Input ids.
    pub input: Vec<u32>,
    /// Target ids (the next token), −1 where no loss is taken.
    pub targets: Vec<i64>,
}

/// How the token stream becomes sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Concatenated examples cut into windows of `len + 1` tokens stepping `len` (the last partial
    /// one dropped): every position has a real target.
    Packed,
    /// One example per sequence (its first `len + 1` tokens), right-padded.
    Padded,
    /// Consecutive blocks of `len` tokens, the last partial one dropped (HF `TextDataset`): targets
    /// are the next token inside the block, the last one −1 (HF's label shift).
    Blocks,
}

/// Sequences of `len` tokens over one stored token stream.
#[derive(Debug, Clone)]
pub struct TokenSequences {
    layout: Layout,
    len: usize,
    pad: u32,
    tokens: Vec<u32>,
    /// `Padded`: where each example starts in `tokens` (plus the end).
    starts: Vec<usize>,
    /// Tokens pushed (before any truncation).
    pushed: usize,
}

impl TokenSequences {
    /// No sequences yet; `len ≥ 1`, `pad` fills `Padded` inputs.
    pub fn new(layout: Layout, len: usize, pad: u32) -> Self {
        assert!(len > 0, "sequence length must be positive");
        Self {
            layout,
            len,
            pad,
            tokens: vec![],
            starts: vec![0],
            pushed: 0,
        }
    }

    /// Append `ids`; the first `no_loss` of them are never targets (a masked prompt).
    pub fn push(&mut self, ids: &[u32], no_loss: usize) {
        self.pushed += ids.len();
        let keep = match self.layout {
            Layout::Padded => ids.len().min(self.len + 1),
            Layout::Packed | Layout::Blocks => ids.len(),
        };
        self.tokens.extend(
            ids[..keep]
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < no_loss { t | NO_LOSS } else { t }),
        );
        if self.layout == Layout::Padded {
            self.starts.push(self.tokens.len());
        }
    }

    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.len
    }

    /// Tokens pushed in all.
    pub fn tokens_pushed(&self) -> usize {
        self.pushed
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        let n = self.tokens.len();
        match self.layout {
            Layout::Packed => n.saturating_sub(1) / self.len,
            Layout::Padded => self.starts.len() - 1,
            Layout::Blocks => n / self.len,
        }
    }

    /// True when there is no sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where sequence `i` lies in the stream: `(s, e, input_end)`, inputs `s..input_end`, targets
    /// `s+1..e` (panics when `i ≥ len()`).
    fn span(&self, i: usize) -> (usize, usize, usize) {
        assert!(i < self.len(), "sequence {i} of {}", self.len());
        match self.layout {
            Layout::Packed => (i * self.len, (i + 1) * self.len + 1, (i + 1) * self.len),
            Layout::Padded => (self.starts[i], self.starts[i + 1], self.starts[i + 1] - 1),
            Layout::Blocks => (i * self.len, (i + 1) * self.len, (i + 1) * self.len),
        }
    }

    /// Sequence `i` (panics when `i ≥ len()`).
    pub fn get(&self, i: usize) -> Sequence {
        let (s, e, input_end) = self.span(i);
        let mut input: Vec<u32> = self.tokens[s..input_end.max(s)]
            .iter()
            .map(|&t| t & !NO_LOSS)
            .collect();
        let mut targets: Vec<i64> = self
            .targets(s, e)
            .iter()
            .map(|&t| if t & NO_LOSS != 0 { -1 } else { t as i64 })
            .collect();
        input.resize(self.len, self.pad);
        targets.resize(self.len, -1);
        Sequence { input, targets }
    }

    /// The stored target tokens of the span `s..e`.
    fn targets(&self, s: usize, e: usize) -> &[u32] {
        &self.tokens[(s + 1).min(e)..e]
    }

    /// Every sequence in order.
    pub fn iter(&self) -> impl Iterator<Item = Sequence> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Fraction of targets over all sequences that carry no loss (masked or padding), counted on
    /// the stream without building the sequences.
    pub fn masked_fraction(&self) -> f64 {
        let total = self.len() * self.len;
        let masked: usize = (0..self.len())
            .map(|i| {
                let (s, e, _) = self.span(i);
                let t = self.targets(s, e);
                t.iter().filter(|&&x| x & NO_LOSS != 0).count() + (self.len - t.len())
            })
            .sum();
        masked as f64 / total.max(1) as f64
    }

    /// Room for `tokens` more tokens (avoids the stream's doubling copies on large files).
    pub fn reserve(&mut self, tokens: usize) {
        self.tokens.reserve(tokens);
    }

    /// Give back the stream's spare capacity.
    pub fn shrink_to_fit(&mut self) {
        self.tokens.shrink_to_fit();
        self.starts.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_shift_inside_the_block() {
        let mut t = TokenSequences::new(Layout::Blocks, 3, 0);
        t.push(&[1, 2, 3, 4, 5, 6, 7], 0);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.get(1),
            Sequence {
                input: vec![4, 5, 6],
                targets: vec![5, 6, -1]
            }
        );
        assert_eq!(t.tokens_pushed(), 7);
        assert!((t.masked_fraction() - 2.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn too_short_is_empty() {
        let mut t = TokenSequences::new(Layout::Packed, 4, 0);
        t.push(&[1, 2, 3, 4], 0);
        assert!(t.is_empty(), "4 tokens give no window of 5");
    }
}
