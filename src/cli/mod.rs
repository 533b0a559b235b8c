//! The `preview` command: start, add pods to, watch and clean environments.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage (clap's own).

mod connect;
pub mod creds;
mod output;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use futures::StreamExt;
use serde_json::json;

pub use connect::{AuthChannel, Connection, Kube, PREVIEWD_LABEL};
pub use creds::Credentials;
pub use output::{Output, env_json, table};
use output::{event_json, print_envs};

use crate::model::Ttl;
use crate::proto::preview_service_client::PreviewServiceClient;
use crate::proto::{self, clean_request};

#[derive(Parser, Debug)]
#[command(name = "preview", version, about = "Preview environments: run changed services against staging traffic")]
pub struct Cli {
    /// previewd's gRPC URL. Without it, previewd is found in the cluster of
    /// the current kubeconfig context and reached by a port-forward.
    #[arg(long, global = true, env = "PREVIEW_SERVER")]
    pub server: Option<String>,
    /// Namespace of the in-cluster previewd.
    #[arg(long, global = true, env = "PREVIEW_PREVIEWD_NAMESPACE", default_value = "preview-system")]
    pub previewd_namespace: String,
    /// kubeconfig context [default: the current context].
    #[arg(long, global = true, env = "PREVIEW_CONTEXT")]
    pub context: Option<String>,
    /// kubeconfig file [default: $KUBECONFIG, else ~/.kube/config].
    #[arg(long, global = true, env = "PREVIEW_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The CA that previewd's certificate chains to [default: the ConfigMap
    /// previewd-ca in --previewd-namespace].
    #[arg(long, global = true, env = "PREVIEW_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A bearer token for previewd, instead of the kubeconfig's credentials.
    #[arg(long, global = true, env = "PREVIEW_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
    /// Make a link that opens an environment in a browser (no kubeconfig
    /// needed); --revoke ends one, --list lists them.
    Share(ShareArgs),
    /// Database branches: `db refresh --key K` takes new snapshots.
    #[command(subcommand)]
    Db(DbCommand),
    /// Print the client's and the server's versions.
    Version(VersionArgs),
    /// Print a shell completion script, e.g. `source <(preview completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Take a new snapshot of each source the environment has a branch of:
    /// branches made from then on start from it (existing ones keep their data).
    Refresh {
        #[arg(long)]
        key: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
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
pub struct CleanArgs {
    #[command(flatten)]
    pub selector: CleanSelector,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct CleanSelector {
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub glob: Option<String>,
    #[arg(long)]
    pub all_expired: bool,
}

#[derive(Args, Debug)]
pub struct ShareArgs {
    #[arg(long)]
    pub key: String,
    /// The entry Service [default: the one that selects the environment's target].
    #[arg(long, conflicts_with_all = ["revoke", "list"])]
    pub service: Option<String>,
    /// The Service's port [default: its only port, or the one named http].
    #[arg(long, conflicts_with_all = ["revoke", "list"])]
    pub port: Option<u16>,
    /// How long the link lives [default: as long as the environment].
    #[arg(long, conflicts_with_all = ["revoke", "list"])]
    pub ttl: Option<String>,
    /// Where the "preview has ended" page points (staging's address).
    #[arg(long, conflicts_with_all = ["revoke", "list"])]
    pub staging_url: Option<String>,
    /// End this link (its URL or slug).
    #[arg(long, conflicts_with = "list")]
    pub revoke: Option<String>,
    /// List the environment's links.
    #[arg(long)]
    pub list: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct VersionArgs {
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach previewd through {via}: {why}")]
    Unreachable { via: String, why: String },
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
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "preview", &mut std::io::stdout());
        return Ok(());
    }
    let kube = Kube {
        namespace: cli.previewd_namespace,
        context: cli.context,
        kubeconfig: cli.kubeconfig,
        ca_file: cli.ca_file,
        token: cli.token,
    };
    let conn = connect::connect(cli.server.as_deref(), &kube).await;
    if let Command::Version(a) = cli.command {
        return version(conn, a.output);
    }
    let conn = conn?;
    let client_version = crate::model::VERSION;
    match conn.server_version.as_deref() {
        Some(v) if v == client_version => {}
        v => eprintln!(
            "warning: preview {client_version} talks to previewd {} ({}); upgrade the older one",
            v.unwrap_or("of unknown version"),
            conn.via
        ),
    }
    let mut client = client(conn.channel);
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
        Command::Share(a) => {
            let revoking = a.revoke.is_some();
            let req = proto::ShareRequest {
                key: a.key,
                service: a.service.unwrap_or_default(),
                port: a.port.unwrap_or(0).into(),
                ttl: a.ttl.unwrap_or_default(),
                staging_url: a.staging_url.unwrap_or_default(),
                revoke: a.revoke.unwrap_or_default(),
                list: a.list,
            };
            let links = client.share(req).await?.into_inner().links;
            if revoking && matches!(a.output, Output::Table | Output::Wide) {
                links.iter().for_each(|l| println!("revoked {}", l.url));
            } else {
                output::print_links(&links, a.output);
            }
            Ok(())
        }
        Command::Db(DbCommand::Refresh { key, output }) => {
            let resp = client.refresh_db(proto::RefreshDbRequest { key }).await?.into_inner();
            match output {
                Output::Json | Output::Yaml => {
                    let doc = json!({"branches": resp.branches.iter().map(output::db_json).collect::<Vec<_>>()});
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default()),
                        _ => print!("{}", serde_yaml::to_string(&doc).unwrap_or_default()),
                    }
                }
                Output::Table | Output::Wide => {
                    resp.branches.iter().for_each(|b| println!("refreshed {} ({})", b.source, output::db_state(b)))
                }
            }
            Ok(())
        }
        Command::Clean(a) => {
            let selector = match (a.selector.key, a.selector.glob, a.selector.all_expired) {
                (Some(k), _, _) => clean_request::Selector::Key(k),
                (_, Some(g), _) => clean_request::Selector::Glob(g),
                _ => clean_request::Selector::AllExpired(true),
            };
            let resp = client.clean(proto::CleanRequest { selector: Some(selector) }).await?.into_inner();
            let doc = json!({"removed": resp.removed.iter().map(|r| json!({"key": r.key, "objects": r.objects})).collect::<Vec<_>>()});
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default()),
                Output::Yaml => print!("{}", serde_yaml::to_string(&doc).unwrap_or_default()),
                Output::Table | Output::Wide => {
                    if resp.removed.is_empty() {
                        println!("nothing to clean");
                    }
                    for r in resp.removed {
                        println!("cleaned {} ({} objects)", r.key, r.objects.len());
                        if a.output == Output::Wide {
                            r.objects.iter().for_each(|o| println!("  {o}"));
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Version(_) | Command::Completion { .. } => unreachable!("handled above"),
    }
}

/// The client version always; the server's, or why it is unknown.
fn version(conn: Result<Connection, CliError>, output: Output) -> Result<(), CliError> {
    let client_version = crate::model::VERSION;
    let (server, via, err) = match &conn {
        Ok(c) => (c.server_version.clone(), Some(c.via.clone()), None),
        Err(e) => (None, None, Some(e.to_string())),
    };
    let doc = json!({"client": client_version, "server": server, "via": via});
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default()),
        Output::Yaml => print!("{}", serde_yaml::to_string(&doc).unwrap_or_default()),
        Output::Table | Output::Wide => {
            println!("client: {client_version}");
            if let Some(s) = &server {
                println!("server: {s}");
            }
        }
    }
    match conn {
        Ok(c) if c.server_version.is_none() => {
            Err(CliError::Failed(format!("previewd ({}) sent no version: it is older than 0.1", c.via)))
        }
        Ok(_) => Ok(()),
        Err(_) => Err(CliError::Failed(err.unwrap_or_default())),
    }
}

/// A previewd client over a channel that carries the caller's credentials.
pub type Client = PreviewServiceClient<AuthChannel>;

fn client(channel: AuthChannel) -> Client {
    PreviewServiceClient::new(channel)
}

/// A client for previewd at a URL, with no credentials (a loopback previewd
/// with `--auth none`; tools and tests).
pub async fn connect(server: &str) -> Result<Client, CliError> {
    connect_with(server, &Credentials::default()).await
}

/// A client for previewd at a URL, presenting `creds` and trusting their CA.
pub async fn connect_with(server: &str, creds: &Credentials) -> Result<Client, CliError> {
    Ok(client(connect::connect_with(server, creds).await?.channel))
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

async fn start(client: &mut Client, a: StartArgs) -> Result<(), CliError> {
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
    if matches!(a.output, Output::Table | Output::Wide) {
        println!("key: {}", resp.key);
        for l in resp.environment.iter().flat_map(|e| &e.shares) {
            println!("link: {}", l.url);
        }
    }
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

async fn status(client: &mut Client, a: StatusArgs) -> Result<(), CliError> {
    let key = a.key.or(a.glob).unwrap_or_default();
    let req = proto::StatusRequest { key, namespace: a.namespace.unwrap_or_default(), watch: a.watch };
    let mut stream = client.status(req).await?.into_inner();
    let mut envs: Vec<proto::Environment> = Vec::new();
    let tty = std::io::stdout().is_terminal();
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        if a.watch && (a.output == Output::Json || (!tty && a.output != Output::Yaml)) {
            // One JSON document per line and event, for machines and pipes.
            println!("{}", event_json(&ev));
            continue;
        }
        if a.watch && a.output == Output::Yaml {
            print!("---\n{}", serde_yaml::to_string(&event_json(&ev)).unwrap_or_default());
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
        if a.watch && tty {
            print!("\x1b[2J\x1b[H");
        }
        print_envs(&envs, a.output);
    }
    Ok(())
}
