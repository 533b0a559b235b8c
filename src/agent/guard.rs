//! The guard process (`run`): starts the worker, forwards signals, and
//! removes the worker's rules whatever way it ends; and `cleanup`, which
//! removes rules left when both were killed.

use super::cli::WorkerArgs;
use super::error::AgentError;
use super::intercept::{self, Backend};

/// The guard: starts the worker, forwards SIGTERM/SIGINT, and removes the
/// worker's chain when it exits, however it exits. Returns its exit code.
pub async fn guard(args: WorkerArgs) -> Result<i32, AgentError> {
    let chain = args.chain.clone().unwrap_or_else(intercept::chain_name);
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("worker");
    if !args.ports.is_empty() {
        cmd.arg("--ports").arg(args.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    }
    cmd.arg("--threads")
        .arg(args.runtime.threads.to_string())
        .arg("--listen")
        .arg(args.listen.to_string())
        .arg("--admin")
        .arg(args.admin.to_string())
        .arg("--mirror-max-bytes")
        .arg(args.mirror_max_bytes.to_string())
        .arg("--linger")
        .arg(format!("{}s", args.linger.as_secs()))
        .arg("--chain")
        .arg(&chain);
    if let Some(r) = &args.routes {
        cmd.arg("--routes").arg(r);
    }
    for (flag, v) in [("--server", &args.server), ("--pod", &args.pod), ("--namespace", &args.namespace)] {
        if let Some(v) = v {
            cmd.arg(flag).arg(v);
        }
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            _ = term.recv() => forward_term(pid),
            _ = int.recv() => forward_term(pid),
        }
    };
    // The worker leaves its (empty) chain, so the connections it closed on
    // the way out were still translated; this removes it, however it ended.
    match Backend::detect().and_then(|b| b.remove(&chain)) {
        Ok(()) => tracing::info!(%chain, ?status, "worker ended; rules removed"),
        Err(e) => tracing::error!(%chain, error = %e, "worker ended; removing rules failed"),
    }
    Ok(status.code().unwrap_or(1))
}

fn forward_term(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Removes every agent chain in this namespace; returns their names.
pub fn cleanup() -> Result<Vec<String>, AgentError> {
    Ok(Backend::detect()?.remove_all()?)
}
