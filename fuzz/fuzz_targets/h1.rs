//! The agent's HTTP/1 fast path over arbitrary bytes: routing a request
//! head, framing a response head and walking a chunked body never panic,
//! never claim more bytes than they were given, and a body gives the same
//! answer whether it arrives whole or in two pieces.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use preview::agent::h1::{BadFraming, Body, Chunked, Decision, decide, response_head};
use preview::agent::routes::RouteTable;
use preview::model::Route;
use preview::model::{Key, Mode};
use preview::filter::FilterSpec;

static TABLE: LazyLock<RouteTable> = LazyLock::new(|| {
    let route = |key: &str, mode, filter| Route {
        key: Key::parse("key", key).expect("a valid test key"),
        mode,
        filter,
        ports: vec![],
        destination: [198, 18, 0, 2].into(),
        expires_at_ms: None,
    };
    RouteTable::compile(vec![
        route("s", Mode::Steal, FilterSpec::Key("s".into())),
        route("m", Mode::Mirror, FilterSpec::Path("^/m".into())),
    ])
    .expect("fixed routes compile")
});

/// Feeds `data` in two pieces the way the relay does: what a piece leaves
/// unconsumed is seen again with the next.
fn walk(data: &[u8], cut: usize) -> Result<(usize, bool), BadFraming> {
    let mut body = Body::Chunked(Chunked::Size);
    let (mut buf, mut consumed) = (Vec::new(), 0);
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        let (n, done) = body.advance(&buf)?;
        consumed += n;
        buf.drain(..n);
        if done {
            return Ok((consumed, true));
        }
    }
    Ok((consumed, false))
}

fuzz_target!(|data: &[u8]| {
    if let Decision::Relay(h) = decide(data, &TABLE, 80) {
        assert!(h.len <= data.len());
    }
    for head in [false, true] {
        if let Ok(Some(h)) = response_head(data, head) {
            assert!(h.len <= data.len());
        }
    }
    let whole = walk(data, data.len());
    if let Ok((n, _)) = whole {
        assert!(n <= data.len());
    }
    let cut = data.first().map_or(0, |b| usize::from(*b) % (data.len() + 1));
    assert_eq!(walk(data, cut), whole);
});
