//! Signed manifests: a bucket write alone must not be enough to run code on every host.
//!
//! Keys use Nix's text format: `name:base64`. A secret key file holds the 32-byte ed25519
//! seed (mode 600, never uploaded); a public key is what agents are told to trust. Every
//! version written with a signing key carries `"signature": {"key": NAME, "value": BASE64}`
//! over the manifest's canonical JSON without the signature itself.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::model::{Manifest, ManifestSignature};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("{what}: {detail}")]
    BadKey { what: String, detail: String },
    #[error(
        "manifest {version} is not signed; this host only accepts manifests signed by {trusted}: write it with DEPLOY_SIGNING_KEY set"
    )]
    Unsigned { version: String, trusted: String },
    #[error(
        "manifest {version} is signed by {key:?}, which this host does not trust (trusted: {trusted})"
    )]
    UnknownKey {
        version: String,
        key: String,
        trusted: String,
    },
    #[error(
        "manifest {version}: the signature by {key:?} does not match its content (tampered with, or corrupted); refusing it"
    )]
    BadSignature { version: String, key: String },
    #[error(
        "manifest {version} has sequence {sequence}, not above {applied} (sequence {applied_sequence}) which this host already applied: refusing a replay or downgrade; to go back, write a new version with `deploy-manifest rollback`"
    )]
    Downgrade {
        version: String,
        sequence: u64,
        applied: String,
        applied_sequence: u64,
    },
    #[error(
        "manifest {version} expired at {expires}: refusing it for any change (this host keeps running what it runs); a writer refreshes it with `deploy-manifest refresh` (run it from a timer well within the expiry)"
    )]
    Expired { version: String, expires: String },
}

/// What a host last accepted: the floor for the next manifest's sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Applied {
    pub version: String,
    pub sequence: u64,
}

/// Anti-replay: refuse `m` unless its signed sequence is above the one this host applied.
/// The applied manifest itself (same version and sequence) passes: reading it again is
/// not a change. A manifest without a sequence (written before sequences existed) counts
/// as sequence 0.
pub fn check_sequence(m: &Manifest, applied: Option<&Applied>) -> Result<(), TrustError> {
    let Some(applied) = applied else {
        return Ok(());
    };
    let sequence = m.sequence.unwrap_or(0);
    let same =
        m.version.as_deref() == Some(applied.version.as_str()) && sequence == applied.sequence;
    if sequence > applied.sequence || same {
        return Ok(());
    }
    Err(TrustError::Downgrade {
        version: m.version.clone().unwrap_or_default(),
        sequence,
        applied: applied.version.clone(),
        applied_sequence: applied.sequence,
    })
}

/// Freeze: refuse `m` once its signed expiry has passed. A manifest without `expires`
/// (written before expiry existed) never expires.
pub fn check_expiry(m: &Manifest, now: std::time::SystemTime) -> Result<(), TrustError> {
    match expired_at(m, now) {
        Some(expires) => Err(TrustError::Expired {
            version: m.version.clone().unwrap_or_default(),
            expires,
        }),
        None => Ok(()),
    }
}

/// `m`'s expiry if it has passed at `now`.
pub fn expired_at(m: &Manifest, now: std::time::SystemTime) -> Option<String> {
    let expires = m.expires.as_deref()?;
    has_expired(expires, now).then(|| expires.to_owned())
}

/// Whether the expiry `expires` (RFC 3339) has passed at `now`. The schema checks the
/// format; an unparsable time counts as passed.
pub fn has_expired(expires: &str, now: std::time::SystemTime) -> bool {
    humantime::parse_rfc3339_weak(expires).map_or(true, |t| t <= now)
}

pub struct SecretKey {
    pub name: String,
    key: SigningKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: VerifyingKey,
}

fn split_key(text: &str, what: &str) -> Result<(String, [u8; 32]), TrustError> {
    let bad = |detail: &str| TrustError::BadKey {
        what: what.to_owned(),
        detail: detail.to_owned(),
    };
    let (name, b64) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| bad("expected NAME:BASE64"))?;
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("the key name must be non-empty, without spaces"));
    }
    let bytes = STANDARD
        .decode(b64.trim())
        .map_err(|e| bad(&format!("not base64: {e}")))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| bad("an ed25519 key is 32 bytes"))?;
    Ok((name.to_owned(), bytes))
}

impl SecretKey {
    /// A new key named `name`, from the kernel's random source.
    pub fn generate(name: &str) -> std::io::Result<SecretKey> {
        let mut seed = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn parse(text: &str, what: &str) -> Result<SecretKey, TrustError> {
        let (name, seed) = split_key(text, what)?;
        Ok(SecretKey {
            name,
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Read a secret key file, refusing one that others can read.
    pub fn load(path: &std::path::Path) -> Result<SecretKey, TrustError> {
        use std::os::unix::fs::MetadataExt;
        let what = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| TrustError::BadKey {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        if meta.mode() & 0o077 != 0 {
            return Err(TrustError::BadKey {
                what,
                detail: format!(
                    "mode {:o} lets others read the signing key; fix: chmod 600 {}",
                    meta.mode() & 0o777,
                    path.display()
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| TrustError::BadKey {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        Self::parse(&text, &what)
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.to_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Sign `m` (replacing any signature it had).
    pub fn sign(&self, m: &mut Manifest) {
        m.signature = None;
        let sig = self.key.sign(&signing_bytes(m));
        m.signature = Some(ManifestSignature {
            key: self.name.clone(),
            value: STANDARD.encode(sig.to_bytes()),
        });
    }
}

impl PublicKey {
    pub fn parse(text: &str, what: &str) -> Result<PublicKey, TrustError> {
        let (name, bytes) = split_key(text, what)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| TrustError::BadKey {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
        Ok(PublicKey { name, key })
    }

    /// Every key in a file, one `NAME:BASE64` per line (`#` comments and blank lines allowed).
    pub fn load_all(path: &std::path::Path) -> Result<Vec<PublicKey>, TrustError> {
        let what = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TrustError::BadKey {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Self::parse(l, &what))
            .collect()
    }

    pub fn to_text(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(self.key.to_bytes()))
    }
}

/// Keys in Nix's `trusted-public-keys` format: `name:base64` separated by white space
/// (lines, `#` comments allowed).
pub fn load_nix_keys(path: &std::path::Path) -> Result<Vec<PublicKey>, TrustError> {
    let what = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| TrustError::BadKey {
        what: what.clone(),
        detail: e.to_string(),
    })?;
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .flat_map(str::split_whitespace)
        .map(|k| PublicKey::parse(k, &what))
        .collect()
}

/// The signature object every signed JSON document here carries (manifests, host reports).
pub type Signature = ManifestSignature;

/// A JSON document that carries its own signature, `"signature": {"key": NAME, "value":
/// BASE64}`, over its JSON without that field: the scheme of manifests, shared by host
/// reports. The bytes come from re-serialising the model, so signer and verifier agree.
pub trait SignedJson: serde::Serialize + Clone {
    fn signature(&self) -> Option<&Signature>;
    fn signature_mut(&mut self) -> &mut Option<Signature>;

    /// What the signature covers: the document's JSON without its signature.
    fn unsigned_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        *unsigned.signature_mut() = None;
        serde_json::to_vec(&unsigned).expect("the model serialises")
    }
}

impl SignedJson for Manifest {
    fn signature(&self) -> Option<&Signature> {
        self.signature.as_ref()
    }
    fn signature_mut(&mut self) -> &mut Option<Signature> {
        &mut self.signature
    }
}

/// Why [`verify_json`] did not accept a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonSignatureError {
    /// It carries no signature.
    Unsigned,
    /// None of the given keys has the name its signature names.
    UnknownKey,
    /// A key of that name exists, but none of them made this signature over this content.
    BadSignature,
}

impl SecretKey {
    /// Sign `doc` (replacing any signature it had), as [`SignedJson`] says.
    pub fn sign_json<T: SignedJson>(&self, doc: &mut T) {
        *doc.signature_mut() = None;
        let sig = self.key.sign(&doc.unsigned_bytes());
        *doc.signature_mut() = Some(Signature {
            key: self.name.clone(),
            value: STANDARD.encode(sig.to_bytes()),
        });
    }
}

/// Accept `doc` if one of `keys` named as its signature says signed exactly this content
/// (several keys may share a name while one is replaced by another).
pub fn verify_json<T: SignedJson>(doc: &T, keys: &[PublicKey]) -> Result<(), JsonSignatureError> {
    let sig = doc.signature().ok_or(JsonSignatureError::Unsigned)?;
    let named: Vec<&PublicKey> = keys.iter().filter(|k| k.name == sig.key).collect();
    if named.is_empty() {
        return Err(JsonSignatureError::UnknownKey);
    }
    let bytes: [u8; 64] = STANDARD
        .decode(&sig.value)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(JsonSignatureError::BadSignature)?;
    let sig = ed25519_dalek::Signature::from_bytes(&bytes);
    let content = doc.unsigned_bytes();
    named
        .iter()
        .any(|k| k.key.verify_strict(&content, &sig).is_ok())
        .then_some(())
        .ok_or(JsonSignatureError::BadSignature)
}

/// Check a narinfo's `Sig:` lines: at least one by a trusted key over Nix's fingerprint
/// `1;<StorePath>;<NarHash>;<NarSize>;<References as full paths, comma-separated>`.
pub fn verify_narinfo(text: &str, trusted: &[PublicKey]) -> Result<(), String> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    let store_path = field("StorePath:").ok_or("no StorePath")?;
    let nar_hash = field("NarHash:").ok_or("no NarHash")?;
    let nar_size = field("NarSize:").ok_or("no NarSize")?;
    let refs: Vec<String> = field("References:")
        .unwrap_or_default()
        .split_whitespace()
        .map(|r| format!("/nix/store/{r}"))
        .collect();
    let fingerprint = format!("1;{store_path};{nar_hash};{nar_size};{}", refs.join(","));
    let sigs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Sig:"))
        .map(str::trim)
        .collect();
    for sig in &sigs {
        let Some((name, b64)) = sig.split_once(':') else {
            continue;
        };
        let Some(key) = trusted.iter().find(|k| k.name == name) else {
            continue;
        };
        let Ok(bytes) = STANDARD.decode(b64) else {
            continue;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes) else {
            continue;
        };
        if key
            .key
            .verify_strict(
                fingerprint.as_bytes(),
                &ed25519_dalek::Signature::from_bytes(&bytes),
            )
            .is_ok()
        {
            return Ok(());
        }
    }
    let names: Vec<&str> = trusted.iter().map(|k| k.name.as_str()).collect();
    Err(if sigs.is_empty() {
        format!("{store_path} is not signed (trusted: {})", names.join(", "))
    } else {
        format!(
            "no valid signature on {store_path} by a trusted key ({})",
            names.join(", ")
        )
    })
}

/// What a signature covers: the manifest's JSON without its signature.
pub fn signing_bytes(m: &Manifest) -> Vec<u8> {
    let mut unsigned = m.clone();
    unsigned.signature = None;
    serde_json::to_vec(&unsigned).expect("the model serialises")
}

/// Accept `m` only if a trusted key signed exactly this content.
pub fn verify(m: &Manifest, trusted: &[PublicKey]) -> Result<(), TrustError> {
    let version = m.version.clone().unwrap_or_else(|| "(unversioned)".into());
    let names = trusted
        .iter()
        .map(|k| k.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let sig = m.signature.as_ref().ok_or_else(|| TrustError::Unsigned {
        version: version.clone(),
        trusted: names.clone(),
    })?;
    let named: Vec<&PublicKey> = trusted.iter().filter(|k| k.name == sig.key).collect();
    if named.is_empty() {
        return Err(TrustError::UnknownKey {
            version,
            key: sig.key.clone(),
            trusted: names,
        });
    }
    let bad = || TrustError::BadSignature {
        version: version.clone(),
        key: sig.key.clone(),
    };
    let bytes: [u8; 64] = STANDARD
        .decode(&sig.value)
        .map_err(|_| bad())?
        .try_into()
        .map_err(|_| bad())?;
    let signature = ed25519_dalek::Signature::from_bytes(&bytes);
    let message = signing_bytes(m);
    // Any trusted key of that name: two may share a name while one replaces the other.
    named
        .iter()
        .any(|k| k.key.verify_strict(&message, &signature).is_ok())
        .then_some(())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_manifests_verify_and_tampering_is_caught() {
        let key = SecretKey::generate("ci-2026").unwrap();
        let other = SecretKey::generate("ci-2026").unwrap();
        let trusted = vec![PublicKey::parse(&key.public().to_text(), "test").unwrap()];
        let mut m = Manifest::empty();
        m.version = Some("manifest-20261122T140000Z-3f2a9c1d".into());
        assert!(matches!(
            verify(&m, &trusted),
            Err(TrustError::Unsigned { .. })
        ));
        key.sign(&mut m);
        assert_eq!(verify(&m, &trusted), Ok(()));
        let mut tampered = m.clone();
        tampered.summary = Some("evil".into());
        assert!(matches!(
            verify(&tampered, &trusted),
            Err(TrustError::BadSignature { .. })
        ));
        let mut forged = m.clone();
        other.sign(&mut forged);
        assert!(matches!(
            verify(&forged, &trusted),
            Err(TrustError::BadSignature { .. })
        ));
        // Two trusted keys with one name (a replacement in progress): either verifies.
        let both = vec![other.public(), key.public()];
        assert_eq!(verify(&m, &both), Ok(()));
        let round = SecretKey::parse(&key.to_text(), "t").unwrap();
        assert_eq!(round.public(), key.public());
        assert!(PublicKey::parse("nocolon", "t").is_err());
        assert!(PublicKey::parse("k:AAAA", "t").is_err());
    }

    #[test]
    fn the_generic_scheme_is_the_manifests_own() {
        let key = SecretKey::generate("ci-2026").unwrap();
        let mut m = Manifest::empty();
        m.version = Some("manifest-20261122T140000Z-3f2a9c1d".into());
        assert_eq!(m.unsigned_bytes(), signing_bytes(&m));
        assert_eq!(
            verify_json(&m, &[key.public()]),
            Err(JsonSignatureError::Unsigned)
        );
        key.sign_json(&mut m);
        assert_eq!(verify(&m, &[key.public()]), Ok(()), "a manifest verifies");
        assert_eq!(verify_json(&m, &[key.public()]), Ok(()));
        let mut by_sign = m.clone();
        key.sign(&mut by_sign);
        assert_eq!(
            by_sign, m,
            "ed25519 is deterministic: both ways sign the same"
        );
        let other = SecretKey::generate("ci-2026").unwrap();
        let renamed =
            SecretKey::parse(&key.to_text().replacen("ci-2026", "other", 1), "t").unwrap();
        assert_eq!(
            verify_json(&m, &[renamed.public()]),
            Err(JsonSignatureError::UnknownKey)
        );
        assert_eq!(
            verify_json(&m, &[other.public()]),
            Err(JsonSignatureError::BadSignature)
        );
        assert_eq!(
            verify_json(&m, &[other.public(), key.public()]),
            Ok(()),
            "any key of that name (a rotation) may verify"
        );
    }

    #[test]
    fn narinfo_signatures_follow_nix() {
        // Made with `nix-store --generate-binary-cache-key test-1` and
        // `nix copy --to 'file://…?secret-key=…'` (Nix 2.8).
        let narinfo = "StorePath: /nix/store/rpp4ph3lc124p3flarywga0ry0358g6r-out\nURL: nar/1pl3xz0rfb20gdgkff0phrxynncxr8a1xcvk401y9zvjy11yi5hz.nar.xz\nCompression: xz\nFileHash: sha256:1pl3xz0rfb20gdgkff0phrxynncxr8a1xcvk401y9zvjy11yi5hz\nFileSize: 184\nNarHash: sha256:140v0py67gd2ppzz8rp0lp82kfqnfzf52h3jdw5642k3hyaqbbjb\nNarSize: 304\nReferences: \nSig: test-1:0jij/T8u9zEb9cSUV9INxiWQYiG4JM5QcjCWNz3UBmaOffKhqjdfJ26us79JGcUPSroTemvj7UHQrpryZfOaBA==\n";
        let key =
            PublicKey::parse("test-1:ihvSwSZy6VMtDpfPHLMVvcSbMLugCnbIFH4vy/v/8As=", "t").unwrap();
        assert_eq!(verify_narinfo(narinfo, std::slice::from_ref(&key)), Ok(()));
        let tampered = narinfo.replace("NarSize: 304", "NarSize: 305");
        assert!(verify_narinfo(&tampered, std::slice::from_ref(&key)).is_err());
        let other = SecretKey::generate("test-1").unwrap().public();
        assert!(verify_narinfo(narinfo, &[other]).is_err());
        let unsigned: String = narinfo
            .lines()
            .filter(|l| !l.starts_with("Sig:"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            verify_narinfo(&unsigned, &[key])
                .unwrap_err()
                .contains("not signed")
        );
    }

    #[test]
    fn sequences_order_versions_and_expiry_freezes() {
        let at = |version: &str, sequence: Option<u64>| {
            let mut m = Manifest::empty();
            m.version = Some(version.into());
            m.sequence = sequence;
            m
        };
        let applied = Applied {
            version: "manifest-b".into(),
            sequence: 5,
        };
        let check = |m: &Manifest| check_sequence(m, Some(&applied));
        assert!(check(&at("manifest-a", Some(4))).is_err(), "lower");
        assert!(
            check(&at("manifest-c", Some(5))).is_err(),
            "same, other version"
        );
        assert!(check(&at("manifest-b", Some(5))).is_ok(), "the applied one");
        assert!(check(&at("manifest-c", Some(6))).is_ok());
        assert!(check(&at("manifest-old", None)).is_err(), "unsequenced = 0");
        assert!(check_sequence(&at("manifest-a", Some(1)), None).is_ok());

        let now = humantime::parse_rfc3339("2026-11-23T12:00:00Z").unwrap();
        let mut m = at("manifest-e", Some(1));
        assert!(check_expiry(&m, now).is_ok(), "no expiry: never");
        m.expires = Some("2026-11-23T12:00:01Z".into());
        assert!(check_expiry(&m, now).is_ok());
        m.expires = Some("2026-11-23T12:00:00Z".into());
        let e = check_expiry(&m, now).unwrap_err().to_string();
        assert!(e.contains("deploy-manifest refresh"), "{e}");
    }
}
