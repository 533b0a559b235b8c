//! What the CLI prints: tables (coloured on a terminal), and the stable
//! JSON and YAML shapes that scripts parse.

use std::io::IsTerminal;

use clap::ValueEnum;
use serde_json::{Value, json};

use crate::proto;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

pub(super) fn print_envs(envs: &[proto::Environment], output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&envs.iter().map(env_json).collect::<Vec<_>>()).unwrap_or_default()
        ),
        Output::Yaml => {
            print!("{}", serde_yaml::to_string(&envs.iter().map(env_json).collect::<Vec<_>>()).unwrap_or_default())
        }
        Output::Table | Output::Wide => {
            print!("{}", table(envs, output == Output::Wide, colour(), crate::model::now_ms()))
        }
    }
}

/// Colours only on a terminal, and never when NO_COLOR is set (no-color.org).
fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// One row per pod: KEY, POD, TARGET, NAMESPACE, IMAGE, STATUS. With
/// `colour`, STATUS is green when running, red on an error, yellow otherwise.
pub fn table(envs: &[proto::Environment], wide: bool, colour: bool, now_ms: i64) -> String {
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
        if !e.failure.is_empty() {
            // FAILED comes first: it says why the pods may not be what they should.
            let mut r = vec![e.key.clone(), "-".into(), "-".into(), e.namespace.clone(), "-".into()];
            r.push(format!("failed: {}", e.failure));
            if wide {
                r.extend(["-".to_string(), "-".to_string(), "-".to_string()]);
            }
            rows.push(r);
        }
        // Target pods whose agent will not carry this environment's requests.
        for a in e.agents.iter().filter(|a| {
            matches!(
                proto::AgentState::try_from(a.state),
                Ok(proto::AgentState::Failed | proto::AgentState::Capped | proto::AgentState::Foreign)
            )
        }) {
            let state = agent_state_name(a.state);
            let mut r = vec![e.key.clone(), a.pod.clone(), a.target.clone(), e.namespace.clone(), "(agent)".into()];
            r.push(format!("agent {state}: {}", a.reason));
            if wide {
                r.extend(["-".to_string(), "-".to_string(), "-".to_string()]);
            }
            rows.push(r);
        }
        for q in &e.queues {
            let lag = if q.lag < 0 { "?".to_string() } else { q.lag.to_string() };
            let mut r = vec![
                e.key.clone(),
                "(queue)".into(),
                q.target.clone(),
                e.namespace.clone(),
                format!("{} {}", q.mode, q.topic),
                format!("{}: forwarded {}, lag {lag}; target reads {}", q.queue_id, q.forwarded, q.staging_topic),
            ];
            if wide {
                r.extend(["-".to_string(), "-".to_string(), "-".to_string()]);
            }
            rows.push(r);
        }
        for b in &e.db_branches {
            let mut r = vec![
                e.key.clone(),
                "(db)".into(),
                b.source.clone(),
                e.namespace.clone(),
                format!("{} {}", b.r#type, b.copy),
                db_state(b),
            ];
            if wide {
                r.extend(["-".to_string(), "-".to_string(), "-".to_string()]);
            }
            rows.push(r);
        }
        for l in &e.shares {
            let mut r = vec![
                e.key.clone(),
                "(link)".into(),
                format!("service/{}:{}", l.service, l.port),
                e.namespace.clone(),
                l.url.clone(),
                format!("shared by {}", l.created_by),
            ];
            if wide {
                r.extend(["-".to_string(), "-".to_string(), "-".to_string()]);
            }
            rows.push(r);
        }
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
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let cell = format!("{c:<w$}");
                // Escapes go around the padded cell so columns stay aligned.
                match (colour && n > 0 && i == STATUS_COLUMN, c.as_str()) {
                    (false, _) => cell,
                    (true, s) if s.starts_with("running") => format!("\x1b[32m{cell}\x1b[0m"),
                    (true, s) if s.contains(": ") => format!("\x1b[31m{cell}\x1b[0m"),
                    (true, _) => format!("\x1b[33m{cell}\x1b[0m"),
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

const STATUS_COLUMN: usize = 5;

/// An agent state as the table and JSON name it: `routing`, `foreign`…
fn agent_state_name(state: i32) -> String {
    proto::AgentState::try_from(state)
        .map_or("unknown".to_string(), |s| s.as_str_name().trim_start_matches("AGENT_STATE_").to_lowercase())
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
        "failure": (!e.failure.is_empty()).then_some(&e.failure),
        "pods": e.pods.iter().map(|p| json!({
            "name": p.name, "group": p.group, "target": p.target, "container": p.container,
            "image": p.image, "phase": p.phase, "ready": p.ready, "restarts": p.restarts,
            "node": p.node, "ip": p.ip, "reason": p.reason, "lastError": p.last_error,
        })).collect::<Vec<_>>(),
        "agents": e.agents.iter().map(|a| json!({
            "pod": a.pod, "target": a.target, "reason": a.reason,
            "state": agent_state_name(a.state),
        })).collect::<Vec<_>>(),
        "shares": e.shares.iter().map(link_json).collect::<Vec<_>>(),
        "queues": e.queues.iter().map(|q| json!({
            "queueId": q.queue_id, "target": q.target, "topic": q.topic, "originalTopic": q.original_topic,
            "stagingTopic": q.staging_topic, "mode": q.mode, "forwarded": q.forwarded, "lag": q.lag,
        })).collect::<Vec<_>>(),
        "dbBranches": e.db_branches.iter().map(db_json).collect::<Vec<_>>(),
    })
}

/// A branch's phase, size and snapshot age, as one cell.
pub fn db_state(b: &proto::DbBranch) -> String {
    if b.phase == "Failed" {
        return format!("Failed: {}", b.reason);
    }
    let size = if b.size_bytes < 0 { "size ?".to_string() } else { format!("{} KiB", b.size_bytes / 1024) };
    let age = b.snapshot_at.as_ref().map(|t| {
        let secs = (crate::model::now_ms() / 1000 - t.seconds).max(0);
        format!(", snapshot {secs}s old")
    });
    format!("{} {}: {size}{}", b.phase, b.database, age.unwrap_or_default())
}

pub fn db_json(b: &proto::DbBranch) -> Value {
    json!({
        "type": b.r#type, "source": b.source, "server": b.server, "database": b.database, "copy": b.copy,
        "phase": b.phase, "reason": b.reason, "sizeBytes": b.size_bytes, "secret": b.secret,
        "snapshotAt": b.snapshot_at.as_ref().map(|t| t.seconds),
    })
}

pub fn link_json(l: &proto::ShareLink) -> Value {
    let ts = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| t.seconds);
    json!({
        "url": l.url, "key": l.key, "service": l.service, "port": l.port,
        "createdBy": l.created_by, "createdAt": ts(&l.created_at), "expiresAt": ts(&l.expires_at),
    })
}

/// One line per link: URL, environment, Service, who made it, time left.
pub(super) fn print_links(links: &[proto::ShareLink], output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&links.iter().map(link_json).collect::<Vec<_>>()).unwrap_or_default()
        ),
        Output::Yaml => {
            print!("{}", serde_yaml::to_string(&links.iter().map(link_json).collect::<Vec<_>>()).unwrap_or_default())
        }
        Output::Table | Output::Wide => {
            let now = crate::model::now_ms();
            for l in links {
                let left = match &l.expires_at {
                    None => "no expiry".to_string(),
                    Some(t) => format!("{} left", human(((t.seconds * 1000 - now).max(0) / 1000) as u64)),
                };
                println!("{}  key {}  → service/{}:{}  by {}  ({left})", l.url, l.key, l.service, l.port, l.created_by);
            }
        }
    }
}

pub(super) fn event_json(ev: &proto::StatusEvent) -> Value {
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
            agents: vec![
                proto::Agent {
                    pod: "orders-1".into(),
                    target: "deployment/orders".into(),
                    state: proto::AgentState::Routing as i32,
                    reason: String::new(),
                },
                proto::Agent {
                    pod: "pay-1".into(),
                    target: "deployment/pay".into(),
                    state: proto::AgentState::Foreign as i32,
                    reason: "another previewd's agent".into(),
                },
            ],
            ..Default::default()
        };
        let j = env_json(&env);
        assert_eq!(j["agents"][1]["state"], "foreign", "{j}");
        let t = table(std::slice::from_ref(&env), false, false, 3600 * 1000);
        // Only the pod whose agent will not route gets a row, before the pods.
        assert!(t.contains("agent foreign: another previewd's agent") && !t.contains("orders-1"), "{t}");
        let t: String = t.lines().filter(|l| !l.contains("(agent)")).map(|l| format!("{l}\n")).collect();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("KEY  POD"), "{t}");
        assert!(lines[1].contains("running (42m remaining)"), "{t}");
        assert!(lines[2].contains("errimageneverpull: image not present"), "{t}");
        assert!(!t.contains('\x1b'), "{t}");
        let c = table(&[env], false, true, 3600 * 1000);
        assert!(c.contains("\x1b[32mrunning (42m remaining)"), "{c}");
        assert!(c.contains("\x1b[31merrimageneverpull"), "{c}");
        assert!(c.lines().next().is_some_and(|h| !h.contains('\x1b')), "the header stays plain: {c}");
    }
}
