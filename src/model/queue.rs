//! Queue splitting, as plain data: what a user asks for
//! (`feature.split_queues`), the message filters and whether two of them can
//! match the same message, and what an environment records about each split
//! queue (its temporary topics or queues), so that none is ever leaked.
//! Kafka's words (topic, brokers, group) name the same things for every
//! broker: for SQS and RabbitMQ a "topic" is a queue, "brokers" the
//! endpoint or AMQP URL, and there is no group.

use std::collections::BTreeMap;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::filter::{self, RequestView};

/// Every temporary topic or queue previewd makes starts with this.
pub const TOPIC_PREFIX: &str = "preview-tmp-";
/// At most this many split queues per pod config.
pub const MAX_QUEUES: usize = 16;

/// The brokers previewd splits (mirrord's `queue_type` names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueType {
    /// Records written before SQS and RabbitMQ were split are Kafka's.
    #[default]
    Kafka,
    #[serde(rename = "SQS")]
    Sqs,
    #[serde(rename = "RMQ")]
    Rmq,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Kafka => "Kafka",
            QueueType::Sqs => "SQS",
            QueueType::Rmq => "RMQ",
        }
    }

    pub fn parse(s: &str) -> Option<QueueType> {
        [QueueType::Kafka, QueueType::Sqs, QueueType::Rmq].into_iter().find(|t| t.as_str() == s)
    }
}

/// `steal`: a matching message goes to the environment only. `mirror`: to
/// the environment and to staging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueMode {
    #[default]
    Steal,
    Mirror,
}

impl QueueMode {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueMode::Steal => "steal",
            QueueMode::Mirror => "mirror",
        }
    }
}

/// Which messages belong to an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageFilter {
    /// The default: header `baggage` with `preview-key=<key>`, or
    /// `x-preview-key: <key>`, exactly as for HTTP.
    Key(String),
    /// mirrord's `message_filter`: every header named must be present with
    /// a value its regex matches; `{}` matches nothing.
    Headers(BTreeMap<String, String>),
}

/// One `feature.split_queues` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueAsk {
    pub queue_id: String,
    pub queue_type: QueueType,
    pub mode: QueueMode,
    /// `None`: the default key filter.
    pub filter: Option<BTreeMap<String, String>>,
}

/// What an environment records about one split queue, before any topic is
/// made: enough to forward, restore and delete without reading anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueBinding {
    pub queue_id: String,
    #[serde(default)]
    pub queue_type: QueueType,
    /// SQS: a FIFO queue (the temporary queues are FIFO too).
    #[serde(default)]
    pub fifo: bool,
    /// SQS: the signing region (ElasticMQ and other local servers ignore it).
    #[serde(default)]
    pub region: String,
    /// The Deployment whose consumers are split (in the environment's namespace).
    pub deployment: String,
    /// The QueueSplit that declares the queue.
    pub declared_by: String,
    /// The containers whose topic variable is pointed elsewhere.
    pub containers: Vec<String>,
    pub brokers: String,
    pub topic_env: String,
    pub original_topic: String,
    pub group: String,
    pub partitions: i32,
    /// Where staging's consumers read while the split lasts.
    pub staging_topic: String,
    /// Where this environment's consumers read.
    pub env_topic: String,
    pub mode: QueueMode,
    pub filter: MessageFilter,
}

impl QueueBinding {
    /// The split this queue is part of: one per Deployment and queue id.
    pub fn split_id(&self, namespace: &str) -> String {
        split_id(namespace, &self.deployment, &self.queue_id)
    }

    /// What the target's variable holds to read `name`: the name, or for
    /// SQS a queue URL when the original was one (same endpoint and account).
    pub fn env_value(&self, name: &str) -> String {
        match self.original_topic.rsplit_once('/') {
            Some((base, _)) if self.queue_type == QueueType::Sqs && name != self.original_topic => {
                format!("{base}/{name}")
            }
            _ => name.to_string(),
        }
    }
}

pub fn split_id(namespace: &str, deployment: &str, queue_id: &str) -> String {
    format!("{namespace}/{deployment}/{queue_id}")
}

/// Staging's temporary topic for a split, a function of the split alone, so
/// every environment on it names the same one.
pub fn staging_topic(namespace: &str, deployment: &str, queue_id: &str) -> String {
    format!("{TOPIC_PREFIX}{:016x}-staging", super::stable_hash(split_id(namespace, deployment, queue_id).as_bytes()))
}

/// An environment's temporary topic for a split.
pub fn env_topic(namespace: &str, deployment: &str, queue_id: &str, key: &str) -> String {
    env_name(namespace, deployment, queue_id, key, 40)
}

fn env_name(namespace: &str, deployment: &str, queue_id: &str, key: &str, readable: usize) -> String {
    let split = super::stable_hash(split_id(namespace, deployment, queue_id).as_bytes());
    // Topic names allow [a-zA-Z0-9._-]; keys are DNS-label-like, but be sure.
    let readable: String = key.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(readable).collect();
    format!("{TOPIC_PREFIX}{split:016x}-{readable}-{:08x}", super::stable_hash(key.as_bytes()) as u32)
}

/// The temporary names for a broker: (staging's, the environment's). SQS
/// names are at most 80 characters, `.fifo` included, which a FIFO queue's
/// must end with.
pub fn temp_names(
    queue_type: QueueType,
    fifo: bool,
    namespace: &str,
    deployment: &str,
    queue_id: &str,
    key: &str,
) -> (String, String) {
    let staging = staging_topic(namespace, deployment, queue_id);
    if queue_type != QueueType::Sqs {
        return (staging, env_topic(namespace, deployment, queue_id, key));
    }
    let env = env_name(namespace, deployment, queue_id, key, 30);
    let suffix = if fifo { ".fifo" } else { "" };
    (format!("{staging}{suffix}"), format!("{env}{suffix}"))
}

/// Compiles one `message_filter` regex (the same limits as HTTP filters).
pub fn compile_regex(s: &str) -> Result<Regex, String> {
    RegexBuilder::new(s).size_limit(1 << 20).build().map_err(|e| format!("regex {s:?} does not compile: {e}"))
}

/// A filter ready to match.
#[derive(Debug, Clone)]
pub enum CompiledFilter {
    Key(filter::Filter),
    Headers(Vec<(String, Regex)>),
}

impl MessageFilter {
    pub fn compile(&self) -> Result<CompiledFilter, String> {
        Ok(match self {
            MessageFilter::Key(k) => CompiledFilter::Key(filter::Filter::Key(k.clone())),
            MessageFilter::Headers(m) => CompiledFilter::Headers(
                m.iter().map(|(h, r)| Ok((h.clone(), compile_regex(r)?))).collect::<Result<_, String>>()?,
            ),
        })
    }

    /// Whether some message could match both. Decided exactly for key
    /// filters; a header filter is disjoint from another only when both pin
    /// one header to different literal values (`^value$`), or when either
    /// is `{}`. Anything else counts as overlapping: refusing is safe,
    /// two environments taking the same message is not.
    pub fn overlaps(&self, other: &MessageFilter) -> bool {
        match (self, other) {
            (MessageFilter::Key(a), MessageFilter::Key(b)) => a == b,
            (MessageFilter::Headers(a), _) if a.is_empty() => false,
            (_, MessageFilter::Headers(b)) if b.is_empty() => false,
            (MessageFilter::Headers(a), MessageFilter::Headers(b)) => !a.iter().any(|(h, ra)| {
                b.iter().any(|(hb, rb)| {
                    hb.eq_ignore_ascii_case(h) && matches!((literal(ra), literal(rb)), (Some(x), Some(y)) if x != y)
                })
            }),
            _ => true,
        }
    }
}

/// The value a regex like `^abc$` matches, when it matches exactly one.
fn literal(re: &str) -> Option<&str> {
    let inner = re.strip_prefix('^')?.strip_suffix('$')?;
    let plain = inner.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_:=@/ ,;".contains(&b));
    plain.then_some(inner)
}

/// A message's headers, as a filter sees them.
pub struct Headers<'a>(pub &'a [(&'a str, &'a [u8])]);

impl RequestView for Headers<'_> {
    fn method(&self) -> &str {
        ""
    }
    fn path_and_query(&self) -> &str {
        ""
    }
    fn for_each_header(&self, f: &mut dyn FnMut(&str, &[u8]) -> bool) -> bool {
        self.0.iter().any(|(n, v)| f(n, v))
    }
}

impl CompiledFilter {
    pub fn matches(&self, headers: &[(&str, &[u8])]) -> bool {
        match self {
            CompiledFilter::Key(f) => f.matches(&Headers(headers)),
            CompiledFilter::Headers(rules) if rules.is_empty() => false,
            CompiledFilter::Headers(rules) => rules.iter().all(|(name, re)| {
                headers
                    .iter()
                    .any(|(n, v)| n.eq_ignore_ascii_case(name) && std::str::from_utf8(v).is_ok_and(|v| re.is_match(v)))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(m: &[(&str, &str)]) -> MessageFilter {
        MessageFilter::Headers(m.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect())
    }

    #[test]
    fn key_filter_matches_as_for_http() {
        let f = MessageFilter::Key("k1".into()).compile().unwrap();
        assert!(f.matches(&[("baggage", b"a=b,preview-key=k1")]));
        assert!(f.matches(&[("X-Preview-Key", b" k1 ")]));
        assert!(!f.matches(&[("baggage", b"preview-key=k12")]));
        assert!(!f.matches(&[("baggage", b"preview-key")]), "malformed baggage matches nothing");
        assert!(!f.matches(&[]));
    }

    #[test]
    fn header_filters_need_every_header_and_empty_matches_nothing() {
        let f = headers(&[("tenant", "^a"), ("kind", "order")]).compile().unwrap();
        assert!(f.matches(&[("tenant", b"abc"), ("kind", b"new-order")]));
        assert!(!f.matches(&[("tenant", b"abc")]));
        assert!(!headers(&[]).compile().unwrap().matches(&[("tenant", b"a")]));
    }

    #[test]
    fn overlap_is_decided_for_exact_keys_and_conservative_otherwise() {
        let k1 = MessageFilter::Key("k1".into());
        assert!(k1.overlaps(&MessageFilter::Key("k1".into())));
        assert!(!k1.overlaps(&MessageFilter::Key("k2".into())));
        assert!(k1.overlaps(&headers(&[("tenant", "^a$")])));
        assert!(!k1.overlaps(&headers(&[])));
        assert!(!headers(&[("tenant", "^a$")]).overlaps(&headers(&[("Tenant", "^b$"), ("x", ".")])));
        assert!(headers(&[("tenant", "^a$")]).overlaps(&headers(&[("tenant", "^a$")])));
        assert!(headers(&[("tenant", "^a")]).overlaps(&headers(&[("tenant", "^b$")])));
    }

    #[test]
    fn topic_names_are_legal_and_stable() {
        let s = staging_topic("shop", "orders", "q");
        assert_eq!(s, staging_topic("shop", "orders", "q"));
        let e = env_topic("shop", "orders", "q", "k1");
        assert_ne!(e, env_topic("shop", "orders", "q", "k2"));
        for t in [s, e] {
            assert!(t.starts_with(TOPIC_PREFIX) && t.len() < 249);
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{t}");
        }
        let long = "k".repeat(63);
        let (s, e) = temp_names(QueueType::Sqs, true, "shop", "orders", "q", &long);
        assert!(s.ends_with("-staging.fifo") && e.ends_with(".fifo") && e.len() <= 80, "{s} {e}");
        let (s, e) = temp_names(QueueType::Rmq, false, "shop", "orders", "q", "k1");
        assert_eq!((s, e), (staging_topic("shop", "orders", "q"), env_topic("shop", "orders", "q", "k1")));
    }
}
