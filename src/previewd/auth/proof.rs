//! previewd's key, kept in the Secret `previewd-agent-key`: agents' proof
//! of the pod they run in, and signatures of the records kept in the
//! cluster (so `--adopt` trusts only records previewd wrote).
//!
//! Agents' proof of the pod they run in. previewd gives each agent it
//! attaches an HMAC of the pod's namespace, name and UID, in the ephemeral
//! container's env; the agent sends it back with its hello. A pod of the
//! same name made again has another UID, so an old proof does not carry
//! over. The key lives in the Secret `previewd-agent-key`, made at first
//! start. Reading a proof needs `get pods` in the target's namespace, which
//! already shows more than the routes it unlocks.

use std::collections::BTreeMap;

use ::kube::Client;
use k8s_openapi::ByteString;
use ring::hmac;

use super::tls::{TlsError, secret_or_make};

pub const SECRET: &str = "previewd-agent-key";
const DATA_KEY: &str = "hmac";

#[derive(Clone)]
pub struct Prover {
    key: hmac::Key,
    /// The key's bytes, for previewd's local copy (see `trust`).
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Prover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prover(..)")
    }
}

impl Prover {
    pub fn from_secret_bytes(bytes: &[u8]) -> Prover {
        Prover { key: hmac::Key::new(hmac::HMAC_SHA256, bytes), bytes: bytes.to_vec() }
    }

    pub fn to_hex(&self) -> String {
        hex(&self.bytes)
    }

    pub fn from_hex(s: &str) -> Option<Prover> {
        if s.len() < 32 || !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bytes: Option<Vec<u8>> =
            (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect();
        bytes.map(|b| Prover::from_secret_bytes(&b))
    }

    /// The key in the Secret, made when missing.
    pub async fn load(client: &Client, ns: &str) -> Result<Prover, TlsError> {
        let data = secret_or_make(client, ns, SECRET, None, || {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| TlsError::Secret {
                namespace: ns.into(),
                message: format!("no randomness for the agent key: {e}"),
            })?;
            Ok(BTreeMap::from([(DATA_KEY.into(), ByteString(bytes.to_vec()))]))
        })
        .await?;
        let bytes = data.get(DATA_KEY).map(|b| b.0.clone()).filter(|b| b.len() >= 16);
        let bytes = bytes.ok_or_else(|| TlsError::Secret {
            namespace: ns.into(),
            message: format!("secret {SECRET}: no {DATA_KEY} of at least 16 bytes"),
        })?;
        Ok(Prover::from_secret_bytes(&bytes))
    }

    /// A signature of `bytes` (records kept in the cluster), as hex.
    pub fn sign(&self, bytes: &[u8]) -> String {
        hex(hmac::sign(&self.key, &[b"record/".as_slice(), bytes].concat()).as_ref())
    }

    pub fn verify_sig(&self, bytes: &[u8], sig: &str) -> bool {
        let Some(tag) = unhex(sig) else { return false };
        hmac::verify(&self.key, &[b"record/".as_slice(), bytes].concat(), &tag).is_ok()
    }

    /// The proof for one pod, as hex.
    pub fn proof(&self, namespace: &str, pod: &str, uid: &str) -> String {
        hex(hmac::sign(&self.key, message(namespace, pod, uid).as_bytes()).as_ref())
    }

    /// Whether `proof` is this pod's, compared in constant time.
    pub fn verify(&self, namespace: &str, pod: &str, uid: &str, proof: &str) -> bool {
        let Some(tag) = unhex(proof) else { return false };
        hmac::verify(&self.key, message(namespace, pod, uid).as_bytes(), &tag).is_ok()
    }
}

fn message(namespace: &str, pod: &str, uid: &str) -> String {
    // Names are DNS labels and a UID has no '/': the joined form is unambiguous.
    format!("preview-agent/{namespace}/{pod}/{uid}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_for_its_pod_only() {
        let p = Prover::from_secret_bytes(b"0123456789abcdef0123456789abcdef");
        let proof = p.proof("a", "orders-1", "uid-1");
        assert_eq!(proof.len(), 64);
        assert!(p.verify("a", "orders-1", "uid-1", &proof));
        assert!(!p.verify("a", "orders-1", "uid-2", &proof), "a pod made again has another UID");
        assert!(!p.verify("b", "orders-1", "uid-1", &proof));
        assert!(!p.verify("a", "orders-2", "uid-1", &proof));
        assert!(!p.verify("a", "orders-1", "uid-1", "zz"));
        let other = Prover::from_secret_bytes(b"another key of at least 16 bytes");
        assert!(!other.verify("a", "orders-1", "uid-1", &proof));
    }

    #[test]
    fn a_record_signature_holds_for_its_bytes_and_key_only() {
        let p = Prover::from_secret_bytes(b"0123456789abcdef0123456789abcdef");
        let sig = p.sign(b"{\"key\":\"k1\"}");
        assert!(p.verify_sig(b"{\"key\":\"k1\"}", &sig));
        assert!(!p.verify_sig(b"{\"key\":\"k2\"}", &sig));
        assert!(!p.verify_sig(b"{\"key\":\"k1\"}", ""));
        // A record signature is not an agent proof, and the other way round.
        let proof = p.proof("a", "b", "c");
        assert!(!p.verify_sig(b"preview-agent/a/b/c", &proof));
        let other = Prover::from_secret_bytes(b"another key of at least 16 bytes");
        assert!(!other.verify_sig(b"{\"key\":\"k1\"}", &sig));
    }
}
