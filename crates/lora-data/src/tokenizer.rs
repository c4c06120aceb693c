//! Tokenizers from a model folder's `tokenizer.json` (Hugging Face `tokenizers`), e.g. GPT-2's
//! byte-level BPE (vocab 50257, `<|endoftext|>` = 50256) or Qwen's.

use crate::error::{DataError, read_bytes};
use std::path::Path;

/// Text ↔ token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Option<(String, u32)>,
}

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
        Ok(Self { inner, eos })
    }

    /// Token ids of `text` (special-token strings such as `<|endoftext|>` become their id).
    pub fn encode(&self, text: &str) -> Vec<u32> {
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
    fn bad_file_is_a_clear_error() {
        let e = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json"))
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "/nonexistent/tokenizer.json: file not found");
        assert!(Tokenizer::from_bytes(b"{}").is_err());
    }
}
