//! previewd's TLS material: the serving certificate (your own files, the
//! Secret `previewd-tls`, or a CA and certificate previewd makes at first
//! start and keeps there), the CA it publishes in the ConfigMap
//! `previewd-ca` for the CLI, the clients and the agents, and the cluster's
//! client CA (`kube-system/extension-apiserver-authentication`, as
//! aggregated API servers read it) that client certificates are checked
//! against.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ::kube::Client;
use ::kube::api::{Api, Patch, PatchParams, PostParams};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The Secret holding the serving certificate (and previewd's CA, when previewd made it).
pub const SECRET: &str = "previewd-tls";
/// The ConfigMap where the CA that clients trust is published, under [`CA_KEY`].
pub const CA_CONFIGMAP: &str = "previewd-ca";
pub const CA_KEY: &str = "ca.crt";
const CA_PRIVATE_KEY: &str = "ca.key";
const FIELD_MANAGER: &str = "previewd";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("secret {namespace}/{SECRET}: {message}")]
    Secret { namespace: String, message: String },
    #[error("kubernetes API: {action}: {source}")]
    Api { action: String, source: ::kube::Error },
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// previewd's own namespace: the Secret and the ConfigMap live there.
    pub namespace: String,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The CA that signed `cert` (default: the last certificate in `cert`).
    pub ca: Option<PathBuf>,
    /// Extra names and addresses for a certificate previewd makes.
    pub sans: Vec<String>,
}

/// What the server serves with (PEM), the CA clients and agents trust, and
/// the cluster's client CA (`None`: client certificates are refused).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Material {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub client_ca_pem: Option<String>,
}

impl Material {
    pub fn server_config(&self) -> ServerTlsConfig {
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            // Optional: token callers present no certificate.
            config = config.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(true);
        }
        config
    }
}

pub async fn load(client: &Client, opts: &TlsOptions, listen: SocketAddr) -> Result<Material, TlsError> {
    let (cert_pem, key_pem, ca_pem) = match (&opts.cert, &opts.key) {
        (Some(c), Some(k)) => files(c, k, opts.ca.as_ref())?,
        (None, None) => from_secret(client, opts, listen).await?,
        _ => {
            return Err(TlsError::Flag {
                flag: "--tls-cert/--tls-key",
                message: "give both, or neither (previewd then uses the Secret previewd-tls)".into(),
            });
        }
    };
    publish_ca(client, &opts.namespace, &ca_pem).await?;
    let client_ca_pem = client_ca(client).await;
    Ok(Material { cert_pem, key_pem, ca_pem, client_ca_pem })
}

fn read(flag: &'static str, p: &PathBuf) -> Result<String, TlsError> {
    std::fs::read_to_string(p).map_err(|e| TlsError::Flag { flag, message: format!("{}: {e}", p.display()) })
}

fn files(cert: &PathBuf, key: &PathBuf, ca: Option<&PathBuf>) -> Result<(String, String, String), TlsError> {
    let cert_pem = read("--tls-cert", cert)?;
    let key_pem = read("--tls-key", key)?;
    let ca_pem = match ca {
        Some(p) => read("--tls-ca", p)?,
        None => last_pem_block(&cert_pem).ok_or_else(|| TlsError::Flag {
            flag: "--tls-cert",
            message: format!("{}: no PEM certificate in it", cert.display()),
        })?,
    };
    Ok((cert_pem, key_pem, ca_pem))
}

fn last_pem_block(pem: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.rfind(BEGIN)?;
    let end = pem[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &pem[start..end]))
}

/// The Secret's certificate, or a new CA and certificate stored there.
async fn from_secret(
    client: &Client,
    opts: &TlsOptions,
    listen: SocketAddr,
) -> Result<(String, String, String), TlsError> {
    let ns = &opts.namespace;
    let data = secret_or_make(client, ns, SECRET, Some("kubernetes.io/tls"), || {
        let (ca, ca_key) = make_ca()?;
        let (cert, key) = issue(&ca, &ca_key, &names(ns, listen, &opts.sans))?;
        Ok(BTreeMap::from([
            ("tls.crt".into(), ByteString(cert.into_bytes())),
            ("tls.key".into(), ByteString(key.into_bytes())),
            (CA_KEY.into(), ByteString(ca.into_bytes())),
            (CA_PRIVATE_KEY.into(), ByteString(ca_key.into_bytes())),
        ]))
    })
    .await?;
    let get = |k: &str| data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
    let bad = |message: String| TlsError::Secret { namespace: ns.clone(), message };
    match (get(CA_KEY), get(CA_PRIVATE_KEY)) {
        // previewd's own CA: a fresh certificate for the names it serves now
        // (another instance may have made the Secret for other addresses).
        (Some(ca), Some(ca_key)) => {
            let (cert, key) = issue(&ca, &ca_key, &names(ns, listen, &opts.sans))?;
            Ok((cert, key, ca))
        }
        // Someone else's certificate (cert-manager, say): served as it is.
        (ca, _) => {
            let cert = get("tls.crt").ok_or_else(|| bad("no tls.crt".into()))?;
            let key = get("tls.key").ok_or_else(|| bad("no tls.key".into()))?;
            let ca =
                ca.or_else(|| last_pem_block(&cert)).ok_or_else(|| bad("no ca.crt, and tls.crt has no PEM".into()))?;
            Ok((cert, key, ca))
        }
    }
}

/// The data of Secret `name` in `ns`, made from `make` (and stored) when it
/// is missing. When another previewd stores it first, theirs is used.
pub(super) async fn secret_or_make(
    client: &Client,
    ns: &str,
    name: &str,
    type_: Option<&str>,
    make: impl FnOnce() -> Result<BTreeMap<String, ByteString>, TlsError>,
) -> Result<BTreeMap<String, ByteString>, TlsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    if let Some(s) = api.get_opt(name).await.map_err(api_err(format!("get secret {ns}/{name}")))? {
        return Ok(s.data.unwrap_or_default());
    }
    let secret = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/name".into(), "previewd".into())])),
            ..Default::default()
        },
        type_: type_.map(str::to_string),
        data: Some(make()?),
        ..Default::default()
    };
    let stored = match api.create(&PostParams::default(), &secret).await {
        Ok(s) => {
            tracing::info!(namespace = %ns, "made secret {name}");
            s
        }
        Err(::kube::Error::Api(e)) if e.code == 409 => {
            api.get(name).await.map_err(api_err(format!("get secret {ns}/{name}")))?
        }
        Err(e) => return Err(api_err(format!("create secret {ns}/{name}"))(e)),
    };
    Ok(stored.data.unwrap_or_default())
}

fn api_err(action: String) -> impl FnOnce(::kube::Error) -> TlsError {
    move |source| TlsError::Api { action, source }
}

/// Names a certificate previewd makes is valid for: loopback, the Service's
/// names in `ns`, the listen address when it is a specific one, and `extra`.
pub fn names(ns: &str, listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into(), "previewd".into()];
    for suffix in ["", ".svc", ".svc.cluster.local"] {
        out.push(format!("previewd.{ns}{suffix}"));
    }
    if !listen.ip().is_unspecified() {
        out.push(listen.ip().to_string());
    }
    out.extend(extra.iter().cloned());
    out.dedup();
    out
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

/// A new CA: (certificate PEM, key PEM), valid for ten years.
fn make_ca() -> Result<(String, String), TlsError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "previewd CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `names` from the CA: (certificate PEM, key PEM).
fn issue(ca_pem: &str, ca_key_pem: &str, names: &[String]) -> Result<(String, String), TlsError> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_pem, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "previewd");
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(rcgen::SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(rcgen::SanType::DnsName),
        })
        .collect::<Result<_, _>>()?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `previewd-ca` in previewd's namespace: what the CLI and clients trust.
async fn publish_ca(client: &Client, ns: &str, ca_pem: &str) -> Result<(), TlsError> {
    let cm = ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(CA_CONFIGMAP.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/name".into(), "previewd".into())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CA_KEY.into(), ca_pem.to_string())])),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .patch(CA_CONFIGMAP, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&cm))
        .await
        .map_err(api_err(format!("apply configmap {ns}/{CA_CONFIGMAP}")))?;
    Ok(())
}

/// The cluster's client CA; `None` (client certificates refused) when it cannot be read.
async fn client_ca(client: &Client) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    match api.get("extension-apiserver-authentication").await {
        Ok(cm) => cm.data.and_then(|d| d.get("client-ca-file").cloned()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read kube-system/extension-apiserver-authentication: client certificates are refused, tokens still work");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_certificate_chains_to_its_ca_and_names_the_listen_address() {
        let (ca, ca_key) = make_ca().expect("ca");
        let listen: SocketAddr = "198.18.255.254:7443".parse().expect("addr");
        let n = names("preview-system", listen, &["previewd.example".into()]);
        assert!(n.contains(&"198.18.255.254".to_string()) && n.contains(&"previewd.preview-system.svc".to_string()));
        let (cert, _) = issue(&ca, &ca_key, &n).expect("issue");
        let der = rustls_pemfile_first(&cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parse");
        let sans = parsed.subject_alternative_name().expect("ext").expect("sans").value.general_names.len();
        assert_eq!(sans, n.len());
        let ca_der = rustls_pemfile_first(&ca);
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(&ca_der).expect("parse ca");
        parsed.verify_signature(Some(ca_parsed.public_key())).expect("signed by the CA");
    }

    #[test]
    fn the_last_certificate_of_a_chain_is_its_ca() {
        let chain = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(
            last_pem_block(chain).as_deref(),
            Some("-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n")
        );
        assert_eq!(last_pem_block("no pem"), None);
    }

    fn rustls_pemfile_first(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem").1.contents
    }
}
