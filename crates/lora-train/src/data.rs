//! Datasets for training: a file of one of three kinds → next-token sequences, with the figures
//! `lora-train data inspect` prints, and `data clean-news`.

use crate::fsutil::write_atomic;
use anyhow::Context;
use lora_data::{Layout, TokenSequences, Tokenizer, alpaca, news};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Dataset kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    /// Alpaca JSON / JSONL (recipe B).
    Alpaca,
    /// Kaggle News Articles CSV (recipe C).
    News,
    /// Plain text (recipe E).
    Text,
}

/// News cleaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cleaning {
    /// Whitespace normalised.
    Basic,
    /// Recipe C's `cleaning`, exactly.
    Original,
}

/// How a data file becomes sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataOptions {
    /// File kind.
    pub dataset: Dataset,
    /// Sequence length (alpaca: `max_seq_len`, default 1024; news/text: `block_size`, default 128).
    pub seq_len: Option<usize>,
    /// Alpaca: no loss on the prompt tokens.
    pub mask_prompt: bool,
    /// Alpaca: concatenate examples into full sequences (default) instead of one padded example each.
    pub packing: bool,
    /// News: text cleaning.
    pub cleaning: Cleaning,
    /// News: keep only rows of this NewsType (e.g. `sports`).
    pub news_type: Option<String>,
}

impl DataOptions {
    /// Options with the defaults of `dataset`.
    pub fn new(dataset: Dataset) -> Self {
        Self {
            dataset,
            seq_len: None,
            mask_prompt: false,
            packing: true,
            cleaning: Cleaning::Basic,
            news_type: None,
        }
    }

    /// The sequence length in effect.
    pub fn seq_len(&self) -> usize {
        self.seq_len.unwrap_or(match self.dataset {
            Dataset::Alpaca => 1024,
            Dataset::News | Dataset::Text => 128,
        })
    }
}

/// The figures `inspect` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// Dataset kind.
    pub dataset: Dataset,
    /// Rows (examples, articles; 1 for text).
    pub rows: usize,
    /// Alpaca rows with a non-empty input.
    pub rows_with_input: Option<usize>,
    /// Rows dropped (news: an empty field, or another NewsType).
    pub rows_skipped: usize,
    /// Why rows were dropped, one line per reason with its count.
    pub skipped_reasons: Vec<String>,
    /// Tokens of all formatted examples (each EOS included), before packing.
    pub tokens: usize,
    /// Training sequences after packing / blocking.
    pub sequences: usize,
    /// Fraction of targets that carry no loss.
    pub masked_fraction: f64,
    /// The first formatted example.
    pub first_example: String,
}

/// A data file turned into sequences.
pub struct Prepared {
    /// What was read.
    pub inspection: Inspection,
    /// Next-token sequences, `len` long each, in file order.
    pub sequences: TokenSequences,
}

/// The cleaned articles of the rows kept by the NewsType filter (recipe C concatenates them with
/// no separator).
pub fn news_articles(
    f: &news::NewsFile,
    cleaning: Cleaning,
    news_type: Option<&str>,
    path: &Path,
) -> anyhow::Result<Vec<String>> {
    let kept: Vec<&news::Article> = f
        .articles
        .iter()
        .filter(|a| news_type.is_none_or(|t| a.news_type.trim() == t))
        .collect();
    if let (Some(t), true) = (news_type, kept.is_empty()) {
        let mut types: Vec<&str> = f.articles.iter().map(|a| a.news_type.trim()).collect();
        types.sort_unstable();
        types.dedup();
        anyhow::bail!(
            "{}: no row has NewsType '{t}' (found: {})",
            path.display(),
            types.join(", ")
        );
    }
    Ok(kept.iter().map(|a| clean_article(a, cleaning)).collect())
}

fn blocks(ids: &[u32], len: usize) -> TokenSequences {
    let mut t = TokenSequences::new(Layout::Blocks, len, 0);
    t.push(ids, 0);
    t
}

/// Read `data` and turn it into sequences with `tok`.
pub fn prepare(opts: &DataOptions, data: &Path, tok: &Tokenizer) -> anyhow::Result<Prepared> {
    let len = opts.seq_len();
    anyhow::ensure!(len >= 2, "--max-seq-len / --block-size must be at least 2");
    let (inspection, sequences) = match opts.dataset {
        Dataset::Alpaca => {
            let (eos_text, eos) = tok
                .eos()
                .context("the tokenizer has no end-of-sequence token")?;
            // Stream the rows: only their tokens are kept, 4 bytes each. GPT-2 has no pad token:
            // pad with EOS, whose targets are −1 (causal attention keeps real tokens from seeing
            // the right padding).
            let layout = if opts.packing {
                Layout::Packed
            } else {
                Layout::Padded
            };
            let mut seqs = TokenSequences::new(layout, len, eos);
            let (mut with_input, mut first, mut truncated) = (0, None, 0);
            let file = std::fs::File::open(data).map_err(|e| lora_data::DataError::io(data, e))?;
            // GPT-2 BPE averages ~4 bytes of JSON per token: reserve once instead of doubling.
            let bytes = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
            seqs.reserve(bytes / 4);
            let rows = alpaca::read_rows(file, data, |r| {
                with_input += r.has_input() as usize;
                first.get_or_insert_with(|| format!("{}{}{eos_text}", r.prompt(), r.output));
                let e = alpaca::tokenize(&r, |s| tok.encode(s), eos);
                truncated += (e.ids.len() > len + 1) as usize;
                seqs.push(&e.ids, e.no_loss(opts.mask_prompt));
            })?;
            seqs.shrink_to_fit();
            let insp = Inspection {
                dataset: opts.dataset,
                rows,
                rows_with_input: Some(with_input),
                rows_skipped: 0,
                skipped_reasons: if !opts.packing && truncated > 0 {
                    vec![format!("{truncated} examples truncated to {len} tokens")]
                } else {
                    vec![]
                },
                tokens: seqs.tokens_pushed(),
                sequences: seqs.len(),
                masked_fraction: seqs.masked_fraction(),
                first_example: first.unwrap_or_default(),
            };
            (insp, seqs)
        }
        Dataset::News => {
            let f = news::read_file(data)?;
            let articles = news_articles(&f, opts.cleaning, opts.news_type.as_deref(), data)?;
            let kept = articles.len();
            let ids = tok.encode(&articles.concat());
            let seqs = blocks(&ids, len);
            let mut reasons = vec![];
            if f.skipped > 0 {
                reasons.push(format!("{} rows with an empty field", f.skipped));
            }
            if let Some(t) = &opts.news_type {
                reasons.push(format!(
                    "{} rows of another NewsType than '{t}'",
                    f.articles.len() - kept
                ));
            }
            let insp = Inspection {
                dataset: opts.dataset,
                rows: f.rows,
                rows_with_input: None,
                rows_skipped: f.rows - kept,
                skipped_reasons: reasons,
                tokens: ids.len(),
                sequences: seqs.len(),
                masked_fraction: seqs.masked_fraction(),
                first_example: articles.into_iter().next().unwrap_or_default(),
            };
            (insp, seqs)
        }
        Dataset::Text => {
            let body = crate::lm::read_text(data)?;
            anyhow::ensure!(!body.trim().is_empty(), "{}: empty file", data.display());
            let ids = tok.encode(&body);
            let seqs = blocks(&ids, len);
            let insp = Inspection {
                dataset: opts.dataset,
                rows: 1,
                rows_with_input: None,
                rows_skipped: 0,
                skipped_reasons: vec![],
                tokens: ids.len(),
                sequences: seqs.len(),
                masked_fraction: seqs.masked_fraction(),
                first_example: body.chars().take(200).collect(),
            };
            (insp, seqs)
        }
    };
    anyhow::ensure!(
        !sequences.is_empty(),
        "{}: {} tokens make no sequence of {len} tokens (lower --max-seq-len / --block-size)",
        data.display(),
        inspection.tokens
    );
    Ok(Prepared {
        inspection,
        sequences,
    })
}

fn clean_article(a: &news::Article, cleaning: Cleaning) -> String {
    match cleaning {
        Cleaning::Basic => news::clean_basic(&a.article),
        Cleaning::Original => news::clean_original(&a.article),
    }
}

/// Inspect `data` with the tokenizer of the model folder `model`.
pub fn inspect(opts: &DataOptions, data: &Path, model: &Path) -> anyhow::Result<Inspection> {
    let tok = Tokenizer::from_file(&model.join("tokenizer.json"))?;
    Ok(prepare(opts, data, &tok)?.inspection)
}

/// Train / validation split of `n` sequences into indices: alpaca shuffled with `seed`, news and
/// text by position (the last `val_fraction` of the stream is validation).
pub fn split(dataset: Dataset, n: usize, seed: u64, val_fraction: f64) -> (Vec<usize>, Vec<usize>) {
    let idx: Vec<usize> = (0..n).collect();
    match dataset {
        Dataset::Alpaca => alpaca::shuffle_split(idx, seed, val_fraction),
        Dataset::News | Dataset::Text => {
            let mut train = idx;
            let n_val = ((n as f64) * val_fraction.clamp(0.0, 1.0)).round() as usize;
            let val = train.split_off(n - n_val);
            (train, val)
        }
    }
}

/// What `clean-news` did.
#[derive(Debug, Clone, Serialize)]
pub struct CleanNewsReport {
    /// Rows in the CSV.
    pub rows: usize,
    /// Rows written (no empty field, NewsType kept).
    pub kept: usize,
    /// Characters written.
    pub chars: usize,
}

/// `data clean-news`: the cleaned articles of `input`, concatenated with no separator (recipe C's
/// Articles.txt), written atomically to `output`.
pub fn clean_news(
    input: &Path,
    output: &Path,
    cleaning: Cleaning,
    news_type: Option<&str>,
) -> anyhow::Result<CleanNewsReport> {
    let f = news::read_file(input)?;
    let articles = news_articles(&f, cleaning, news_type, input)?;
    let (kept, corpus) = (articles.len(), articles.concat());
    write_atomic(output, corpus.as_bytes())?;
    Ok(CleanNewsReport {
        rows: f.rows,
        kept,
        chars: corpus.chars().count(),
    })
}
