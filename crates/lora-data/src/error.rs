//! One error type for data files: names the file and the problem.

use std::path::{Path, PathBuf};

/// A data file that cannot be used: names the file (and row) and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DataError {
    /// The file.
    pub path: PathBuf,
    /// The problem.
    pub message: String,
}

impl DataError {
    /// An error about `path`.
    pub fn new(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An I/O error on `path` ("file not found" for a missing file).
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::NotFound => Self::new(path, "file not found"),
            _ => Self::new(path, format!("cannot read: {e}")),
        }
    }
}

/// Read the whole file at `path`.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}
