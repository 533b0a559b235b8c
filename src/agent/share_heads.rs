//! What the share gateway changes in message heads, for both of its paths:
//! the request a link forwards (its key in `baggage`, the entry Service's
//! Host, `X-Forwarded-*`), and the response's `Location` and `Set-Cookie`
//! under the share host. The byte-level forms serve the fast path
//! (`h1::serve_front`); hyper's path uses the same rules on a `HeaderMap`.

use std::net::SocketAddr;

use http::header::{HOST, LOCATION, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::framing::MAX_HEADERS;
use crate::filter::{KEY_HEADER, set_baggage_key};

/// Sets what a link forwards on a request's headers: `key` alone in
/// `baggage` (a link opens its own environment only), `authority` as Host,
/// and `X-Forwarded-Host`, `-Proto` and `-For`.
pub fn forward_headers(h: &mut HeaderMap, key: &str, authority: &str, share_host: &str, peer: SocketAddr) {
    set_baggage_key(h, key);
    if let Ok(v) = HeaderValue::from_str(authority) {
        h.insert(HOST, v);
    }
    if let Ok(v) = HeaderValue::from_str(share_host) {
        h.insert("x-forwarded-host", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
}

/// Headers `forward_headers` sets or changes: the fast path takes them out
/// of the head and writes them again.
fn rewritten(name: &str) -> bool {
    ["host", "baggage", KEY_HEADER, "x-forwarded-host", "x-forwarded-proto", "x-forwarded-for"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
}

/// A whole request head (HTTP/1.1, exactly one Host) as a link forwards it,
/// with its lowercased Host: `link` names the link's key and authority for
/// that Host. The headers a link does not touch keep their bytes and their
/// order. `None` for a head the fast path leaves to hyper.
pub fn request_head<'l>(
    head: &[u8],
    peer: SocketAddr,
    link: impl FnOnce(&str) -> Option<(&'l str, &'l str)>,
) -> Option<(String, Vec<u8>)> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    req.parse(head).ok()?.is_complete().then_some(())?;
    let mut hosts = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    let (Some(h), None) = (hosts.next(), hosts.next()) else { return None };
    let share_host = std::str::from_utf8(h.value).ok()?.trim().to_ascii_lowercase();
    let (key, authority) = link(&share_host)?;
    let (method, path) = (req.method?, req.path?);
    let mut out = Vec::with_capacity(head.len() + 160);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut changed = HeaderMap::new();
    for h in req.headers.iter() {
        if rewritten(h.name) {
            changed.append(HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_bytes(h.value).ok()?);
        } else {
            put(&mut out, h.name.as_bytes(), h.value);
        }
    }
    forward_headers(&mut changed, key, authority, &share_host, peer);
    for (n, v) in &changed {
        put(&mut out, n.as_str().as_bytes(), v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Some((share_host, out))
}

fn put(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A whole response head with `rewrite_response` applied; `None` when that
/// changes nothing (the bytes are relayed as they came).
pub fn response_head(head: &[u8], share_host: &str, authority: &str, upstream: SocketAddr) -> Option<Vec<u8>> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hs);
    resp.parse(head).ok()?.is_complete().then_some(())?;
    let touched = |n: &str| n.eq_ignore_ascii_case(LOCATION.as_str()) || n.eq_ignore_ascii_case(SET_COOKIE.as_str());
    if !resp.headers.iter().any(|h| touched(h.name)) {
        return None;
    }
    let mut map = HeaderMap::new();
    for h in resp.headers.iter().filter(|h| touched(h.name)) {
        map.append(HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_bytes(h.value).ok()?);
    }
    let before = map.clone();
    rewrite_response(&mut map, share_host, authority, upstream);
    if map == before {
        return None;
    }
    let line = head.iter().position(|b| *b == b'\n')? + 1;
    let mut out = Vec::with_capacity(head.len() + 32);
    out.extend_from_slice(&head[..line]);
    for h in resp.headers.iter().filter(|h| !touched(h.name)) {
        put(&mut out, h.name.as_bytes(), h.value);
    }
    for (n, v) in &map {
        put(&mut out, n.as_str().as_bytes(), v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// Under the share host: an absolute `Location` that points at the entry
/// Service (any of its names, or its address) moves to the share host, and
/// `Set-Cookie` loses `Domain` (the browser then keeps it for the share host).
pub fn rewrite_response(h: &mut http::HeaderMap, share_host: &str, authority: &str, upstream: SocketAddr) {
    if let Some(loc) = h.get(LOCATION).and_then(|v| v.to_str().ok())
        && let Some(rest) = loc.strip_prefix("http://").or_else(|| loc.strip_prefix("https://"))
    {
        let (auth, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
        let loc_host = auth.rsplit_once(':').map_or(auth, |(h, _)| h).to_ascii_lowercase();
        let svc_host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        let ours = loc_host == svc_host
            || svc_host.starts_with(&format!("{loc_host}."))
            || loc_host.starts_with(&format!("{svc_host}."))
            || loc_host == upstream.ip().to_string();
        if ours {
            let path = if path.is_empty() { "/" } else { path };
            if let Ok(v) = HeaderValue::from_str(&format!("http://{share_host}{path}")) {
                h.insert(LOCATION, v);
            }
        }
    }
    let cookies: Vec<HeaderValue> = h.get_all(SET_COOKIE).iter().cloned().collect();
    if cookies.iter().any(|c| c.to_str().is_ok_and(|c| c.to_ascii_lowercase().contains("domain="))) {
        h.remove(SET_COOKIE);
        for c in cookies {
            let kept = match c.to_str() {
                Ok(s) => s
                    .split(';')
                    .filter(|attr| !attr.trim_start().to_ascii_lowercase().starts_with("domain="))
                    .collect::<Vec<_>>()
                    .join(";"),
                Err(_) => continue,
            };
            if let Ok(v) = HeaderValue::from_str(&kept) {
                h.append(SET_COOKIE, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(loc: &str, cookies: &[&str]) -> (String, Vec<String>) {
        let mut h = http::HeaderMap::new();
        h.insert(LOCATION, HeaderValue::from_str(loc).unwrap());
        for c in cookies {
            h.append(SET_COOKIE, HeaderValue::from_str(c).unwrap());
        }
        let up: SocketAddr = "198.19.0.7:8080".parse().unwrap();
        rewrite_response(&mut h, "abc.preview.test:30080", "frontend.demo.svc:8080", up);
        let loc = h.get(LOCATION).unwrap().to_str().unwrap().to_string();
        (loc, h.get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect())
    }

    #[test]
    fn redirects_to_the_service_move_to_the_share_host() {
        for to in [
            "http://frontend.demo.svc:8080/next?a=1",
            "http://frontend/next?a=1",
            "http://frontend.demo/next?a=1",
            "http://frontend.demo.svc.cluster.local:8080/next?a=1",
            "http://198.19.0.7:8080/next?a=1",
        ] {
            assert_eq!(rewritten(to, &[]).0, "http://abc.preview.test:30080/next?a=1", "{to}");
        }
        assert_eq!(rewritten("http://frontend.demo.svc:8080", &[]).0, "http://abc.preview.test:30080/");
        // Elsewhere, and relative: untouched.
        assert_eq!(rewritten("https://login.example.com/x", &[]).0, "https://login.example.com/x");
        assert_eq!(rewritten("/next", &[]).0, "/next");
    }

    #[test]
    fn cookies_lose_their_domain_only() {
        let (_, c) = rewritten("/", &["a=1; Domain=frontend.demo.svc; Path=/; HttpOnly", "b=2; Path=/"]);
        assert_eq!(c, vec!["a=1; Path=/; HttpOnly".to_string(), "b=2; Path=/".to_string()]);
    }

    #[test]
    fn a_request_head_carries_the_links_key_host_and_forwarding() {
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        let head = b"GET /a?b=1 HTTP/1.1\r\nHost: abc.preview.test:30080\r\nAccept: */*\r\n\
            baggage: preview-key=theirs, user=7\r\nx-preview-key: theirs\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
        let (host, out) = request_head(head, peer, |host| {
            assert_eq!(host, "abc.preview.test:30080");
            Some(("k1", "frontend.demo.svc:8080"))
        })
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(host, "abc.preview.test:30080");
        assert!(out.starts_with("GET /a?b=1 HTTP/1.1\r\nAccept: */*\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"));
        let lines: Vec<&str> = out.lines().collect();
        for want in [
            "host: frontend.demo.svc:8080",
            "baggage: user=7,preview-key=k1",
            "x-forwarded-host: abc.preview.test:30080",
            "x-forwarded-proto: http",
            "x-forwarded-for: 1.2.3.4, 10.0.0.9",
        ] {
            assert!(lines.contains(&want), "{want} in {out}");
        }
        assert!(!out.to_ascii_lowercase().contains("x-preview-key"), "{out}");
        assert!(!out.contains("theirs"), "{out}");
    }

    #[test]
    fn response_heads_change_only_when_they_must() {
        let up: SocketAddr = "198.19.0.7:8080".parse().unwrap();
        let (share, auth) = ("abc.preview.test:30080", "frontend.demo.svc:8080");
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nSet-Cookie: b=2; Path=/\r\n\r\n";
        assert_eq!(response_head(plain, share, auth, up), None);
        let moved = b"HTTP/1.1 302 Found\r\nLocation: http://frontend.demo.svc:8080/x\r\ncontent-length: 0\r\n\
            set-cookie: a=1; Domain=frontend.demo.svc; Path=/\r\n\r\n";
        let out = String::from_utf8(response_head(moved, share, auth, up).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 302 Found\r\ncontent-length: 0\r\n"), "{out}");
        assert!(out.contains("location: http://abc.preview.test:30080/x\r\n"), "{out}");
        assert!(out.contains("set-cookie: a=1; Path=/\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\n"));
    }
}
