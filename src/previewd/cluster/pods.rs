//! Building preview pods and agent containers: pure functions from a plan
//! to Kubernetes objects, tested without a cluster.

pub use crate::model::stable_hash;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EphemeralContainer, ExecAction, Lifecycle, LifecycleHandler, Pod,
    PodReadinessGate, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::names::{
    ANNOTATION_CONTAINER, ANNOTATION_TARGET, LABEL_GROUP, LABEL_INSTANCE, READINESS_GATE, ROLE_POD, labels,
};
use crate::model::Target;
use crate::model::podspec::{
    AGENT_BIN, ARG_LINGER, ARG_SERVER, CMD_CLEANUP, CMD_OUTBOUND, CMD_READY, CMD_RUN, ENV_CA, ENV_KEY, ENV_LOG,
    ENV_POD_NAME, ENV_POD_NAMESPACE, ENV_PROOF, SIDECAR,
};

/// The parts of a target that a preview pod is cloned from.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub template: PodTemplateSpec,
    pub container: String,
    /// Ports of the chosen container, used when the config names none.
    pub ports: Vec<u16>,
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
            overrides.push((ENV_KEY, plan.key));
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

/// Root with every capability dropped but NET_ADMIN (nat rules, conntrack),
/// NET_RAW (iptables-legacy's socket, where nft is missing) and, for the
/// outbound sidecar, SETGID (its marker group); no privilege escalation, and
/// the runtime's default seccomp profile.
fn agent_security(setgid: bool) -> SecurityContext {
    let mut add = vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()];
    if setgid {
        add.push("SETGID".into());
    }
    SecurityContext {
        capabilities: Some(Capabilities { add: Some(add), drop: Some(vec!["ALL".into()]) }),
        run_as_user: Some(0),
        run_as_non_root: Some(false),
        allow_privilege_escalation: Some(false),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

fn outbound_sidecar(image: &str, key: &str, pull_policy: Option<&str>) -> Container {
    Container {
        name: SIDECAR.into(),
        image: Some(image.into()),
        image_pull_policy: pull_policy.map(str::to_string),
        args: Some(vec![CMD_OUTBOUND.into()]),
        env: Some(vec![
            EnvVar { name: ENV_KEY.into(), value: Some(key.into()), value_from: None },
            EnvVar { name: ENV_LOG.into(), value: Some("info".into()), value_from: None },
        ]),
        restart_policy: Some("Always".into()),
        security_context: Some(agent_security(true)),
        // The admin port opens once the rules are in. The kubelet starts the
        // app only after this hook returns (a startup probe would cost up to
        // its 1 s period).
        lifecycle: Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction { command: Some(vec![AGENT_BIN.into(), CMD_READY.into()]) }),
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
/// `trust`: the CA the agent trusts and its proof of the pod, when
/// previewd serves TLS.
pub fn agent_container(
    name: &str,
    image: &str,
    args: Vec<String>,
    pod: &str,
    ns: &str,
    pull: Option<&str>,
    trust: Option<(&str, String)>,
) -> EphemeralContainer {
    let env = |n: &str, v: &str| EnvVar { name: n.into(), value: Some(v.into()), value_from: None };
    let mut vars = vec![env(ENV_POD_NAME, pod), env(ENV_POD_NAMESPACE, ns), env(ENV_LOG, "info")];
    if let Some((ca, proof)) = trust {
        vars.extend([env(ENV_CA, ca), env(ENV_PROOF, &proof)]);
    }
    EphemeralContainer {
        name: name.into(),
        image: Some(image.into()),
        image_pull_policy: pull.map(str::to_string),
        args: Some(args),
        env: Some(vars),
        security_context: Some(agent_security(false)),
        ..Default::default()
    }
}

/// The arguments of an agent that streams its routes from `server`.
pub fn agent_args(server: &str, linger: std::time::Duration) -> Vec<String> {
    vec![CMD_RUN.into(), ARG_SERVER.into(), server.into(), ARG_LINGER.into(), format!("{}s", linger.as_secs())]
}

/// The arguments of an agent that removes rules a killed agent left.
pub fn cleanup_args() -> Vec<String> {
    vec![CMD_CLEANUP.into()]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::previewd::cluster::names::LABEL_KEY;
    use ::kube::ResourceExt;
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
        assert_eq!(env, vec![("A".into(), "new".into()), ("B".into(), "b".into()), (ENV_KEY.into(), "k1".into())]);
        assert_eq!(spec.containers[1].image.as_deref(), Some("side:v1"));
        assert_eq!(spec.readiness_gates.as_ref().unwrap()[0].condition_type, READINESS_GATE);
        // The outbound sidecar comes first, as a native sidecar with the key.
        let side = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!((side.name.as_str(), side.restart_policy.as_deref()), (SIDECAR, Some("Always")));
        let sc = side.security_context.as_ref().unwrap();
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(
            (caps.drop.as_deref(), caps.add.as_deref()),
            (
                Some(&["ALL".to_string()][..]),
                Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string(), "SETGID".to_string()][..])
            )
        );
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
        let agent = agent_container(
            "preview-agent-1",
            "agent:dev",
            agent_args("http://p:7443", std::time::Duration::from_secs(600)),
            "p",
            "ns",
            None,
            Some(("CA PEM", "proof".into())),
        );
        let env: Vec<(&str, &str)> =
            agent.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or(""))).collect();
        assert!(env.contains(&(ENV_CA, "CA PEM")) && env.contains(&(ENV_PROOF, "proof")), "{env:?}");
        let caps = agent.security_context.unwrap().capabilities.unwrap();
        assert_eq!(
            caps.add.as_deref(),
            Some(&["NET_ADMIN".to_string(), "NET_RAW".to_string()][..]),
            "the inbound agent needs no SETGID"
        );
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
