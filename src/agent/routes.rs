//! The agent's route table: per environment, a filter, a mode and where
//! matching requests go.
//!
//! Precedence: a request that carries an environment key (the `preview-key`
//! baggage member, or `x-preview-key`) is that environment's or staging's,
//! never another environment's. Its key is read once and its routes are
//! found by key, so the cost does not grow with the number of environments.
//! Only a request with no key is tried against the unscoped filters (custom
//! header, path or method filters), in the order previewd sends them
//! (creation order).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::filter::{Filter, RequestView, request_key};
use crate::model::Route;

#[derive(Debug)]
pub struct CompiledRoute {
    pub route: Route,
    pub filter: Filter,
}

/// An immutable set of compiled routes; replaced whole on every update.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<CompiledRoute>,
    /// Indexes into `routes`: each environment's routes by key, and the
    /// routes whose filter does not pin their key, in order.
    by_key: HashMap<String, Vec<usize>>,
    unscoped: Vec<usize>,
}

impl RouteTable {
    pub fn compile(routes: Vec<Route>) -> Result<RouteTable, String> {
        let routes = routes
            .into_iter()
            .map(|route| {
                let filter = route.filter.compile().map_err(|e| format!("route {}: {e}", route.key))?;
                Ok(CompiledRoute { route, filter })
            })
            .collect::<Result<Vec<CompiledRoute>, String>>()?;
        let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
        let mut unscoped = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            by_key.entry(r.route.key.to_string()).or_default().push(i);
            if !matches!(r.filter, Filter::Key(_)) {
                unscoped.push(i);
            }
        }
        Ok(RouteTable { routes, by_key, unscoped })
    }

    /// The route for a request on `port` (see the precedence above).
    pub fn find(&self, port: u16, req: &dyn RequestView) -> Option<&Route> {
        let on_port = |r: &&CompiledRoute| r.route.ports.is_empty() || r.route.ports.contains(&port);
        match request_key(req) {
            Some(key) => {
                let mine = self.by_key.get(key.as_str())?.iter().map(|i| &self.routes[*i]);
                // The key was found: a key filter (the default) needs no second look.
                mine.filter(on_port).find(|r| matches!(&r.filter, Filter::Key(k) if *k == key) || r.filter.matches(req))
            }
            None => self.unscoped.iter().map(|i| &self.routes[*i]).filter(on_port).find(|r| r.filter.matches(req)),
        }
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
    use crate::filter::FilterSpec;
    use crate::model::{Key, Mode};

    fn route(key: &str, ports: Vec<u16>) -> Route {
        Route {
            key: Key::parse("key", key).unwrap(),
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

    /// A request that carries a key is that environment's or staging's,
    /// whatever other environments' unscoped filters would match.
    #[test]
    fn the_key_comes_first_and_unscoped_filters_only_see_keyless_requests() {
        let mut everything = route("k2", vec![]);
        everything.filter = FilterSpec::Header(".".into());
        let mut by_path = route("k3", vec![]);
        by_path.filter = FilterSpec::Path("^/api".into());
        let t = RouteTable::compile(vec![route("k1", vec![]), everything, by_path]).unwrap();
        let req = |headers: &[(&str, &str)], path: &str| {
            let mut b = http::Request::get(path);
            for (n, v) in headers {
                b = b.header(*n, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        let found = |r: &http::request::Parts| t.find(80, r).map(|r| r.key.to_string());
        assert_eq!(found(&req(&[("baggage", "a=1,preview-key=k1")], "/api")), Some("k1".into()));
        assert_eq!(found(&req(&[("x-preview-key", "k1")], "/")), Some("k1".into()));
        // Another environment's key, or an unknown one: never k2's "." filter.
        assert_eq!(found(&req(&[("x-preview-key", "gone")], "/api")), None);
        // An empty key is no key.
        assert_eq!(found(&req(&[("x-preview-key", ""), ("x-other", "1")], "/")), Some("k2".into()));
        // No key: the unscoped filters, in order.
        assert_eq!(found(&req(&[("x-other", "1")], "/api")), Some("k2".into()));
        let t = RouteTable::compile(vec![route("k1", vec![]), route("k9", vec![81])]).unwrap();
        assert_eq!(t.find(80, &req(&[("x-preview-key", "k9")], "/")).map(|r| r.key.to_string()), None, "port");
        assert_eq!(t.find(80, &req(&[], "/")), None, "key filters need the key");
    }
}
