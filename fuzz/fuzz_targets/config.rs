//! Start's request checks (`config::read_start`) over arbitrary bytes: one
//! or two configs (JSON, YAML or neither), a key and a TTL, split at NUL
//! bytes. Never panics, a refusal always names a field, and an accepted
//! filter compiles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use preview::config::read_start;
use preview::model::{PodRequest, StartRequest};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let pod = |c: &str| PodRequest { config: c.to_string(), ..Default::default() };
    let mut pods = vec![pod(parts.next().unwrap_or_default())];
    if let Some(second) = parts.next().filter(|s| !s.is_empty()) {
        pods.push(pod(second));
    }
    let key = parts.next().unwrap_or_default().to_string();
    let ttl = parts.next().unwrap_or_default().to_string();
    match read_start(&StartRequest { pods, key, ttl }) {
        Ok(read) => {
            for c in &read.configs {
                if let Some(f) = &c.filter {
                    f.compile().expect("an accepted filter compiles");
                }
            }
        }
        Err(e) => assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}"),
    }
});
