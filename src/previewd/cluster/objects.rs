//! The objects previewd creates: the per-environment owner (a
//! `PreviewEnvironment`, the CRD in deploy/previewd/crd.yaml), preview pods,
//! and deletes and lists by label.

use ::kube::ResourceExt;
use ::kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::names::{LABEL_KEY, LABEL_ROLE, MANAGER, ROLE_ENV, owner_name};
use super::{Cluster, KubeError, is_status};
use crate::model::EnvRecord;

/// `previewenvironments.preview.dev/v1alpha1`.
pub fn env_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("preview.dev", "v1alpha1", "PreviewEnvironment");
    ApiResource::from_gvk_with_plural(&gvk, "previewenvironments")
}

/// RFC 3339, as the CRD's `expiresAt` column shows it.
fn rfc3339(ms: i64) -> Option<String> {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok().map(|t| t.to_string())
}

impl Cluster {
    /// Creates or updates the environment's PreviewEnvironment, which also
    /// holds the record, signed, so that `--adopt` can rebuild the store from
    /// the cluster and trusts no record previewd did not write.
    pub async fn put_owner(&self, rec: &EnvRecord) -> Result<OwnerReference, KubeError> {
        let ar = env_resource();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &rec.namespace, &ar);
        let name = owner_name(&rec.key);
        // Serialising a plain struct cannot fail.
        let record = serde_json::to_string(rec).expect("record serialises");
        let mut obj = DynamicObject::new(&name, &ar).within(&rec.namespace).data(serde_json::json!({
            "spec": {
                "key": rec.key.as_str(),
                "mode": rec.mode,
                "pods": rec.pod_names().count(),
                "targets": rec.pods.iter().map(|p| p.target.to_string()).collect::<Vec<_>>(),
                "expiresAt": rec.expires_at_ms.and_then(rfc3339),
                "creator": rec.creator,
                "deleting": rec.deleting,
                "recordMac": self.signer.as_ref().map(|s| s.sign(record.as_bytes())),
                "record": record,
            }
        }));
        obj.metadata.labels = Some(self.labels(&rec.key, ROLE_ENV));
        let pp = PatchParams::apply(MANAGER).force();
        let obj = api
            .patch(&name, &pp, &Patch::Apply(&obj))
            .await
            .map_err(KubeError::api(format!("apply previewenvironment {}/{name}", rec.namespace)))?;
        Ok(OwnerReference {
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
            name,
            uid: obj.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(false),
        })
    }

    /// Writes how many of the environment's pods are ready, for `kubectl get pe`.
    pub async fn put_owner_status(&self, ns: &str, key: &str, ready: usize) -> Result<(), KubeError> {
        let ar = env_resource();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
        let name = owner_name(key);
        let mut obj = DynamicObject::new(&name, &ar).within(ns);
        obj.data = serde_json::json!({"status": {"ready": ready}});
        let pp = PatchParams::apply(MANAGER).force();
        match api.patch_status(&name, &pp, &Patch::Apply(&obj)).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(KubeError::Api { action: format!("status of previewenvironment {ns}/{name}"), source: e }),
        }
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
        let envs = Api::<DynamicObject>::all_with(self.client.clone(), &env_resource())
            .list_metadata(&lp)
            .await
            .map_err(KubeError::api("list previewenvironments"))?;
        let metas = pods.items.into_iter().map(|m| ("pod", m.metadata));
        let metas = metas.chain(envs.items.into_iter().map(|m| ("previewenvironment", m.metadata)));
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
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &obj.namespace, &env_resource());
        match api.delete(&obj.name, &DeleteParams::background()).await {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(KubeError::Api { action: format!("delete {obj}"), source: e }),
        }
    }

    /// Environment records kept in PreviewEnvironments, for `--adopt`: only
    /// those whose signature is previewd's (anyone allowed to create the
    /// objects by hand gets nothing from it).
    pub async fn adoptable(&self) -> Result<Vec<EnvRecord>, KubeError> {
        let lp = ListParams::default().labels(&self.selector(&format!("{LABEL_ROLE}={ROLE_ENV}")));
        let envs = Api::<DynamicObject>::all_with(self.client.clone(), &env_resource())
            .list(&lp)
            .await
            .map_err(KubeError::api("list previewenvironments"))?;
        Ok(envs
            .items
            .into_iter()
            .filter_map(|obj| {
                let spec = obj.data.get("spec")?;
                let record = spec.get("record")?.as_str()?;
                let mac = spec.get("recordMac").and_then(|m| m.as_str()).unwrap_or_default();
                let signed = self.signer.as_ref().is_some_and(|s| s.verify_sig(record.as_bytes(), mac));
                if !signed {
                    tracing::warn!(namespace = ?obj.metadata.namespace, name = %obj.name_any(), "ignoring an environment record previewd did not sign");
                    return None;
                }
                match serde_json::from_str::<EnvRecord>(record) {
                    Ok(r) if Some(r.namespace.as_str()) == obj.metadata.namespace.as_deref() => Some(r),
                    Ok(_) => {
                        tracing::warn!(name = %obj.name_any(), "ignoring an environment record from another namespace");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(name = %obj.name_any(), error = %e, "skipping unreadable environment record");
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
