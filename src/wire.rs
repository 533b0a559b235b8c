//! Every conversion between the protobuf messages (`proto`) and the shared
//! words (`model`, `filter`), in one place.

use crate::filter::FilterSpec;
use crate::model::share::{EndedLink, ShareLink};
use crate::model::{
    AgentState, AgentStatus, Cleaned, EnvStatus, Key, Mode, PodRequest, PodState, Route, StartRequest, Started,
};
use crate::proto;
use crate::proto::filter::Kind;

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

pub fn timestamp_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

pub fn mode(m: Mode) -> i32 {
    match m {
        Mode::Steal => proto::Mode::Steal as i32,
        Mode::Mirror => proto::Mode::Mirror as i32,
    }
}

pub fn filter_to_proto(f: &FilterSpec) -> proto::Filter {
    let list = |v: &[FilterSpec]| proto::FilterList { filters: v.iter().map(filter_to_proto).collect() };
    let kind = match f {
        FilterSpec::Header(s) => Kind::Header(s.clone()),
        FilterSpec::Path(s) => Kind::Path(s.clone()),
        FilterSpec::Method(s) => Kind::Method(s.clone()),
        FilterSpec::AllOf(v) => Kind::AllOf(list(v)),
        FilterSpec::AnyOf(v) => Kind::AnyOf(list(v)),
        FilterSpec::Key(k) => Kind::Key(k.clone()),
    };
    proto::Filter { kind: Some(kind) }
}

pub fn filter_from_proto(f: proto::Filter) -> Result<FilterSpec, String> {
    let list = |l: proto::FilterList| l.filters.into_iter().map(filter_from_proto).collect::<Result<Vec<_>, _>>();
    Ok(match f.kind.ok_or("filter without a kind")? {
        Kind::Header(s) => FilterSpec::Header(s),
        Kind::Path(s) => FilterSpec::Path(s),
        Kind::Method(s) => FilterSpec::Method(s),
        Kind::AllOf(l) => FilterSpec::AllOf(list(l)?),
        Kind::AnyOf(l) => FilterSpec::AnyOf(list(l)?),
        Kind::Key(k) => FilterSpec::Key(k),
    })
}

pub fn route_to_proto(r: &Route) -> proto::Route {
    proto::Route {
        key: r.key.to_string(),
        mode: mode(r.mode),
        filter: Some(filter_to_proto(&r.filter)),
        ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
        destination: r.destination.to_string(),
        expires_at: r.expires_at_ms.map(timestamp),
    }
}

/// A route from previewd; every field is checked, the error names it.
pub fn route_from_proto(r: proto::Route) -> Result<Route, String> {
    let key = Key::parse("route.key", &r.key).map_err(|e| e.to_string())?;
    Ok(Route {
        mode: if r.mode == proto::Mode::Mirror as i32 { Mode::Mirror } else { Mode::Steal },
        filter: filter_from_proto(r.filter.ok_or_else(|| format!("route {key}: no filter"))?)?,
        ports: r
            .ports
            .iter()
            .map(|p| u16::try_from(*p).map_err(|_| format!("route {key}: port {p} out of range")))
            .collect::<Result<_, _>>()?,
        destination: r.destination.parse().map_err(|e| format!("route {key}: destination {:?}: {e}", r.destination))?,
        expires_at_ms: r.expires_at.as_ref().map(timestamp_ms),
        key,
    })
}

pub fn pod_request(p: proto::PodRequest) -> PodRequest {
    PodRequest { config: p.config, image: p.image, target: p.target, namespace: p.namespace, name: p.name }
}

pub fn start_request(r: proto::StartRequest) -> StartRequest {
    StartRequest { pods: r.pods.into_iter().map(pod_request).collect(), key: r.key, ttl: r.ttl }
}

pub fn started(s: &Started) -> proto::StartResponse {
    proto::StartResponse {
        key: s.key.to_string(),
        environment: Some(environment(&s.environment)),
        warnings: s.warnings.clone(),
    }
}

pub fn cleaned(c: Cleaned) -> proto::CleanedEnvironment {
    proto::CleanedEnvironment { key: c.key.into(), objects: c.objects }
}

/// An environment as Status shows it: the record, with each replica's
/// state where one has been seen.
pub fn environment(env: &EnvStatus) -> proto::Environment {
    let (rec, pods) = (&env.record, &env.pods);
    let mut out = Vec::new();
    for p in &rec.pods {
        for name in &p.pod_names {
            let st = pods.get(name).cloned().unwrap_or_else(|| PodState {
                phase: "Pending".into(),
                reason: if rec.pending { "Creating".into() } else { "Pending".into() },
                ..Default::default()
            });
            out.push(proto::Pod {
                name: name.clone(),
                target: p.target.to_string(),
                container: p.container.clone(),
                image: p.image.clone(),
                phase: st.phase,
                ready: st.ready,
                restarts: st.restarts,
                node: st.node,
                ip: st.ip,
                last_error: st.last_error,
                reason: st.reason,
                group: p.group.clone(),
            });
        }
    }
    proto::Environment {
        key: rec.key.to_string(),
        namespace: rec.namespace.clone(),
        created_at: Some(timestamp(rec.created_at_ms)),
        expires_at: rec.expires_at_ms.map(timestamp),
        mode: mode(rec.mode),
        pods: out,
        pending: rec.pending,
        failure: env.failure.clone().unwrap_or_default(),
        agents: env.agents.iter().map(agent).collect(),
        shares: rec.shares.iter().map(|l| share_link(l, &rec.key)).collect(),
        queues: rec
            .queues
            .iter()
            .map(|b| {
                let stats =
                    env.queues.get(&b.env_topic).copied().unwrap_or(crate::model::QueueStats { forwarded: 0, lag: -1 });
                proto::Queue {
                    queue_id: b.queue_id.clone(),
                    target: format!("deployment/{}", b.deployment),
                    topic: b.env_topic.clone(),
                    original_topic: b.original_topic.clone(),
                    staging_topic: b.staging_topic.clone(),
                    mode: b.mode.as_str().into(),
                    forwarded: stats.forwarded,
                    lag: stats.lag,
                }
            })
            .collect(),
        db_branches: rec.dbs.iter().map(|b| db_branch(b, env.dbs.get(&b.database))).collect(),
    }
}

pub fn db_branch(b: &crate::model::db::DbBinding, stats: Option<&crate::model::DbStats>) -> proto::DbBranch {
    let default = crate::model::DbStats { size_bytes: -1, ..Default::default() };
    let st = stats.unwrap_or(&default);
    proto::DbBranch {
        r#type: b.db_type.as_str().into(),
        source: b.source.clone(),
        server: b.server.clone(),
        database: b.database.clone(),
        copy: b.copy.as_str().into(),
        phase: st.phase.as_str().into(),
        reason: st.reason.clone(),
        size_bytes: st.size_bytes,
        snapshot_at: st.snapshot_at_ms.map(timestamp),
        secret: b.secret.clone(),
    }
}

pub fn share_link(l: &ShareLink, key: &Key) -> proto::ShareLink {
    proto::ShareLink {
        url: l.url.clone(),
        slug: l.slug.clone(),
        key: key.to_string(),
        service: l.service.clone(),
        port: l.port.into(),
        created_by: l.created_by.clone(),
        created_at: Some(timestamp(l.created_at_ms)),
        expires_at: l.expires_at_ms.map(timestamp),
    }
}

/// A live link as the gateway needs it.
pub fn gateway_link(l: &ShareLink, key: &Key, namespace: &str) -> proto::GatewayLink {
    proto::GatewayLink {
        slug: l.slug.clone(),
        key: key.to_string(),
        upstream: l.upstream.clone(),
        authority: l.authority(namespace),
        expires_at: l.expires_at_ms.map(timestamp),
        ended: String::new(),
        staging_url: l.staging_url.clone(),
    }
}

/// An ended link as the gateway needs it: no key, no upstream.
pub fn gateway_ended(e: &EndedLink) -> proto::GatewayLink {
    proto::GatewayLink {
        slug: e.slug.clone(),
        ended: e.reason.clone(),
        staging_url: e.staging_url.clone(),
        ..Default::default()
    }
}

fn agent(a: &AgentStatus) -> proto::Agent {
    let state = match a.state {
        AgentState::Attaching => proto::AgentState::Attaching,
        AgentState::Routing => proto::AgentState::Routing,
        AgentState::Failed => proto::AgentState::Failed,
        AgentState::Capped => proto::AgentState::Capped,
        AgentState::Foreign => proto::AgentState::Foreign,
    };
    proto::Agent { pod: a.pod.clone(), target: a.target.clone(), state: state as i32, reason: a.reason.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_round_trip() {
        let r = Route {
            key: Key::parse("key", "k").unwrap(),
            mode: Mode::Mirror,
            filter: FilterSpec::AllOf(vec![
                FilterSpec::Header("^a: b$".into()),
                FilterSpec::AnyOf(vec![FilterSpec::Key("k".into())]),
            ]),
            ports: vec![80, 8080],
            destination: "198.18.0.9".parse().unwrap(),
            expires_at_ms: Some(1_764_290_000_123),
        };
        assert_eq!(route_from_proto(route_to_proto(&r)).unwrap(), r);
        let mut bad = route_to_proto(&r);
        bad.key = "Not A Key".into();
        assert!(route_from_proto(bad).unwrap_err().contains("route.key"));
        let mut bad = route_to_proto(&r);
        bad.ports.push(70000);
        assert!(route_from_proto(bad).unwrap_err().contains("70000"));
    }

    #[test]
    fn timestamps_round_trip_before_and_after_1970() {
        for ms in [-1_500, -1, 0, 1, 1_764_290_000_123] {
            assert_eq!(timestamp_ms(&timestamp(ms)), ms);
        }
    }
}
