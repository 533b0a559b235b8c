//! How a target consumes, as an admin declares it (`QueueSplit`, the CRD in
//! deploy/previewd/crd-queuesplit.yaml), and the one change previewd makes
//! to a target: pointing its topic variable elsewhere (a rolling restart).

use ::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{EnvVar, Pod, PodSpec};
use serde_json::Value;

use super::names::label_selector;
use super::{Cluster, KubeError};
use crate::model::queue::QueueType;

/// `queuesplits.preview.dev/v1alpha1`.
pub fn queuesplit_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("preview.dev", "v1alpha1", "QueueSplit");
    ApiResource::from_gvk_with_plural(&gvk, "queuesplits")
}

/// Where the brokers' address (Kafka), the endpoint URL (SQS) or the AMQP
/// URL (RabbitMQ) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Brokers {
    Value(String),
    /// An env var of the target's container.
    Env(String),
}

/// One queue of a QueueSplit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDecl {
    /// The QueueSplit's name.
    pub declared_by: String,
    pub id: String,
    pub queue_type: QueueType,
    pub brokers: Brokers,
    /// The variable that names the topic (Kafka: `topicEnv`) or the queue
    /// (SQS, RabbitMQ: `queueEnv`; SQS: its name or URL).
    pub topic_env: String,
    /// Kafka's consumer group variable (`groupIdEnv`); empty for the others.
    pub group_env: String,
    /// SQS: the signing region (`region`; empty: previewd's default).
    pub region: String,
    /// Empty: every container that has `topic_env`.
    pub containers: Vec<String>,
}

/// The queue `id` of a QueueSplit's spec. `Err` says what is wrong with it,
/// naming the spec field.
pub fn declared_queue(name: &str, spec: &Value, id: &str) -> Result<Option<QueueDecl>, String> {
    let Some(queues) = spec.get("queues").and_then(Value::as_array) else {
        return Err(format!("QueueSplit {name}: spec.queues must be a list"));
    };
    let Some((i, q)) = queues.iter().enumerate().find(|(_, q)| q.get("id").and_then(Value::as_str) == Some(id)) else {
        return Ok(None);
    };
    let field = |f: &str| format!("QueueSplit {name}: spec.queues[{i}].{f}");
    let string = |f: &str| -> Result<String, String> {
        q.get(f)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| field(f) + " is required")
    };
    let type_name = q.get("type").and_then(Value::as_str).unwrap_or("Kafka");
    let queue_type = QueueType::parse(type_name).ok_or_else(|| field("type") + " must be Kafka, SQS or RMQ")?;
    let brokers = match q.get("brokers") {
        Some(b) => match (b.get("value").and_then(Value::as_str), b.get("fromEnv").and_then(Value::as_str)) {
            (Some(v), None) if !v.is_empty() => Brokers::Value(v.into()),
            (None, Some(e)) if !e.is_empty() => Brokers::Env(e.into()),
            _ => return Err(field("brokers") + " needs exactly one of value, fromEnv"),
        },
        None => return Err(field("brokers") + " is required"),
    };
    let containers = match q.get("containers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(c)) => c.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(_) => return Err(field("containers") + " must be a list of container names"),
    };
    let (topic_env, group_env) = match queue_type {
        QueueType::Kafka => (string("topicEnv")?, string("groupIdEnv")?),
        QueueType::Sqs | QueueType::Rmq => (string("queueEnv")?, String::new()),
    };
    let region = q.get("region").and_then(Value::as_str).unwrap_or_default().to_string();
    Ok(Some(QueueDecl {
        declared_by: name.to_string(),
        id: id.to_string(),
        queue_type,
        brokers,
        topic_env,
        group_env,
        region,
        containers,
    }))
}

/// An env var's literal value in a pod spec's container.
pub fn env_value(spec: &PodSpec, container: &str, var: &str) -> Option<Result<String, ()>> {
    let c = spec.containers.iter().find(|c| c.name == container)?;
    let e = c.env.iter().flatten().find(|e| e.name == var)?;
    Some(e.value.clone().ok_or(()))
}

impl Cluster {
    /// The QueueSplit in `ns` whose target is Deployment `deployment`, as
    /// (name, spec). `None` when no admin has declared one.
    pub async fn queue_split(&self, ns: &str, deployment: &str) -> Result<Option<(String, Value)>, KubeError> {
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &queuesplit_resource());
        let list =
            api.list(&ListParams::default()).await.map_err(KubeError::api(format!("list queuesplits in {ns}")))?;
        Ok(list.items.into_iter().find_map(|o| {
            let spec = o.data.get("spec")?.clone();
            let t = spec.get("target")?;
            let kind = t.get("kind").and_then(Value::as_str).unwrap_or("Deployment");
            (kind == "Deployment" && t.get("name").and_then(Value::as_str) == Some(deployment))
                .then(|| (o.metadata.name.clone().unwrap_or_default(), spec))
        }))
    }

    pub async fn deployment(&self, ns: &str, name: &str) -> Result<Option<Deployment>, KubeError> {
        Api::<Deployment>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(KubeError::api(format!("get deployment/{name}")))
    }

    /// Sets `var` to `value` in the named containers of the Deployment's pod
    /// template (a rolling restart when it changes), and records the
    /// original in an annotation so that it can always be restored.
    pub async fn set_topic_env(
        &self,
        ns: &str,
        name: &str,
        containers: &[String],
        var: &str,
        value: &str,
        annotation: (&str, Option<&str>),
    ) -> Result<(), KubeError> {
        let env = vec![EnvVar { name: var.into(), value: Some(value.into()), ..Default::default() }];
        let cs: Vec<Value> = containers.iter().map(|c| serde_json::json!({"name": c, "env": env})).collect();
        let patch = serde_json::json!({
            "metadata": {"annotations": {annotation.0: annotation.1}},
            "spec": {"template": {"spec": {"containers": cs}}},
        });
        Api::<Deployment>::namespaced(self.client.clone(), ns)
            .patch(name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
            .map_err(KubeError::api(format!("patch deployment/{name}")))?;
        Ok(())
    }

    /// How many of the Deployment's pods (terminating ones too) still have
    /// `var` = `value` in one of `containers`.
    pub async fn pods_with_env(
        &self,
        ns: &str,
        deployment: &str,
        containers: &[String],
        var: &str,
        value: &str,
    ) -> Result<usize, KubeError> {
        let Some(d) = self.deployment(ns, deployment).await? else { return Ok(0) };
        let Some(sel) = d.spec.map(|s| label_selector(&s.selector)) else { return Ok(0) };
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default().labels(&sel))
            .await
            .map_err(KubeError::api(format!("list pods of deployment/{deployment}")))?;
        Ok(pods
            .items
            .iter()
            .filter(|p| {
                p.spec.as_ref().is_some_and(|s| {
                    containers.iter().any(|c| env_value(s, c, var).and_then(Result::ok).as_deref() == Some(value))
                })
            })
            .count())
    }

    /// How many pods labelled with the environment's key exist (terminating ones too).
    pub async fn env_pods(&self, ns: &str, key: &str) -> Result<usize, KubeError> {
        let sel = self.selector(&format!("{}={key}", super::names::LABEL_KEY));
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default().labels(&sel))
            .await
            .map_err(KubeError::api(format!("list pods of environment {key}")))?;
        Ok(pods.items.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_declaration_and_names_what_is_wrong() {
        let spec = serde_json::json!({"target": {"kind": "Deployment", "name": "c"}, "queues": [
            {"id": "orders", "brokers": {"fromEnv": "KAFKA"}, "topicEnv": "TOPIC", "groupIdEnv": "GROUP"},
            {"id": "bad", "brokers": {"value": "b:9092", "fromEnv": "X"}, "topicEnv": "T", "groupIdEnv": "G"},
            {"id": "nogroup", "brokers": {"value": "b:9092"}, "topicEnv": "T"},
            {"id": "sqs", "type": "SQS", "brokers": {"value": "http://q:9324"}, "queueEnv": "Q", "region": "eu-west-1"},
            {"id": "rmq", "type": "RMQ", "brokers": {"fromEnv": "AMQP_URL"}, "topicEnv": "Q"},
        ]});
        let q = declared_queue("qs", &spec, "orders").unwrap().unwrap();
        assert_eq!((q.brokers, q.topic_env.as_str(), q.containers.len()), (Brokers::Env("KAFKA".into()), "TOPIC", 0));
        assert_eq!(declared_queue("qs", &spec, "other").unwrap(), None);
        assert!(declared_queue("qs", &spec, "bad").unwrap_err().contains("spec.queues[1].brokers"));
        assert!(declared_queue("qs", &spec, "nogroup").unwrap_err().contains("spec.queues[2].groupIdEnv"));
        let q = declared_queue("qs", &spec, "sqs").unwrap().unwrap();
        assert_eq!((q.queue_type, q.topic_env.as_str(), q.region.as_str()), (QueueType::Sqs, "Q", "eu-west-1"));
        assert!(declared_queue("qs", &spec, "rmq").unwrap_err().contains("spec.queues[4].queueEnv"));
    }
}
