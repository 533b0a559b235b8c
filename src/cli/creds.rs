//! What the CLI presents to previewd: whatever the kubeconfig holds for
//! the user (a token, a token file, an exec plugin's token, or a client
//! certificate), or `--token`; and the CA it trusts (`--ca-file`, else the
//! ConfigMap `previewd-ca` that previewd publishes).

use std::path::PathBuf;

use base64::Engine;
use kube::config::{AuthInfo, ExecConfig};
use secrecy::ExposeSecret;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// Credentials for previewd, and the CA to check it against.
#[derive(Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
    /// Client certificate and key, PEM.
    pub identity: Option<CertKey>,
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("identity", &self.identity.as_ref().map(|_| "…"))
            .field("ca_pem", &self.ca_pem.is_some())
            .finish()
    }
}

impl Credentials {
    /// From a kubeconfig user entry. A certificate and a token may both be
    /// there; previewd takes the certificate.
    pub fn from_auth_info(a: &AuthInfo) -> Result<Credentials, String> {
        let mut token = a.token.as_ref().map(|t| t.expose_secret().to_string());
        if token.is_none()
            && let Some(f) = &a.token_file
        {
            token = Some(std::fs::read_to_string(f).map_err(|e| format!("token-file {f}: {e}"))?.trim().to_string());
        }
        let mut identity = None;
        let cert = pem_of("client-certificate", a.client_certificate_data.as_deref(), a.client_certificate.as_deref())?;
        let key = pem_of("client-key", a.client_key_data.as_ref().map(|k| k.expose_secret()), a.client_key.as_deref())?;
        if let (Some(c), Some(k)) = (cert, key) {
            identity = Some((c, k));
        }
        if token.is_none()
            && identity.is_none()
            && let Some(exec) = &a.exec
        {
            let (t, id) = run_exec(exec)?;
            token = t;
            identity = id;
        }
        Ok(Credentials { token, identity, ca_pem: None })
    }
}

/// PEM from base64 `*-data`, or from a file.
fn pem_of(what: &str, data: Option<&str>, file: Option<&str>) -> Result<Option<Vec<u8>>, String> {
    if let Some(d) = data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map_err(|e| format!("{what}-data: not base64: {e}"))?;
        return Ok(Some(bytes));
    }
    match file {
        Some(f) => Ok(Some(std::fs::read(PathBuf::from(f)).map_err(|e| format!("{what} {f}: {e}"))?)),
        None => Ok(None),
    }
}

/// A client certificate and its key, PEM.
type CertKey = (Vec<u8>, Vec<u8>);

/// Runs a client-go credential plugin and reads its ExecCredential.
fn run_exec(exec: &ExecConfig) -> Result<(Option<String>, Option<CertKey>), String> {
    let command = exec.command.as_deref().ok_or("exec: no command")?;
    let api_version = exec.api_version.clone().unwrap_or_else(|| "client.authentication.k8s.io/v1".into());
    let info = serde_json::json!({"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": false}});
    let mut cmd = std::process::Command::new(command);
    cmd.args(exec.args.iter().flatten());
    for pair in exec.env.iter().flatten() {
        if let (Some(n), Some(v)) = (pair.get("name"), pair.get("value")) {
            cmd.env(n, v);
        }
    }
    let out = cmd
        .env("KUBERNETES_EXEC_INFO", info.to_string())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("exec {command}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("exec {command}: {}: {}", out.status, err.trim()));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("exec {command}: not an ExecCredential: {e}"))?;
    let status = v.get("status").ok_or_else(|| format!("exec {command}: ExecCredential has no status"))?;
    let s = |k: &str| status.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let identity = match (s("clientCertificateData"), s("clientKeyData")) {
        (Some(c), Some(k)) => Some((c.into_bytes(), k.into_bytes())),
        _ => None,
    };
    Ok((s("token"), identity))
}

/// Adds `authorization: Bearer …` to every call when there is a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| "the token has characters a header cannot carry".to_string())
            })
            .transpose()
            .map(Bearer)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_plugin_token_is_read() {
        let exec: ExecConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "sh",
            "args": ["-c", "printf '{\"kind\":\"ExecCredential\",\"status\":{\"token\":\"%s\"}}' \"$T\""],
            "env": [{"name": "T", "value": "tok-123"}],
        }))
        .expect("exec config");
        let a = AuthInfo { exec: Some(exec), ..Default::default() };
        let c = Credentials::from_auth_info(&a).expect("creds");
        assert_eq!(c.token.as_deref(), Some("tok-123"));
        assert!(c.identity.is_none());
    }

    #[test]
    fn a_failing_exec_plugin_says_so() {
        let exec: ExecConfig =
            serde_json::from_value(serde_json::json!({"command": "sh", "args": ["-c", "echo nope >&2; exit 3"]}))
                .expect("exec config");
        let a = AuthInfo { exec: Some(exec), ..Default::default() };
        let err = Credentials::from_auth_info(&a).expect_err("fails");
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn client_certificate_data_is_base64_pem() {
        let a = AuthInfo {
            client_certificate_data: Some(base64::engine::general_purpose::STANDARD.encode("CERT")),
            client_key_data: Some(base64::engine::general_purpose::STANDARD.encode("KEY").into()),
            ..Default::default()
        };
        let c = Credentials::from_auth_info(&a).expect("creds");
        assert_eq!(c.identity, Some((b"CERT".to_vec(), b"KEY".to_vec())));
    }
}
