//! A mocked Kubernetes API server for manager and API tests that run with no
//! cluster (as kube-rs tests with a tower service in place of the network).
//! It keeps objects in memory, answers the calls previewd makes (get, list
//! with label selectors and metadata-only lists, create, server-side apply,
//! delete), records every call, and fails the calls a test asks it to. The
//! cluster tests back up what it claims.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

/// A failure to inject: the `nth` (from 1) call whose method is `method`
/// and whose path contains `path` answers `code`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Method,
    pub path: String,
    pub nth: usize,
    pub code: u16,
}

#[derive(Default)]
struct State {
    /// (resource, namespace, name) → object. Resources: namespaces, pods,
    /// configmaps, deployments.
    objects: BTreeMap<(String, String, String), Value>,
    calls: Vec<String>,
    faults: Vec<Fault>,
    next_uid: u64,
    /// Every call answers 503, as an API server that is away.
    down: bool,
}

#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

impl FakeApi {
    /// A kube client whose every request is answered by this fake.
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                // The fake's bodies are small and in memory: reading cannot fail.
                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                Ok::<_, Infallible>(me.handle(&parts, &body))
            }) as Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>
        });
        kube::Client::new(svc, "default")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking test thread leaves plain data behind.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_namespace(&self, ns: &str) {
        self.put("namespaces", "", ns, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }

    /// A Deployment whose pods run one container `app` on port 8080.
    pub fn add_deployment(&self, ns: &str, name: &str, extra_spec: Value) {
        let mut spec = json!({
            "containers": [{"name": "app", "image": format!("{name}:v1"), "ports": [{"containerPort": 8080}]}]
        });
        if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
            s.extend(extra.clone());
        }
        let obj = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": spec}
            }
        });
        self.put("deployments", ns, name, obj);
    }

    /// Puts an object as it is (name and namespace from the arguments).
    pub fn put(&self, resource: &str, ns: &str, name: &str, mut obj: Value) {
        let mut st = self.state();
        st.next_uid += 1;
        let uid = format!("uid-{}", st.next_uid);
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("uid".into(), json!(uid));
            m.insert("name".into(), json!(name));
            if !ns.is_empty() {
                m.insert("namespace".into(), json!(ns));
            }
        }
        st.objects.insert((resource.into(), ns.into(), name.into()), obj);
    }

    /// While down, every call answers 503.
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
    }

    /// Deletes a namespace and everything in it.
    pub fn delete_namespace(&self, ns: &str) {
        self.state().objects.retain(|(r, n, name), _| !(n == ns || (r == "namespaces" && name == ns)));
    }

    pub fn fail(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    /// Names of the objects of `resource` in `ns`.
    pub fn names(&self, resource: &str, ns: &str) -> Vec<String> {
        self.state()
            .objects
            .keys()
            .filter(|(r, n, _)| r == resource && n == ns)
            .map(|(_, _, name)| name.clone())
            .collect()
    }

    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.state().objects.get(&(resource.into(), ns.into(), name.into())).cloned()
    }

    /// Every call so far, as `METHOD path`.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    fn handle(&self, parts: &http::request::Parts, body: &[u8]) -> Response<Full<Bytes>> {
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or_default().to_string();
        let call = format!("{} {path}", parts.method);
        let mut st = self.state();
        st.calls.push(call);
        // The nth matching call fails.
        let method = parts.method.clone();
        let matching = |f: &Fault, calls: &[String]| {
            calls.iter().filter(|c| c.starts_with(&format!("{} ", f.method)) && c.contains(&f.path)).count()
        };
        let calls = st.calls.clone();
        if let Some(f) =
            st.faults.iter().find(|f| f.method == method && path.contains(&f.path) && matching(f, &calls) == f.nth)
        {
            return status(f.code, "injected failure");
        }
        if st.down {
            return status(503, "the API server is away");
        }
        let Some((resource, ns, name)) = route(&path) else { return status(404, &format!("no route {path}")) };
        let ns_exists = st.objects.contains_key(&("namespaces".to_string(), String::new(), ns.clone()));
        if !ns.is_empty() && !ns_exists && (method == Method::POST || method == Method::PATCH) {
            return status(404, &format!("namespaces \"{ns}\" not found"));
        }
        let key = (resource.clone(), ns.clone(), name.clone().unwrap_or_default());
        match (method, name) {
            (Method::GET, Some(_)) => match st.objects.get(&key) {
                Some(o) => ok(o.clone()),
                None => status(404, &format!("{resource} {:?} not found", key.2)),
            },
            (Method::GET, None) => {
                let selector = param(&query, "labelSelector");
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|((r, n, _), o)| *r == resource && (ns.is_empty() || *n == ns) && selects(&selector, o))
                    .map(|(_, o)| o.clone())
                    .collect();
                let metadata_only = parts
                    .headers
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("PartialObjectMetadataList"));
                if metadata_only {
                    let items: Vec<Value> = items
                        .iter()
                        .map(|o| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": o["metadata"]}))
                        .collect();
                    ok(
                        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": items}),
                    )
                } else {
                    ok(json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}))
                }
            }
            (Method::POST, None) => {
                let Ok(obj) = serde_json::from_slice::<Value>(body) else { return status(400, "bad body") };
                let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
                let key = (resource, ns.clone(), name.clone());
                if st.objects.contains_key(&key) {
                    return status(409, &format!("{name} already exists"));
                }
                drop(st);
                self.put(&key.0, &ns, &name, obj);
                ok(self.get(&key.0, &ns, &name).unwrap_or_default())
            }
            (Method::PATCH, Some(name)) => {
                // Server-side apply of a whole object (all previewd applies).
                let Ok(obj) = serde_json::from_slice::<Value>(body) else { return status(400, "bad body") };
                let uid = st.objects.get(&key).and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string));
                drop(st);
                self.put(&key.0, &ns, &name, obj);
                if let Some(uid) = uid {
                    let mut st = self.state();
                    if let Some(o) = st.objects.get_mut(&key) {
                        o["metadata"]["uid"] = json!(uid);
                    }
                }
                ok(self.get(&key.0, &ns, &name).unwrap_or_default())
            }
            (Method::DELETE, Some(_)) => match st.objects.remove(&key) {
                Some(o) => ok(o),
                None => status(404, "not found"),
            },
            _ => status(405, "not supported by the fake"),
        }
    }
}

/// `/api/v1/namespaces/NS/pods/NAME`, `/apis/apps/v1/namespaces/NS/deployments`,
/// `/api/v1/pods`, `/api/v1/namespaces/NAME` → (resource, namespace, name).
fn route(path: &str) -> Option<(String, String, Option<String>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    Some(match rest {
        ["namespaces", name] => ("namespaces".into(), String::new(), Some(name.to_string())),
        ["namespaces"] => ("namespaces".into(), String::new(), None),
        ["namespaces", ns, resource] => (resource.to_string(), ns.to_string(), None),
        ["namespaces", ns, resource, name] => (resource.to_string(), ns.to_string(), Some(name.to_string())),
        [resource] => (resource.to_string(), String::new(), None),
        _ => return None,
    })
}

fn param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=b,c=d,!e,f`: equality, absence and existence terms.
fn selects(selector: &str, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some(k) = term.strip_prefix('!') {
            labels.get(k).is_none()
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k).and_then(Value::as_str) == Some(v)
        } else {
            labels.get(term).is_some()
        }
    })
}

fn ok(v: Value) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, &v)
}

fn status(code: u16, message: &str) -> Response<Full<Bytes>> {
    let reason = match code {
        404 => "NotFound",
        409 => "AlreadyExists",
        403 => "Forbidden",
        _ => "InternalError",
    };
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    json_response(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &body)
}

fn json_response(code: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
