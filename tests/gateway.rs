//! The share gateway (issue 18) on real sockets, without a cluster: the
//! gateway in front of a real preview-echo. A link's key replaces whatever
//! key the visitor sent, other baggage stays, redirects and cookies come
//! back under the share host, WebSocket upgrades go through, and ended,
//! expired and unknown links answer 410, 410 and 404 pages. One kept-alive
//! connection carries every request framing, two links and an upgrade.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use preview::agent::gateway::{Gateway, Link, LinkTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIVE: &str = "aaaaaaaaaaaaaaaaaaaa";
const ENDED: &str = "bbbbbbbbbbbbbbbbbbbb";
const EXPIRED: &str = "cccccccccccccccccccc";
const DOMAIN: &str = "preview.test:30080";

/// preview-echo on loopback, stopped (by its pid) on drop.
struct Echo(Child, SocketAddr);

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn echo() -> Result<Echo> {
    echo_version("v-staging").await
}

async fn echo_version(version: &str) -> Result<Echo> {
    let addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let child = Command::new(env!("CARGO_BIN_EXE_preview-echo"))
        .args(["serve", "--listen", &addr.to_string(), "--version", version])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let echo = Echo(child, addr);
    // It prints "listening" once bound; connecting is the same fact, on the socket.
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(echo);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("preview-echo did not listen on {addr}")
}

async fn gateway(upstream: SocketAddr) -> Result<SocketAddr> {
    serve(links(upstream)).await
}

async fn serve(links: LinkTable) -> Result<SocketAddr> {
    let gw = Gateway::new(links);
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(gw.serve(l));
    Ok(addr)
}

fn links(upstream: SocketAddr) -> LinkTable {
    let mut links = LinkTable::new();
    let live = |expires_at_ms| Link::Live {
        key: "k1".into(),
        upstream,
        authority: "web.shop.svc:8080".into(),
        expires_at_ms,
        staging_url: "http://staging.example/".into(),
    };
    links.insert(LIVE.into(), live(None));
    links.insert(EXPIRED.into(), live(Some(1)));
    links.insert(ENDED.into(), Link::Ended { reason: "revoked".into(), staging_url: "http://staging.example/".into() });
    links
}

/// One request with `head` lines; the whole raw answer (the connection closes).
async fn raw(gw: SocketAddr, slug: &str, path: &str, extra: &str) -> Result<String> {
    let mut s = TcpStream::connect(gw).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {slug}.{DOMAIN}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.context("answer")??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Reads one answer with a `content-length` off a kept-alive connection.
async fn answer(s: &mut TcpStream) -> Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
                .context("no content-length")??;
            if body.len() >= len {
                return Ok(text);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.context("answer")??;
        ensure!(n > 0, "closed: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

fn body_json(answer: &str) -> Result<serde_json::Value> {
    let (_, body) = answer.split_once("\r\n\r\n").context("no body")?;
    Ok(serde_json::from_str(body.trim())?)
}

#[tokio::test]
async fn a_link_forwards_with_its_own_key_only() -> Result<()> {
    let e = echo().await?;
    let gw = gateway(e.1).await?;
    let a = raw(
        gw,
        LIVE,
        "/x?y=1",
        "Accept: application/json\r\nbaggage: userId=7,preview-key=someone-else\r\nx-preview-key: someone-else\r\n",
    )
    .await?;
    ensure!(a.starts_with("HTTP/1.1 200"), "{a}");
    let v = body_json(&a)?;
    assert_eq!(v["baggage"], serde_json::json!(["userId=7,preview-key=k1"]), "{v}");
    assert_eq!(v["path"], "/x?y=1");
    assert_eq!(v["version"], "v-staging");
    Ok(())
}

#[tokio::test]
async fn redirects_and_cookies_stay_on_the_share_host() -> Result<()> {
    let e = echo().await?;
    let gw = gateway(e.1).await?;
    // The app builds both from the Host it got: the Service's name.
    let a = raw(gw, LIVE, "/login", "").await?;
    ensure!(a.starts_with("HTTP/1.1 302"), "{a}");
    let lower = a.to_ascii_lowercase();
    ensure!(lower.contains(&format!("location: http://{LIVE}.{DOMAIN}/welcome\r\n")), "{a}");
    ensure!(lower.contains("set-cookie: session=v-staging; path=/\r\n"), "{a}");
    Ok(())
}

#[tokio::test]
async fn websocket_upgrades_go_through() -> Result<()> {
    let e = echo().await?;
    let gw = gateway(e.1).await?;
    let mut s = TcpStream::connect(gw).await?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {LIVE}.{DOMAIN}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    upgraded(&mut s).await
}

/// Reads a 101, then the first frame: the version.
async fn upgraded(s: &mut TcpStream) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("v-staging") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.context("frame")??;
        ensure!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    ensure!(text.starts_with("HTTP/1.1 101"), "{text}");
    Ok(())
}

#[tokio::test]
async fn ended_expired_and_unknown_links_say_so() -> Result<()> {
    let e = echo().await?;
    let gw = gateway(e.1).await?;
    for slug in [ENDED, EXPIRED] {
        let a = raw(gw, slug, "/", "Accept: text/html\r\n").await?;
        ensure!(a.starts_with("HTTP/1.1 410"), "{slug}: {a}");
        ensure!(a.contains("This preview has ended") && a.contains("href=\"http://staging.example/\""), "{a}");
        ensure!(!a.contains("v-staging"), "an ended link must never show staging's page: {a}");
    }
    let a = raw(gw, "dddddddddddddddddddd", "/", "").await?;
    ensure!(a.starts_with("HTTP/1.1 404"), "{a}");
    let a = raw(gw, "", "/", "").await?;
    ensure!(a.starts_with("HTTP/1.1 404"), "{a}");
    Ok(())
}

/// Requests of every framing on one kept-alive connection (the byte-level
/// path), a second link on the same connection (another upstream), then a
/// WebSocket upgrade on it (handed to hyper mid-connection).
#[tokio::test]
async fn one_connection_carries_bodies_links_and_an_upgrade() -> Result<()> {
    const OTHER: &str = "dddddddddddddddddddd";
    let (a, b) = (echo().await?, echo_version("v-other").await?);
    let mut table = links(a.1);
    table.insert(
        OTHER.into(),
        Link::Live {
            key: "k2".into(),
            upstream: b.1,
            authority: "other.shop.svc:8080".into(),
            expires_at_ms: None,
            staging_url: String::new(),
        },
    );
    let gw = serve(table).await?;
    let mut s = TcpStream::connect(gw).await?;
    let host = |slug| format!("Host: {slug}.{DOMAIN}\r\nAccept: application/json\r\n");
    let asks = [
        (format!("POST /p HTTP/1.1\r\n{}Content-Length: 5\r\n\r\nhello", host(LIVE)), "v-staging", "k1", 5),
        (
            format!(
                "POST /c HTTP/1.1\r\n{}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
                host(OTHER)
            ),
            "v-other",
            "k2",
            7,
        ),
        (format!("GET /g HTTP/1.1\r\n{}\r\n", host(LIVE)), "v-staging", "k1", 0),
    ];
    for (req, version, key, bytes) in asks {
        s.write_all(req.as_bytes()).await?;
        let a = answer(&mut s).await?;
        ensure!(a.starts_with("HTTP/1.1 200"), "{a}");
        let v = body_json(&a)?;
        assert_eq!(v["version"], version, "{v}");
        assert_eq!(v["baggage"], serde_json::json!([format!("preview-key={key}")]), "{v}");
        assert_eq!(v["body_bytes"], bytes, "{v}");
    }
    s.write_all(format!("GET /login HTTP/1.1\r\nHost: {LIVE}.{DOMAIN}\r\n\r\n").as_bytes()).await?;
    let a = answer(&mut s).await?;
    ensure!(a.to_ascii_lowercase().contains(&format!("location: http://{LIVE}.{DOMAIN}/welcome\r\n")), "{a}");
    let ws = format!(
        "GET /ws HTTP/1.1\r\nHost: {LIVE}.{DOMAIN}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(ws.as_bytes()).await?;
    upgraded(&mut s).await
}
