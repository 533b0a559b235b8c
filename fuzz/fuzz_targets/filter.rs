//! Filter matching over arbitrary header values, paths and methods: never
//! panics, and the key filter agrees with the baggage parser.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use preview::filter::{Filter, FilterSpec, baggage_has_key};

/// Regex filters compiled once: compiling is not what is being fuzzed.
static FIXED: LazyLock<Vec<Filter>> = LazyLock::new(|| {
    [
        FilterSpec::Header("^baggage: .*preview-key=a".into()),
        FilterSpec::AllOf(vec![FilterSpec::Path("^/a".into()), FilterSpec::Method("GET".into())]),
        FilterSpec::AnyOf(vec![FilterSpec::Key("a".into()), FilterSpec::Header("^x-other: .*".into())]),
    ]
    .iter()
    .map(|s| s.compile().expect("fixed filters compile"))
    .collect()
});

fuzz_target!(|data: &[u8]| {
    let (head, value) = data.split_at(data.len().min(8));
    let key = String::from_utf8_lossy(head).to_string();
    let _ = baggage_has_key(value, &key);
    let Ok(hv) = http::HeaderValue::from_bytes(value) else { return };
    let path = format!("/{}", String::from_utf8_lossy(head).replace(|c: char| !c.is_ascii_alphanumeric(), ""));
    let Ok(mut req) = http::Request::get(path).body(()) else { return };
    req.headers_mut().insert("baggage", hv.clone());
    req.headers_mut().insert("x-other", hv);
    for f in FIXED.iter() {
        let _ = f.matches(&req);
    }
    // Without x-preview-key, the key filter is exactly the baggage check.
    if let Ok(f) = FilterSpec::Key(key.clone()).compile() {
        assert_eq!(f.matches(&req), baggage_has_key(req.headers()["baggage"].as_bytes(), &key));
    }
});
