//! Share links: made, revoked and listed under the key's lock, kept on the
//! environment's record (and its owner object), and ended (kept as "ended"
//! in the store, so the URL never falls through to staging) when they are
//! revoked or expire, or their environment ends. The gateways' link set is
//! built here too.

use std::collections::BTreeMap;

use super::error::invalid;
use super::{Error, Manager};
use crate::model::share::{
    self, ENDED_KEPT_MS, EndedLink, MAX_LINKS_PER_ENV, ShareLink, ShareSpec, parse_slug, share_url,
    validate_staging_url,
};
use crate::model::{EnvRecord, Key, Target, Ttl, now_ms};
use crate::previewd::auth::{Access, Caller};
use crate::previewd::cluster::names::LABEL_MANAGED_BY;
use crate::previewd::cluster::services::Entry;
use crate::{proto, wire};

impl Manager {
    /// The environment's record, for a share call by `who`: NOT_FOUND, or
    /// PERMISSION_DENIED without `share` on environments in its namespace.
    async fn share_record(&self, who: &Caller, key: &Key) -> Result<EnvRecord, Error> {
        let rec = self.view().envs.get(key).map(|e| e.record.clone()).filter(|r| !r.deleting);
        let Some(rec) = rec else {
            return Err(Error::NotFound { field: "key".into(), message: format!("no environment {:?}", key.as_str()) });
        };
        self.require(who, vec![Access::env("share", &rec.namespace)]).await?;
        Ok(rec)
    }

    /// Makes a link to `key`'s entry Service.
    pub async fn share_as(&self, who: &Caller, key: &Key, spec: ShareSpec) -> Result<ShareLink, Error> {
        let domain = self.settings.share_domain.clone();
        if domain.is_empty() {
            return Err(Error::FailedPrecondition {
                field: "key".into(),
                message: "sharing is off on this previewd: it runs without --share-domain".into(),
            });
        }
        validate_staging_url("staging_url", &spec.staging_url)?;
        let _guard = self.lock_key(key).await;
        let mut rec = self.share_record(who, key).await?;
        if rec.shares.len() >= MAX_LINKS_PER_ENV {
            return Err(Error::ResourceExhausted {
                field: "key".into(),
                message: format!(
                    "environment {:?} has {MAX_LINKS_PER_ENV} links, the most it may; revoke one",
                    key.as_str()
                ),
            });
        }
        let entry = self.entry_service(who, &rec, &spec.service).await?;
        let port = pick_port(&entry, spec.port)?;
        let Some(ip) = &entry.cluster_ip else {
            return Err(Error::FailedPrecondition {
                field: "service".into(),
                message: format!("service {:?} is headless (no ClusterIP); a link needs one address", entry.name),
            });
        };
        let now = now_ms();
        let expires_at_ms = match spec.ttl {
            Some(Ttl::Finite(d)) => {
                let t = now.saturating_add(d.as_millis() as i64);
                Some(rec.expires_at_ms.map_or(t, |e| e.min(t)))
            }
            _ => rec.expires_at_ms,
        };
        let slug = share::new_slug();
        let link = ShareLink {
            url: share_url(&slug, &domain),
            slug,
            service: entry.name.clone(),
            port,
            upstream: std::net::SocketAddr::new(
                ip.parse().map_err(|_| invalid("service", format!("ClusterIP {ip:?} is not an address")))?,
                port,
            )
            .to_string(),
            created_by: who.user.clone(),
            created_at_ms: now,
            expires_at_ms,
            staging_url: spec.staging_url,
        };
        rec.shares.push(link.clone());
        self.store.put(&rec).await?;
        self.put_owner_copy(&rec).await;
        self.publish_shares(&rec);
        tracing::info!(key = %key, service = %link.service, port, user = %who.user, "share link made");
        Ok(link)
    }

    /// Ends the link `revoke` (its URL or slug) of `key`.
    pub async fn revoke_as(&self, who: &Caller, key: &Key, revoke: &str) -> Result<ShareLink, Error> {
        let slug = parse_slug("revoke", revoke)?;
        let _guard = self.lock_key(key).await;
        let mut rec = self.share_record(who, key).await?;
        let Some(i) = rec.shares.iter().position(|l| l.slug == slug) else {
            return Err(Error::NotFound {
                field: "revoke".into(),
                message: format!("environment {:?} has no live link {slug:?}", key.as_str()),
            });
        };
        let link = rec.shares.remove(i);
        self.store.put_ending(&rec, vec![EndedLink::of(&link, "revoked", now_ms())]).await?;
        self.put_owner_copy(&rec).await;
        self.publish_shares(&rec);
        tracing::info!(key = %key, user = %who.user, "share link revoked");
        Ok(link)
    }

    /// `key`'s live links.
    pub async fn links_as(&self, who: &Caller, key: &Key) -> Result<Vec<ShareLink>, Error> {
        Ok(self.share_record(who, key).await?.shares)
    }

    /// Ends links whose own TTL ran out (the environment lives on).
    pub(super) async fn reap_links(&self) {
        let now = now_ms();
        let keys: Vec<Key> = self
            .view()
            .envs
            .values()
            .filter(|e| !e.record.deleting && e.record.shares.iter().any(|l| l.expired_at(now)))
            .map(|e| e.record.key.clone())
            .collect();
        for key in keys {
            let _guard = self.lock_key(&key).await;
            let Some(mut rec) = self.view().envs.get(&key).map(|e| e.record.clone()) else { continue };
            let (gone, live): (Vec<_>, Vec<_>) = rec.shares.drain(..).partition(|l| l.expired_at(now));
            rec.shares = live;
            let ended = gone.iter().map(|l| EndedLink::of(l, "expired", now)).collect();
            if let Err(e) = self.store.put_ending(&rec, ended).await {
                tracing::warn!(key = %key, error = %e, "ending expired links failed; retrying");
                continue;
            }
            self.put_owner_copy(&rec).await;
            self.publish_shares(&rec);
        }
    }

    /// Every link the gateways serve: live ones from the view, ended ones
    /// from the store (pruned to the last week).
    pub async fn link_set(&self) -> Result<proto::LinkSet, Error> {
        let ended = self.store.ended_links(now_ms() - ENDED_KEPT_MS).await?;
        let now = now_ms();
        let mut links: Vec<proto::GatewayLink> = {
            let view = self.view();
            view.envs
                .values()
                .filter(|e| !e.record.deleting)
                .flat_map(|e| {
                    e.record
                        .shares
                        .iter()
                        .filter(move |l| !l.expired_at(now))
                        .map(|l| wire::gateway_link(l, &e.record.key, &e.record.namespace))
                })
                .collect()
        };
        links.extend(ended.iter().map(wire::gateway_ended));
        links.sort_by(|a, b| a.slug.cmp(&b.slug));
        Ok(proto::LinkSet { links })
    }

    /// The entry Service: the one named, or the one that selects the
    /// environment's first target. The caller must be able to `get` it.
    async fn entry_service(&self, who: &Caller, rec: &EnvRecord, name: &str) -> Result<Entry, Error> {
        let ns = &rec.namespace;
        let name = if name.is_empty() {
            let Some(pod) = rec.pods.iter().find(|p| matches!(p.target, Target::Workload { .. })) else {
                return Err(invalid(
                    "service",
                    format!("environment {:?} has no target whose Service could be found; name one", rec.key.as_str()),
                ));
            };
            let labels: BTreeMap<String, String> = pod.template["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !k.starts_with("preview.dev/") && k.as_str() != LABEL_MANAGED_BY)
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            let found = self.cluster.services_selecting(ns, &labels).await.map_err(|e| Error::cluster("service", e))?;
            match found.as_slice() {
                [one] => one.name.clone(),
                [] => {
                    return Err(Error::NotFound {
                        field: "service".into(),
                        message: format!("no Service in namespace {ns:?} selects {}", pod.target.short_name()),
                    });
                }
                many => {
                    let names: Vec<&str> = many.iter().map(|s| s.name.as_str()).collect();
                    return Err(invalid(
                        "service",
                        format!("several Services select {}: {}; name one", pod.target.short_name(), names.join(", ")),
                    ));
                }
            }
        } else {
            crate::model::validate_dns_label("service", name, 63)?;
            name.to_string()
        };
        self.require(who, vec![Access::of("get", "", "services", ns, &name)]).await?;
        match self.cluster.service(ns, &name).await.map_err(|e| Error::cluster("service", e))? {
            Some(s) => Ok(s),
            None => Err(Error::NotFound {
                field: "service".into(),
                message: format!("service {name:?} not found in namespace {ns:?}"),
            }),
        }
    }

    /// The owner object's signed copy follows the record (for --adopt);
    /// best effort, as the store is what recovery reads.
    async fn put_owner_copy(&self, rec: &EnvRecord) {
        if let Err(e) = self.cluster.put_owner(rec).await {
            tracing::warn!(key = %rec.key, error = %e, "links not copied to the owner object");
        }
    }

    fn publish_shares(&self, rec: &EnvRecord) {
        let mut view = self.view();
        let env = wire::environment(view.upsert(rec));
        view.publish(&self.events, proto::EventKind::SharesChanged, vec![env], None);
    }
}

/// The port to forward to: the one asked for (it must be the Service's),
/// else its only port, else the one named `http`.
fn pick_port(s: &Entry, asked: u16) -> Result<u16, Error> {
    let list = || s.ports.iter().map(|(n, p)| if n.is_empty() { p.to_string() } else { format!("{p} ({n})") });
    let have = list().collect::<Vec<_>>().join(", ");
    if asked != 0 {
        return if s.ports.iter().any(|(_, p)| *p == asked) {
            Ok(asked)
        } else {
            Err(invalid("port", format!("service {:?} has no TCP port {asked}; it has: {have}", s.name)))
        };
    }
    match s.ports.as_slice() {
        [(_, p)] => Ok(*p),
        ports => ports.iter().find(|(n, _)| n == "http").map(|(_, p)| *p).ok_or_else(|| {
            invalid("port", format!("service {:?} has several ports and none named http: {have}; pick one", s.name))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ports: &[(&str, u16)]) -> Entry {
        Entry {
            name: "web".into(),
            cluster_ip: Some("198.19.0.9".into()),
            ports: ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
        }
    }

    #[test]
    fn ports_are_picked_or_refused_by_name() {
        assert_eq!(pick_port(&svc(&[("", 8080)]), 0).unwrap(), 8080);
        assert_eq!(pick_port(&svc(&[("grpc", 9090), ("http", 8080)]), 0).unwrap(), 8080);
        assert_eq!(pick_port(&svc(&[("grpc", 9090), ("http", 8080)]), 9090).unwrap(), 9090);
        let e = pick_port(&svc(&[("a", 1), ("b", 2)]), 0).unwrap_err().to_string();
        assert!(e.starts_with("port: "), "{e}");
        let e = pick_port(&svc(&[("", 8080)]), 81).unwrap_err().to_string();
        assert!(e.contains("no TCP port 81") && e.contains("8080"), "{e}");
    }
}
