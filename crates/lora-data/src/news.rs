//! Kaggle "News Articles" (recipe C): `Articles.csv` (Article, Date, Heading, NewsType; ISO-8859-1,
//! CRLF, quoted fields with newlines), recipe C's `cleaning`, and the concatenated corpus.

use crate::error::{DataError, read_bytes};
use std::path::Path;

/// One article row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Article {
    /// Body text.
    pub article: String,
    /// Date as written.
    pub date: String,
    /// Headline.
    pub heading: String,
    /// `sports` or `business`.
    pub news_type: String,
}

/// Rows read and rows dropped for an empty field (recipe C's `dropna`).
#[derive(Debug, Clone)]
pub struct NewsFile {
    /// Rows with every field present.
    pub articles: Vec<Article>,
    /// Rows read in all.
    pub rows: usize,
    /// Rows dropped for an empty field.
    pub skipped: usize,
}

/// ISO-8859-1 bytes to text: every byte is the code point of the same value (Python's `latin-1`).
pub fn decode_latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// Read `Articles.csv` at `path`.
pub fn read_file(path: &Path) -> Result<NewsFile, DataError> {
    let bytes = read_bytes(path)?;
    parse(&bytes, path)
}

/// Parse the CSV `bytes` (Latin-1) of `path`.
pub fn parse(bytes: &[u8], path: &Path) -> Result<NewsFile, DataError> {
    let fail = |message: String| DataError {
        path: path.into(),
        message,
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(fail(
            "empty file: expected a CSV with columns Article, Date, Heading, NewsType".into(),
        ));
    }
    let text = decode_latin1(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| fail(format!("bad CSV header: {e}")))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| {
                fail(format!(
                    "missing column '{name}' (found: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ))
            })
    };
    let (a, d, h, t) = (
        column("Article")?,
        column("Date")?,
        column("Heading")?,
        column("NewsType")?,
    );
    let (mut articles, mut rows, mut skipped) = (vec![], 0, 0);
    for record in reader.records() {
        let r = record.map_err(|e| fail(format!("bad CSV: {e}")))?;
        rows += 1;
        let field = |i: usize| r.get(i).unwrap_or("").to_string();
        let art = Article {
            article: field(a),
            date: field(d),
            heading: field(h),
            news_type: field(t),
        };
        if [&art.article, &art.date, &art.heading, &art.news_type]
            .iter()
            .any(|f| f.is_empty())
        {
            skipped += 1;
        } else {
            articles.push(art);
        }
    }
    Ok(NewsFile {
        articles,
        rows,
        skipped,
    })
}

/// Python 3 `str.isspace()`: Unicode whitespace plus the separators U+001C–U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python 3 `re` `\w` on str patterns: `str.isalnum()` or `_`.
fn py_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Replace each leftmost, non-overlapping match of a fixed-length char pattern by `with`.
fn sub(s: &str, len: usize, with: &str, matches: impl Fn(&[char]) -> bool) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if i + len <= chars.len() && matches(&chars[i..i + len]) {
            out.push_str(with);
            i += len;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// Recipe C's `cleaning`, exactly as Python's `re` (str patterns) runs it, in this order:
/// `\s\W`→' ', `\W,\s`→' ', `\d+`→'', `\s+`→' ', `[!@#$_]`→'', then `replace("co","")`,
/// `replace("https","")`, `replace("[\w*"," ")`. `\d` is ASCII 0-9, which is Python's `\d` on
/// Latin-1 text.
pub fn clean_original(s: &str) -> String {
    let s = sub(s, 2, " ", |w| py_space(w[0]) && !py_word(w[1]));
    let s = sub(&s, 3, " ", |w| {
        !py_word(w[0]) && w[1] == ',' && py_space(w[2])
    });
    let s: String = s.chars().filter(|c| !c.is_ascii_digit()).collect();
    let mut collapsed = String::with_capacity(s.len());
    let mut in_space = false;
    for c in s.chars() {
        if py_space(c) {
            if !in_space {
                collapsed.push(' ');
            }
            in_space = true;
        } else {
            collapsed.push(c);
            in_space = false;
        }
    }
    let s: String = collapsed
        .chars()
        .filter(|c| !"!@#$_".contains(*c))
        .collect();
    s.replace("co", "")
        .replace("https", "")
        .replace("[\\w*", " ")
}

/// Whitespace runs to one space, trimmed (the sane default).
pub fn clean_basic(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        clean: String,
    }

    #[test]
    fn original_cleaning_equals_python_re() {
        // Expectations computed once with python3's `re` (tests/fixtures/news-cleaning-cases.json).
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../tests/fixtures/news-cleaning-cases.json"))
                .unwrap();
        for c in cases {
            assert_eq!(clean_original(&c.text), c.clean, "input {:?}", c.text);
        }
    }

    #[test]
    fn csv_latin1_quotes_newlines_and_dropna() {
        let bytes = b"Article,Date,Heading,NewsType\r\n\"Line one\r\nline two, caf\xe9\",1/1/2015,Head,sports\r\n\"x\",,H,business\r\n";
        let f = parse(bytes, Path::new("a.csv")).unwrap();
        assert_eq!((f.rows, f.skipped, f.articles.len()), (2, 1, 1));
        assert_eq!(f.articles[0].article, "Line one\r\nline two, caf\u{e9}");
        assert_eq!(f.articles[0].news_type, "sports");
    }

    #[test]
    fn bad_csv_files() {
        let e = parse(b"Article,Date,Heading\r\nx,y,z\r\n", Path::new("a.csv"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("a.csv: missing column 'NewsType'"), "{e}");
        let e = parse(b"", Path::new("a.csv")).unwrap_err().to_string();
        assert!(e.starts_with("a.csv: empty file"), "{e}");
        let e = parse(
            b"Article,Date,Heading,NewsType\r\nx,y\r\n",
            Path::new("a.csv"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("a.csv: bad CSV"), "{e}");
    }

    /// `LORA_SHARED_DATA=/abs/path/shared/data` opts in.
    #[test]
    fn shared_articles_csv() {
        let Ok(dir) = std::env::var("LORA_SHARED_DATA") else {
            return;
        };
        let f = read_file(&Path::new(&dir).join("news-articles/Articles.csv")).unwrap();
        assert_eq!(f.rows, 2692);
    }
}
