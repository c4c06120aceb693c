//! Datasets for the LoRA recipes. Plain Rust data (token ids), no tensors: the training crate
//! turns batches into tensors on its device.

pub mod alpaca;
pub mod error;
pub mod news;
pub mod sequences;
pub mod sort;
pub mod text;
pub mod tokenizer;

pub use error::DataError;
pub use sequences::{Layout, Sequence, TokenSequences};
pub use sort::{SortDataset, Split};
pub use tokenizer::Tokenizer;
