//! Who is calling and what they may do: identity from the cluster (bearer
//! tokens by TokenReview, client certificates against the cluster's client
//! CA), decisions from RBAC (SubjectAccessReviews on
//! `previewenvironments.preview.dev` and on what a preview touches), the
//! serving TLS material (`tls`, `serve`: the accept loop), previewd's key
//! (`proof`: agents' proof of their pod, record signatures), the
//! edge layer that authenticates every call (`layer`) and the audit line.
//!
//! Both caches keep an answer for at most [`CACHE_TTL`], as kube-rbac-proxy
//! and aggregated API servers do: a revoked binding takes effect within it.

pub mod layer;
pub mod proof;
pub mod serve;
pub mod tls;
pub mod trust;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::kube::Client;
use ::kube::api::{Api, PostParams};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};

/// How long an authentication or authorisation answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// The audience previewd's tokens are for.
pub const AUDIENCE: &str = "previewd";
/// The API group and resource of environments; every decision is about it.
pub const GROUP: &str = "preview.dev";
pub const RESOURCE: &str = "previewenvironments";
/// Entries per cache: beyond it, expired entries go, then everything.
const CACHE_MAX: usize = 4096;

/// How callers are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Tokens and client certificates checked by the cluster; RBAC decides.
    Kube,
    /// No checks at all, and no TLS: only for a loopback listen address.
    None,
}

/// An authenticated caller, as the API server would see them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    pub user: String,
    pub groups: Vec<String>,
    pub uid: String,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl Caller {
    /// The caller when authentication is off.
    pub fn anonymous() -> Caller {
        Caller { user: "system:anonymous".into(), groups: vec!["system:unauthenticated".into()], ..Default::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials, or credentials the cluster does not accept.
    #[error("{0}")]
    Unauthenticated(String),
    /// The API server could not be asked.
    #[error("asking the API server: {0}")]
    Unavailable(String),
}

/// One RBAC question: may the caller do `verb` on `resource` (in `group`)
/// in `namespace`?
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Access {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl Access {
    /// A verb on `previewenvironments.preview.dev` in `namespace`.
    pub fn env(verb: &str, namespace: &str) -> Access {
        Access::of(verb, GROUP, RESOURCE, namespace, "")
    }

    pub fn of(verb: &str, group: &str, resource: &str, namespace: &str, name: &str) -> Access {
        Access {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let res =
            if self.group.is_empty() { self.resource.clone() } else { format!("{}.{}", self.resource, self.group) };
        let name = if self.name.is_empty() { String::new() } else { format!(" {:?}", self.name) };
        write!(f, "{} {res}{name} in namespace {:?}", self.verb, self.namespace)
    }
}

struct Cache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Cache { entries: Mutex::new(HashMap::new()) }
    }

    fn get(&self, k: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(k).filter(|(_, at)| at.elapsed() < CACHE_TTL).map(|(v, _)| v.clone())
    }

    fn put(&self, k: K, v: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_MAX {
            entries.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            if entries.len() >= CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(k, (v, Instant::now()));
    }
}

/// Authentication and authorisation against the cluster.
pub struct Auth {
    mode: AuthMode,
    client: Option<Client>,
    /// Checks client certificates; `None`: the cluster's client CA is unknown.
    certs: Option<serve::Verifier>,
    accept_apiserver_tokens: bool,
    tokens: Cache<[u8; 32], Result<Caller, String>>,
    decisions: Cache<(String, Vec<String>, Access), bool>,
}

impl Auth {
    pub fn new(mode: AuthMode, client: Client, accept_apiserver_tokens: bool, certs: Option<serve::Verifier>) -> Auth {
        Auth {
            mode,
            client: (mode == AuthMode::Kube).then_some(client),
            certs,
            accept_apiserver_tokens,
            tokens: Cache::new(),
            decisions: Cache::new(),
        }
    }

    /// Everyone is allowed everything (manager tests; `--auth none`).
    pub fn off() -> Auth {
        Auth {
            mode: AuthMode::None,
            client: None,
            certs: None,
            accept_apiserver_tokens: false,
            tokens: Cache::new(),
            decisions: Cache::new(),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The caller of a request: its verified client certificate's subject,
    /// or its bearer token's user. A certificate wins when both are given.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer_certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    ) -> Result<Caller, AuthError> {
        let Some(client) = &self.client else { return Ok(Caller::anonymous()) };
        // A presented certificate must chain to the cluster's client CA (the
        // handshake took it unchecked, so that this can say why not).
        if let Some(chain) = peer_certs.filter(|c| !c.is_empty()) {
            let verifier = self.certs.as_ref().ok_or_else(|| {
                AuthError::Unauthenticated(
                    "client certificates are not accepted here: previewd could not read the cluster's client CA".into(),
                )
            })?;
            verifier.verify(chain).map_err(|e| {
                AuthError::Unauthenticated(format!(
                    "client certificate refused: {e} (it must be signed by the cluster's client CA)"
                ))
            })?;
            return caller_of_cert(&chain[0]);
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(AuthError::Unauthenticated(
                "no credentials: send 'authorization: Bearer <token>' or a client certificate the cluster's CA signed"
                    .into(),
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 16 * 1024)
            .ok_or_else(|| {
                AuthError::Unauthenticated("authorization: expected 'Bearer <token>' (at most 16 KiB)".into())
            })?;
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("a SHA-256 digest is 32 bytes");
        if let Some(r) = self.tokens.get(&digest) {
            return r.map_err(AuthError::Unauthenticated);
        }
        let mut result = review(client, token, Some(vec![AUDIENCE.into()])).await?;
        if result.is_err() && self.accept_apiserver_tokens {
            // No audiences: the API server's own (--accept-apiserver-tokens).
            result = review(client, token, None).await?;
        }
        self.tokens.put(digest, result.clone());
        result.map_err(AuthError::Unauthenticated)
    }

    /// Whether RBAC allows `access` to the caller (cached for [`CACHE_TTL`]).
    pub async fn allowed(&self, who: &Caller, access: &Access) -> Result<bool, AuthError> {
        let Some(client) = &self.client else { return Ok(true) };
        let k = (who.user.clone(), who.groups.clone(), access.clone());
        if let Some(v) = self.decisions.get(&k) {
            return Ok(v);
        }
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.user.clone()),
                groups: Some(who.groups.clone()),
                uid: (!who.uid.is_empty()).then(|| who.uid.clone()),
                extra: (!who.extra.is_empty()).then(|| who.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(access.verb.clone()),
                    group: Some(access.group.clone()),
                    resource: Some(access.resource.clone()),
                    namespace: Some(access.namespace.clone()),
                    name: (!access.name.is_empty()).then(|| access.name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &sar)
            .await
            .map_err(|e| AuthError::Unavailable(format!("SubjectAccessReview: {e}")))?;
        let allowed = answer.status.is_some_and(|s| s.allowed && !s.denied.unwrap_or(false));
        self.decisions.put(k, allowed);
        Ok(allowed)
    }
}

/// One TokenReview: the caller, or why the token was refused.
async fn review(
    client: &Client,
    token: &str,
    audiences: Option<Vec<String>>,
) -> Result<Result<Caller, String>, AuthError> {
    let tr = TokenReview {
        spec: TokenReviewSpec { token: Some(token.into()), audiences: audiences.clone() },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &tr)
        .await
        .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
        let aud = audiences.map(|a| format!(" for audience {}", a.join(","))).unwrap_or_default();
        return Ok(Err(format!("the bearer token was refused{aud}: {why}")));
    }
    let user = status.user.unwrap_or_default();
    Ok(Ok(Caller {
        user: user.username.unwrap_or_default(),
        groups: user.groups.unwrap_or_default(),
        uid: user.uid.unwrap_or_default(),
        extra: user.extra.unwrap_or_default(),
    }))
}

/// User = CN, groups = O, as the API server reads client certificates.
fn caller_of_cert(der: &[u8]) -> Result<Caller, AuthError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| AuthError::Unauthenticated(format!("client certificate: unreadable: {e}")))?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| AuthError::Unauthenticated("client certificate: no common name (the user)".into()))?;
    let mut groups: Vec<String> =
        subject.iter_organization().filter_map(|o| o.as_str().ok()).map(str::to_string).collect();
    groups.push("system:authenticated".into());
    Ok(Caller { user: user.to_string(), groups, ..Default::default() })
}

/// One JSON line per mutating call, on stdout, whatever the log format.
#[derive(Debug, serde::Serialize)]
pub struct AuditLine<'a> {
    pub audit: &'static str,
    pub time_ms: i64,
    pub user: &'a str,
    pub groups: &'a [String],
    pub verb: &'a str,
    pub key: &'a str,
    pub namespace: &'a str,
    pub targets: Vec<String>,
    pub filter: &'a str,
    pub result: String,
}

impl AuditLine<'_> {
    pub fn write(&self) {
        use std::io::Write;
        // A plain struct always serialises; a closed stdout only loses the line.
        let line = serde_json::to_string(self).expect("audit line serialises");
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_its_user_and_groups() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "alice");
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "qa");
        let cert = params.self_signed(&key).expect("cert");
        let who = caller_of_cert(cert.der()).expect("caller");
        assert_eq!(who.user, "alice");
        assert_eq!(who.groups, vec!["qa".to_string(), "system:authenticated".into()]);
    }

    #[test]
    fn a_certificate_without_a_common_name_is_refused() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "qa");
        let cert = params.self_signed(&key).expect("cert");
        let err = caller_of_cert(cert.der()).expect_err("no CN");
        assert!(err.to_string().contains("no common name"), "{err}");
    }

    #[test]
    fn accesses_read_as_rbac_would_say_them() {
        assert_eq!(Access::env("create", "a").to_string(), "create previewenvironments.preview.dev in namespace \"a\"");
        assert_eq!(
            Access::of("get", "apps", "deployments", "a", "web").to_string(),
            "get deployments.apps \"web\" in namespace \"a\""
        );
    }

    #[test]
    fn the_cache_answers_and_stays_bounded() {
        let c: Cache<u32, bool> = Cache::new();
        c.put(1, true);
        assert_eq!(c.get(&1), Some(true));
        for i in 0..(CACHE_MAX as u32 + 10) {
            c.put(i, false);
        }
        assert!(c.entries.lock().expect("lock").len() <= CACHE_MAX);
    }
}
