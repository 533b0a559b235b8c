//! The `preview` command: start, add pods to, watch and clean environments.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage (clap's own).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::config::Ttl;
use crate::proto::preview_service_client::PreviewServiceClient;
use crate::proto::{self, clean_request};

#[derive(Parser, Debug)]
#[command(name = "preview", version, about = "Preview environments: run changed services against staging traffic")]
pub struct Cli {
    /// previewd's gRPC address.
    #[arg(long, global = true, env = "PREVIEW_SERVER", default_value = "http://127.0.0.1:7443")]
    pub server: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start an environment (or add/update pods in an existing key).
    Start(StartArgs),
    /// Add a pod to an existing environment, or replace the one with the same name.
    AddPod(AddPodArgs),
    /// Show environments; --watch streams changes.
    Status(StatusArgs),
    /// Remove environments and everything created for them.
    Clean(CleanArgs),
}

#[derive(Args, Debug)]
pub struct PodArgs {
    /// Config file (JSON or YAML, mirrord's shape).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Image of the preview container.
    #[arg(long)]
    pub image: Option<String>,
    /// Target, e.g. deployment/orders[/container/app], or targetless.
    #[arg(long)]
    pub target: Option<String>,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Name of the pod within the environment.
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    pub pod: PodArgs,
    #[arg(long)]
    pub key: Option<String>,
    /// 30m, 2h, infinite…
    #[arg(long)]
    pub ttl: Option<String>,
    /// How long to wait for the pods to be ready (0 = don't wait).
    #[arg(long, default_value = "120s")]
    pub timeout: String,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct AddPodArgs {
    #[arg(long)]
    pub key: String,
    #[command(flatten)]
    pub pod: PodArgs,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, conflicts_with = "glob")]
    pub key: Option<String>,
    #[arg(long)]
    pub glob: Option<String>,
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    #[arg(short = 'w', long)]
    pub watch: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct CleanArgs {
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub glob: Option<String>,
    #[arg(long)]
    pub all_expired: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach previewd at {server}: {source} (set --server or PREVIEW_SERVER)")]
    Connect { server: String, source: tonic::transport::Error },
    #[error("{0}")]
    Rpc(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Rpc(format!("{:?}: {}", s.code(), s.message()))
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let mut client = connect(&cli.server).await?;
    match cli.command {
        Command::Start(a) => start(&mut client, a).await,
        Command::AddPod(a) => {
            let pod = pod_request(&a.pod)?;
            let resp = client.add_pod(proto::AddPodRequest { key: a.key, pod: Some(pod) }).await?.into_inner();
            for w in &resp.warnings {
                eprintln!("warning: {w}");
            }
            print_envs(resp.environment.as_slice(), a.output);
            Ok(())
        }
        Command::Status(a) => status(&mut client, a).await,
        Command::Clean(a) => {
            let selector = match (a.key, a.glob, a.all_expired) {
                (Some(k), _, _) => clean_request::Selector::Key(k),
                (_, Some(g), _) => clean_request::Selector::Glob(g),
                _ => clean_request::Selector::AllExpired(true),
            };
            let resp = client.clean(proto::CleanRequest { selector: Some(selector) }).await?.into_inner();
            if resp.removed.is_empty() {
                println!("nothing to clean");
            }
            for r in resp.removed {
                println!("cleaned {} ({} objects)", r.key, r.objects.len());
            }
            Ok(())
        }
    }
}

pub async fn connect(server: &str) -> Result<PreviewServiceClient<Channel>, CliError> {
    let endpoint = Channel::from_shared(server.to_string())
        .map_err(|e| CliError::Usage(format!("--server {server:?} is not a URL: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        // Snapshots of many environments are large: a 64 KiB HTTP/2 window
        // would cost several round trips each.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20));
    let channel = endpoint.connect().await.map_err(|source| CliError::Connect { server: server.into(), source })?;
    Ok(PreviewServiceClient::new(channel))
}

fn pod_request(a: &PodArgs) -> Result<proto::PodRequest, CliError> {
    let config = match &a.file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| CliError::Usage(format!("-f {}: {e}", f.display())))?,
        None => String::new(),
    };
    Ok(proto::PodRequest {
        config,
        image: a.image.clone().unwrap_or_default(),
        target: a.target.clone().unwrap_or_default(),
        namespace: a.namespace.clone().unwrap_or_default(),
        name: a.name.clone().unwrap_or_default(),
    })
}

async fn start(client: &mut PreviewServiceClient<Channel>, a: StartArgs) -> Result<(), CliError> {
    let timeout = match Ttl::parse("--timeout", &a.timeout) {
        Ok(Ttl::Finite(d)) => Some(d),
        _ if a.timeout.trim() == "0" => None,
        _ => return Err(CliError::Usage(format!("--timeout {:?}: expected e.g. 90s or 0", a.timeout))),
    };
    let req = proto::StartRequest {
        pods: vec![pod_request(&a.pod)?],
        key: a.key.unwrap_or_default(),
        ttl: a.ttl.unwrap_or_default(),
    };
    let resp = client.start(req).await?.into_inner();
    println!("key: {}", resp.key);
    for w in &resp.warnings {
        eprintln!("warning: {w}");
    }
    let Some(timeout) = timeout else {
        print_envs(resp.environment.as_slice(), a.output);
        return Ok(());
    };
    let progress = std::io::stdout().is_terminal();
    let watch = client.status(proto::StatusRequest { key: resp.key.clone(), namespace: String::new(), watch: true });
    let mut stream = watch.await?.into_inner();
    let mut last = String::new();
    let wait = async {
        while let Some(ev) = stream.next().await {
            let ev = ev?;
            let Some(env) = ev.environments.into_iter().find(|e| e.key == resp.key) else { continue };
            let line = env.pods.iter().map(|p| format!("{} {}", p.name, p.reason)).collect::<Vec<_>>().join(", ");
            if progress && line != last {
                eprintln!("  {line}");
                last = line;
            }
            if !env.pending && !env.pods.is_empty() && env.pods.iter().all(|p| p.ready) {
                return Ok(env);
            }
            if let Some(p) = env.pods.iter().find(|p| is_fatal(&p.reason)) {
                return Err(CliError::Failed(format!(
                    "pod {} cannot start: {}",
                    p.name,
                    if p.last_error.is_empty() { &p.reason } else { &p.last_error }
                )));
            }
        }
        Err(CliError::Failed("status stream ended before the pods were ready".into()))
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(env)) => {
            print_envs(&[env], a.output);
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CliError::Failed(format!(
            "pods not ready after {}; see `preview status --key {}`",
            a.timeout, resp.key
        ))),
    }
}

/// Waiting reasons that will not clear up by themselves.
fn is_fatal(reason: &str) -> bool {
    matches!(
        reason,
        "ErrImageNeverPull"
            | "ImagePullBackOff"
            | "ErrImagePull"
            | "InvalidImageName"
            | "CrashLoopBackOff"
            | "CreateContainerConfigError"
    )
}

async fn status(client: &mut PreviewServiceClient<Channel>, a: StatusArgs) -> Result<(), CliError> {
    let key = a.key.or(a.glob).unwrap_or_default();
    let req = proto::StatusRequest { key, namespace: a.namespace.unwrap_or_default(), watch: a.watch };
    let mut stream = client.status(req).await?.into_inner();
    let mut envs: Vec<proto::Environment> = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        if a.watch && matches!(a.output, Output::Json | Output::Yaml) {
            // One JSON document per event, for machines.
            println!("{}", event_json(&ev));
            continue;
        }
        if ev.kind == proto::EventKind::Snapshot as i32 {
            envs = ev.environments;
        } else {
            for e in ev.environments {
                envs.retain(|x| x.key != e.key);
                if ev.kind != proto::EventKind::Expired as i32 && ev.kind != proto::EventKind::Cleaned as i32 {
                    envs.push(e);
                }
            }
            envs.sort_by(|a, b| a.key.cmp(&b.key));
        }
        if a.watch && std::io::stdout().is_terminal() {
            print!("\x1b[2J\x1b[H");
        }
        print_envs(&envs, a.output);
    }
    Ok(())
}

fn print_envs(envs: &[proto::Environment], output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&envs.iter().map(env_json).collect::<Vec<_>>()).unwrap_or_default()
        ),
        Output::Yaml => {
            print!("{}", serde_yaml::to_string(&envs.iter().map(env_json).collect::<Vec<_>>()).unwrap_or_default())
        }
        Output::Table | Output::Wide => print!("{}", table(envs, output == Output::Wide, crate::manager::now_ms())),
    }
}

/// One row per pod: KEY, POD, TARGET, NAMESPACE, IMAGE, STATUS.
pub fn table(envs: &[proto::Environment], wide: bool, now_ms: i64) -> String {
    let mut rows = vec![{
        let mut h = vec!["KEY", "POD", "TARGET", "NAMESPACE", "IMAGE", "STATUS"];
        if wide {
            h.extend(["NODE", "IP", "RESTARTS"]);
        }
        h.into_iter().map(String::from).collect::<Vec<_>>()
    }];
    for e in envs {
        let remaining = match &e.expires_at {
            None => "no expiry".to_string(),
            Some(t) => {
                let left = (t.seconds * 1000 - now_ms).max(0) / 1000;
                format!("{} remaining", human(left as u64))
            }
        };
        for p in &e.pods {
            let status = if p.ready {
                format!("running ({remaining})")
            } else if p.last_error.is_empty() {
                format!("{} ({remaining})", p.reason.to_lowercase())
            } else {
                format!("{}: {}", p.reason.to_lowercase(), p.last_error)
            };
            let mut r =
                vec![e.key.clone(), p.name.clone(), p.target.clone(), e.namespace.clone(), p.image.clone(), status];
            if wide {
                r.extend([p.node.clone(), p.ip.clone(), p.restarts.to_string()]);
            }
            rows.push(r);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The stable JSON shape of an environment (documented in README).
pub fn env_json(e: &proto::Environment) -> Value {
    let ts = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds);
    json!({
        "key": e.key,
        "namespace": e.namespace,
        "mode": if e.mode == proto::Mode::Mirror as i32 { "mirror" } else { "steal" },
        "createdAt": ts(&e.created_at),
        "expiresAt": ts(&e.expires_at),
        "pending": e.pending,
        "pods": e.pods.iter().map(|p| json!({
            "name": p.name, "group": p.group, "target": p.target, "container": p.container,
            "image": p.image, "phase": p.phase, "ready": p.ready, "restarts": p.restarts,
            "node": p.node, "ip": p.ip, "reason": p.reason, "lastError": p.last_error,
        })).collect::<Vec<_>>(),
    })
}

fn event_json(ev: &proto::StatusEvent) -> Value {
    let kind = proto::EventKind::try_from(ev.kind).map_or("unknown".to_string(), |k| k.as_str_name().to_string());
    json!({
        "kind": kind.trim_start_matches("EVENT_KIND_").to_lowercase(),
        "sequence": ev.sequence,
        "environments": ev.environments.iter().map(env_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows() {
        let env = proto::Environment {
            key: "k1".into(),
            namespace: "shop".into(),
            expires_at: Some(prost_types::Timestamp { seconds: 3600 + 42 * 60, nanos: 0 }),
            pods: vec![
                proto::Pod {
                    name: "orders-k1-abcde".into(),
                    target: "deployment/orders".into(),
                    image: "o:v2".into(),
                    ready: true,
                    reason: "Ready".into(),
                    ..Default::default()
                },
                proto::Pod {
                    name: "pay-k1-abcde".into(),
                    target: "deployment/pay".into(),
                    image: "p:v9".into(),
                    reason: "ErrImageNeverPull".into(),
                    last_error: "image not present".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let t = table(&[env], false, 3600 * 1000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("KEY  POD"), "{t}");
        assert!(lines[1].contains("running (42m remaining)"), "{t}");
        assert!(lines[2].contains("errimageneverpull: image not present"), "{t}");
    }
}
