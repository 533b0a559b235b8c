//! The objects previewd creates: the per-environment owner, preview pods,
//! and deletes and lists by label.

use std::collections::BTreeMap;

use ::kube::ResourceExt;
use ::kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::names::{LABEL_KEY, LABEL_ROLE, MANAGER, RECORD_DATA, ROLE_ENV, owner_name};
use super::{Cluster, KubeError, is_status};
use crate::model::EnvRecord;

impl Cluster {
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
