//! Reading Services: the entry point a share link forwards to.

use std::collections::BTreeMap;

use ::kube::api::{Api, ListParams};
use k8s_openapi::api::core::v1::Service;

use super::{Cluster, KubeError};

/// A Service as a share link needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    /// `None` for a headless Service.
    pub cluster_ip: Option<String>,
    /// Port names (may be empty) and numbers.
    pub ports: Vec<(String, u16)>,
}

fn entry(s: Service) -> Entry {
    let spec = s.spec.unwrap_or_default();
    Entry {
        name: s.metadata.name.unwrap_or_default(),
        cluster_ip: spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None"),
        ports: spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| Some((p.name.unwrap_or_default(), u16::try_from(p.port).ok()?)))
            .collect(),
    }
}

impl Cluster {
    /// Service `name` in `ns`, if it exists.
    pub async fn service(&self, ns: &str, name: &str) -> Result<Option<Entry>, KubeError> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let s = api.get_opt(name).await.map_err(KubeError::api(format!("get service/{name}")))?;
        Ok(s.map(entry))
    }

    /// The Services in `ns` whose selector picks pods labelled `labels`.
    pub async fn services_selecting(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Entry>, KubeError> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let all = api.list(&ListParams::default()).await.map_err(KubeError::api("list services"))?;
        Ok(all
            .items
            .into_iter()
            .filter(|s| {
                let sel = s.spec.as_ref().and_then(|sp| sp.selector.as_ref());
                sel.is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
            .map(entry)
            .collect())
    }
}
