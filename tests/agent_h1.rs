//! The agent's HTTP/1 fast path against real sockets on loopback: the proxy
//! in-process (no interception; the test passes the app's address), a hyper
//! app on 127.0.0.1, a preview on 127.0.0.2 at the same port, and, for what
//! hyper will not send, an app that writes scripted bytes. Framing is checked
//! by independent implementations: hyper on both ends, or exact bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use preview::agent::metrics::Metrics;
use preview::agent::proxy::Proxy;
use preview::agent::routes::{RouteTable, SharedRoutes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Requests with credentials that reached a preview (mirror copies must carry none).
static PREVIEW_SAW_CREDENTIALS: AtomicUsize = AtomicUsize::new(0);

/// The app (and, as "preview", the preview pod): `/chunked` streams three
/// chunks, `/echo` streams the request body back, `/empty`
/// answers 204, anything else says who answered and how many body bytes came.
async fn app(name: &'static str, hits: Arc<AtomicUsize>, req: http::Request<Incoming>) -> Result<http::Response<Body>> {
    hits.fetch_add(1, Ordering::SeqCst);
    let creds = ["authorization", "proxy-authorization", "cookie"].iter().any(|h| req.headers().contains_key(*h));
    if name == "preview" && creds {
        PREVIEW_SAW_CREDENTIALS.fetch_add(1, Ordering::SeqCst);
    }
    let path = req.uri().path().to_string();
    Ok(match path.as_str() {
        "/chunked" => {
            let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(b"one,"))),
                Ok(Frame::data(Bytes::from_static(b"two,"))),
                Ok(Frame::data(Bytes::from_static(b"three"))),
            ];
            http::Response::new(StreamBody::new(futures::stream::iter(frames)).boxed())
        }
        "/echo" => http::Response::new(req.into_body().boxed()),
        "/empty" => http::Response::builder().status(204).body(full(""))?,
        _ => {
            let method = req.method().to_string();
            let n = req.into_body().collect().await?.to_bytes().len();
            http::Response::builder().header("x-app", name).body(full(format!("{name} {method} {path} {n}")))?
        }
    })
}

async fn serve_app(addr: SocketAddr, name: &'static str) -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let h = h.clone();
            let svc = hyper::service::service_fn(move |req| app(name, h.clone(), req));
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc));
        }
    });
    Ok((addr, hits))
}

/// The app on 127.0.0.1 and the preview on 127.0.0.2, at the same port (a
/// route's destination is an address; the port is the request's own).
async fn app_and_preview() -> Result<(SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let (app_addr, app_hits) = serve_app(format!("127.0.0.1:{port}").parse()?, "app").await?;
    let (_, preview_hits) = serve_app(format!("127.0.0.2:{port}").parse()?, "preview").await?;
    Ok((app_addr, app_hits, preview_hits))
}

/// The proxy on loopback, sending everything it accepts to `app`.
async fn agent(app: SocketAddr, routes: serde_json::Value) -> Result<(SocketAddr, Arc<Metrics>)> {
    let shared = Arc::new(SharedRoutes::default());
    shared.set(RouteTable::compile(serde_json::from_value(routes)?).map_err(anyhow::Error::msg)?);
    let metrics = Arc::new(Metrics::default());
    let proxy = Proxy::new(shared, metrics.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(proxy.clone().serve(s, app));
        }
    });
    Ok((addr, metrics))
}

type H1 = hyper::client::conn::http1::SendRequest<Body>;

async fn h1(addr: SocketAddr) -> Result<H1> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(TcpStream::connect(addr).await?)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn call(s: &mut H1, req: http::Request<Body>) -> Result<(http::Response<()>, Bytes)> {
    s.ready().await?;
    let resp = s.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    Ok((http::Response::from_parts(parts, ()), body.collect().await?.to_bytes()))
}

fn get(path: &str) -> Result<http::Request<Body>> {
    Ok(http::Request::get(path).header("host", "app").body(full(""))?)
}

/// Waits, bounded at 5 s, until `done` holds; polls every millisecond,
/// yielding to the runtime in between.
async fn wait_for(what: &str, done: impl Fn() -> bool) -> Result<()> {
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        ensure!(tokio::time::Instant::now() < end, "timed out after 5 s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Reads until `want` bytes arrived or the peer closed.
async fn read_n(s: &mut TcpStream, want: usize) -> Result<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < want {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.context("read timed out")??;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn unmatched_requests_keep_their_framing_on_one_connection() -> Result<()> {
    let (app_addr, _) = serve_app("127.0.0.1:0".parse()?, "app").await?;
    let (agent_addr, metrics) = agent(app_addr, serde_json::json!([])).await?;
    let mut s = h1(agent_addr).await?;

    // A chunked response (trailers: see the scripted test).
    let (resp, body) = call(&mut s, get("/chunked")?).await?;
    ensure!(resp.headers().get("transfer-encoding").is_some_and(|v| v == "chunked"), "{resp:?}");
    ensure!(body == "one,two,three", "{body:?}");

    // A 4 MiB chunked upload streamed back while it is still going up.
    let chunk = Bytes::from((0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = (0..64).map(|_| Ok(Frame::data(chunk.clone()))).collect();
    let req = http::Request::post("/echo").body(StreamBody::new(futures::stream::iter(frames)).boxed())?;
    let (_, body) = call(&mut s, req).await?;
    ensure!(body.len() == 64 * chunk.len() && body.chunks(chunk.len()).all(|c| c == chunk), "echo differs");

    // A large download with a content-length, HEAD, and 204 on the same connection.
    let big = "x".repeat(3 << 20);
    let (_, body) = call(&mut s, http::Request::post("/count").body(full(big.clone()))?).await?;
    ensure!(body == format!("app POST /count {}", big.len()), "{body:?}");
    let (resp, body) = call(&mut s, http::Request::head("/x").body(full(""))?).await?;
    ensure!(resp.headers().get("content-length").is_some_and(|v| v == "13") && body.is_empty(), "{resp:?}");
    let (resp, _) = call(&mut s, get("/empty")?).await?;
    ensure!(resp.status() == 204);
    let (_, body) = call(&mut s, get("/after")?).await?;
    ensure!(body == "app GET /after 0", "{body:?}");

    // Pipelined: two requests in one write, answered in order.
    let mut raw = TcpStream::connect(agent_addr).await?;
    raw.write_all(b"GET /p1 HTTP/1.1\r\nhost: a\r\n\r\nPOST /p2 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc")
        .await?;
    let text = read_n(&mut raw, 2 * 100).await?;
    let (a, b) =
        (text.find("app GET /p1 0").context(text.clone())?, text.find("app POST /p2 3").context(text.clone())?);
    ensure!(a < b, "{text}");

    // Expect: 100-continue: the body goes up only after the app's 100.
    let mut raw = TcpStream::connect(agent_addr).await?;
    raw.write_all(b"PUT /up HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n").await?;
    let interim = read_n(&mut raw, 25).await?;
    ensure!(interim.starts_with("HTTP/1.1 100 Continue\r\n\r\n"), "{interim:?}");
    raw.write_all(b"hello").await?;
    let text = read_n(&mut raw, 90).await?;
    ensure!(text.starts_with("HTTP/1.1 200 OK") && text.ends_with("app PUT /up 5"), "{text:?}");

    // Nine requests, each counted once as passed through.
    ensure!(metrics.render().contains("preview_agent_passthrough_total 9\n"), "{}", metrics.render());
    Ok(())
}

/// An app that answers each connection's requests with scripted bytes, one
/// answer per request head it reads, then closes; also returns how many
/// connections it has closed so far.
async fn scripted(answers: Vec<&'static [u8]>) -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let answers = Arc::new(answers);
    let closed = Arc::new(AtomicUsize::new(0));
    let counter = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (answers, closed) = (answers.clone(), counter.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                'answers: for answer in answers.iter() {
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break 'answers,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let end = seen.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
                    seen.drain(..end);
                    if s.write_all(answer).await.is_err() {
                        break;
                    }
                }
                drop(s);
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Ok((addr, closed))
}

#[tokio::test]
async fn close_delimited_answers_closed_app_connections_and_a_down_app() -> Result<()> {
    // A response with no length ends when the app closes; so does the client's connection.
    let (app, _) = scripted(vec![b"HTTP/1.1 200 OK\r\nx-app: raw\r\n\r\nuntil the end"]).await?;
    let (agent_addr, _) = agent(app, serde_json::json!([])).await?;
    let mut raw = TcpStream::connect(agent_addr).await?;
    raw.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await?;
    let text = read_n(&mut raw, usize::MAX).await?;
    ensure!(text.ends_with("\r\n\r\nuntil the end"), "{text:?}");

    // A chunked answer with a trailer and chunk extensions reaches the
    // client byte for byte, and the next answer is framed right after it.
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;x=1\r\none,\r\n5\r\nthree\r\n0\r\nx-checksum: ok\r\n\r\n";
    const NEXT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext";
    let (app, _) = scripted(vec![CHUNKED, NEXT]).await?;
    let (agent_addr, _) = agent(app, serde_json::json!([])).await?;
    let mut raw = TcpStream::connect(agent_addr).await?;
    raw.write_all(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nGET /2 HTTP/1.1\r\nhost: a\r\n\r\n").await?;
    let text = read_n(&mut raw, CHUNKED.len() + NEXT.len()).await?;
    ensure!(text.as_bytes() == [CHUNKED, NEXT].concat(), "{text:?}");

    // The app closes its kept-alive connection after one answer: the next
    // requests on the client's connection go on a fresh one, GET and POST
    // alike. Each is sent once the app has closed (the agent then sees the
    // close before the request; one racing the close is the keep-alive race
    // every HTTP/1 client has, and a POST cannot be replayed).
    let (app, closed) = scripted(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]).await?;
    let (agent_addr, _) = agent(app, serde_json::json!([])).await?;
    let mut s = h1(agent_addr).await?;
    let reqs = [get("/1")?, get("/2")?, http::Request::post("/3").body(full("body"))?, get("/4")?];
    for (i, req) in reqs.into_iter().enumerate() {
        let (resp, body) = call(&mut s, req).await?;
        ensure!(resp.status() == 200 && body == "ok", "{resp:?} {body:?}");
        wait_for("the app to close its connection", || closed.load(Ordering::SeqCst) > i).await?;
    }

    // An app that answers garbage: the client gets a 502 from the agent.
    let (app, _) = scripted(vec![b"SSH-2.0-nope\r\n\r\n"]).await?;
    let (agent_addr, _) = agent(app, serde_json::json!([])).await?;
    let (resp, body) = call(&mut h1(agent_addr).await?, get("/")?).await?;
    ensure!(resp.status() == 502 && resp.headers().get("x-preview-agent").is_some_and(|v| v == "error"), "{resp:?}");
    ensure!(String::from_utf8_lossy(&body).contains("unreachable"), "{body:?}");

    // Nobody listening: hyper takes over and answers 502 too.
    let gone = TcpListener::bind("127.0.0.1:0").await?;
    let down = gone.local_addr()?;
    drop(gone);
    let (agent_addr, _) = agent(down, serde_json::json!([])).await?;
    let (resp, _) = call(&mut h1(agent_addr).await?, get("/")?).await?;
    ensure!(resp.status() == 502, "{resp:?}");
    Ok(())
}

#[tokio::test]
async fn mirror_copies_are_the_original_bytes_and_steal_hands_over_to_hyper() -> Result<()> {
    let (app_addr, app_hits, preview_hits) = app_and_preview().await?;
    let (agent_addr, metrics) = agent(
        app_addr,
        serde_json::json!([
            {"key": "m", "mode": "mirror", "filter": {"key": "m"}, "destination": "127.0.0.2"},
            {"key": "s", "mode": "steal", "filter": {"key": "s"}, "destination": "127.0.0.2"}
        ]),
    )
    .await?;
    let mut s = h1(agent_addr).await?;
    for i in 0..20 {
        let req = http::Request::post(format!("/m{i}")).header("x-preview-key", "m").body(full("12345"))?;
        let (_, body) = call(&mut s, req).await?;
        ensure!(body == format!("app POST /m{i} 5"), "the original must be answered by the app: {body:?}");
    }
    let copies = || preview_hits.load(Ordering::SeqCst);
    wait_for("20 copies at the preview", || copies() >= 20).await.with_context(|| format!("copies: {}", copies()))?;
    ensure!(copies() == 20, "copies: {}", copies());
    // Copies carry no one's credentials: on the fast path (a whole request
    // relayed as bytes) and on hyper's (after a steal hands the connection over).
    for (path, auth) in [("/fast", "Bearer t1"), ("/fast2", "Basic dTpw")] {
        let req = http::Request::post(path)
            .header("x-preview-key", "m")
            .header("authorization", auth)
            .header("cookie", "session=1")
            .body(full("12345"))?;
        let (_, body) = call(&mut s, req).await?;
        ensure!(body == format!("app POST {path} 5"), "{body:?}");
    }
    wait_for("22 copies at the preview", || copies() >= 22).await?;
    let text = metrics.render();
    ensure!(text.contains(r#"preview_agent_requests_total{key="m",action="mirrored"} 22"#), "{text}");

    // On the same connection: unkeyed, stolen, unkeyed again (hyper from here on).
    let before = app_hits.load(Ordering::SeqCst);
    let (_, body) = call(&mut s, get("/a")?).await?;
    ensure!(body == "app GET /a 0", "{body:?}");
    let req = http::Request::get("/b").header("x-preview-key", "s").body(full(""))?;
    let (_, body) = call(&mut s, req).await?;
    ensure!(body == "preview GET /b 0", "{body:?}");
    let (_, body) = call(&mut s, get("/c")?).await?;
    ensure!(body == "app GET /c 0", "{body:?}");
    ensure!(app_hits.load(Ordering::SeqCst) == before + 2);
    let req = http::Request::post("/slow").header("x-preview-key", "m").header("cookie", "s=2").body(full("1"))?;
    let (_, body) = call(&mut s, req).await?;
    ensure!(body == "app POST /slow 1", "{body:?}");
    wait_for("23 copies at the preview", || copies() >= 23).await?;
    let seen = PREVIEW_SAW_CREDENTIALS.load(Ordering::SeqCst);
    ensure!(seen == 0, "{seen} copies reached the preview with credentials");
    Ok(())
}

#[tokio::test]
async fn a_client_silent_past_detection_is_still_routed_and_server_first_protocols_get_their_greeting() -> Result<()> {
    let (app_addr, _, _) = app_and_preview().await?;
    let routes = serde_json::json!([{"key": "s", "mode": "steal", "filter": {"key": "s"}, "destination": "127.0.0.2"}]);
    let (agent_addr, _) = agent(app_addr, routes).await?;
    // A client that writes only after the detection timeout (a busy node)
    // is HTTP all the same: keyed requests on it are routed.
    let s = TcpStream::connect(agent_addr).await?;
    // The stimulus, not a synchronisation: the client stays silent well
    // past the agent's detection timeout before it writes a byte.
    tokio::time::sleep(preview::agent::proxy::DETECT_TIMEOUT * 3).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let req = http::Request::get("/late").header("x-preview-key", "s").body(full(""))?;
    let (_, body) = call(&mut send, req).await?;
    ensure!(body == "preview GET /late 0", "{body:?}");
    let (_, body) = call(&mut send, get("/late")?).await?;
    ensure!(body == "app GET /late 0", "{body:?}");

    // An app that speaks first (SMTP-like): its greeting reaches the silent client.
    let greeter = TcpListener::bind("127.0.0.1:0").await?;
    let greeter_addr = greeter.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = greeter.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if s.write_all(b"220 hello\r\n").await.is_err() {
                    return;
                }
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (agent_addr, metrics) = agent(greeter_addr, serde_json::json!([])).await?;
    let mut raw = TcpStream::connect(agent_addr).await?;
    let greeting = read_n(&mut raw, 11).await?;
    ensure!(greeting == "220 hello\r\n", "{greeting:?}");
    raw.write_all(b"EHLO x\r\n").await?;
    ensure!(read_n(&mut raw, 8).await? == "EHLO x\r\n");
    ensure!(metrics.render().contains("preview_agent_raw_connections_total 1\n"), "{}", metrics.render());
    Ok(())
}
