//! Standard Webhooks signatures: `webhook-id`, `webhook-timestamp` and
//! `webhook-signature` (`v1,<base64 HMAC-SHA256>` over `id.timestamp.body`).
//!
//! A subscription's secret is shown to its owner once, as `whsec_<base64>`;
//! while a rotation is in its grace period both the new and the old secret
//! sign every delivery (the header carries one `v1,…` per secret, separated
//! by spaces), so a receiver can switch at its own pace.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretBox};

/// The prefix of a secret's text form.
pub const SECRET_PREFIX: &str = "whsec_";
/// Bytes of key in a secret fluxo generates.
pub const GENERATED_KEY_BYTES: usize = 32;
/// The shortest and longest keys accepted (the specification's bounds).
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;
/// How far a receiver should let `webhook-timestamp` stray from its clock.
pub const DEFAULT_TOLERANCE_SECS: i64 = 5 * 60;

/// Header names, lower case as HTTP/2 sends them.
pub const HEADER_ID: &str = "webhook-id";
/// Seconds since the Unix epoch at signing.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Space-separated `v1,<signature>` list.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// A signing secret. Its key never appears in `Debug` output.
pub struct Secret {
    key: SecretBox<[u8]>,
}

/// Why a secret's text or a signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// The secret is not `whsec_` followed by base64.
    #[error("a secret is `whsec_` followed by base64")]
    SecretFormat,
    /// The key is shorter or longer than the specification allows.
    #[error("a secret's key is 24 to 64 bytes, this one is {0}")]
    SecretLength(usize),
    /// The system's random source failed.
    #[error("the system's random source failed")]
    Random,
    /// The timestamp is not whole seconds or too far from the verifier's clock.
    #[error("webhook-timestamp is missing, malformed or outside the tolerance")]
    Timestamp,
    /// No `v1` signature in the header matches.
    #[error("no webhook-signature matches")]
    Mismatch,
}

impl Secret {
    /// A new random secret of [`GENERATED_KEY_BYTES`].
    pub fn generate() -> Result<Self, SignatureError> {
        let mut key = vec![0u8; GENERATED_KEY_BYTES];
        SystemRandom::new().fill(&mut key).map_err(|_| SignatureError::Random)?;
        Ok(Self::from_key(key))
    }

    /// Parses the text form (`whsec_<base64>`), as stored or as shown to the owner.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or(SignatureError::SecretFormat)?;
        let key = STANDARD.decode(encoded).map_err(|_| SignatureError::SecretFormat)?;
        if !KEY_BYTES.contains(&key.len()) {
            return Err(SignatureError::SecretLength(key.len()));
        }
        Ok(Self::from_key(key))
    }

    fn from_key(key: Vec<u8>) -> Self {
        Self { key: SecretBox::new(key.into_boxed_slice()) }
    }

    /// The text form, to be shown once and stored encrypted or hashed by the caller.
    pub fn expose_text(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(self.key.expose_secret()))
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.key.expose_secret())
    }

    /// The bare base64 signature of one message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = hmac::sign(&self.hmac_key(), &signed_content(id, timestamp, body));
        STANDARD.encode(tag.as_ref())
    }

    fn verifies(&self, content: &[u8], signature: &[u8]) -> bool {
        hmac::verify(&self.hmac_key(), content, signature).is_ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

fn signed_content(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(id.len() + body.len() + 24);
    content.extend_from_slice(id.as_bytes());
    content.push(b'.');
    content.extend_from_slice(timestamp.to_string().as_bytes());
    content.push(b'.');
    content.extend_from_slice(body);
    content
}

/// The three headers of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `webhook-id`: the event's id, the same on every retry.
    pub id: String,
    /// `webhook-timestamp`: seconds since the epoch at this attempt.
    pub timestamp: String,
    /// `webhook-signature`: one `v1,…` per secret in force.
    pub signature: String,
}

impl SignedHeaders {
    /// The headers as (name, value) pairs, in the specification's names.
    pub fn pairs(&self) -> [(&'static str, &str); 3] {
        [(HEADER_ID, &self.id), (HEADER_TIMESTAMP, &self.timestamp), (HEADER_SIGNATURE, &self.signature)]
    }
}

/// Signs `body` with every secret in force, current first.
///
/// `secrets` is never empty in practice (a subscription always has its
/// current secret); an empty slice yields an empty signature list, which no
/// receiver accepts.
pub fn sign(secrets: &[&Secret], id: &str, timestamp: i64, body: &[u8]) -> SignedHeaders {
    let signature = secrets
        .iter()
        .map(|secret| format!("v1,{}", secret.sign(id, timestamp, body)))
        .collect::<Vec<_>>()
        .join(" ");
    SignedHeaders { id: id.to_owned(), timestamp: timestamp.to_string(), signature }
}

/// Verifies a delivery the way a receiver does: the timestamp within
/// `tolerance_secs` of `now`, and at least one `v1` signature made by `secret`.
/// fluxo's tests check against an independent implementation too; this one
/// serves `fluxo webhooks` tooling and the unit tests.
pub fn verify(
    secret: &Secret,
    headers: &SignedHeaders,
    body: &[u8],
    now: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let timestamp: i64 = headers.timestamp.parse().map_err(|_| SignatureError::Timestamp)?;
    if timestamp.abs_diff(now) > tolerance_secs.unsigned_abs() {
        return Err(SignatureError::Timestamp);
    }
    let content = signed_content(&headers.id, timestamp, body);
    let matched = headers
        .signature
        .split(' ')
        .filter_map(|part| part.strip_prefix("v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .any(|signature| secret.verifies(&content, &signature));
    if matched { Ok(()) } else { Err(SignatureError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of the Standard Webhooks specification's reference libraries.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specifications_example_byte_for_byte() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let headers = sign(&[&secret], SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        assert_eq!(headers.signature, SPEC_SIGNATURE);
        assert_eq!(headers.timestamp, "1614265330");
        assert_eq!(headers.id, SPEC_ID);
    }

    #[test]
    fn a_rotation_signs_with_both_secrets_and_either_verifies() {
        let old = Secret::generate().unwrap();
        let new = Secret::generate().unwrap();
        let headers = sign(&[&new, &old], "evt_1", 1_000, b"{}");
        assert_eq!(headers.signature.split(' ').count(), 2);
        verify(&old, &headers, b"{}", 1_000, DEFAULT_TOLERANCE_SECS).unwrap();
        verify(&new, &headers, b"{}", 1_000, DEFAULT_TOLERANCE_SECS).unwrap();
        let stranger = Secret::generate().unwrap();
        assert_eq!(
            verify(&stranger, &headers, b"{}", 1_000, DEFAULT_TOLERANCE_SECS),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_changed_body_id_or_stale_timestamp_is_refused() {
        let secret = Secret::generate().unwrap();
        let headers = sign(&[&secret], "evt_1", 10_000, b"{\"a\":1}");
        assert_eq!(verify(&secret, &headers, b"{\"a\":2}", 10_000, 300), Err(SignatureError::Mismatch));
        let mut other_id = headers.clone();
        other_id.id = "evt_2".into();
        assert_eq!(verify(&secret, &other_id, b"{\"a\":1}", 10_000, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify(&secret, &headers, b"{\"a\":1}", 10_301, 300), Err(SignatureError::Timestamp));
        verify(&secret, &headers, b"{\"a\":1}", 9_700, 300).unwrap();
    }

    #[test]
    fn secrets_round_trip_and_bad_text_is_refused_without_echoing_it() {
        let secret = Secret::generate().unwrap();
        let text = secret.expose_text();
        assert!(text.starts_with(SECRET_PREFIX));
        let again = Secret::parse(&text).unwrap();
        assert_eq!(again.sign("a", 1, b"b"), secret.sign("a", 1, b"b"));
        assert_eq!(format!("{secret:?}"), "Secret(redacted)");
        assert_eq!(
            Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SignatureError::SecretFormat
        );
        assert_eq!(Secret::parse("whsec_not base64!").unwrap_err(), SignatureError::SecretFormat);
        assert_eq!(Secret::parse("whsec_c2hvcnQ=").unwrap_err(), SignatureError::SecretLength(5));
    }
}
