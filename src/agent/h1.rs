//! The HTTP/1 fast path for traffic that stays on staging. A request that
//! matches no route, or a mirror route, is relayed as the bytes it came in:
//! its head is parsed only to route it and to find where its body and its
//! response end. One task, one app connection per client connection, no
//! copies of heads or headers.
//!
//! The first request that needs more (a steal route, an upgrade, HTTP/1.0,
//! a framing we do not relay byte for byte) hands the connection, with the
//! bytes read so far, to hyper for the rest of its life (see `proxy.rs`).
//! The parsing is in `framing.rs`; this file moves the bytes.
//!
//! `serve_front` is the same path for a front that rewrites each request
//! head and may rewrite response heads (the share gateway).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub use super::framing::{
    BadFraming, Body, Chunked, Decision, MAX_HEAD, RequestHead, ResponseHead, decide, response_head,
    without_credentials,
};
use super::state::{MIRROR_MAX_BODY, MirrorCopy, Proxy};

const READ_CHUNK: usize = 16 * 1024;

/// Which side of an exchange failed.
#[derive(Debug)]
enum Fail {
    Client,
    /// The app: a read or write error, a close, or bad framing.
    App(String),
}

/// Writes the first `head` bytes of `buf` and the body after them, reading
/// more from `src` as needed; bytes after the body stay in `buf`.
/// Errors are `(true, e)` when reading `src` failed, `(false, e)` otherwise.
async fn relay<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    head: usize,
    mut body: Body,
    dst: &mut W,
) -> Result<(), (bool, String)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut head = head;
    loop {
        let (n, done) = body.advance(&buf[head..]).map_err(|e| (true, e.0.to_string()))?;
        let take = head + n;
        if take > 0 {
            dst.write_all(&buf[..take]).await.map_err(|e| (false, e.to_string()))?;
            buf.advance(take);
        }
        head = 0;
        if done {
            return Ok(());
        }
        buf.reserve(READ_CHUNK);
        match src.read_buf(buf).await {
            Ok(0) if body == Body::Eof => return Ok(()),
            Ok(0) => return Err((true, "closed mid-body".into())),
            Ok(_) => {}
            Err(e) => return Err((true, e.to_string())),
        }
    }
}

/// A final response head's replacement, or `None` to relay it as it came
/// (the share gateway's `Location` and `Set-Cookie` rewrite).
pub type HeadRewrite = dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync;

/// Reads the response to one request from `app` and writes it to `client`,
/// interim (1xx) responses included. `started` turns true once anything was
/// written. Returns whether the connection closes after it.
async fn response<R, W>(
    app: &mut R,
    buf: &mut BytesMut,
    client: &mut W,
    head_request: bool,
    started: &mut bool,
    rewrite: Option<&HeadRewrite>,
) -> Result<bool, Fail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let head = loop {
            if let Some(h) = response_head(buf, head_request).map_err(|e| Fail::App(e.0.into()))? {
                break h;
            }
            buf.reserve(READ_CHUNK);
            match app.read_buf(buf).await {
                Ok(0) => return Err(Fail::App("closed before answering".into())),
                Ok(_) => {}
                Err(e) => return Err(Fail::App(e.to_string())),
            }
        };
        *started = true;
        let mut head_len = head.len;
        if let Some(new) = rewrite.filter(|_| !head.interim).and_then(|f| f(&buf[..head.len])) {
            client.write_all(&new).await.map_err(|_| Fail::Client)?;
            buf.advance(head.len);
            head_len = 0;
        }
        relay(app, buf, head_len, head.body, client).await.map_err(|(read, e)| match read {
            true => Fail::App(e),
            false => Fail::Client,
        })?;
        if !head.interim {
            return Ok(head.close);
        }
    }
}

/// An app connection and the bytes read from it.
struct Upstream {
    io: TcpStream,
    buf: BytesMut,
}

impl Upstream {
    async fn connect(to: SocketAddr) -> io::Result<Upstream> {
        let io = TcpStream::connect(to).await?;
        let _ = io.set_nodelay(true);
        Ok(Upstream { io, buf: BytesMut::new() })
    }

    /// False when the app closed it or sent bytes nobody asked for. Costs no
    /// syscall while the socket is not readable (tokio's cached readiness).
    fn usable(&self) -> bool {
        self.buf.is_empty()
            && matches!(self.io.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// A client connection with bytes already read from it in front.
pub struct Prefixed {
    pre: Bytes,
    io: TcpStream,
}

impl Prefixed {
    pub fn new(io: TcpStream) -> Prefixed {
        Prefixed { pre: Bytes::new(), io }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pre.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.pre.len().min(buf.remaining());
        buf.put_slice(&this.pre[..n]);
        this.pre.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Reads more of a client's request; false once the client is gone.
async fn read_more(client: &mut TcpStream, cbuf: &mut BytesMut) -> bool {
    cbuf.reserve(READ_CHUNK);
    matches!(client.read_buf(cbuf).await, Ok(n) if n > 0)
}

fn bad_gateway(app: SocketAddr, why: &str) -> Vec<u8> {
    let body = format!("upstream {app} is unreachable: {why}\n");
    format!(
        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\nx-preview-agent: error\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves one HTTP/1 client connection on the fast path. Returns the
/// connection when a request needs hyper, `None` when it is done.
pub async fn serve(proxy: &Proxy, mut client: TcpStream, app: SocketAddr) -> Option<Prefixed> {
    let port = app.port();
    let mut cbuf = BytesMut::new();
    let mut up: Option<Upstream> = None;
    loop {
        let head = loop {
            match decide(&cbuf, &proxy.routes.get(), port) {
                Decision::Relay(h) => break h,
                Decision::Partial if cbuf.len() < MAX_HEAD => {}
                Decision::Partial | Decision::HandOff => return Some(Prefixed { pre: cbuf.freeze(), io: client }),
            }
            if !read_more(&mut client, &mut cbuf).await {
                return None;
            }
        };
        let _busy = proxy.inflight.enter();
        if up.as_ref().is_some_and(|u| !u.usable()) {
            up = None;
        }
        let reused = up.is_some();
        let mut conn = match up.take() {
            Some(u) => u,
            // Hyper answers the 502 (and counts the request) when the app is down.
            None => match Upstream::connect(app).await {
                Ok(u) => u,
                Err(_) => return Some(Prefixed { pre: cbuf.freeze(), io: client }),
            },
        };
        // A mirrored request is read whole first (like the hyper path), so
        // the copy is the bytes that went to the app.
        let mut copy = None;
        match &head.mirror {
            None => proxy.metrics.passthrough(),
            Some((key, to)) => match head.body {
                Body::Length(n) if n <= MIRROR_MAX_BODY && !head.expect => {
                    let total = head.len + n as usize;
                    while cbuf.len() < total {
                        cbuf.reserve(total - cbuf.len());
                        match client.read_buf(&mut cbuf).await {
                            Ok(0) | Err(_) => return None,
                            Ok(_) => {}
                        }
                    }
                    // A preview gets no one's credentials.
                    let mut bytes = without_credentials(&cbuf[..head.len]);
                    bytes.extend_from_slice(&cbuf[head.len..total]);
                    copy = Some((key, *to, Bytes::from(bytes)));
                }
                _ => proxy.metrics.mirror_dropped(key),
            },
        }
        let mut started = false;
        // Saturating: a content-length near u64::MAX is simply never whole.
        let whole = match head.body {
            Body::Length(n) => Some(head.len.saturating_add(usize::try_from(n).unwrap_or(usize::MAX))),
            _ => None,
        }
        .filter(|total| cbuf.len() >= *total);
        let result = if let Some(total) = whole {
            let r = exchange_whole(
                &mut conn,
                app,
                reused && head.replayable,
                &cbuf[..total],
                &mut client,
                head.head,
                &mut started,
                None,
            )
            .await;
            cbuf.advance(total);
            r
        } else {
            exchange_streamed(&mut conn, &mut cbuf, head.len, head.body, head.head, &mut client, &mut started, None)
                .await
        };
        match result {
            Ok(close) => {
                if let Some((key, to, bytes)) = copy {
                    // Queued once the original has its answer.
                    proxy.queue_copy(key, MirrorCopy::Raw { bytes, head: head.head }, to);
                }
                if close || head.close {
                    return None;
                }
                up = Some(conn);
            }
            Err(Fail::App(why)) if !started => {
                tracing::debug!(%app, %why, "app failed before answering");
                let _ = client.write_all(&bad_gateway(app, &why)).await;
                return None;
            }
            Err(_) => return None,
        }
    }
}

/// The whole request in one write, then its answer. The bytes stay with the
/// caller until it is answered: a safe request on a kept-alive connection
/// that was closed or reset under us is replayed once on a fresh one, like
/// Envoy does.
#[allow(clippy::too_many_arguments)]
async fn exchange_whole(
    conn: &mut Upstream,
    app: SocketAddr,
    replayable: bool,
    request: &[u8],
    client: &mut TcpStream,
    head: bool,
    started: &mut bool,
    rewrite: Option<&HeadRewrite>,
) -> Result<bool, Fail> {
    let once = async |conn: &mut Upstream, client: &mut TcpStream, started: &mut bool| {
        conn.io.write_all(request).await.map_err(|e| Fail::App(e.to_string()))?;
        response(&mut conn.io, &mut conn.buf, client, head, started, rewrite).await
    };
    let r = once(conn, client, started).await;
    if !(matches!(r, Err(Fail::App(_))) && replayable && !*started) {
        return r;
    }
    *conn = Upstream::connect(app).await.map_err(|e| Fail::App(e.to_string()))?;
    once(conn, client, started).await
}

/// Body and answer at once: the app may answer early, and with
/// `Expect: 100-continue` the body comes only after its 100. The first
/// `head_len` bytes of `cbuf` are the head.
#[allow(clippy::too_many_arguments)]
async fn exchange_streamed(
    conn: &mut Upstream,
    cbuf: &mut BytesMut,
    head_len: usize,
    body: Body,
    head_request: bool,
    client: &mut TcpStream,
    started: &mut bool,
    rewrite: Option<&HeadRewrite>,
) -> Result<bool, Fail> {
    let (mut cr, mut cw) = client.split();
    let (mut ar, mut aw) = conn.io.split();
    let request = async {
        relay(&mut cr, cbuf, head_len, body, &mut aw).await.map_err(|(read, e)| match read {
            true => Fail::Client,
            false => Fail::App(e),
        })
    };
    let answer = response(&mut ar, &mut conn.buf, &mut cw, head_request, started, rewrite);
    // Either side failing ends both: nothing waits on a half that is gone.
    let ((), close) = tokio::try_join!(request, answer)?;
    Ok(close)
}

/// One request as a rewriting front (the share gateway) forwards it.
pub struct Forward {
    /// The head as read: its `len` bytes are replaced by `new_head`.
    pub head: RequestHead,
    pub new_head: Vec<u8>,
    pub upstream: SocketAddr,
    pub rewrite: Box<HeadRewrite>,
}

/// What a front does with the bytes read so far.
pub enum Front {
    Forward(Forward),
    /// Not a whole head yet.
    Partial,
    /// Hyper serves the connection from this request on.
    HandOff,
}

/// Serves one HTTP/1 client connection for a front that rewrites each
/// request head (`plan`) and may rewrite response heads; bodies are relayed
/// as bytes. Returns the connection when a request needs hyper.
pub async fn serve_front(mut client: TcpStream, plan: impl Fn(&[u8]) -> Front) -> Option<Prefixed> {
    let mut cbuf = BytesMut::new();
    let mut up: Option<(SocketAddr, Upstream)> = None;
    loop {
        let Forward { head, mut new_head, upstream, rewrite } = loop {
            match plan(&cbuf) {
                Front::Forward(f) => break f,
                Front::Partial if cbuf.len() < MAX_HEAD => {}
                Front::Partial | Front::HandOff => return Some(Prefixed { pre: cbuf.freeze(), io: client }),
            }
            if !read_more(&mut client, &mut cbuf).await {
                return None;
            }
        };
        // Another link on the same connection gets its own upstream.
        let kept = up.take().filter(|(to, u)| *to == upstream && u.usable());
        let reused = kept.is_some();
        let mut conn = match kept {
            Some((_, u)) => u,
            // Hyper answers the 502 when the upstream is down.
            None => match Upstream::connect(upstream).await {
                Ok(u) => u,
                Err(_) => return Some(Prefixed { pre: cbuf.freeze(), io: client }),
            },
        };
        let mut started = false;
        let whole = match head.body {
            Body::Length(n) => Some(head.len.saturating_add(usize::try_from(n).unwrap_or(usize::MAX))),
            _ => None,
        }
        .filter(|total| cbuf.len() >= *total);
        let rewrite = Some(&*rewrite);
        let result = if let Some(total) = whole {
            new_head.extend_from_slice(&cbuf[head.len..total]);
            cbuf.advance(total);
            let replayable = reused && head.replayable;
            exchange_whole(&mut conn, upstream, replayable, &new_head, &mut client, head.head, &mut started, rewrite)
                .await
        } else {
            match conn.io.write_all(&new_head).await {
                Ok(()) => {
                    cbuf.advance(head.len);
                    let (body, h) = (head.body, head.head);
                    exchange_streamed(&mut conn, &mut cbuf, 0, body, h, &mut client, &mut started, rewrite).await
                }
                Err(e) => Err(Fail::App(e.to_string())),
            }
        };
        match result {
            Ok(close) if close || head.close => return None,
            Ok(_) => up = Some((upstream, conn)),
            Err(Fail::App(why)) if !started => {
                tracing::debug!(%upstream, %why, "upstream failed before answering");
                let _ = client.write_all(&bad_gateway(upstream, &why)).await;
                return None;
            }
            Err(_) => return None,
        }
    }
}

/// Idle raw connections to preview pods for mirror copies.
#[derive(Default)]
pub struct CopyPool(Mutex<Vec<(SocketAddr, Upstream)>>);

/// At most this many idle copy connections are kept.
const POOL_MAX: usize = 64;

impl CopyPool {
    /// Sends a copy as the bytes the original came in, and reads its answer
    /// to the end (dropping it) so the connection can be reused.
    pub async fn send(self: &Arc<Self>, to: SocketAddr, bytes: &[u8], head: bool) -> Result<(), String> {
        let pooled = {
            // A poisoned lock only means a panic elsewhere; the list is still whole.
            let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|(_, u)| u.usable());
            idle.iter().position(|(a, _)| *a == to).map(|i| idle.swap_remove(i).1)
        };
        let mut conn = match pooled {
            Some(c) => c,
            None => Upstream::connect(to).await.map_err(|e| e.to_string())?,
        };
        conn.io.write_all(bytes).await.map_err(|e| e.to_string())?;
        let mut started = false;
        let close = response(&mut conn.io, &mut conn.buf, &mut tokio::io::sink(), head, &mut started, None)
            .await
            .map_err(|e| format!("{e:?}"))?;
        if !close {
            let mut idle = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < POOL_MAX {
                idle.push((to, conn));
            }
        }
        Ok(())
    }
}
