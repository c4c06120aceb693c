//! Alpaca-style instruction data (recipe B): `instruction`, `input` (may be empty or absent),
//! `output`, as a JSON array or JSON Lines, formatted with Stanford Alpaca's templates and the
//! tokenizer's end-of-sequence token, then packed into fixed-length sequences.

use crate::error::DataError;
pub use crate::sequences::Sequence;
use crate::sequences::{Layout, TokenSequences};
use serde::Deserialize;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Stanford Alpaca's template for rows with an input.
pub const PROMPT_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// Stanford Alpaca's template for rows without one.
pub const PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// One instruction example.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AlpacaRow {
    /// The task.
    pub instruction: String,
    /// Optional context (`""` or absent: none).
    #[serde(default)]
    pub input: Option<String>,
    /// The expected response.
    pub output: String,
}

impl AlpacaRow {
    /// The prompt: template with instruction (and input).
    pub fn prompt(&self) -> String {
        match self.input.as_deref().filter(|i| !i.is_empty()) {
            Some(input) => PROMPT_WITH_INPUT
                .replace("{instruction}", &self.instruction)
                .replace("{input}", input),
            None => PROMPT_NO_INPUT.replace("{instruction}", &self.instruction),
        }
    }

    /// Whether the row has a non-empty input.
    pub fn has_input(&self) -> bool {
        self.input.as_deref().is_some_and(|i| !i.is_empty())
    }
}

struct RowsVisitor<'a, F: FnMut(AlpacaRow)>(&'a mut F, &'a mut usize);

impl<'de, F: FnMut(AlpacaRow)> Visitor<'de> for RowsVisitor<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of {instruction, input, output} objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            let row: Option<AlpacaRow> = seq
                .next_element()
                .map_err(|e| serde::de::Error::custom(format!("row {}: {e}", *self.1)))?;
            match row {
                Some(r) => {
                    (self.0)(r);
                    *self.1 += 1;
                }
                None => return Ok(()),
            }
        }
    }
}

struct Rows<'a, F: FnMut(AlpacaRow)>(&'a mut F, &'a mut usize);

impl<'de, F: FnMut(AlpacaRow)> DeserializeSeed<'de> for Rows<'_, F> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(RowsVisitor(self.0, self.1))
    }
}

/// Stream the rows of `reader` (a JSON array, or JSON Lines), calling `each` per row; the whole
/// file is never held in memory. Returns the row count.
pub fn read_rows(
    reader: impl Read,
    path: &Path,
    mut each: impl FnMut(AlpacaRow),
) -> Result<usize, DataError> {
    let fail = |message: String| DataError {
        path: path.into(),
        message,
    };
    let mut r = BufReader::new(reader);
    let first = loop {
        let buf = r
            .fill_buf()
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let b = buf[i];
                r.consume(i);
                break Some(b);
            }
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                r.consume(n);
            }
        }
    };
    let mut count = 0usize;
    match first {
        None => Err(fail(
            "empty file: expected a JSON array or JSON Lines of {instruction, input, output}"
                .into(),
        )),
        Some(b'[') => {
            let mut de = serde_json::Deserializer::from_reader(r);
            Rows(&mut each, &mut count)
                .deserialize(&mut de)
                .map_err(|e| fail(describe(e)))?;
            de.end().map_err(|e| fail(describe(e)))?;
            Ok(count)
        }
        Some(b'{') => {
            for (i, line) in r.lines().enumerate() {
                let line = line.map_err(|e| fail(format!("line {}: cannot read: {e}", i + 1)))?;
                if line.trim().is_empty() {
                    continue;
                }
                let row: AlpacaRow = serde_json::from_str(&line)
                    .map_err(|e| fail(format!("row {count} (line {}): {e}", i + 1)))?;
                each(row);
                count += 1;
            }
            Ok(count)
        }
        Some(b) => Err(fail(format!(
            "{}: expected a JSON array or JSON Lines of {{instruction, input, output}}",
            if b"\"-0123456789tfn".contains(&b) {
                "not an array of rows"
            } else {
                "not JSON"
            }
        ))),
    }
}

fn describe(e: serde_json::Error) -> String {
    // Row errors are re-wrapped with their index, which hides serde_json's EOF category.
    let eof = e.is_eof() || e.to_string().contains("EOF while parsing");
    let what = if eof {
        "truncated JSON"
    } else {
        "invalid JSON"
    };
    format!("{what}: {e}")
}

/// Read every row of the file at `path`.
pub fn read_file(path: &Path) -> Result<Vec<AlpacaRow>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut rows = vec![];
    read_rows(file, path, |r| rows.push(r))?;
    Ok(rows)
}

/// One tokenized example: ids and, per position, whether it is part of the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Prompt, response and EOS ids.
    pub ids: Vec<u32>,
    /// Number of leading prompt tokens.
    pub prompt_len: usize,
}

impl Example {
    /// Leading tokens that are never targets: the prompt with `mask_prompt`, else none.
    pub fn no_loss(&self, mask_prompt: bool) -> usize {
        if mask_prompt { self.prompt_len } else { 0 }
    }
}

/// Tokenize `prompt + output + EOS`.
pub fn tokenize(row: &AlpacaRow, encode: impl Fn(&str) -> Vec<u32>, eos: u32) -> Example {
    let prompt = encode(&row.prompt());
    let prompt_len = prompt.len();
    let mut ids = prompt;
    ids.extend(encode(&row.output));
    ids.push(eos);
    Example { ids, prompt_len }
}

/// Concatenate examples and cut the stream into sequences of `len` tokens (the last partial one is
/// dropped), so no position is padding. Targets are the next token; with `mask_prompt` targets
/// inside a prompt are −1.
pub fn pack(examples: &[Example], len: usize, mask_prompt: bool) -> Vec<Sequence> {
    sequences(examples, Layout::Packed, len, 0, mask_prompt)
}

/// One example per sequence, right-padded with `pad` to `len` (longer ones truncated); padding
/// targets are −1, as are prompt targets with `mask_prompt`.
pub fn pad_each(examples: &[Example], len: usize, pad: u32, mask_prompt: bool) -> Vec<Sequence> {
    sequences(examples, Layout::Padded, len, pad, mask_prompt)
}

fn sequences(
    examples: &[Example],
    layout: Layout,
    len: usize,
    pad: u32,
    mask_prompt: bool,
) -> Vec<Sequence> {
    let mut t = TokenSequences::new(layout, len, pad);
    for e in examples {
        t.push(&e.ids, e.no_loss(mask_prompt));
    }
    t.iter().collect()
}

/// Deterministic shuffle (Fisher–Yates with a seeded RNG) and split: `(train, validation)` with
/// `val_fraction` of the items (rounded) in validation.
pub fn shuffle_split<T>(mut items: Vec<T>, seed: u64, val_fraction: f64) -> (Vec<T>, Vec<T>) {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    items.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let n_val = ((items.len() as f64) * val_fraction.clamp(0.0, 1.0)).round() as usize;
    let val = items.split_off(items.len() - n_val);
    (items, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(instruction: &str, input: Option<&str>, output: &str) -> AlpacaRow {
        AlpacaRow {
            instruction: instruction.into(),
            input: input.map(Into::into),
            output: output.into(),
        }
    }

    #[test]
    fn templates_byte_for_byte() {
        assert_eq!(
            row("Add the numbers.", Some("2 and 3"), "5").prompt(),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
        );
        let expect = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n";
        assert_eq!(row("Name a colour.", Some(""), "Red").prompt(), expect);
        assert_eq!(row("Name a colour.", None, "Red").prompt(), expect);
    }

    fn parse(text: &str) -> Result<Vec<AlpacaRow>, DataError> {
        let mut rows = vec![];
        read_rows(text.as_bytes(), Path::new("data.json"), |r| rows.push(r)).map(|_| rows)
    }

    #[test]
    fn array_and_json_lines() {
        let a = parse(r#" [ {"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"} ] "#).unwrap();
        let l = parse("{\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"}\n\n{\"instruction\": \"c\", \"output\": \"d\"}\n").unwrap();
        assert_eq!(a, l);
        assert_eq!(a.len(), 2);
        assert!(!a[0].has_input() && a[1].input.is_none());
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let msg = |t: &str| parse(t).unwrap_err().to_string();
        assert!(msg("").starts_with("data.json: empty file"), "{}", msg(""));
        assert!(msg("hello").starts_with("data.json: not JSON"));
        let m = msg(r#"[{"instruction": "a", "output": "b"}, {"instruction": "c""#);
        assert!(m.contains("truncated JSON"), "{m}");
        let m = msg(r#"[{"instruction": "a", "output": "b"}, {"instruction": "c"}]"#);
        assert!(
            m.contains("row 1") && m.contains("missing field `output`"),
            "{m}"
        );
        let m = msg(r#"[{"instruction": 3, "output": "b"}]"#);
        assert!(m.contains("row 0") && m.contains("invalid type"), "{m}");
        let m = msg(r#"{"instruction": "a"}"#);
        assert!(
            m.contains("row 0 (line 1)") && m.contains("missing field `output`"),
            "{m}"
        );
        let bad_utf8 = b"[{\"instruction\": \"a\xff\", \"output\": \"b\"}]";
        let e = read_rows(&bad_utf8[..], Path::new("x.json"), |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.json: invalid JSON") && e.contains("row 0"),
            "{e}"
        );
        assert_eq!(
            read_file(Path::new("/nonexistent.json"))
                .unwrap_err()
                .to_string(),
            "/nonexistent.json: file not found"
        );
    }

    #[test]
    fn packing_and_masking() {
        let ex = [
            Example {
                ids: vec![1, 2, 3, 9],
                prompt_len: 2,
            },
            Example {
                ids: vec![4, 5, 9],
                prompt_len: 1,
            },
        ];
        // Stream 1 2 3 9 4 5 9: two windows of 3 (inputs), targets shifted by one.
        let p = pack(&ex, 3, false);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            Sequence {
                input: vec![1, 2, 3],
                targets: vec![2, 3, 9]
            }
        );
        assert_eq!(
            p[1],
            Sequence {
                input: vec![9, 4, 5],
                targets: vec![4, 5, 9]
            }
        );
        let m = pack(&ex, 3, true);
        assert_eq!(
            m[0].targets,
            vec![-1, 3, 9],
            "token 2 is in the first prompt"
        );
        assert_eq!(m[1].targets, vec![-1, 5, 9], "token 4 is the second prompt");
        let padded = pad_each(&ex, 5, 0, true);
        assert_eq!(
            padded[1],
            Sequence {
                input: vec![4, 5, 0, 0, 0],
                targets: vec![5, 9, -1, -1, -1]
            }
        );
        assert_eq!(padded[0].targets, vec![-1, 3, 9, -1, -1]);
    }

    #[test]
    fn shuffle_is_deterministic() {
        let (t1, v1) = shuffle_split((0..100).collect::<Vec<_>>(), 7, 0.1);
        let (t2, v2) = shuffle_split((0..100).collect::<Vec<_>>(), 7, 0.1);
        assert_eq!((t1.len(), v1.len()), (90, 10));
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_ne!(t1, (0..90).collect::<Vec<_>>());
    }

    /// The demo file of `shared/data` (opt-in: `LORA_SHARED_DATA=../shared/data`).
    #[test]
    fn shared_alpaca_demo_file() {
        let Ok(dir) = std::env::var("LORA_SHARED_DATA") else {
            return;
        };
        let rows = read_file(&Path::new(&dir).join("alpaca/alpaca_en_demo.json")).unwrap();
        assert_eq!(rows.len(), 999);
        assert_eq!(rows.iter().filter(|r| r.has_input()).count(), 412);
    }
}
