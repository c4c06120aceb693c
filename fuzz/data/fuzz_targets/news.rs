//! The News Articles CSV reader and recipe C's two cleanings.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lora_data::news;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = news::parse(data, std::path::Path::new("Articles.csv")) {
        for a in &file.articles {
            let _ = news::clean_original(&a.article);
            let _ = news::clean_basic(&a.article);
        }
    }
    let text = news::decode_latin1(data);
    let _ = news::clean_original(&text);
    let _ = news::clean_basic(&text);
});
