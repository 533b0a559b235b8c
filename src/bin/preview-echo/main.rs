//! preview-echo: the test and demo application.
//!
//! `serve` answers every request (HTTP/1.1 or h2c) with its version, pod name,
//! method, path and the `baggage` it saw; with `--downstream URL` it first
//! calls that URL, passing `baggage` on (unless `--drop-baggage`), and
//! includes the answer. A downstream call that fails is not retried unless
//! `--retry-downstream` asks for it, so a reset shows; `/stats` counts the
//! downstream calls, their failures and the retries. `get URL` is a tiny
//! client for tests run inside pods. A browser (Accept: text/html) gets a
//! page that calls the chain by `fetch` and over a WebSocket and shows which
//! version answered at each hop. With `KAFKA_TOPIC` set it also consumes
//! that topic and records what it consumed (see `kafka`); with `SQS_QUEUE`
//! or `AMQP_QUEUE`, that queue (see `queues`). With
//! `DATABASE_URL` set, `/db/…` writes and counts rows there (see `db`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

mod db;
mod echo_ws;
mod kafka;
mod page;
mod queues;

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser)]
#[command(name = "preview-echo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of `Serve` costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1 and h2c.
    Serve {
        /// Where to serve; several addresses, comma-separated, serve the same app.
        #[arg(long, env = "ECHO_LISTEN", default_value = "0.0.0.0:8080", value_delimiter = ',')]
        listen: Vec<SocketAddr>,
        /// The version string every answer carries.
        #[arg(long, env = "ECHO_VERSION", default_value = "v1")]
        version: String,
        /// Call this URL for every request and include its answer.
        #[arg(long, env = "ECHO_DOWNSTREAM")]
        downstream: Option<String>,
        /// Do not pass `baggage` on to the downstream call.
        #[arg(long, env = "ECHO_DROP_BAGGAGE")]
        drop_baggage: bool,
        /// Send a downstream GET that got no whole answer (say, on a reset
        /// pooled connection) once more, on a new connection, as Go's and
        /// browsers' clients do. Off by default: a failure shows in the answer and in
        /// `/stats`, instead of being hidden.
        #[arg(long, env = "ECHO_RETRY_DOWNSTREAM")]
        retry_downstream: bool,
        /// Also serve the gRPC Echo service on this address.
        #[arg(long, env = "ECHO_GRPC_LISTEN")]
        grpc_listen: Option<SocketAddr>,
        /// Also echo raw TCP bytes back on this address.
        #[arg(long, env = "ECHO_TCP_ECHO")]
        tcp_echo: Option<SocketAddr>,
        /// Consume this Kafka topic (with the next three).
        #[arg(long, env = "KAFKA_TOPIC")]
        kafka_topic: Option<String>,
        #[arg(long, env = "KAFKA_BROKERS", default_value = "")]
        kafka_brokers: String,
        #[arg(long, env = "KAFKA_GROUP", default_value = "echo")]
        kafka_group: String,
        /// Where to record each consumed record's id and who consumed it
        /// (empty: only logged).
        #[arg(long, env = "KAFKA_RECORD_TOPIC", default_value = "")]
        kafka_record_to: String,
        /// Consume this SQS queue (a name or URL) at `--sqs-endpoint`.
        #[arg(long, env = "SQS_QUEUE")]
        sqs_queue: Option<String>,
        #[arg(long, env = "SQS_ENDPOINT", default_value = "")]
        sqs_endpoint: String,
        /// Where to record each consumed message (empty: only logged).
        #[arg(long, env = "SQS_RECORD_QUEUE", default_value = "")]
        sqs_record_to: String,
        /// Consume this RabbitMQ queue at `--amqp-url`.
        #[arg(long, env = "AMQP_QUEUE")]
        amqp_queue: Option<String>,
        #[arg(long, env = "AMQP_URL", default_value = "")]
        amqp_url: String,
        /// Where to record each consumed message (empty: only logged).
        #[arg(long, env = "AMQP_RECORD_QUEUE", default_value = "")]
        amqp_record_to: String,
        /// A PostgreSQL URL: `/db/write?table=T` adds a row to T (its
        /// columns' defaults), `/db/count` counts each table's rows.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
    /// Send Kafka records (the topic is made if missing): ids in an `id` header.
    KafkaSend {
        #[arg(long, env = "KAFKA_BROKERS")]
        brokers: String,
        #[arg(long)]
        topic: String,
        /// Extra headers, `Name: value`.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value_t = 1)]
        first_id: u64,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Send SQS messages (the queue is made if missing): ids in an `id` attribute.
    SqsSend {
        #[arg(long, env = "SQS_ENDPOINT")]
        endpoint: String,
        #[arg(long)]
        queue: String,
        /// Extra attributes, `Name: value`.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value_t = 1)]
        first_id: u64,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Publish RabbitMQ messages to a queue (made if missing): ids in an `id` header.
    AmqpSend {
        #[arg(long, env = "AMQP_URL")]
        url: String,
        #[arg(long)]
        queue: String,
        /// Extra headers, `Name: value`.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        #[arg(long, default_value_t = 1)]
        first_id: u64,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Print this network namespace's outbound IPv4 address (no packet is sent).
    Whoami,
    /// GET a URL and print the body; exits 1 on a non-2xx answer.
    Get {
        url: String,
        /// Extra request headers, `Name: value`.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
}

/// Counters that `/stats` reports.
#[derive(Default)]
struct Stats {
    /// Requests answered, not counting `/stats` or the kubelet's `/healthz`.
    served: AtomicU64,
    /// Downstream GETs sent, retries included (probes' too: `/healthz`
    /// calls downstream like any request).
    downstream_calls: AtomicU64,
    /// Downstream GETs that got no answer (refused, reset, closed) or a
    /// non-2xx one, retried or not.
    downstream_failures: AtomicU64,
    /// Downstream GETs sent again after a failure (`--retry-downstream`).
    retries: AtomicU64,
}

struct App {
    stats: Stats,
    version: String,
    pod: String,
    downstream: Option<String>,
    database_url: Option<String>,
    drop_baggage: bool,
    retry_downstream: bool,
    client: Client<HttpConnector, Full<Bytes>>,
    /// For the retry: never pooled, so it cannot pick another dead connection.
    fresh: Client<HttpConnector, Full<Bytes>>,
}

impl App {
    /// One downstream GET on `client`, counted in `/stats`: the answer's
    /// status and body, or Err when no whole answer came back.
    async fn get_downstream(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        url: &str,
        baggage: &[String],
    ) -> Result<(hyper::StatusCode, Bytes), String> {
        self.stats.downstream_calls.fetch_add(1, Ordering::Relaxed);
        let mut b = Request::get(url);
        if !self.drop_baggage {
            for v in baggage {
                b = b.header("baggage", v.as_str());
            }
        }
        let got = match b.body(Full::new(Bytes::new())) {
            Ok(r) => match client.request(r).await {
                Ok(resp) => {
                    let status = resp.status();
                    resp.into_body().collect().await.map(|b| (status, b.to_bytes())).map_err(|e| error_chain(&e))
                }
                Err(e) => Err(error_chain(&e)),
            },
            Err(e) => Err(e.to_string()),
        };
        if !got.as_ref().is_ok_and(|(status, _)| status.is_success()) {
            self.stats.downstream_failures.fetch_add(1, Ordering::Relaxed);
        }
        got
    }
}

impl App {
    /// Opens the downstream's WebSocket (`<downstream>ws`), passing `baggage` on.
    async fn downstream_ws(&self, url: &str, baggage: &[String]) -> Result<hyper::upgrade::Upgraded, String> {
        let url = format!("{}/ws", url.trim_end_matches('/'));
        let mut b = Request::get(url.as_str())
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "cHJldmlldy1lY2hvLWhvcA==");
        if !self.drop_baggage {
            for v in baggage {
                b = b.header("baggage", v.as_str());
            }
        }
        let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let resp = self.fresh.request(req).await.map_err(|e| error_chain(&e))?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            return Err(format!("{url}: {}", resp.status()));
        }
        hyper::upgrade::on(resp).await.map_err(|e| e.to_string())
    }
}

/// An error and its sources, `: `-separated (hyper's own message alone is
/// only "client error (SendRequest)"; the cause, say a reset, is below it).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn unpooled_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http()
}

async fn handle(app: Arc<App>, mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // WebSocket: 101, then the version as the first frame, then echo. With
    // a downstream, the downstream's WebSocket is spliced in after that
    // frame: each hop's version arrives in order, and the last one echoes.
    if let Some(key) = req.headers().get("sec-websocket-key").and_then(|k| k.to_str().ok()).map(echo_ws::accept_key) {
        app.stats.served.fetch_add(1, Ordering::Relaxed);
        let upgrade = hyper::upgrade::on(&mut req);
        let version = app.version.clone();
        let baggage: Vec<String> =
            req.headers().get_all("baggage").iter().filter_map(|v| v.to_str().ok().map(String::from)).collect();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(up) = upgrade.await else { return };
            let mut io = TokioIo::new(up);
            if echo_ws::write_text(&mut io, version.as_bytes()).await.is_err() {
                return;
            }
            if let Some(url) = &app.downstream {
                match app.downstream_ws(url, &baggage).await {
                    Ok(down) => {
                        let _ = tokio::io::copy_bidirectional(&mut io, &mut TokioIo::new(down)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = echo_ws::write_text(&mut io, format!("downstream: {e}").as_bytes()).await;
                    }
                }
            }
            while let Ok(Some(msg)) = echo_ws::read_frame(&mut io).await {
                if echo_ws::write_text(&mut io, &msg).await.is_err() {
                    break;
                }
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert("upgrade", hyper::header::HeaderValue::from_static("websocket"));
        h.insert("connection", hyper::header::HeaderValue::from_static("Upgrade"));
        if let Ok(v) = hyper::header::HeaderValue::from_str(&key) {
            h.insert("sec-websocket-accept", v);
        }
        return Ok(resp);
    }
    let path = req.uri().path();
    // /stats: how many requests this instance answered, not counting /stats
    // or the kubelet's /healthz probes; its downstream calls, how many of
    // them failed, and how many were retried.
    if path == "/stats" {
        let s = &app.stats;
        let body = serde_json::json!({
            "version": app.version,
            "served": s.served.load(Ordering::Relaxed),
            "downstream_calls": s.downstream_calls.load(Ordering::Relaxed),
            "downstream_failures": s.downstream_failures.load(Ordering::Relaxed),
            "retries": s.retries.load(Ordering::Relaxed),
            "retry_downstream": app.retry_downstream,
        });
        return Ok(Response::new(Full::new(Bytes::from(body.to_string() + "\n"))));
    }
    if path != "/healthz" {
        app.stats.served.fetch_add(1, Ordering::Relaxed);
    }
    // /login: a redirect and a cookie addressed to the host asked for, as
    // an app behind a name does (a share link must keep both working).
    if path == "/login" {
        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_string();
        let domain = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h).to_string();
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = hyper::StatusCode::FOUND;
        let h = resp.headers_mut();
        if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("http://{host}/welcome")) {
            h.insert("location", v);
        }
        if let Ok(v) =
            hyper::header::HeaderValue::from_str(&format!("session={}; Domain={domain}; Path=/", app.version))
        {
            h.insert("set-cookie", v);
        }
        return Ok(resp);
    }
    if let Some(what) = path.strip_prefix("/db/") {
        let query = req.uri().query().unwrap_or_default().to_string();
        let (status, body) = db::handle(app.database_url.as_deref(), what, &query).await;
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
        *resp.status_mut() = status;
        return Ok(resp);
    }
    // A browser's page load: the demo page, which calls the chain itself.
    let wants_html = req.headers().get("accept").and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    if wants_html && req.method() == hyper::Method::GET {
        let page = page::render(&app.version, &app.pod);
        let mut resp = Response::new(Full::new(Bytes::from(page)));
        resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("text/html; charset=utf-8"));
        return Ok(resp);
    }
    // /bytes/N: a large download.
    if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
        let mut resp = Response::new(Full::new(Bytes::from(vec![b'x'; n.min(64 << 20)])));
        resp.headers_mut().insert(
            "x-version",
            hyper::header::HeaderValue::from_str(&app.version).unwrap_or(hyper::header::HeaderValue::from_static("?")),
        );
        return Ok(resp);
    }
    let baggage: Vec<String> =
        req.headers().get_all("baggage").iter().filter_map(|v| v.to_str().ok().map(String::from)).collect();
    let method = req.method().to_string();
    let path = req.uri().path_and_query().map_or("/".to_string(), |p| p.to_string());
    let proto = format!("{:?}", req.version());
    let body_len = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    let mut answer = serde_json::json!({
        "version": app.version, "pod": app.pod, "method": method, "path": path,
        "protocol": proto, "baggage": baggage, "body_bytes": body_len,
    });
    if let Some(url) = &app.downstream {
        let mut sent = app.get_downstream(&app.client, url, &baggage).await;
        // Only when asked: a GET is idempotent, so like Go's and browsers'
        // clients, send it once more, on a new connection, when a pooled one
        // turned out to be dead (reset by a peer: connections open to a pod
        // when an agent attaches are). Off, the failure shows in the answer;
        // either way /stats counts it.
        if sent.is_err() && app.retry_downstream {
            app.stats.retries.fetch_add(1, Ordering::Relaxed);
            sent = app.get_downstream(&app.fresh, url, &baggage).await;
        }
        let down = match sent {
            Ok((status, body)) => serde_json::from_slice(&body).unwrap_or_else(
                |_| serde_json::json!({"status": status.as_u16(), "raw": String::from_utf8_lossy(&body)}),
            ),
            Err(e) => serde_json::json!({"error": e}),
        };
        answer["downstream"] = down;
    }
    let mut resp = Response::new(Full::new(Bytes::from(answer.to_string() + "\n")));
    resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(resp)
}

async fn serve(app: App, listen: Vec<SocketAddr>) -> anyhow::Result<()> {
    let app = Arc::new(app);
    let mut servers = tokio::task::JoinSet::new();
    for addr in listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        eprintln!("preview-echo {} listening on {addr}", app.version);
        servers.spawn(accept(app.clone(), listener));
    }
    // Each accept loop ends only on an error; the first one ends the app.
    servers.join_next().await.context("no --listen address")??
}

async fn accept(app: Arc<App>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        // Like Go's, tonic's and Node's servers: no Nagle delay on answers.
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(app.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // Errors here are per-connection (client went away); nothing to do.
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
        });
    }
}

struct GrpcEcho {
    version: String,
}

#[tonic::async_trait]
impl preview::proto::echo::echo_server::Echo for GrpcEcho {
    async fn unary(
        &self,
        req: tonic::Request<preview::proto::echo::EchoRequest>,
    ) -> Result<tonic::Response<preview::proto::echo::EchoReply>, tonic::Status> {
        let message = req.into_inner().message;
        Ok(tonic::Response::new(preview::proto::echo::EchoReply { message, version: self.version.clone(), index: 0 }))
    }

    type StreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<preview::proto::echo::EchoReply, tonic::Status>> + Send>>;

    async fn stream(
        &self,
        req: tonic::Request<preview::proto::echo::EchoRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let req = req.into_inner();
        let version = self.version.clone();
        let replies = (0..req.count.min(1000)).map(move |index| {
            Ok(preview::proto::echo::EchoReply { message: req.message.clone(), version: version.clone(), index })
        });
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(replies))))
    }
}

/// `-H Name: value` arguments.
fn name_values(headers: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    headers
        .iter()
        .map(|h| {
            let (n, v) = h.split_once(':').with_context(|| format!("-H {h:?}: expected `Name: value`"))?;
            Ok((n.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // With no arguments (an image's bare entrypoint) it serves.
    let mut args: Vec<String> = std::env::args().collect();
    if args.len() == 1 {
        args.push("serve".into());
    }
    match Cli::parse_from(args).cmd {
        Cmd::Serve {
            listen,
            version,
            downstream,
            drop_baggage,
            retry_downstream,
            tcp_echo,
            grpc_listen,
            kafka_topic,
            kafka_brokers,
            kafka_group,
            kafka_record_to,
            sqs_queue,
            sqs_endpoint,
            sqs_record_to,
            amqp_queue,
            amqp_url,
            amqp_record_to,
            database_url,
        } => {
            let by = std::env::var("PREVIEW_KEY").unwrap_or_else(|_| "staging".into());
            let pod = std::env::var("HOSTNAME").unwrap_or_default();
            let consumers: Vec<_> = [
                sqs_queue.map(|queue| (true, queue, sqs_endpoint, sqs_record_to)),
                amqp_queue.map(|queue| (false, queue, amqp_url, amqp_record_to)),
            ]
            .into_iter()
            .flatten()
            .map(|(sqs_mode, queue, endpoint, record_to)| {
                let s = queues::Settings { endpoint, queue, record_to, by: by.clone(), pod: pod.clone() };
                tokio::spawn(queues::run(s, sqs_mode))
            })
            .collect();
            if !consumers.is_empty() {
                tokio::spawn(async move {
                    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                        return;
                    };
                    term.recv().await;
                    queues::STOP.store(true, std::sync::atomic::Ordering::SeqCst);
                    // The batch in hand is recorded and deleted (or acked) first.
                    futures::future::join_all(consumers).await;
                    std::process::exit(0);
                });
            }
            if let Some(topic) = kafka_topic {
                let settings = kafka::Settings {
                    brokers: kafka_brokers,
                    topic,
                    group: kafka_group,
                    record_to: kafka_record_to,
                    by: std::env::var("PREVIEW_KEY").unwrap_or_else(|_| "staging".into()),
                    pod: std::env::var("HOSTNAME").unwrap_or_default(),
                };
                let consumer = std::thread::spawn(move || kafka::run(settings));
                tokio::spawn(async move {
                    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                        return;
                    };
                    term.recv().await;
                    kafka::STOP.store(true, std::sync::atomic::Ordering::SeqCst);
                    // The transaction in flight ends, then the consumer leaves.
                    let _ = tokio::task::spawn_blocking(move || consumer.join()).await;
                    std::process::exit(0);
                });
            }
            if let Some(addr) = grpc_listen {
                let svc = preview::proto::echo::echo_server::EchoServer::new(GrpcEcho { version: version.clone() });
                let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(svc)
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
                );
            }
            if let Some(addr) = tcp_echo {
                let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = l.accept().await {
                        tokio::spawn(async move {
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                });
            }
            let pod = std::env::var("HOSTNAME").unwrap_or_default();
            let app = App {
                stats: Stats::default(),
                version,
                pod,
                downstream,
                database_url,
                drop_baggage,
                retry_downstream,
                client: client(),
                fresh: unpooled_client(),
            };
            serve(app, listen).await
        }
        Cmd::KafkaSend { brokers, topic, headers, first_id, count } => {
            kafka::send(&brokers, &topic, &name_values(&headers)?, first_id, count).await
        }
        Cmd::SqsSend { endpoint, queue, headers, first_id, count } => {
            queues::send(true, &endpoint, &queue, &name_values(&headers)?, first_id, count).await
        }
        Cmd::AmqpSend { url, queue, headers, first_id, count } => {
            queues::send(false, &url, &queue, &name_values(&headers)?, first_id, count).await
        }
        Cmd::Whoami => {
            // connect() on UDP only picks a route and source address.
            let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
            sock.connect("198.19.0.1:53").context("no route to the service network")?;
            println!("{}", sock.local_addr()?.ip());
            Ok(())
        }
        Cmd::Get { url, headers } => {
            let mut b = Request::get(url.as_str());
            for h in &headers {
                let (n, v) = h.split_once(':').with_context(|| format!("-H {h:?}: expected `Name: value`"))?;
                b = b.header(n.trim(), v.trim());
            }
            let resp =
                client().request(b.body(Full::new(Bytes::new()))?).await.with_context(|| format!("GET {url}"))?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            print!("{}", String::from_utf8_lossy(&body));
            anyhow::ensure!(status.is_success(), "GET {url}: {status}");
            Ok(())
        }
    }
}
