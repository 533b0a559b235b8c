//! What previewd needs from the cluster before it serves anyone: its TLS
//! material (`tls`) and its key (`proof`). Both are copied into the data
//! directory (mode 0600, next to the store, which holds as much), so that
//! previewd still starts, and serves Status from its store, while the API
//! server is away.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ::kube::Client;

use super::proof::Prover;
use super::tls::{self, Material, TlsError, TlsOptions};

const FILE: &str = "trust.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Copy {
    key_hex: String,
    tls: Option<Material>,
}

/// The key, and the TLS material when `with_tls`.
pub async fn load(
    client: &Client,
    opts: &TlsOptions,
    listen: SocketAddr,
    with_tls: bool,
    data_dir: &Path,
) -> Result<(Prover, Option<Material>), TlsError> {
    let path = data_dir.join(FILE);
    let fresh = async {
        let prover = Prover::load(client, &opts.namespace).await?;
        let material = if with_tls { Some(tls::load(client, opts, listen).await?) } else { None };
        Ok::<_, TlsError>((prover, material))
    }
    .await;
    match fresh {
        Ok((prover, material)) => {
            if let Err(e) = save(&path, &Copy { key_hex: prover.to_hex(), tls: material.clone() }) {
                tracing::warn!(path = %path.display(), error = %e, "could not keep a local copy of the TLS material");
            }
            Ok((prover, material))
        }
        Err(e @ TlsError::Api { .. }) => {
            let copy = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Copy>(&b).ok());
            let usable = copy.and_then(|c| Some((Prover::from_hex(&c.key_hex)?, c.tls)));
            match usable {
                Some((prover, material)) if material.is_some() || !with_tls => {
                    tracing::warn!(error = %e, path = %path.display(), "the API server is away: serving with the last TLS material and key");
                    Ok((prover, material))
                }
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

fn save(path: &PathBuf, copy: &Copy) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    // A plain struct always serialises.
    f.write_all(&serde_json::to_vec(copy).expect("trust copy serialises"))?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}
