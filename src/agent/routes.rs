//! The agent's route table: per environment, a filter, a mode and where
//! matching requests go. Matching walks the routes for the port once, in
//! order; the unmatched path allocates nothing for key filters.

use std::sync::{Arc, RwLock};

use crate::filter::{Filter, RequestView};
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
}
