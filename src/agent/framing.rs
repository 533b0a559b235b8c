//! HTTP/1 framing for the fast path, as pure functions over bytes: where a
//! request head ends and what to do with it (relay, mirror, or hand to
//! hyper), where a body ends (length or chunked, however it arrives), and
//! how a response is framed (RFC 9112 §6.3). Fuzzed by `fuzz/fuzz_targets/h1.rs`.

use std::net::SocketAddr;

use super::routes::RouteTable;
use super::state::{CREDENTIAL_HEADERS, idempotent};
use crate::filter::RequestView;
use crate::model::Mode;

/// Longer heads go to hyper, which answers 431 (its limit in `proxy.rs`).
pub const MAX_HEAD: usize = 64 * 1024;
/// More headers than this go to hyper, which allows 100.
pub(super) const MAX_HEADERS: usize = 64;
/// A chunk-size or trailer line longer than this is not HTTP.
const MAX_LINE: usize = 4096;

/// Where a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes (responses only).
    Eof,
}

/// Position in a chunked body (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// At the start of a chunk-size line.
    Size,
    /// This many data bytes are left in the chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// At the start of a trailer line; an empty one ends the body.
    Trailer,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub struct BadFraming(pub &'static str);

impl Body {
    /// How many of `buf`'s first bytes belong to this body, and whether the
    /// body ends there. Bytes after the end are left for the next message;
    /// an incomplete line is left until more arrives.
    pub fn advance(&mut self, buf: &[u8]) -> Result<(usize, bool), BadFraming> {
        match self {
            Body::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                Ok((n as usize, *left == 0))
            }
            Body::Eof => Ok((buf.len(), false)),
            Body::Chunked(state) => chunked(state, buf),
        }
    }
}

fn chunked(state: &mut Chunked, buf: &[u8]) -> Result<(usize, bool), BadFraming> {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        match *state {
            Chunked::Done => return Ok((pos, true)),
            Chunked::Data(left) => {
                let n = left.min(rest.len() as u64);
                pos += n as usize;
                if n < left {
                    *state = Chunked::Data(left - n);
                    return Ok((pos, false));
                }
                *state = Chunked::DataEnd;
            }
            Chunked::DataEnd => {
                if rest.len() < 2 {
                    return Ok((pos, false));
                }
                if &rest[..2] != b"\r\n" {
                    return Err(BadFraming("chunk data not followed by CRLF"));
                }
                pos += 2;
                *state = Chunked::Size;
            }
            Chunked::Size | Chunked::Trailer => {
                // Bounded scan: a longer line is refused however it arrives.
                let Some(eol) = rest.iter().take(MAX_LINE + 1).position(|b| *b == b'\n') else {
                    if rest.len() > MAX_LINE {
                        return Err(BadFraming("chunk line too long"));
                    }
                    return Ok((pos, false));
                };
                let line = rest[..eol].strip_suffix(b"\r").ok_or(BadFraming("chunk line not ended by CRLF"))?;
                pos += eol + 1;
                *state = match *state {
                    Chunked::Trailer if line.is_empty() => Chunked::Done,
                    Chunked::Trailer => Chunked::Trailer,
                    _ => match chunk_size(line)? {
                        0 => Chunked::Trailer,
                        n => Chunked::Data(n),
                    },
                };
            }
        }
    }
}

/// The hex size before any `;extension`.
fn chunk_size(line: &[u8]) -> Result<u64, BadFraming> {
    let end = line.iter().position(|b| matches!(b, b';' | b' ' | b'\t')).unwrap_or(line.len());
    let hex = &line[..end];
    if hex.is_empty() || hex.len() > 15 {
        return Err(BadFraming("bad chunk size"));
    }
    hex.iter().try_fold(0u64, |n, b| {
        let d = (*b as char).to_digit(16).ok_or(BadFraming("bad chunk size"))?;
        Ok(n << 4 | u64::from(d))
    })
}

/// What to do with a request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The head is not complete yet.
    Partial,
    /// Relay it; `mirror` names the route whose preview gets a copy.
    Relay(RequestHead),
    /// Let hyper serve the connection from this request on.
    HandOff,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub len: usize,
    pub body: Body,
    /// The client asked to close after this exchange.
    pub close: bool,
    /// HEAD: the response has no body whatever its headers say.
    pub head: bool,
    /// Safe to send again on a fresh connection: idempotent and bodiless.
    pub replayable: bool,
    /// `Expect: 100-continue`: the body comes only after the app's 100.
    pub expect: bool,
    pub mirror: Option<(String, SocketAddr)>,
}

struct View<'a, 'b>(&'a httparse::Request<'b, 'b>);

impl RequestView for View<'_, '_> {
    fn method(&self) -> &str {
        self.0.method.unwrap_or("")
    }
    fn path_and_query(&self) -> &str {
        self.0.path.unwrap_or("/")
    }
    fn for_each_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        self.0.headers.iter().any(|h| f(h.name, h.value))
    }
}

fn has_token(value: &[u8], token: &str) -> bool {
    value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Routes a request head and finds its body. Anything hyper would treat
/// with more care than a byte relay can (HTTP/1.0, upgrades, CONNECT,
/// absolute-form targets, ambiguous lengths, errors) is handed off.
pub fn decide(buf: &[u8], table: &RouteTable, port: u16) -> Decision {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Decision::Partial,
        Err(_) => return Decision::HandOff,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Decision::HandOff;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Decision::HandOff;
    }
    let (mut length, mut chunked, mut close, mut expect) = (None, false, false, false);
    for h in req.headers.iter() {
        let (name, value) = (h.name, h.value);
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(value).ok().filter(|v| v.bytes().all(|b| b.is_ascii_digit()));
            match n.and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if length.is_none() => length = Some(n),
                _ => return Decision::HandOff,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Decision::HandOff;
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("upgrade") {
            return Decision::HandOff;
        } else if name.eq_ignore_ascii_case("connection") {
            close |= has_token(value, "close");
        } else if name.eq_ignore_ascii_case("expect") {
            expect = true;
        }
    }
    let body = match (length, chunked) {
        (Some(_), true) => return Decision::HandOff,
        (_, true) => Body::Chunked(Chunked::Size),
        (n, false) => Body::Length(n.unwrap_or(0)),
    };
    let mirror = match table.find(port, &View(&req)) {
        None => None,
        Some(r) if r.mode == Mode::Mirror => Some((r.key.to_string(), SocketAddr::new(r.destination, port))),
        Some(_) => return Decision::HandOff,
    };
    Decision::Relay(RequestHead {
        len,
        body,
        close,
        head: method == "HEAD",
        replayable: idempotent(method) && body == Body::Length(0),
        expect,
        mirror,
    })
}

/// A response head: its length, its body, and whether the connection
/// closes after it. `None` while incomplete.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub body: Body,
    pub close: bool,
    /// 1xx other than 101: relayed, then the real response follows.
    pub interim: bool,
}

pub fn response_head(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, BadFraming> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(BadFraming("response head too large")),
        Err(_) => return Err(BadFraming("malformed response head")),
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return Err(BadFraming("malformed response head"));
    };
    // Upgrades are handed to hyper before they are sent.
    if code == 101 {
        return Err(BadFraming("101 to a request that asked for no upgrade"));
    }
    let interim = (100..200).contains(&code);
    let (mut length, mut coded, mut chunked, mut close, mut keep) = (None, false, false, false, false);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err(BadFraming("bad content-length")),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            coded = true;
            chunked =
                h.value.rsplit(|b| *b == b',').next().is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= has_token(h.value, "close");
            keep |= has_token(h.value, "keep-alive");
        }
    }
    // An HTTP/1.0 response keeps the connection only when it says so.
    let close = close || (version == 0 && !keep);
    let body = if head_request || interim || code == 204 || code == 304 {
        Body::Length(0)
    } else if coded {
        if chunked { Body::Chunked(Chunked::Size) } else { Body::Eof }
    } else {
        length.map_or(Body::Eof, Body::Length)
    };
    Ok(Some(ResponseHead { len, close: close || body == Body::Eof, body, interim }))
}

/// A request head without its [`CREDENTIAL_HEADERS`] lines: what a mirror
/// copy carries.
pub fn without_credentials(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    for line in head.split_inclusive(|b| *b == b'\n') {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        let drop = line.contains(&b':')
            && CREDENTIAL_HEADERS.iter().any(|h| name.trim_ascii().eq_ignore_ascii_case(h.as_str().as_bytes()));
        if !drop {
            out.extend_from_slice(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `msg` in pieces split at `cuts` and returns what the body
    /// consumed and whether it ended, the way `relay` drives it.
    fn feed(mut body: Body, msg: &[u8], step: usize) -> Result<(usize, bool), BadFraming> {
        let mut buf = Vec::new();
        let mut consumed = 0;
        for piece in msg.chunks(step.max(1)) {
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

    #[test]
    fn chunked_bodies_end_where_they_end_however_they_arrive() {
        let msg =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let end = msg.len() - b"GET / HTTP/1.1\r\n".len();
        for step in 1..=msg.len() {
            assert_eq!(feed(Body::Chunked(Chunked::Size), msg, step), Ok((end, true)), "step {step}");
        }
        assert_eq!(feed(Body::Chunked(Chunked::Size), b"0\r\n\r\n", 1), Ok((5, true)));
        assert!(feed(Body::Chunked(Chunked::Size), b"zz\r\n", 4).is_err());
        assert!(feed(Body::Chunked(Chunked::Size), b"3\r\nabcXY", 8).is_err());
        assert!(feed(Body::Chunked(Chunked::Size), b"3\nabc", 8).is_err());
        assert!(feed(Body::Chunked(Chunked::Size), &[b'1'; MAX_LINE + 2], MAX_LINE + 2).is_err());
        assert!(feed(Body::Chunked(Chunked::Size), b"ffffffffffffffff\r\n", 32).is_err());
        assert_eq!(feed(Body::Length(3), b"abcdef", 2), Ok((3, true)));
        assert_eq!(feed(Body::Length(0), b"abc", 3), Ok((0, true)));
        assert_eq!(feed(Body::Eof, b"abc", 1), Ok((3, false)));
    }

    /// Fuzz-style: random bytes never panic, never consume more than given,
    /// and give the same answer however they are split.
    #[test]
    fn random_chunked_input_is_split_invariant() {
        let mut next = crate::xorshift(0x9E37_79B9_7F4A_7C15);
        let alphabet = b"0123456789abcdefXZ;\r\n \t";
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let msg: Vec<u8> = (0..len).map(|_| alphabet[(next() as usize) % alphabet.len()]).collect();
            let whole = feed(Body::Chunked(Chunked::Size), &msg, msg.len());
            let step = 1 + (next() % 8) as usize;
            assert_eq!(feed(Body::Chunked(Chunked::Size), &msg, step), whole, "{msg:?} in steps of {step}");
            if let Ok((n, _)) = whole {
                assert!(n <= msg.len());
            }
        }
        // A long (trailer) line is refused whether or not its end has arrived.
        let long = [b"0\r\nx: ".to_vec(), vec![b'a'; MAX_LINE], b"\r\n\r\n".to_vec()].concat();
        assert!(feed(Body::Chunked(Chunked::Size), &long, long.len()).is_err());
        assert!(feed(Body::Chunked(Chunked::Size), &long, 100).is_err());
    }

    fn table(routes: serde_json::Value) -> RouteTable {
        let routes = serde_json::from_value(routes).expect("test routes are valid");
        RouteTable::compile(routes).expect("test routes compile")
    }

    #[test]
    fn requests_are_relayed_or_handed_to_hyper() {
        let t = table(serde_json::json!([
            {"key": "s", "mode": "steal", "filter": {"key": "s"}, "destination": "198.18.1.2", "ports": [80]},
            {"key": "m", "mode": "mirror", "filter": {"key": "m"}, "destination": "198.18.1.3", "ports": [80]}
        ]));
        let relay = |req: &str| match decide(req.as_bytes(), &t, 80) {
            Decision::Relay(h) => Some(h),
            _ => None,
        };
        let h = relay("GET /x HTTP/1.1\r\nhost: a\r\n\r\nnext").expect("plain GET is relayed");
        assert_eq!((h.len, h.body, h.close, h.replayable, h.mirror), (28, Body::Length(0), false, true, None));
        let h = relay("POST / HTTP/1.1\r\ncontent-length: 5\r\nconnection: keep-alive, close\r\n\r\n").expect("POST");
        assert_eq!((h.body, h.close, h.replayable), (Body::Length(5), true, false));
        let h = relay("PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n").expect("chunked");
        assert_eq!((h.body, h.expect, h.replayable), (Body::Chunked(Chunked::Size), true, false));
        let h = relay("GET / HTTP/1.1\r\nbaggage: preview-key=m\r\n\r\n").expect("mirror is relayed");
        assert_eq!(h.mirror, Some(("m".to_string(), "198.18.1.3:80".parse().expect("addr"))));
        assert!(relay("HEAD / HTTP/1.1\r\n\r\n").is_some_and(|h| h.head));
        assert_eq!(decide(b"GET / HTTP/1.1\r\nhost: a\r\n", &t, 80), Decision::Partial);
        for handed in [
            "GET / HTTP/1.1\r\nx-preview-key: s\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert_eq!(decide(handed.as_bytes(), &t, 80), Decision::HandOff, "{handed:?}");
        }
        // The steal route is on port 80 only.
        assert!(decide(b"GET / HTTP/1.1\r\nx-preview-key: s\r\n\r\n", &t, 81) != Decision::HandOff);
    }

    #[test]
    fn mirror_copies_lose_credentials_and_keep_the_rest() {
        let head = b"POST /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\ncookie: s=1\r\nX-Cookie-Note: keep\r\nProxy-Authorization: b\r\nContent-Length: 2\r\n\r\n";
        let out = without_credentials(head);
        assert_eq!(out, b"POST /a HTTP/1.1\r\nHost: x\r\nX-Cookie-Note: keep\r\nContent-Length: 2\r\n\r\n".to_vec());
        assert_eq!(without_credentials(b"GET / HTTP/1.1\r\n\r\n"), b"GET / HTTP/1.1\r\n\r\n".to_vec());
    }

    #[test]
    fn responses_are_framed_like_rfc_9112_says() {
        let r = |s: &str, head| response_head(s.as_bytes(), head);
        let h = r("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false).expect("ok").expect("complete");
        assert_eq!((h.len, h.body, h.close, h.interim), (38, Body::Length(3), false, false));
        let h = r("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true).expect("ok").expect("complete");
        assert_eq!(h.body, Body::Length(0));
        let h = r("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", false).expect("ok").expect("c");
        assert_eq!(h.body, Body::Chunked(Chunked::Size));
        let h = r("HTTP/1.1 200 OK\r\n\r\n", false).expect("ok").expect("complete");
        assert_eq!((h.body, h.close), (Body::Eof, true));
        let h = r("HTTP/1.1 204 No Content\r\n\r\n", false).expect("ok").expect("complete");
        assert_eq!((h.body, h.close), (Body::Length(0), false));
        let h = r("HTTP/1.1 100 Continue\r\n\r\n", false).expect("ok").expect("complete");
        assert!(h.interim && h.body == Body::Length(0));
        let h = r("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false).expect("ok").expect("complete");
        assert!(h.close);
        let h = r("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n", false).expect("ok");
        assert!(h.is_some_and(|h| !h.close));
        let h = r("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", false).expect("ok");
        assert!(h.is_some_and(|h| h.close));
        assert_eq!(r("HTTP/1.1 200 OK\r\n", false), Ok(None));
        assert!(r("HTTP/1.1 101 Switching Protocols\r\n\r\n", false).is_err());
        assert!(r("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", false).is_err());
        assert!(r("garbage\r\n\r\n", false).is_err());
    }
}
