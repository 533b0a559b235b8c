//! The agent's route table: per environment, a filter, a mode and where
//! matching requests go. Matching walks the routes for the port once, in
//! order; the unmatched path allocates nothing for key filters.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::filter::{Filter, FilterSpec, RequestView};

/// One environment's route on this target, as previewd sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub key: String,
    pub mode: Mode,
    pub filter: FilterSpec,
    /// Ports it applies to; empty means every intercepted port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// The preview pod's address; the port is the request's own.
    pub destination: IpAddr,
    /// Unix ms after which the agent drops the route on its own.
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

#[derive(Debug)]
pub struct CompiledRoute {
    pub route: Route,
    pub filter: Filter,
}

/// An immutable set of compiled routes; replaced whole on every update.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<CompiledRoute>,
}

impl RouteTable {
    pub fn compile(routes: Vec<Route>) -> Result<RouteTable, String> {
        let routes = routes
            .into_iter()
            .map(|route| {
                let filter = route.filter.compile().map_err(|e| format!("route {}: {e}", route.key))?;
                Ok(CompiledRoute { route, filter })
            })
            .collect::<Result<_, String>>()?;
        Ok(RouteTable { routes })
    }

    /// The first route on `port` whose filter matches.
    pub fn find(&self, port: u16, req: &dyn RequestView) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.route.ports.is_empty() || r.route.ports.contains(&port))
            .find(|r| r.filter.matches(req))
            .map(|r| &r.route)
    }

    /// Routes still valid at `now_ms`.
    pub fn live(&self, now_ms: i64) -> Vec<Route> {
        self.routes
            .iter()
            .filter(|r| r.route.expires_at_ms.is_none_or(|t| t > now_ms))
            .map(|r| r.route.clone())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// The shared, swappable table: readers clone an `Arc` and never block writers for long.
#[derive(Debug, Default)]
pub struct SharedRoutes(RwLock<Arc<RouteTable>>);

impl SharedRoutes {
    pub fn get(&self) -> Arc<RouteTable> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, table: RouteTable) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(key: &str, ports: Vec<u16>) -> Route {
        Route {
            key: key.into(),
            mode: Mode::Steal,
            filter: FilterSpec::Key(key.into()),
            ports,
            destination: "198.18.1.1".parse().unwrap(),
            expires_at_ms: Some(100),
        }
    }

    #[test]
    fn finds_by_key_and_port() {
        let t = RouteTable::compile(vec![route("a", vec![]), route("b", vec![80])]).unwrap();
        let req = |k: &str| {
            http::Request::get("/").header("baggage", format!("preview-key={k}")).body(()).unwrap().into_parts().0
        };
        assert_eq!(t.find(80, &req("a")).map(|r| r.key.as_str()), Some("a"));
        assert_eq!(t.find(80, &req("b")).map(|r| r.key.as_str()), Some("b"));
        assert!(t.find(81, &req("b")).is_none());
        assert!(t.find(80, &req("c")).is_none());
        assert_eq!(t.live(99).len(), 2);
        assert!(t.live(100).is_empty());
    }
}

/// Wire form of routes (`preview.v1.Route`), shared by previewd and the agent.
pub mod wire {
    use super::Route;
    use crate::config::Mode;
    use crate::filter::FilterSpec;
    use crate::proto;
    use crate::proto::filter::Kind;

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

    pub fn to_proto(r: &Route) -> proto::Route {
        proto::Route {
            key: r.key.clone(),
            mode: match r.mode {
                Mode::Steal => proto::Mode::Steal as i32,
                Mode::Mirror => proto::Mode::Mirror as i32,
            },
            filter: Some(filter_to_proto(&r.filter)),
            ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
            destination: r.destination.to_string(),
            expires_at: r.expires_at_ms.map(|ms| prost_types::Timestamp {
                seconds: ms.div_euclid(1000),
                nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
            }),
        }
    }

    pub fn from_proto(r: proto::Route) -> Result<Route, String> {
        Ok(Route {
            mode: if r.mode == proto::Mode::Mirror as i32 { Mode::Mirror } else { Mode::Steal },
            filter: filter_from_proto(r.filter.ok_or_else(|| format!("route {}: no filter", r.key))?)?,
            ports: r
                .ports
                .iter()
                .map(|p| u16::try_from(*p).map_err(|_| format!("port {p} out of range")))
                .collect::<Result<_, _>>()?,
            destination: r
                .destination
                .parse()
                .map_err(|e| format!("route {}: destination {:?}: {e}", r.key, r.destination))?,
            expires_at_ms: r.expires_at.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
            key: r.key,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trip() {
            let r = Route {
                key: "k".into(),
                mode: Mode::Mirror,
                filter: FilterSpec::AllOf(vec![
                    FilterSpec::Header("^a: b$".into()),
                    FilterSpec::AnyOf(vec![FilterSpec::Key("k".into())]),
                ]),
                ports: vec![80, 8080],
                destination: "198.18.0.9".parse().unwrap(),
                expires_at_ms: Some(1_764_290_000_123),
            };
            assert_eq!(from_proto(to_proto(&r)).unwrap(), r);
        }
    }
}
