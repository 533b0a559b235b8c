//! Share links: what a link points at while it lives, and what is kept of
//! it once it has ended (so its URL answers "ended", never staging).

use serde::{Deserialize, Serialize};

use super::field::FieldError;
use super::ttl::Ttl;

/// Characters of a slug: 20 of base32, 100 bits from the OS's random source.
pub const SLUG_LEN: usize = 20;
/// At most this many live links per environment.
pub const MAX_LINKS_PER_ENV: usize = 16;
/// Ended links answer 410 for this long, then 404.
pub const ENDED_KEPT_MS: i64 = 7 * 24 * 3600 * 1000;
/// At most this many ended links are kept (the oldest go first).
pub const MAX_ENDED: usize = 10_000;

/// What a new link asks for (the Share RPC, or `feature.preview.share`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareSpec {
    /// The entry Service; empty: the one that selects the first target.
    pub service: String,
    /// 0: the Service's only port, or the one named `http`.
    pub port: u16,
    /// `None`: as long as the environment.
    pub ttl: Option<Ttl>,
    pub staging_url: String,
}

/// A live link, kept on its environment's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareLink {
    pub slug: String,
    /// `http://<slug>.<share domain>/`, as previewd's domain was when it was made.
    pub url: String,
    /// The entry Service in the environment's namespace, and its port.
    pub service: String,
    pub port: u16,
    /// The Service's ClusterIP and port, where the gateway forwards.
    pub upstream: String,
    pub created_by: String,
    pub created_at_ms: i64,
    /// `None`: as long as the environment.
    pub expires_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staging_url: String,
}

impl ShareLink {
    /// The Host the gateway sends upstream: the Service's own name.
    pub fn authority(&self, namespace: &str) -> String {
        format!("{}.{namespace}.svc:{}", self.service, self.port)
    }

    pub fn expired_at(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }
}

/// What is kept of a link that ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndedLink {
    pub slug: String,
    pub ended_at_ms: i64,
    /// "cleaned", "expired" or "revoked".
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staging_url: String,
}

impl EndedLink {
    pub fn of(link: &ShareLink, reason: &str, now_ms: i64) -> EndedLink {
        EndedLink {
            slug: link.slug.clone(),
            ended_at_ms: now_ms,
            reason: reason.into(),
            staging_url: link.staging_url.clone(),
        }
    }
}

/// A fresh slug: [`SLUG_LEN`] base32 characters (100 random bits), a DNS label.
pub fn new_slug() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = [0u8; SLUG_LEN];
    // The OS random source failing is not something we can recover from.
    getrandom::fill(&mut bytes).expect("OS random source unavailable");
    bytes.iter().map(|b| ALPHABET[(b & 31) as usize] as char).collect()
}

/// The link's URL: `http://<slug>.<domain>/` (the domain may carry a port).
pub fn share_url(slug: &str, domain: &str) -> String {
    format!("http://{slug}.{domain}/")
}

/// The slug of a URL or a bare slug, as `field` (`revoke`) gives it.
pub fn parse_slug(field: &str, s: &str) -> Result<String, FieldError> {
    let s = s.trim();
    let host = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://")).unwrap_or(s);
    let slug = host.split(['.', '/', ':']).next().unwrap_or_default().to_ascii_lowercase();
    let ok = slug.len() == SLUG_LEN && slug.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    if ok {
        Ok(slug)
    } else {
        Err(FieldError::new(field, format!("{s:?} is not a share link; expected http://<slug>.<domain>/ or the slug")))
    }
}

/// A staging URL for the "ended" page: http(s) only, so the page never
/// links to `javascript:`.
pub fn validate_staging_url(field: &str, s: &str) -> Result<(), FieldError> {
    let ok = s.is_empty()
        || ((s.starts_with("http://") || s.starts_with("https://"))
            && s.len() <= 2048
            && !s.bytes().any(|b| b.is_ascii_control() || b == b'"' || b == b'<' || b == b'>' || b == b' '));
    if ok { Ok(()) } else { Err(FieldError::new(field, format!("{s:?} is not an http(s) URL"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_fresh_labels_and_round_trip_through_urls() {
        let a = new_slug();
        assert_ne!(a, new_slug());
        assert_eq!(parse_slug("revoke", &a).unwrap(), a);
        assert_eq!(parse_slug("revoke", &share_url(&a, "preview.test:30080")).unwrap(), a);
        assert!(crate::model::validate_dns_label("slug", &a, 63).is_ok());
        let e = parse_slug("revoke", "http://short.preview.test/").unwrap_err();
        assert_eq!(e.field, "revoke");
    }

    #[test]
    fn staging_urls_are_http_only() {
        assert!(validate_staging_url("staging_url", "").is_ok());
        assert!(validate_staging_url("staging_url", "http://198.19.0.10:8080/").is_ok());
        assert!(validate_staging_url("staging_url", "javascript:alert(1)").is_err());
        assert!(validate_staging_url("staging_url", "http://x/\"><script>").is_err());
    }
}
