//! The worker: binds, installs the interception rules, routes every
//! connection through the proxy, follows route changes (ports included),
//! lingers idle with no redirect while no route is left (so the next
//! environment on the target reuses it), and removes its rules when it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::cli::WorkerArgs;
use super::error::AgentError;
use super::intercept::{self, Backend, Direction};
use super::metrics::Metrics;
use super::proxy::Proxy;
use super::routes::{RouteTable, SharedRoutes};
use super::sockdiag;
use super::source::RouteSource;
use crate::model::{Route, now_ms};

/// The worker: listens, installs the rules, routes until SIGTERM, drops its
/// redirects while no route is left, and exits once idle for `--linger`.
pub async fn worker(args: WorkerArgs) -> Result<(), AgentError> {
    let chain = args.chain.clone().unwrap_or_else(intercept::chain_name);
    // Bind first: if another agent holds the port, touch nothing.
    let listener =
        TcpListener::bind(args.listen).await.map_err(|source| AgentError::Bind { addr: args.listen, source })?;
    let admin = TcpListener::bind(args.admin).await.map_err(|source| AgentError::Bind { addr: args.admin, source })?;
    let now = now_ms();
    let mut source = RouteSource::new(&args).await?;
    let first = source.initial.take().unwrap_or_default();
    let initial = RouteTable::compile(first).map_err(|message| AgentError::Routes { path: source.name(), message })?;
    let initial = RouteTable::compile(initial.live(now))
        .map_err(|message| AgentError::Routes { path: source.name(), message })?;
    if initial.is_empty() {
        tracing::info!("no live routes; nothing to do");
        return Ok(());
    }
    let routes = Arc::new(SharedRoutes::default());
    routes.set(initial);
    let metrics = Arc::new(Metrics::default());
    let proxy = Proxy::with_mirror_budget(
        routes.clone(),
        metrics.clone(),
        usize::try_from(args.mirror_max_bytes).unwrap_or(usize::MAX),
    );

    let mut ports = wanted_ports(&args.ports, &routes.get());
    if ports.is_empty() {
        return Err(AgentError::Routes {
            path: source.name(),
            message: "no ports: give --ports or routes with ports".into(),
        });
    }
    let backend = Backend::detect()?;
    let stale = backend.remove_all()?;
    if !stale.is_empty() {
        tracing::warn!(?stale, "removed rules left by a dead agent");
    }
    backend.install(&chain, &Direction::Inbound(ports.clone()), args.listen.port())?;
    ports.iter().for_each(|p| take_over(*p));
    tracing::info!(%chain, ?ports, listen = %args.listen, "intercepting");

    tokio::spawn(serve_admin(admin, routes.clone(), metrics.clone()));
    tokio::spawn(async move {
        loop {
            let (stream, _) = crate::net::accept(&listener).await;
            let app = match intercept::original_dst(&stream) {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "no original destination; dropping connection");
                    continue;
                }
            };
            tokio::spawn(proxy.clone().serve(stream, app));
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // Under a guard: if the guard dies, we are reparented; clean up and go.
    let guard_pid = args.chain.is_some().then(std::os::unix::process::parent_id);
    // Set while no route is left: the rules are gone and we wait, up to
    // --linger, for the target to be previewed again.
    let mut idle_since: Option<Instant> = None;
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = tick.tick() => {
                if guard_pid.is_some_and(|p| p != std::os::unix::process::parent_id()) {
                    break "guard died";
                }
                let now = now_ms();
                let current = routes.get();
                // New routes if the source has some; either way, drop expired ones.
                let next: Vec<Route> = match source.poll() {
                    Some(r) => r.into_iter().filter(|r| r.expires_at_ms.is_none_or(|t| t > now)).collect(),
                    None => current.live(now),
                };
                if next.len() != current.routes.len() || next.iter().zip(&current.routes).any(|(a, b)| *a != b.route) {
                    match RouteTable::compile(next) {
                        Ok(t) => {
                            tracing::info!(routes = t.routes.len(), "routes updated");
                            routes.set(t);
                        }
                        Err(e) => tracing::warn!(error = %e, "bad routes; keeping the previous ones"),
                    }
                }
                let table = routes.get();
                // No route: no rule, so staging pays nothing while we linger.
                // Connections already through us go on, passed through.
                let want = if table.is_empty() { Vec::new() } else { wanted_ports(&args.ports, &table) };
                if want != ports {
                    let (b, c, to) = (backend.clone(), chain.clone(), args.listen.port());
                    let (old, new) = (ports.clone(), want.clone());
                    // iptables and conntrack block: keep them off the data-plane thread.
                    let changed = tokio::task::spawn_blocking(move || set_ports(&b, &c, &old, &new, to))
                        .await
                        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                    match changed {
                        Ok(()) => {
                            if want.is_empty() {
                                tracing::info!(linger = ?args.linger, "no routes left; redirects removed, idle");
                            } else {
                                tracing::info!(ports = ?want, "intercepted ports changed");
                            }
                            ports = want;
                        }
                        Err(e) => tracing::warn!(error = %e, "changing the intercepted ports failed; keeping the old ones"),
                    }
                }
                if table.is_empty() {
                    if idle_since.get_or_insert_with(Instant::now).elapsed() >= args.linger {
                        break "idle for --linger";
                    }
                } else {
                    idle_since = None;
                }
            }
        }
    };
    if guard_pid.is_some() {
        // No new connection comes to us; the guard removes the chain once we
        // are gone, after our connections' FINs left translated.
        backend.update(&chain, &Direction::Inbound(Vec::new()), args.listen.port())?;
        tracing::info!(%chain, why, "redirects removed; exiting");
    } else {
        backend.remove(&chain)?;
        tracing::info!(%chain, why, "rules removed; exiting");
    }
    Ok(())
}

/// Moves the redirects from `old` ports to `new` (empty: none), and forgets
/// conntrack state for newly intercepted ports. The chain, the jump to it
/// and its first rule stay (see `Direction::rules`): they keep conntrack on,
/// so connections already redirected to us keep their translation.
fn set_ports(b: &Backend, chain: &str, old: &[u16], new: &[u16], to: u16) -> Result<(), intercept::InterceptError> {
    b.update(chain, &Direction::Inbound(new.to_vec()), to)?;
    new.iter().filter(|p| !old.contains(p)).for_each(|p| take_over(*p));
    Ok(())
}

/// Once `port`'s redirect is in: connections made before it go through the
/// agent from now on, or are reset (the client reconnects, through us).
/// conntrack is flushed first, then the app's sockets from outside the pod
/// are reset: a response in flight after the flush would otherwise keep its
/// connection around the agent (see `sockdiag`). A request in flight on such
/// a connection fails, as any connection reset would make it.
fn take_over(port: u16) {
    intercept::flush_conntrack(port);
    match sockdiag::reset_direct(port) {
        Ok(0) => {}
        Ok(n) => tracing::info!(port, reset = n, "reset connections made straight to the app before the redirect"),
        Err(e) => {
            tracing::warn!(port, error = %e, "could not reset old connections; they may reach the app around the agent")
        }
    }
}

/// The ports to intercept: the flag's, or every port the routes name.
fn wanted_ports(flag: &[u16], table: &RouteTable) -> Vec<u16> {
    if !flag.is_empty() {
        return flag.to_vec();
    }
    let mut ports: Vec<u16> = table.routes.iter().flat_map(|r| r.route.ports.iter().copied()).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The admin port (on the pod IP too): counters for anyone; keys, filters
/// and preview IPs only for callers on 127.0.0.1 (inside the pod).
pub(super) async fn serve_admin(listener: TcpListener, routes: Arc<SharedRoutes>, metrics: Arc<Metrics>) {
    crate::telemetry::serve_text(listener, move |path, local| admin_page(path, local, &routes, &metrics)).await
}

fn admin_page(path: &str, local: bool, routes: &SharedRoutes, metrics: &Metrics) -> Result<String, String> {
    match path {
        "/metrics" => Ok(metrics.render_with(local)),
        "/routes" if local => Ok(serde_json::to_string(&routes.get().live(i64::MIN)).unwrap_or_default()),
        "/routes" => Err("routes are shown on 127.0.0.1 only (inside the pod)\n".into()),
        _ => Ok("ok\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::FilterSpec;
    use crate::model::{Key, Mode};

    #[test]
    fn the_admin_page_shows_keys_and_routes_on_loopback_only() {
        let routes = SharedRoutes::default();
        let route = Route {
            key: Key::parse("key", "secret1").unwrap(),
            mode: Mode::Steal,
            filter: FilterSpec::Key("secret1".into()),
            ports: vec![8080],
            destination: "198.18.0.7".parse().unwrap(),
            expires_at_ms: None,
        };
        routes.set(RouteTable::compile(vec![route]).unwrap());
        let metrics = Metrics::default();
        metrics.routed("secret1");
        let remote = admin_page("/metrics", false, &routes, &metrics).unwrap();
        assert!(!remote.contains("secret1"), "{remote}");
        assert!(remote.contains("preview_agent_requests_total{action=\"routed\"} 1"), "{remote}");
        assert!(admin_page("/routes", false, &routes, &metrics).is_err());
        let local = admin_page("/routes", true, &routes, &metrics).unwrap();
        assert!(local.contains("secret1") && local.contains("198.18.0.7"), "{local}");
        assert!(admin_page("/metrics", true, &routes, &metrics).unwrap().contains("key=\"secret1\""));
    }
}
