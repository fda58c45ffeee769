//! Signing secrets at rest: sealed with AES-256-GCM under the install's key
//! (`webhooks.secret_key`), bound to the subscription they belong to.
//!
//! The notifier must sign with the secret itself, so it cannot be stored as a
//! hash; sealing it keeps a database dump, a replica or a backup from handing
//! out every merchant's signing secrets. A sealed value is
//! `version (1) | key id (4) | nonce (12) | ciphertext and tag`; the key id
//! (the first bytes of the key's SHA-256) makes a value sealed under another
//! key fail with a message that says so, not as a bad tag. The subscription's
//! id is the associated data: a sealed secret copied onto another row does not
//! open there.

use base64::{Engine, engine::general_purpose::STANDARD};
use fluxo_webhooks::Secret;
use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;

/// Seals and opens signing secrets under one key.
pub struct Sealer {
    key: LessSafeKey,
    id: [u8; KEY_ID_LEN],
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("key_id", &hex(&self.id)).finish_non_exhaustive()
    }
}

/// Why a key or a sealed value was refused. No variant carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The configured key is not base64 of 32 bytes.
    #[error("webhooks.secret_key must be base64 of 32 random bytes (e.g. `openssl rand -base64 32`)")]
    Key,
    /// The system's random source failed.
    #[error("the system's random source failed")]
    Random,
    /// Sealed under a different key than the one configured.
    #[error("sealed under key {stored}, but webhooks.secret_key is key {configured}")]
    OtherKey {
        /// The key id in the value.
        stored: String,
        /// The configured key's id.
        configured: String,
    },
    /// Not a sealed value of this version, or it was altered.
    #[error("the sealed secret is damaged or belongs to another subscription")]
    Damaged,
}

impl Sealer {
    /// A sealer for `key`: the text of `webhooks.secret_key`.
    pub fn from_config(key: &SecretString) -> Result<Self, SealError> {
        let bytes = STANDARD.decode(key.expose_secret().trim()).map_err(|_| SealError::Key)?;
        Self::new(&bytes)
    }

    /// A sealer for 32 raw key bytes.
    pub fn new(key: &[u8]) -> Result<Self, SealError> {
        if key.len() != 32 {
            return Err(SealError::Key);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| SealError::Key)?;
        let digest = Sha256::digest(key);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Ok(Self { key: LessSafeKey::new(unbound), id, random: SystemRandom::new() })
    }

    /// The key's id, as sealed values carry it (hex).
    pub fn key_id(&self) -> String {
        hex(&self.id)
    }

    /// `secret`, sealed for the subscription `owner`.
    pub fn seal(&self, secret: &Secret, owner: &str) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(HEADER_LEN + 64);
        out.push(VERSION);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce);
        let mut body = secret.expose_text().into_bytes();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(owner.as_bytes()),
                &mut body,
            )
            .map_err(|_| SealError::Damaged)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The secret in `sealed`, which must have been sealed for `owner`.
    pub fn open(&self, sealed: &[u8], owner: &str) -> Result<Secret, SealError> {
        if sealed.len() <= HEADER_LEN || sealed[0] != VERSION {
            return Err(SealError::Damaged);
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        if header[1..=KEY_ID_LEN] != self.id {
            return Err(SealError::OtherKey {
                stored: hex(&header[1..=KEY_ID_LEN]),
                configured: self.key_id(),
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&header[1 + KEY_ID_LEN..]);
        let mut body = rest.to_vec();
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(owner.as_bytes()), &mut body)
            .map_err(|_| SealError::Damaged)?;
        let text = std::str::from_utf8(plain).map_err(|_| SealError::Damaged)?;
        Secret::parse(text).map_err(|_| SealError::Damaged)
    }
}

/// The embedded default's key: `webhook-secret-key` in `data_dir`, created
/// (owner-only) on first use. An install with a database server sets
/// `webhooks.secret_key` instead, so every replica seals with one key.
pub fn dev_key(data_dir: &std::path::Path) -> std::io::Result<SecretString> {
    let path = data_dir.join("webhook-secret-key");
    if let Ok(existing) = std::fs::read_to_string(&path)
        && Sealer::from_config(&SecretString::from(existing.trim().to_owned())).is_ok()
    {
        return Ok(SecretString::from(existing.trim().to_owned()));
    }
    std::fs::create_dir_all(data_dir)?;
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| std::io::Error::other("the system's random source failed"))?;
    let text = STANDARD.encode(key);
    std::fs::write(&path, &text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(SecretString::from(text))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> Sealer {
        Sealer::new(&[byte; 32]).unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_subscription_under_its_key() {
        let secret = Secret::generate().unwrap();
        let sealed = sealer(7).seal(&secret, "sub-1").unwrap();
        let text = secret.expose_text();
        assert!(!sealed.windows(text.len()).any(|w| w == text.as_bytes()), "nothing readable at rest");
        assert_eq!(sealer(7).open(&sealed, "sub-1").unwrap().expose_text(), text);
        assert_eq!(sealer(7).open(&sealed, "sub-2").unwrap_err(), SealError::Damaged);
        assert!(matches!(sealer(8).open(&sealed, "sub-1").unwrap_err(), SealError::OtherKey { .. }));
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(sealer(7).open(&altered, "sub-1").unwrap_err(), SealError::Damaged);
        assert_ne!(sealer(7).seal(&secret, "sub-1").unwrap(), sealed, "a fresh nonce each time");
    }

    #[test]
    fn the_embedded_default_keeps_one_key_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_key(dir.path()).unwrap();
        let second = dev_key(dir.path()).unwrap();
        assert_eq!(first.expose_secret(), second.expose_secret());
        let sealed = Sealer::from_config(&first).unwrap().seal(&Secret::generate().unwrap(), "s").unwrap();
        assert!(Sealer::from_config(&second).unwrap().open(&sealed, "s").is_ok());
    }

    #[test]
    fn a_key_must_be_base64_of_32_bytes_and_is_never_echoed() {
        let short = SecretString::from(STANDARD.encode([1u8; 16]));
        assert_eq!(Sealer::from_config(&short).unwrap_err(), SealError::Key);
        let garbage = SecretString::from("not base64 at all!".to_owned());
        assert_eq!(Sealer::from_config(&garbage).unwrap_err(), SealError::Key);
        let good = SecretString::from(STANDARD.encode([9u8; 32]));
        let debug = format!("{:?}", Sealer::from_config(&good).unwrap());
        assert!(!debug.contains(&STANDARD.encode([9u8; 32])) && debug.contains("key_id"));
    }
}
