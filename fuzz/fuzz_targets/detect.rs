//! Protocol detection: never panics, and a decision made on a prefix holds
//! for the whole input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use preview::agent::detect::detect;

fuzz_target!(|data: &[u8]| {
    let full = detect(data);
    for cut in 0..data.len().min(64) {
        if let Some(p) = detect(&data[..cut]) {
            assert_eq!(Some(p), full);
        }
    }
});
