//! Training glue: backends, the minGPT sort exercise, atomic file output.

pub mod backend;
pub mod bench;
pub mod data;
pub mod finetune;
pub mod fsutil;
pub mod lm;
pub mod merge;
pub mod plot;
pub mod sort_demo;

pub use backend::{Backend, on_worker_pool};

#[cfg(test)]
mod tests;
