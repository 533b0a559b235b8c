//! What a Start or AddPod needs from RBAC, asked before anything is written:
//! `create` on environments and on pods in the namespace, `get` on each
//! target, and the custom verbs for what is riskier (`unscoped` for a filter
//! that does not pin the environment's own key, `mirror`, and `privileged`
//! for a target whose pod spec is). Anyone allowed to create pods in a
//! namespace can already run any pod there, so a preview adds no privilege.

use futures::future::join_all;

use super::{Error, Manager};
use crate::filter::FilterSpec;
use crate::model::{Key, Mode, PodRecord, Target};
use crate::previewd::auth::{Access, Caller};

impl Manager {
    /// `create` on environments and on pods in `ns`, and `get` on the
    /// target: asked first, before previewd reads the namespace or the
    /// target for the caller, so a refusal says nothing of what exists.
    pub(super) async fn authorize_reads(&self, who: &Caller, ns: &str, target: &Target) -> Result<(), Error> {
        let mut needs = vec![Access::env("create", ns), Access::of("create", "", "pods", ns, "")];
        if let Target::Workload { kind, name, .. } = target {
            let (group, resource) = kind.resource();
            needs.push(Access::of("get", group, resource, ns, name));
        }
        self.require(who, needs).await
    }

    /// The riskier verbs the planned pods need (`authorize_reads` asked the
    /// rest for each pod, before planning it).
    pub(super) async fn authorize(
        &self,
        who: &Caller,
        key: &Key,
        ns: &str,
        planned: &[PodRecord],
    ) -> Result<(), Error> {
        let mut needs = Vec::new();
        for p in planned {
            if p.filter != FilterSpec::Key(key.to_string()) {
                needs.push(Access::env("unscoped", ns));
            }
            if p.mode == Mode::Mirror {
                needs.push(Access::env("mirror", ns));
            }
        }
        self.require(who, needs).await?;
        for p in planned {
            if let Some(field) = privileged_field(&p.template)
                && !self.auth.allowed(who, &Access::env("privileged", ns)).await?
            {
                return Err(Error::FailedPrecondition {
                    field: "target".into(),
                    message: format!(
                        "{}: the target's pod spec sets {field}; previewing it needs the verb privileged on previewenvironments.preview.dev in namespace {ns:?}, which user {:?} lacks",
                        p.target.short_name(),
                        who.user
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Manager {
    /// PERMISSION_DENIED naming the first access RBAC refuses (asked at once).
    pub(crate) async fn require(&self, who: &Caller, mut needs: Vec<Access>) -> Result<(), Error> {
        needs.dedup();
        let answers = join_all(needs.iter().map(|a| self.auth.allowed(who, a))).await;
        for (a, allowed) in needs.iter().zip(answers) {
            if !allowed? {
                return Err(Error::PermissionDenied {
                    field: "namespace".into(),
                    message: format!("user {:?} may not {a}", who.user),
                });
            }
        }
        Ok(())
    }
}

/// The first pod-spec field that makes a pod privileged on its node: host
/// namespaces, hostPath volumes, or a privileged container.
pub(crate) fn privileged_field(pod: &serde_json::Value) -> Option<String> {
    let spec = pod.get("spec")?;
    for f in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec.get(f).and_then(|v| v.as_bool()) == Some(true) {
            return Some(format!("spec.{f}"));
        }
    }
    for (i, v) in spec.get("volumes").and_then(|v| v.as_array()).into_iter().flatten().enumerate() {
        if v.get("hostPath").is_some() {
            return Some(format!("spec.volumes[{i}].hostPath"));
        }
    }
    for list in ["initContainers", "containers"] {
        for (i, c) in spec.get(list).and_then(|v| v.as_array()).into_iter().flatten().enumerate() {
            let sc = c.get("securityContext");
            if sc.and_then(|s| s.get("privileged")).and_then(|v| v.as_bool()) == Some(true) {
                return Some(format!("spec.{list}[{i}].securityContext.privileged"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn privileged_fields_are_named() {
        assert_eq!(privileged_field(&json!({"spec": {"containers": [{"name": "a"}]}})), None);
        assert_eq!(privileged_field(&json!({"spec": {"hostNetwork": true}})).as_deref(), Some("spec.hostNetwork"));
        assert_eq!(
            privileged_field(&json!({"spec": {"hostPID": false, "hostIPC": true}})).as_deref(),
            Some("spec.hostIPC")
        );
        assert_eq!(
            privileged_field(
                &json!({"spec": {"volumes": [{"name": "a", "emptyDir": {}}, {"name": "b", "hostPath": {"path": "/"}}]}})
            )
            .as_deref(),
            Some("spec.volumes[1].hostPath")
        );
        assert_eq!(
            privileged_field(&json!({"spec": {"containers": [{"name": "a"}, {"name": "b", "securityContext": {"privileged": true}}]}}))
                .as_deref(),
            Some("spec.containers[1].securityContext.privileged")
        );
    }
}
