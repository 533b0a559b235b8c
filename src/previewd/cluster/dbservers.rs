//! The objects of database branches: a branch server per source database
//! (a Pod, its Service, and a Secret with its superuser's password), the
//! Secret each environment's preview pods read their branch connection
//! from (and pointing their variables at it), and reading a target's
//! connection variables (a literal, or a ConfigMap or Secret key).

use std::collections::BTreeMap;

use ::kube::api::{Api, DeleteParams, PostParams};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::names::{LABEL_INSTANCE, LABEL_KEY, LABEL_MANAGED_BY, LABEL_ROLE, MANAGER};
use super::{Cluster, KubeError, is_status};
use crate::model::db::DbType;

pub const ROLE_DB_SERVER: &str = "db-server";
pub const ROLE_DB_BRANCH: &str = "db-branch";
/// Which server a server's Pod is (its Service selects on it).
pub const LABEL_DB_SERVER: &str = "preview.dev/db-server";
/// The branch server images, built by `make images` from Debian's
/// PostgreSQL 15 and MariaDB 10.11.
pub const POSTGRES_IMAGE: &str = "preview.local/postgres:15";
pub const MARIADB_IMAGE: &str = "preview.local/mariadb:10.11";

/// A branch server's image, its container's name, and its port.
fn engine(db_type: DbType) -> (&'static str, &'static str, u16) {
    match db_type {
        DbType::Postgres => (POSTGRES_IMAGE, "postgres", 5432),
        DbType::MySql => (MARIADB_IMAGE, "mariadb", 3306),
    }
}

/// What a branch server's container asks for (`requests`) and may use
/// (`limits`): resource name → quantity. Without any, its pod would be
/// refused in a namespace whose ResourceQuota tracks them, and run as
/// BestEffort (the first evicted, the last to get CPU) everywhere else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerResources {
    pub requests: BTreeMap<String, String>,
    pub limits: BTreeMap<String, String>,
}

/// The resources a branch server may name.
const RESOURCES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];

impl ServerResources {
    /// From `--db-server-requests` and `--db-server-limits`, each
    /// `name=quantity,…` (empty: none). An error names the flag and says
    /// what was expected.
    pub fn parse(requests: &str, limits: &str) -> Result<Self, (&'static str, String)> {
        let requests = parse_list(requests).map_err(|m| ("--db-server-requests", m))?;
        let limits = parse_list(limits).map_err(|m| ("--db-server-limits", m))?;
        for (name, want) in &requests {
            if let Some(max) = limits.get(name)
                && quantity(want) > quantity(max)
            {
                return Err(("--db-server-requests", format!("{name}={want} is more than its limit {name}={max}")));
            }
        }
        Ok(ServerResources { requests, limits })
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"requests": self.requests, "limits": self.limits})
    }
}

fn parse_list(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((name, q)) = item.split_once('=') else {
            return Err(format!("{item:?}: expected name=quantity, e.g. memory=1Gi"));
        };
        let (name, q) = (name.trim(), q.trim());
        if !RESOURCES.contains(&name) {
            return Err(format!("{name:?} is not a resource here; expected one of {}", RESOURCES.join(", ")));
        }
        if quantity(q).is_none() {
            return Err(format!("{name}={q:?} is not a quantity; expected e.g. 500m, 256Mi or 10Gi"));
        }
        if out.insert(name.to_string(), q.to_string()).is_some() {
            return Err(format!("{name} is given twice"));
        }
    }
    Ok(out)
}

/// A Kubernetes quantity in base units: a decimal number with an optional
/// binary (Ki…Ei) or decimal (m, k…E) suffix.
fn quantity(s: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, unit) = SUFFIXES.iter().find_map(|(x, u)| s.strip_suffix(x).map(|n| (n, *u))).unwrap_or((s, 1.0));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    let ok = match num.split_once('.') {
        Some((i, f)) => digits(i) && digits(f),
        None => digits(num),
    };
    ok.then(|| num.parse::<f64>().ok().map(|n| n * unit)).flatten()
}

/// Where a variable's value comes from, as the pod spec says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VarSource {
    Literal(String),
    ConfigMap {
        name: String,
        key: String,
    },
    Secret {
        name: String,
        key: String,
    },
    /// A `fieldRef` or `resourceFieldRef`: not a connection.
    Other,
}

pub fn var_source(e: &EnvVar) -> VarSource {
    if let Some(v) = &e.value {
        return VarSource::Literal(v.clone());
    }
    let Some(from) = &e.value_from else { return VarSource::Literal(String::new()) };
    if let Some(r) = &from.config_map_key_ref {
        return VarSource::ConfigMap { name: r.name.clone(), key: r.key.clone() };
    }
    if let Some(r) = &from.secret_key_ref {
        return VarSource::Secret { name: r.name.clone(), key: r.key.clone() };
    }
    VarSource::Other
}

/// A server's live address: its pod's IP once the pod runs.
#[derive(Debug, Clone)]
pub struct ServerState {
    pub pod_ip: Option<String>,
    pub ready: bool,
    /// Why it is not running, when the kubelet says (image missing, say).
    pub waiting: Option<String>,
    /// Why its pod ended for good (phase Failed or Succeeded: evicted, say).
    pub ended: Option<String>,
}

impl Cluster {
    /// The value of a variable from the pod spec: the literal, or the key of
    /// the ConfigMap or Secret it names. `Ok(None)`: that object or key is
    /// missing.
    pub async fn var_value(&self, ns: &str, src: &VarSource) -> Result<Option<String>, KubeError> {
        match src {
            VarSource::Literal(v) => Ok(Some(v.clone())),
            VarSource::ConfigMap { name, key } => {
                let cm = Api::<ConfigMap>::namespaced(self.client.clone(), ns)
                    .get_opt(name)
                    .await
                    .map_err(KubeError::api(format!("get configmap {ns}/{name}")))?;
                Ok(cm.and_then(|c| c.data).and_then(|d| d.get(key).cloned()))
            }
            VarSource::Secret { name, key } => {
                let s = Api::<Secret>::namespaced(self.client.clone(), ns)
                    .get_opt(name)
                    .await
                    .map_err(KubeError::api(format!("get secret {ns}/{name}")))?;
                Ok(s.and_then(|s| s.data)
                    .and_then(|d| d.get(key).cloned())
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned()))
            }
            VarSource::Other => Ok(None),
        }
    }

    fn db_labels(&self, role: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
            (LABEL_INSTANCE.to_string(), self.instance.clone()),
            (LABEL_ROLE.to_string(), role.to_string()),
        ])
    }

    /// The data of Secret `name`, if it exists.
    pub async fn secret_data(&self, ns: &str, name: &str) -> Result<Option<BTreeMap<String, String>>, KubeError> {
        let s = Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(KubeError::api(format!("get secret {ns}/{name}")))?;
        Ok(s.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        }))
    }

    /// Creates Secret `name` with `data` unless it exists; returns the data
    /// it holds either way (a retry keeps the first password).
    pub async fn ensure_secret(
        &self,
        ns: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        owner: Option<&OwnerReference>,
        data: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, KubeError> {
        if let Some(d) = self.secret_data(ns, name).await? {
            return Ok(d);
        }
        let api = Api::<Secret>::namespaced(self.client.clone(), ns);
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels),
                owner_references: owner.map(|o| vec![o.clone()]),
                ..Default::default()
            },
            data: Some(data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes()))).collect()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &s).await {
            Ok(_) => Ok(data),
            // Made meanwhile by another request: theirs stands.
            Err(e) if is_status(&e, 409) => Ok(self.secret_data(ns, name).await?.unwrap_or(data)),
            Err(e) => Err(KubeError::Api { action: format!("create secret {ns}/{name}"), source: e }),
        }
    }

    /// Replaces the data of an environment's branch Secret (its address).
    pub async fn put_branch_secret(
        &self,
        ns: &str,
        name: &str,
        key: &str,
        owner: &OwnerReference,
        data: BTreeMap<String, String>,
    ) -> Result<(), KubeError> {
        let api = Api::<Secret>::namespaced(self.client.clone(), ns);
        let mut labels = self.db_labels(ROLE_DB_BRANCH);
        labels.insert(LABEL_KEY.into(), key.into());
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect()),
            ..Default::default()
        };
        let pp = ::kube::api::PatchParams::apply(MANAGER).force();
        api.patch(name, &pp, &::kube::api::Patch::Apply(&s))
            .await
            .map_err(KubeError::api(format!("apply secret {ns}/{name}")))?;
        Ok(())
    }

    /// The branch server's Secret (its superuser password), Service and Pod,
    /// each made unless it exists. Returns the superuser password.
    pub async fn ensure_db_server(
        &self,
        ns: &str,
        name: &str,
        db_type: DbType,
        password: String,
    ) -> Result<String, KubeError> {
        let (image, container, port) = engine(db_type);
        let labels = self.db_labels(ROLE_DB_SERVER);
        let data =
            self.ensure_secret(ns, name, labels.clone(), None, BTreeMap::from([("password".into(), password)])).await?;
        let password = data.get("password").cloned().unwrap_or_default();
        let mut pod_labels = labels.clone();
        pod_labels.insert(LABEL_DB_SERVER.into(), name.into());
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "selector": {LABEL_DB_SERVER: name},
                "ports": [{"name": container, "port": port, "targetPort": port}],
            }
        }))
        .expect("a Service from literal JSON");
        match Api::<Service>::namespaced(self.client.clone(), ns).create(&PostParams::default(), &svc).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(KubeError::Api { action: format!("create service {ns}/{name}"), source: e }),
        }
        // No readiness probe: previewd logs in before anything uses the
        // server, and a probe would hold its Service's endpoints back by up
        // to a probe period after the server answers.
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": pod_labels},
            "spec": {
                "automountServiceAccountToken": false,
                "enableServiceLinks": false,
                "securityContext": {"runAsUser": 65534, "runAsGroup": 65534, "runAsNonRoot": true},
                "containers": [{
                    "name": container,
                    "image": image,
                    "imagePullPolicy": self.pull_policy.clone().unwrap_or_else(|| "IfNotPresent".into()),
                    "ports": [{"name": container, "containerPort": port}],
                    "env": [{"name": "TZ", "value": "UTC"}],
                    "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
                    "resources": self.db_resources.to_json(),
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/var/lib/preview-db"},
                        {"name": "password", "mountPath": "/etc/preview-db", "readOnly": true},
                    ],
                }],
                "volumes": [
                    {"name": "data", "emptyDir": {}},
                    {"name": "password", "secret": {"secretName": name, "defaultMode": 0o444}},
                ],
            }
        }))
        .expect("a Pod from literal JSON");
        match Api::<Pod>::namespaced(self.client.clone(), ns).create(&PostParams::default(), &pod).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(KubeError::Api { action: format!("create pod {ns}/{name}"), source: e }),
        }
        Ok(password)
    }

    /// The server pod's IP and readiness; `None` when it does not exist.
    pub async fn db_server(&self, ns: &str, name: &str) -> Result<Option<ServerState>, KubeError> {
        let p = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(KubeError::api(format!("get pod {ns}/{name}")))?;
        Ok(p.map(|p| {
            let st = p.status.unwrap_or_default();
            let cs = st.container_statuses.unwrap_or_default();
            let ended = matches!(st.phase.as_deref(), Some("Failed" | "Succeeded")).then(|| {
                let why = [st.phase.clone(), st.reason.clone(), st.message.clone()];
                why.into_iter().flatten().collect::<Vec<_>>().join(": ")
            });
            ServerState {
                ended,
                pod_ip: st.pod_ip,
                ready: cs.iter().all(|c| c.ready) && !cs.is_empty(),
                waiting: cs
                    .iter()
                    .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
                    .map(|w| {
                        format!("{}: {}", w.reason.clone().unwrap_or_default(), w.message.clone().unwrap_or_default())
                    })
                    .next(),
            }
        }))
    }

    /// The ClusterIP of a server's Service.
    pub async fn db_service_ip(&self, ns: &str, name: &str) -> Result<Option<String>, KubeError> {
        let s = Api::<Service>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(KubeError::api(format!("get service {ns}/{name}")))?;
        Ok(s.and_then(|s| s.spec?.cluster_ip).filter(|ip| !ip.is_empty() && ip != "None"))
    }

    /// Deletes a branch server: its Pod (and its data), Service and Secret.
    pub async fn delete_db_server(&self, ns: &str, name: &str) -> Result<(), KubeError> {
        self.delete_pod(ns, name).await?;
        let dp = DeleteParams::default();
        match Api::<Service>::namespaced(self.client.clone(), ns).delete(name, &dp).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(KubeError::Api { action: format!("delete service {ns}/{name}"), source: e }),
        }
        self.delete_secret(ns, name).await
    }

    pub async fn delete_secret(&self, ns: &str, name: &str) -> Result<(), KubeError> {
        match Api::<Secret>::namespaced(self.client.clone(), ns).delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(KubeError::Api { action: format!("delete secret {ns}/{name}"), source: e }),
        }
    }

    /// Names of the branch servers this instance runs in `ns`.
    pub async fn db_servers(&self, ns: &str) -> Result<Vec<String>, KubeError> {
        let lp = ::kube::api::ListParams::default().labels(&self.selector(&format!("{LABEL_ROLE}={ROLE_DB_SERVER}")));
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
            .list_metadata(&lp)
            .await
            .map_err(KubeError::api(format!("list branch servers in {ns}")))?;
        Ok(pods.items.into_iter().filter_map(|p| p.metadata.name).collect())
    }
}

/// Points `var` at key `key` of Secret `secret`, in every container of a
/// pod (JSON) that has it.
pub fn set_env_from_secret(pod: &mut serde_json::Value, var: &str, secret: &str, key: &str) {
    let Some(list) = pod.pointer_mut("/spec/containers").and_then(|c| c.as_array_mut()) else { return };
    let entry = serde_json::json!({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}});
    for c in list.iter_mut() {
        if let Some(e) =
            c.get_mut("env").and_then(|e| e.as_array_mut()).and_then(|env| env.iter_mut().find(|e| e["name"] == var))
        {
            *e = entry.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_resources_from_flags() {
        let r = ServerResources::parse("cpu=100m, memory=256Mi", "memory=1Gi,ephemeral-storage=10Gi").unwrap();
        assert_eq!(r.requests["cpu"], "100m");
        assert_eq!(r.limits["ephemeral-storage"], "10Gi");
        assert_eq!(ServerResources::parse("", "").unwrap(), ServerResources::default());
        assert_eq!(quantity("1.5Gi"), Some(1.5 * 1073741824.0));
        assert_eq!(quantity("250m"), Some(0.25));
        for (req, lim, flag, says) in [
            ("memory", "", "--db-server-requests", "expected name=quantity"),
            ("gpu=1", "", "--db-server-requests", "expected one of cpu, memory, ephemeral-storage"),
            ("", "memory=lots", "--db-server-limits", "not a quantity"),
            ("", "memory=1Gi,memory=2Gi", "--db-server-limits", "given twice"),
            ("memory=2Gi", "memory=1Gi", "--db-server-requests", "more than its limit memory=1Gi"),
            ("", "cpu=.5", "--db-server-limits", "not a quantity"),
        ] {
            let (f, m) = ServerResources::parse(req, lim).unwrap_err();
            assert_eq!(f, flag, "{req} / {lim}");
            assert!(m.contains(says), "{req} / {lim}: {m}");
        }
    }

    #[test]
    fn points_the_variable_at_the_branch_secret() {
        let mut pod = serde_json::json!({"spec": {"containers": [
            {"name": "app", "env": [{"name": "DATABASE_URL", "value": "postgres://staging"}, {"name": "X", "value": "1"}]},
            {"name": "side"},
        ]}});
        set_env_from_secret(&mut pod, "DATABASE_URL", "s", "url");
        assert_eq!(
            pod["spec"]["containers"][0]["env"][0],
            serde_json::json!({"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "s", "key": "url"}}})
        );
        assert_eq!(pod["spec"]["containers"][0]["env"][1]["value"], "1");
        assert!(pod["spec"]["containers"][1].get("env").is_none());
    }
}
