//! `lora-train data inspect`: what a dataset turns into for training.

use anyhow::Context;
use lora_data::{Tokenizer, alpaca, news, text};
use serde::Serialize;
use std::path::Path;

/// Dataset kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataset {
    /// Alpaca JSON / JSONL (recipe B).
    Alpaca,
    /// Kaggle News Articles CSV (recipe C).
    News,
    /// Plain text (recipe E).
    Text,
}

/// News cleaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cleaning {
    /// Whitespace normalised.
    Basic,
    /// Recipe C's `cleaning`, exactly.
    Original,
}

/// The figures `inspect` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Dataset kind.
    pub dataset: &'static str,
    /// Rows (examples, articles; 1 for text).
    pub rows: usize,
    /// Alpaca rows with a non-empty input.
    pub rows_with_input: Option<usize>,
    /// Rows dropped (news: an empty field).
    pub rows_skipped: usize,
    /// Tokens of all formatted examples (each EOS included), before packing.
    pub tokens: usize,
    /// Training sequences after packing / blocking.
    pub sequences: usize,
    /// Fraction of targets that carry no loss.
    pub masked_fraction: f64,
    /// The first formatted example.
    pub first_example: String,
}

/// Inspect `data` with the tokenizer of `model`.
pub fn inspect(
    dataset: Dataset,
    data: &Path,
    model: &Path,
    seq_len: Option<usize>,
    mask_prompt: bool,
    cleaning: Cleaning,
) -> anyhow::Result<Inspection> {
    let tok = Tokenizer::from_file(&model.join("tokenizer.json"))?;
    Ok(match dataset {
        Dataset::Alpaca => {
            let len = seq_len.unwrap_or(1024);
            let (eos_text, eos) = tok
                .eos()
                .context("the tokenizer has no end-of-sequence token")?;
            let rows = alpaca::read_file(data)?;
            let examples: Vec<_> = rows
                .iter()
                .map(|r| alpaca::tokenize(r, |s| tok.encode(s), eos))
                .collect();
            let seqs = alpaca::pack(&examples, len, mask_prompt);
            let (masked, total) = seqs
                .iter()
                .flat_map(|s| &s.targets)
                .fold((0, 0), |(m, t), &x| (m + (x < 0) as usize, t + 1));
            Inspection {
                dataset: "alpaca",
                rows: rows.len(),
                rows_with_input: Some(rows.iter().filter(|r| r.has_input()).count()),
                rows_skipped: 0,
                tokens: examples.iter().map(|e| e.ids.len()).sum(),
                sequences: seqs.len(),
                masked_fraction: masked as f64 / total.max(1) as f64,
                first_example: rows
                    .first()
                    .map(|r| format!("{}{}{eos_text}", r.prompt(), r.output))
                    .unwrap_or_default(),
            }
        }
        Dataset::News => {
            let f = news::read_file(data)?;
            let clean = |s: &str| match cleaning {
                Cleaning::Basic => news::clean_basic(s),
                Cleaning::Original => news::clean_original(s),
            };
            let corpus: String = f.articles.iter().map(|a| clean(&a.article)).collect();
            let ids = tok.encode(&corpus);
            Inspection {
                dataset: "news",
                rows: f.rows,
                rows_with_input: None,
                rows_skipped: f.skipped,
                tokens: ids.len(),
                sequences: text::blocks(&ids, seq_len.unwrap_or(128)).len(),
                masked_fraction: 0.0,
                first_example: f
                    .articles
                    .first()
                    .map(|a| clean(&a.article))
                    .unwrap_or_default(),
            }
        }
        Dataset::Text => {
            let body = crate::lm::read_text(data)?;
            anyhow::ensure!(!body.trim().is_empty(), "{}: empty file", data.display());
            let ids = tok.encode(&body);
            Inspection {
                dataset: "text",
                rows: 1,
                rows_with_input: None,
                rows_skipped: 0,
                tokens: ids.len(),
                sequences: text::blocks(&ids, seq_len.unwrap_or(128)).len(),
                masked_fraction: 0.0,
                first_example: body.chars().take(200).collect(),
            }
        }
    })
}
