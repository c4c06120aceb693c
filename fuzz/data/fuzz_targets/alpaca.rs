//! The Alpaca JSON / JSON Lines reader, the prompt templates, packing and padding.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lora_data::alpaca;

fuzz_target!(|data: &[u8]| {
    let mut examples = vec![];
    let _ = alpaca::read_rows(data, std::path::Path::new("fuzz.json"), |row| {
        // Bytes as token ids: no tokenizer needed to reach the packing code.
        examples.push(alpaca::tokenize(&row, |s| s.bytes().map(u32::from).collect(), 0));
    });
    for mask in [false, true] {
        let _ = alpaca::pack(&examples, 16, mask);
        let _ = alpaca::pad_each(&examples, 16, 0, mask);
    }
});
