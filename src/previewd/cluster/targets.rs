//! Reading targets: a workload's pod template and selector, the container
//! to clone, and the workload a pod belongs to.

use ::kube::api::{Api, ObjectMeta};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::names::{LABEL_KEY, label_selector};
use super::pods::Resolved;
use super::{Cluster, KubeError};
use crate::model::{Target, WorkloadKind};

impl Cluster {
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

    /// The running pods of a target (not preview pods).
    pub async fn target_pods(&self, ns: &str, kind: WorkloadKind, name: &str) -> Result<Vec<Pod>, KubeError> {
        let Some((labels, fields)) = self.target_selector(ns, kind, name).await? else { return Ok(Vec::new()) };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut lp = ::kube::api::ListParams::default().labels(&labels);
        if !fields.is_empty() {
            lp = lp.fields(&fields);
        }
        Ok(api.list(&lp).await.map_err(KubeError::api(format!("list pods of {}/{name}", kind.as_str())))?.items)
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
    /// The workload a pod belongs to, and the pod's UID.
    pub async fn target_of_pod(
        &self,
        ns: &str,
        pod: &str,
    ) -> Result<Option<(WorkloadKind, String, String)>, KubeError> {
        let p = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(pod)
            .await
            .map_err(KubeError::api(format!("get pod {ns}/{pod}")))?;
        let Some(p) = p else { return Ok(None) };
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let owner = p.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true)).cloned();
        let (kind, name) = match owner {
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
        };
        Ok(Some((kind, name, uid)))
    }
}
