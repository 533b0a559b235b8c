//! `feature.split_queues`, in both of mirrord's forms: a map by queue id, or
//! a list of entries with `queue_id`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::fields::{Result, as_object, check_fields, type_name};
use crate::model::FieldError;
use crate::model::queue::{MAX_QUEUES, QueueAsk, QueueMode, QueueType, compile_regex};

/// mirrord fields of an entry that previewd cannot honour: a filter we would
/// ignore would send the wrong messages, so they are errors, not warnings.
const UNSUPPORTED: &[&str] = &["jq_filter", "payload_protobuf"];

pub(super) fn parse_split_queues(v: &Value) -> Result<Vec<QueueAsk>> {
    let field = "feature.split_queues";
    let entries: Vec<(String, String, &Map<String, Value>)> = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Object(map) => map
            .iter()
            .map(|(id, e)| {
                let f = format!("{field}.{id}");
                Ok((f.clone(), id.clone(), as_object(&f, e)?))
            })
            .collect::<Result<_>>()?,
        Value::Array(list) => list
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let f = format!("{field}[{i}]");
                let obj = as_object(&f, e)?;
                let id = match obj.get("queue_id") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(FieldError::new(
                            format!("{f}.queue_id"),
                            format!("expected a string, got {}", type_name(other)),
                        ));
                    }
                    None => return Err(FieldError::new(format!("{f}.queue_id"), "required in the list form")),
                };
                Ok((f, id, obj))
            })
            .collect::<Result<_>>()?,
        other => {
            return Err(FieldError::new(
                field,
                format!("expected a map by queue id or a list of entries, got {}", type_name(other)),
            ));
        }
    };
    if entries.len() > MAX_QUEUES {
        return Err(FieldError::new(field, format!("{} queues; at most {MAX_QUEUES} per pod", entries.len())));
    }
    let mut out: Vec<QueueAsk> = Vec::new();
    for (f, id, obj) in entries {
        // 40: it is part of an annotation name on the target (at most 63).
        if id.is_empty() || id.len() > 40 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(FieldError::new(
                f,
                "a queue id of 1 to 40 letters, digits, '-', '_' or '.' (the id its QueueSplit declares)",
            ));
        }
        if out.iter().any(|q| q.queue_id == id) {
            return Err(FieldError::new(f, format!("queue {id:?} is split twice; give it once")));
        }
        let mut ignored = Vec::new();
        check_fields(obj, &f, &["queue_id", "queue_type", "queue_mode", "message_filter"], UNSUPPORTED, &mut ignored)?;
        if let Some(w) = ignored.first() {
            let name = w.split(':').next().unwrap_or(w);
            return Err(FieldError::new(name, "not supported by previewd; use message_filter (header regexes)"));
        }
        let expected = "expected \"Kafka\", \"SQS\" or \"RMQ\"";
        let queue_type = match obj.get("queue_type") {
            Some(Value::String(t)) => QueueType::parse(t).ok_or_else(|| {
                FieldError::new(format!("{f}.queue_type"), format!("{t:?} is not supported; {expected}"))
            })?,
            Some(other) => {
                return Err(FieldError::new(
                    format!("{f}.queue_type"),
                    format!("{expected}, got {}", type_name(other)),
                ));
            }
            None => return Err(FieldError::new(format!("{f}.queue_type"), format!("required; {expected}"))),
        };
        let mode = match obj.get("queue_mode") {
            None | Some(Value::Null) => QueueMode::Steal,
            Some(Value::String(m)) if m == "steal" => QueueMode::Steal,
            Some(Value::String(m)) if m == "mirror" => QueueMode::Mirror,
            Some(other) => {
                return Err(FieldError::new(
                    format!("{f}.queue_mode"),
                    format!("expected \"steal\" or \"mirror\", got {other}"),
                ));
            }
        };
        let filter = match obj.get("message_filter") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let mut rules = BTreeMap::new();
                for (header, re) in m {
                    let hf = format!("{f}.message_filter.{header}");
                    if header.is_empty() {
                        return Err(FieldError::new(format!("{f}.message_filter"), "a header name is empty"));
                    }
                    let re = re.as_str().ok_or_else(|| FieldError::new(&hf, "expected a regex string"))?;
                    compile_regex(re).map_err(|e| FieldError::new(&hf, e))?;
                    rules.insert(header.clone(), re.to_string());
                }
                Some(rules)
            }
            Some(other) => {
                return Err(FieldError::new(
                    format!("{f}.message_filter"),
                    format!("expected a map of header name to regex, got {}", type_name(other)),
                ));
            }
        };
        out.push(QueueAsk { queue_id: id, queue_type, mode, filter });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<QueueAsk>> {
        parse_split_queues(&serde_json::from_str(s).unwrap())
    }

    #[test]
    fn both_of_mirrords_forms() {
        let map = parse(r#"{"orders": {"queue_type": "Kafka", "message_filter": {"tenant": "^a$"}}}"#).unwrap();
        let list =
            parse(r#"[{"queue_id": "orders", "queue_type": "Kafka", "message_filter": {"tenant": "^a$"}}]"#).unwrap();
        assert_eq!(map, list);
        assert_eq!(map[0].mode, QueueMode::Steal);
        let m = parse(r#"{"q": {"queue_type": "SQS"}, "r": {"queue_type": "RMQ", "message_filter": {"h": "^a$"}}}"#)
            .unwrap();
        assert_eq!((m[0].queue_type, m[1].queue_type), (QueueType::Sqs, QueueType::Rmq));
        let m = parse(r#"{"q": {"queue_type": "Kafka", "queue_mode": "mirror"}}"#).unwrap();
        assert_eq!((m[0].mode, m[0].filter.clone()), (QueueMode::Mirror, None));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"q": {"queue_type": "Kafka", "message_filter": {"h": "("}}}"#,
                "feature.split_queues.q.message_filter.h",
            ),
            (r#"{"q": {"queue_type": "PubSub"}}"#, "feature.split_queues.q.queue_type"),
            (r#"{"q": {}}"#, "feature.split_queues.q.queue_type"),
            (r#"{"q": {"queue_type": "Kafka", "queue_mode": "borrow"}}"#, "feature.split_queues.q.queue_mode"),
            (r#"{"q": {"queue_type": "Kafka", "jq_filter": ".x"}}"#, "feature.split_queues.q.jq_filter"),
            (r#"{"q": {"queue_type": "Kafka", "filter": {}}}"#, "feature.split_queues.q.filter"),
            (r#"[{"queue_type": "Kafka"}]"#, "feature.split_queues[0].queue_id"),
            (r#"[{"queue_id": "a b", "queue_type": "Kafka"}]"#, "feature.split_queues[0]"),
            (r#""orders""#, "feature.split_queues"),
        ];
        for (text, field) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.field, field, "{text}: {e}");
        }
    }
}
