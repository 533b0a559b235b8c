//! Cluster operations: reading targets, building and creating preview pods,
//! the per-environment owner object, deleting by label, and watching pods.
//!
//! Every object we create carries the key label, so the cluster alone is
//! enough to rebuild or clean state.

use std::collections::BTreeMap;

use ::kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use ::kube::{Client, ResourceExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, EnvVar, EphemeralContainer, ExecAction, Lifecycle, LifecycleHandler, Namespace,
    Pod, PodReadinessGate, PodSpec, PodTemplateSpec, ResourceRequirements, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};

use crate::config::{Target, WorkloadKind};
use crate::previewd::store::EnvRecord;

pub const LABEL_KEY: &str = "preview.dev/key";
pub const LABEL_ROLE: &str = "preview.dev/role";
pub const LABEL_GROUP: &str = "preview.dev/group";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Which previewd owns an object: several can share a cluster.
pub const LABEL_INSTANCE: &str = "preview.dev/instance";
pub const MANAGER: &str = "previewd";
pub const ROLE_POD: &str = "pod";
pub const ROLE_ENV: &str = "env";
pub const ANNOTATION_TARGET: &str = "preview.dev/target";
pub const ANNOTATION_CONTAINER: &str = "preview.dev/container";
/// A readiness gate nobody sets: the pod never turns Ready, so the target
/// Service's EndpointSlices never send it unfiltered traffic.
pub const READINESS_GATE: &str = "preview.dev/routed";
/// The env var that tells a preview pod its key.
pub const KEY_ENV: &str = "PREVIEW_KEY";
const RECORD_DATA: &str = "environment.json";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("namespace {0:?} does not exist")]
    NamespaceNotFound(String),
    #[error("{target} not found in namespace {namespace:?}")]
    TargetNotFound { target: String, namespace: String },
    #[error("{target} has no container {container:?}; it has: {available}")]
    ContainerNotFound { target: String, container: String, available: String },
    #[error("{target} has no containers")]
    NoContainers { target: String },
    #[error("kubernetes API: {action}: {source}")]
    Api { action: String, source: ::kube::Error },
}

impl KubeError {
    fn api(action: impl Into<String>) -> impl FnOnce(::kube::Error) -> KubeError {
        let action = action.into();
        move |source| KubeError::Api { action, source }
    }
}

fn is_status(e: &::kube::Error, code: u16) -> bool {
    matches!(e, ::kube::Error::Api(s) if s.code == code)
}

/// The parts of a target that a preview pod is cloned from.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub template: PodTemplateSpec,
    pub container: String,
    /// Ports of the chosen container, used when the config names none.
    pub ports: Vec<u16>,
}

#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// Forces this pull policy on preview containers (e.g. "Never" on a registry-less cluster).
    pub pull_policy: Option<String>,
    /// This previewd's instance name; it only sees objects labelled with it.
    pub instance: String,
    /// The preview-agent image; without it no agent is attached or added.
    pub agent_image: Option<String>,
}

impl Cluster {
    pub fn new(client: Client, pull_policy: Option<String>, instance: String, agent_image: Option<String>) -> Self {
        Cluster { client, pull_policy, instance, agent_image }
    }

    /// The label selector of a target's pods, without preview pods (they
    /// carry the target's labels too). `None` if the target is gone.
    pub async fn target_selector(
        &self,
        ns: &str,
        kind: WorkloadKind,
        name: &str,
    ) -> Result<Option<(String, String)>, KubeError> {
        if kind == WorkloadKind::Pod {
            return Ok(Some((format!("!{LABEL_KEY}"), format!("metadata.name={name}"))));
        }
        let sel = self.controller(ns, kind, name, format!("get {}/{name}", kind.as_str())).await?.map(|(_, s)| s);
        Ok(sel.map(|s| (label_selector(&s), String::new())))
    }

    /// Label selector for everything this instance manages, plus `extra`.
    pub fn selector(&self, extra: &str) -> String {
        let base = format!("{LABEL_MANAGED_BY}={MANAGER},{LABEL_INSTANCE}={}", self.instance);
        if extra.is_empty() { base } else { format!("{base},{extra}") }
    }

    pub fn labels(&self, key: &str, role: &str) -> BTreeMap<String, String> {
        let mut l = labels(key, role);
        l.insert(LABEL_INSTANCE.into(), self.instance.clone());
        l
    }

    pub async fn ensure_namespace(&self, ns: &str) -> Result<(), KubeError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.get_opt(ns).await.map_err(KubeError::api(format!("get namespace {ns}")))? {
            Some(_) => Ok(()),
            None => Err(KubeError::NamespaceNotFound(ns.to_string())),
        }
    }

    /// A controller's pod template and selector; `None` when it does not
    /// exist (and for pods, which are not controllers).
    async fn controller(
        &self,
        ns: &str,
        kind: WorkloadKind,
        name: &str,
        what: String,
    ) -> Result<Option<(Option<PodTemplateSpec>, LabelSelector)>, KubeError> {
        let c = self.client.clone();
        Ok(match kind {
            WorkloadKind::Deployment => Api::<Deployment>::namespaced(c, ns)
                .get_opt(name)
                .await
                .map_err(KubeError::api(what))?
                .and_then(|d| d.spec)
                .map(|s| (Some(s.template), s.selector)),
            WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(c, ns)
                .get_opt(name)
                .await
                .map_err(KubeError::api(what))?
                .and_then(|d| d.spec)
                .map(|s| (Some(s.template), s.selector)),
            WorkloadKind::ReplicaSet => Api::<ReplicaSet>::namespaced(c, ns)
                .get_opt(name)
                .await
                .map_err(KubeError::api(what))?
                .and_then(|d| d.spec)
                .map(|s| (s.template, s.selector)),
            WorkloadKind::Pod => None,
        })
    }

    /// Reads the target's pod template and picks the container.
    pub async fn resolve(&self, ns: &str, target: &Target) -> Result<Option<Resolved>, KubeError> {
        let Target::Workload { kind, name, container, .. } = target else { return Ok(None) };
        let what = format!("get {target}");
        let template = match kind {
            WorkloadKind::Pod => {
                Api::<Pod>::namespaced(self.client.clone(), ns).get_opt(name).await.map_err(KubeError::api(what))?.map(
                    |p| PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: p.metadata.labels,
                            annotations: p.metadata.annotations,
                            ..Default::default()
                        }),
                        spec: p.spec,
                    },
                )
            }
            _ => self.controller(ns, *kind, name, what).await?.and_then(|(t, _)| t),
        };
        let template = template.ok_or_else(|| KubeError::TargetNotFound {
            target: Target::Workload { kind: *kind, name: name.clone(), container: None, namespace: None }.to_string(),
            namespace: ns.to_string(),
        })?;
        let containers = template.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
        let chosen = match container {
            None => containers.first().ok_or_else(|| KubeError::NoContainers { target: target.to_string() })?,
            Some(c) => containers.iter().find(|x| &x.name == c).ok_or_else(|| KubeError::ContainerNotFound {
                target: format!("{}/{name}", kind.as_str()),
                container: c.clone(),
                available: containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
            })?,
        };
        let ports = chosen
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect();
        Ok(Some(Resolved { container: chosen.name.clone(), template, ports }))
    }

    /// The workload a pod belongs to: its ReplicaSet's Deployment, its
    /// StatefulSet or ReplicaSet, or the pod itself. `None` if the pod is gone.
    pub async fn target_of_pod(&self, ns: &str, pod: &str) -> Result<Option<(WorkloadKind, String)>, KubeError> {
        let p = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(pod)
            .await
            .map_err(KubeError::api(format!("get pod {ns}/{pod}")))?;
        let Some(p) = p else { return Ok(None) };
        let owner = p.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true)).cloned();
        Ok(Some(match owner {
            Some(o) if o.kind == "ReplicaSet" => {
                let rs = Api::<ReplicaSet>::namespaced(self.client.clone(), ns)
                    .get_opt(&o.name)
                    .await
                    .map_err(KubeError::api(format!("get replicaset {ns}/{}", o.name)))?;
                let dep = rs
                    .and_then(|rs| rs.metadata.owner_references)
                    .and_then(|refs| refs.into_iter().find(|r| r.controller == Some(true) && r.kind == "Deployment"));
                match dep {
                    Some(d) => (WorkloadKind::Deployment, d.name),
                    None => (WorkloadKind::ReplicaSet, o.name),
                }
            }
            Some(o) if o.kind == "StatefulSet" => (WorkloadKind::StatefulSet, o.name),
            _ => (WorkloadKind::Pod, pod.to_string()),
        }))
    }

    /// Creates or updates the environment's owner ConfigMap, which also holds
    /// the record so that `--adopt` can rebuild the store from the cluster.
    pub async fn put_owner(&self, rec: &EnvRecord) -> Result<OwnerReference, KubeError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &rec.namespace);
        let name = owner_name(&rec.key);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(self.labels(&rec.key, ROLE_ENV)),
                ..Default::default()
            },
            // Serialising a plain struct cannot fail.
            data: Some(BTreeMap::from([(
                RECORD_DATA.to_string(),
                serde_json::to_string(rec).expect("record serialises"),
            )])),
            ..Default::default()
        };
        let pp = PatchParams::apply(MANAGER).force();
        let cm = api
            .patch(&name, &pp, &Patch::Apply(&cm))
            .await
            .map_err(KubeError::api(format!("apply configmap {}/{name}", rec.namespace)))?;
        Ok(OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name,
            uid: cm.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        })
    }

    /// Creates a pod; an existing pod of the same name is left alone (names
    /// carry a hash of the spec, so the same name means the same spec).
    pub async fn create_pod(&self, ns: &str, pod: &Pod) -> Result<bool, KubeError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        match api.create(&PostParams::default(), pod).await {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(KubeError::Api { action: format!("create pod {ns}/{}", pod.name_any()), source: e }),
        }
    }

    pub async fn delete_pod(&self, ns: &str, name: &str) -> Result<bool, KubeError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        match api.delete(name, &DeleteParams::default().grace_period(0)).await {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(KubeError::Api { action: format!("delete pod {ns}/{name}"), source: e }),
        }
    }

    /// Deletes every object labelled with `key`, in any namespace. Returns
    /// `kind/namespace/name` of what it deleted.
    pub async fn delete_env(&self, key: &str) -> Result<Vec<String>, KubeError> {
        let selector = self.selector(&format!("{LABEL_KEY}={key}"));
        let mut removed = Vec::new();
        for obj in self.managed(&selector).await? {
            if self.delete_object(&obj).await? {
                removed.push(obj.to_string());
            }
        }
        Ok(removed)
    }

    /// Every object this instance manages that matches `selector` (from
    /// [`Cluster::selector`]), in any namespace.
    pub async fn managed(&self, selector: &str) -> Result<Vec<ManagedObject>, KubeError> {
        let lp = ListParams::default().labels(selector);
        let mut out = Vec::new();
        let pods = Api::<Pod>::all(self.client.clone())
            .list_metadata(&lp)
            .await
            .map_err(KubeError::api("list preview pods"))?;
        let cms = Api::<ConfigMap>::all(self.client.clone())
            .list_metadata(&lp)
            .await
            .map_err(KubeError::api("list preview configmaps"))?;
        let metas = pods.items.into_iter().map(|m| ("pod", m.metadata));
        let metas = metas.chain(cms.items.into_iter().map(|m| ("configmap", m.metadata)));
        for (kind, m) in metas {
            out.push(ManagedObject {
                kind,
                namespace: m.namespace.clone().unwrap_or_default(),
                key: m.labels.as_ref().and_then(|l| l.get(LABEL_KEY)).cloned().unwrap_or_default(),
                name: m.name.clone().unwrap_or_default(),
            });
        }
        Ok(out)
    }

    pub async fn delete_object(&self, obj: &ManagedObject) -> Result<bool, KubeError> {
        if obj.kind == "pod" {
            return self.delete_pod(&obj.namespace, &obj.name).await;
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &obj.namespace);
        match api.delete(&obj.name, &DeleteParams::background()).await {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(KubeError::Api { action: format!("delete {obj}"), source: e }),
        }
    }

    /// Environment records kept in owner ConfigMaps, for `--adopt`.
    pub async fn adoptable(&self) -> Result<Vec<EnvRecord>, KubeError> {
        let lp = ListParams::default().labels(&self.selector(&format!("{LABEL_ROLE}={ROLE_ENV}")));
        let cms = Api::<ConfigMap>::all(self.client.clone())
            .list(&lp)
            .await
            .map_err(KubeError::api("list preview configmaps"))?;
        Ok(cms
            .items
            .into_iter()
            .filter_map(|cm| {
                let data = cm.data.as_ref()?.get(RECORD_DATA)?;
                match serde_json::from_str::<EnvRecord>(data) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(configmap = %cm.name_any(), error = %e, "skipping unreadable environment record");
                        None
                    }
                }
            })
            .collect())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedObject {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub key: String,
}

impl std::fmt::Display for ManagedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// A LabelSelector as a list-call selector string, excluding preview pods.
pub fn label_selector(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.push(format!("!{LABEL_KEY}"));
    parts.join(",")
}

pub fn owner_name(key: &str) -> String {
    format!("preview-env-{key}")
}

pub fn labels(key: &str, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_KEY.to_string(), key.to_string()),
        (LABEL_ROLE.to_string(), role.to_string()),
    ])
}

/// What a preview pod is made of; turned into a Pod by [`build_pod`].
pub struct PodPlan<'a> {
    pub key: &'a str,
    pub group: &'a str,
    pub target: &'a Target,
    /// `None` for targetless.
    pub resolved: Option<&'a Resolved>,
    pub image: &'a str,
    pub env: &'a BTreeMap<String, String>,
    pub pull_policy: Option<&'a str>,
    pub propagate_key: bool,
    pub instance: &'a str,
    /// The agent image, for the outbound sidecar that propagates the key.
    pub agent_image: Option<&'a str>,
}

/// Builds the preview pod (without a name): the target's template with the
/// image swapped and env overridden, or a fresh pod when targetless.
pub fn build_pod(plan: &PodPlan) -> Pod {
    let (mut meta, mut spec, container) = match plan.resolved {
        Some(r) => (
            r.template.metadata.clone().unwrap_or_default(),
            r.template.spec.clone().unwrap_or_default(),
            r.container.clone(),
        ),
        None => (
            ObjectMeta::default(),
            PodSpec { containers: vec![Container { name: "app".into(), ..Default::default() }], ..Default::default() },
            "app".to_string(),
        ),
    };
    // Fields that tie a pod to a node or an owner must not be copied.
    spec.node_name = None;
    spec.ephemeral_containers = None;
    let mut labels_ = meta.labels.take().unwrap_or_default();
    labels_.extend(labels(plan.key, ROLE_POD));
    labels_.insert(LABEL_GROUP.into(), plan.group.into());
    labels_.insert(LABEL_INSTANCE.into(), plan.instance.into());
    let mut annotations = meta.annotations.take().unwrap_or_default();
    annotations.insert(ANNOTATION_TARGET.into(), plan.target.to_string());
    annotations.insert(ANNOTATION_CONTAINER.into(), container.clone());
    for c in spec.containers.iter_mut().filter(|c| c.name == container) {
        c.image = Some(plan.image.to_string());
        if let Some(p) = plan.pull_policy {
            c.image_pull_policy = Some(p.to_string());
        }
        let env = c.env.get_or_insert_with(Vec::new);
        let mut overrides: Vec<(&str, &str)> = plan.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if plan.propagate_key {
            overrides.push((KEY_ENV, plan.key));
        }
        for (name, value) in overrides {
            env.retain(|e| e.name != name);
            env.push(EnvVar { name: name.into(), value: Some(value.into()), value_from: None });
        }
    }
    if plan.propagate_key
        && let Some(image) = plan.agent_image
    {
        // A native sidecar: it starts, and its rules are in, before the app.
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, outbound_sidecar(image, plan.key, plan.pull_policy));
    }
    let gates = spec.readiness_gates.get_or_insert_with(Vec::new);
    if !gates.iter().any(|g| g.condition_type == READINESS_GATE) {
        gates.push(PodReadinessGate { condition_type: READINESS_GATE.into() });
    }
    Pod {
        metadata: ObjectMeta { labels: Some(labels_), annotations: Some(annotations), ..Default::default() },
        spec: Some(spec),
        status: None,
    }
}

/// Name of the outbound sidecar in preview pods.
pub const SIDECAR: &str = "preview-agent";
/// Ephemeral containers we add to target pods: agents and their cleanups.
pub const AGENT_PREFIX: &str = "preview-agent-";
pub const CLEANUP_PREFIX: &str = "preview-cleanup-";

/// Root with NET_ADMIN (nat rules, conntrack) and SETGID (the outbound
/// agent's marker group); nothing else is added.
fn agent_security() -> SecurityContext {
    SecurityContext {
        capabilities: Some(Capabilities { add: Some(vec!["NET_ADMIN".into(), "SETGID".into()]), drop: None }),
        run_as_user: Some(0),
        run_as_non_root: Some(false),
        ..Default::default()
    }
}

fn outbound_sidecar(image: &str, key: &str, pull_policy: Option<&str>) -> Container {
    Container {
        name: SIDECAR.into(),
        image: Some(image.into()),
        image_pull_policy: pull_policy.map(str::to_string),
        args: Some(vec!["outbound".into()]),
        env: Some(vec![
            EnvVar { name: KEY_ENV.into(), value: Some(key.into()), value_from: None },
            EnvVar { name: "RUST_LOG".into(), value: Some("info".into()), value_from: None },
        ]),
        restart_policy: Some("Always".into()),
        security_context: Some(agent_security()),
        // The admin port opens once the rules are in. The kubelet starts the
        // app only after this hook returns (a startup probe would cost up to
        // its 1 s period).
        lifecycle: Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction { command: Some(vec!["/usr/local/bin/preview-agent".into(), "ready".into()]) }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("128Mi".into()))])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An ephemeral container that runs the agent (`run`, routes from
/// `server`) or its `cleanup` in a target pod.
pub fn agent_container(
    name: &str,
    image: &str,
    args: Vec<String>,
    pod: &str,
    ns: &str,
    pull: Option<&str>,
) -> EphemeralContainer {
    let env = |n: &str, v: &str| EnvVar { name: n.into(), value: Some(v.into()), value_from: None };
    EphemeralContainer {
        name: name.into(),
        image: Some(image.into()),
        image_pull_policy: pull.map(str::to_string),
        args: Some(args),
        env: Some(vec![env("POD_NAME", pod), env("POD_NAMESPACE", ns), env("RUST_LOG", "info")]),
        security_context: Some(agent_security()),
        ..Default::default()
    }
}

/// FNV-1a: a stable hash (std's hasher may change between releases), used to
/// name pods after their spec.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Pod names: `<group>-<key>-<spec hash>[-<replica>]`, at most 63 characters.
pub fn pod_names(group: &str, key: &str, template: &serde_json::Value, replicas: u32) -> Vec<String> {
    // Serialising a JSON value cannot fail.
    let hash = stable_hash(&serde_json::to_vec(template).expect("json serialises"));
    let hash = format!("{:05x}", hash & 0xfffff);
    let suffix_len = if replicas > 1 { 3 } else { 0 };
    let room = 63usize.saturating_sub(key.len() + hash.len() + 2 + suffix_len);
    let g: String = group.chars().take(room).collect();
    let g = g.trim_end_matches('-');
    (0..replicas)
        .map(|i| if replicas > 1 { format!("{g}-{key}-{hash}-{i}") } else { format!("{g}-{key}-{hash}") })
        .collect()
}

/// The finished pod for one replica: name and controller owner set.
pub fn instantiate(
    template: &serde_json::Value,
    name: &str,
    ns: &str,
    owner: &OwnerReference,
) -> Result<Pod, serde_json::Error> {
    let mut pod: Pod = serde_json::from_value(template.clone())?;
    pod.metadata.name = Some(name.to_string());
    pod.metadata.namespace = Some(ns.to_string());
    pod.metadata.owner_references = Some(vec![owner.clone()]);
    Ok(pod)
}

/// A pod's state as the Status API reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodState {
    pub phase: String,
    pub ready: bool,
    pub restarts: u32,
    pub node: String,
    pub ip: String,
    pub reason: String,
    pub last_error: String,
}

/// Summarises a pod, looking at the preview container.
pub fn pod_state(pod: &Pod) -> PodState {
    let container = pod.annotations().get(ANNOTATION_CONTAINER).cloned().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let mut st = PodState {
        phase: status.phase.clone().unwrap_or_else(|| "Pending".into()),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ip: status.pod_ip.clone().unwrap_or_default(),
        ..Default::default()
    };
    if pod.metadata.deletion_timestamp.is_some() {
        st.reason = "Terminating".into();
        return st;
    }
    let cs = status.container_statuses.iter().flatten().find(|c| c.name == container);
    match cs {
        Some(cs) => {
            st.ready = cs.ready;
            st.restarts = u32::try_from(cs.restart_count).unwrap_or(0);
            let state = cs.state.clone().unwrap_or_default();
            if let Some(w) = state.waiting {
                st.reason = w.reason.unwrap_or_else(|| "Waiting".into());
                if let Some(m) = w.message.filter(|m| !m.is_empty()) {
                    st.last_error = format!("{}: {m}", st.reason);
                }
            } else if let Some(t) = state.terminated {
                st.reason = t.reason.unwrap_or_else(|| "Terminated".into());
                st.last_error = format!("{} (exit code {})", st.reason, t.exit_code);
            } else if cs.ready {
                st.reason = "Ready".into();
            } else {
                st.reason = "Running".into();
            }
            if st.last_error.is_empty()
                && let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref())
            {
                st.last_error = format!("{} (exit code {})", t.reason.as_deref().unwrap_or("Terminated"), t.exit_code);
            }
        }
        None => {
            let unscheduled =
                status.conditions.iter().flatten().find(|c| c.type_ == "PodScheduled" && c.status == "False");
            match unscheduled {
                Some(c) => {
                    st.reason = c.reason.clone().unwrap_or_else(|| "Unschedulable".into());
                    st.last_error = c.message.clone().unwrap_or_default();
                }
                None => st.reason = if st.node.is_empty() { "Pending".into() } else { "ContainerCreating".into() },
            }
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, Probe, Volume};

    fn resolved() -> Resolved {
        Resolved {
            container: "app".into(),
            ports: vec![8080],
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(BTreeMap::from([("app".to_string(), "orders".to_string())])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some("orders-sa".into()),
                    node_name: Some("n1".into()),
                    volumes: Some(vec![Volume { name: "cfg".into(), ..Default::default() }]),
                    containers: vec![
                        Container {
                            name: "app".into(),
                            image: Some("orders:v1".into()),
                            env: Some(vec![EnvVar { name: "A".into(), value: Some("old".into()), value_from: None }]),
                            readiness_probe: Some(Probe::default()),
                            ports: Some(vec![ContainerPort { container_port: 8080, ..Default::default() }]),
                            ..Default::default()
                        },
                        Container { name: "side".into(), image: Some("side:v1".into()), ..Default::default() },
                    ],
                    ..Default::default()
                }),
            },
        }
    }

    #[test]
    fn clone_swaps_image_keeps_the_rest() {
        let r = resolved();
        let env = BTreeMap::from([("A".to_string(), "new".to_string()), ("B".to_string(), "b".to_string())]);
        let target = Target::parse("target", "deployment/orders").unwrap();
        let pod = build_pod(&PodPlan {
            key: "k1",
            group: "orders",
            target: &target,
            resolved: Some(&r),
            image: "orders:v2",
            env: &env,
            pull_policy: Some("Never"),
            propagate_key: true,
            instance: "i1",
            agent_image: Some("agent:dev"),
        });
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("orders-sa"));
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.volumes.as_ref().unwrap()[0].name, "cfg");
        let app = &spec.containers[0];
        assert_eq!(app.image.as_deref(), Some("orders:v2"));
        assert_eq!(app.image_pull_policy.as_deref(), Some("Never"));
        assert!(app.readiness_probe.is_some());
        let env: Vec<(String, String)> =
            app.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
        assert_eq!(env, vec![("A".into(), "new".into()), ("B".into(), "b".into()), (KEY_ENV.into(), "k1".into())]);
        assert_eq!(spec.containers[1].image.as_deref(), Some("side:v1"));
        assert_eq!(spec.readiness_gates.as_ref().unwrap()[0].condition_type, READINESS_GATE);
        // The outbound sidecar comes first, as a native sidecar with the key.
        let side = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!((side.name.as_str(), side.restart_policy.as_deref()), (SIDECAR, Some("Always")));
        assert_eq!(side.env.as_ref().unwrap()[0].value.as_deref(), Some("k1"));
        let l = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(l.get("app").map(String::as_str), Some("orders"));
        assert_eq!(l.get(LABEL_KEY).map(String::as_str), Some("k1"));
        assert_eq!(pod.annotations().get(ANNOTATION_TARGET).map(String::as_str), Some("deployment/orders"));
    }

    #[test]
    fn names_fit_and_are_stable() {
        let t = serde_json::json!({"a": 1});
        let a = pod_names(&"g".repeat(80), &"k".repeat(40), &t, 3);
        assert!(a.iter().all(|n| n.len() <= 63), "{a:?}");
        assert_eq!(a, pod_names(&"g".repeat(80), &"k".repeat(40), &t, 3));
        assert_ne!(pod_names("g", "k", &t, 1), pod_names("g", "k", &serde_json::json!({"a": 2}), 1));
        assert_eq!(stable_hash(b"a"), 0xaf63dc4c8601ec8c);
    }
}
