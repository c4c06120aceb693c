//! Tokenizers from a model folder's `tokenizer.json` (Hugging Face `tokenizers`), e.g. GPT-2's
//! byte-level BPE (vocab 50257, `<|endoftext|>` = 50256) or Qwen's.

use crate::error::{DataError, read_bytes};
use std::path::Path;

/// Text ↔ token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Option<(String, u32)>,
    /// GPT-2's byte-level pre-tokenizer alone: long texts may be cut at word boundaries.
    byte_level: bool,
}

/// Texts longer than this are encoded in pieces of about this many bytes (one `encode` of a 5 MB
/// corpus peaks at ~0.5 GB of offsets and token strings).
const PIECE: usize = 1 << 16;

/// End-of-sequence strings tried in order (GPT-2 / Qwen, Llama).
const EOS_CANDIDATES: [&str; 3] = ["<|endoftext|>", "</s>", "<|im_end|>"];

impl Tokenizer {
    /// Load `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        Self::from_bytes(&read_bytes(path)?).map_err(|m| DataError::new(path, m))
    }

    /// Load from the bytes of a `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| format!("not a tokenizer.json: {e}"))?;
        let eos = EOS_CANDIDATES
            .iter()
            .find_map(|s| inner.token_to_id(s).map(|id| (s.to_string(), id)));
        let byte_level = matches!(
            inner.get_pre_tokenizer(),
            Some(tokenizers::PreTokenizerWrapper::ByteLevel(_))
        ) && inner.get_normalizer().is_none();
        Ok(Self {
            inner,
            eos,
            byte_level,
        })
    }

    /// Token ids of `text` (special-token strings such as `<|endoftext|>` become their id).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        if !self.byte_level || text.len() <= PIECE {
            return self.encode_piece(text);
        }
        let mut ids = Vec::with_capacity(text.len() / 4);
        let mut rest = text;
        while !rest.is_empty() {
            let cut = word_boundary_after(rest, PIECE);
            ids.extend(self.encode_piece(&rest[..cut]));
            rest = &rest[cut..];
        }
        ids
    }

    fn encode_piece(&self, text: &str) -> Vec<u32> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// Text of `ids` (special tokens included, as transformers' `decode` by default).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// The end-of-sequence token and its id, if the vocabulary has one.
    pub fn eos(&self) -> Option<(&str, u32)> {
        self.eos.as_ref().map(|(s, id)| (s.as_str(), *id))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The first byte index ≥ `min` that starts a `' '` between two non-whitespace characters (no
/// GPT-2 pre-token spans it: `" word"` starts there), or `text.len()`.
fn word_boundary_after(text: &str, min: usize) -> usize {
    let b = text.as_bytes();
    (min.max(1)..b.len().saturating_sub(1))
        .find(|&i| {
            b[i] == b' '
                && text.is_char_boundary(i)
                && text[..i]
                    .chars()
                    .next_back()
                    .is_some_and(|c| !c.is_whitespace())
                && text[i + 1..]
                    .chars()
                    .next()
                    .is_some_and(|c| !c.is_whitespace())
        })
        .unwrap_or(b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT2: &[u8] = include_bytes!("../tests/fixtures/gpt2-tokenizer.json");
    const CASES: &str = include_str!("../tests/fixtures/gpt2-tokenizer-cases.json");

    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
    }

    #[test]
    fn gpt2_cases_match_transformers() {
        let tok = Tokenizer::from_bytes(GPT2).unwrap();
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.eos(), Some(("<|endoftext|>", 50256)));
        let cases: Vec<Case> = serde_json::from_str(CASES).unwrap();
        assert!(cases.len() >= 6);
        for c in cases {
            assert_eq!(tok.encode(&c.text), c.ids, "encode {:?}", c.text);
            assert_eq!(tok.decode(&c.ids), c.text, "decode {:?}", c.text);
        }
    }

    #[test]
    fn long_texts_encode_in_pieces_as_one() {
        let tok = Tokenizer::from_bytes(GPT2).unwrap();
        assert!(tok.byte_level);
        let cases: Vec<Case> = serde_json::from_str(CASES).unwrap();
        let mut text = String::new();
        for i in 0..4000 {
            text += &cases[i % cases.len()].text;
            text += [
                "  a",
                " b",
                "\n\n",
                "\u{a0}c d",
                "'s it<|endoftext|>x",
                " 12 34",
            ][i % 6];
        }
        assert!(text.len() > 3 * PIECE, "{}", text.len());
        assert_eq!(tok.encode(&text), tok.encode_piece(&text));
    }

    /// The same on the real corpora (opt-in: `LORA_SHARED_DATA=/abs/shared/data`).
    #[test]
    fn shared_corpora_encode_in_pieces_as_one() {
        let Ok(dir) = std::env::var("LORA_SHARED_DATA") else {
            return;
        };
        let tok = Tokenizer::from_bytes(GPT2).unwrap();
        let dir = Path::new(&dir);
        let news = crate::news::read_file(&dir.join("news-articles/Articles.csv")).unwrap();
        let corpus: String = news.articles.iter().map(|a| a.article.as_str()).collect();
        let shakespeare = std::fs::read_to_string(dir.join("tinyshakespeare/input.txt")).unwrap();
        for text in [corpus, shakespeare] {
            assert_eq!(tok.encode(&text), tok.encode_piece(&text));
        }
    }

    #[test]
    fn bad_file_is_a_clear_error() {
        let e = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json"))
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "/nonexistent/tokenizer.json: file not found");
        assert!(Tokenizer::from_bytes(b"{}").is_err());
    }
}
