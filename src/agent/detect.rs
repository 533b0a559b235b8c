//! Protocol detection from the first bytes a client sends.

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Not HTTP: bytes are copied both ways unchanged.
    Raw,
}

/// `None`: these bytes could still become HTTP; read more (or time out to Raw).
pub fn detect(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // An HTTP/1.x request line starts with a method token then a space.
    const MAX_METHOD: usize = 16;
    for (i, b) in buf.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i > 0 => return Some(Protocol::Http1),
            _ => return Some(Protocol::Raw),
        }
    }
    if buf.len() > MAX_METHOD { Some(Protocol::Raw) } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects() {
        assert_eq!(detect(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(detect(&H2_PREFACE[..10]), None);
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(detect(b"POST "), Some(Protocol::Http1));
        assert_eq!(detect(b"PROPFIND /x"), Some(Protocol::Http1));
        assert_eq!(detect(b"GE"), None);
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"hello\n"), Some(Protocol::Raw));
        assert_eq!(detect(b"\x16\x03\x01"), Some(Protocol::Raw));
        assert_eq!(detect(b" GET"), Some(Protocol::Raw));
        assert_eq!(detect(b"AAAAAAAAAAAAAAAAAAAA"), Some(Protocol::Raw));
        // "PRI" that is not the preface is an ordinary token.
        assert_eq!(detect(b"PRIX / HTTP/1.1"), Some(Protocol::Http1));
    }

    /// Fuzz-style property test: any bytes, any split, never panics, and a
    /// decision never changes once more bytes arrive.
    #[test]
    fn random_input_is_stable_and_never_panics() {
        let mut next = crate::xorshift(0x2545_F491_4F6C_DD1D);
        let seeds: [&[u8]; 3] = [H2_PREFACE, b"GET /x HTTP/1.1\r\n", b"SSH-2.0-x\r\n"];
        for i in 0..50_000 {
            let mut buf: Vec<u8> = seeds[i % 3].to_vec();
            for _ in 0..(next() % 4) {
                let pos = (next() as usize) % buf.len();
                buf[pos] = next() as u8;
            }
            buf.truncate((next() as usize) % (buf.len() + 1));
            let full = detect(&buf);
            for cut in 0..buf.len() {
                if let Some(p) = detect(&buf[..cut]) {
                    assert_eq!(Some(p), full, "{:?} then {:?}", &buf[..cut], buf);
                }
            }
        }
    }
}
