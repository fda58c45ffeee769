//! Bearer JWT authentication and per-merchant authorization.
//!
//! A token names the merchants it may act for (`merchants` claim) or carries
//! the admin scope (`scope` containing `fluxo:admin`). Issuer, audience and
//! expiry are always checked; keys come from a JWKS file (RS256/ES256, chosen
//! by `kid`) or, for development, an HS256 secret.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::HeaderValue;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Tokens remembered as verified, at most; the cache is emptied when full.
const VERIFIED_CAPACITY: usize = 10_000;
/// The longest a verification is reused, whatever the token's expiry: a key
/// removed from the JWKS stops being honoured within this time.
const VERIFIED_FOR_SECS: u64 = 60;

/// Scope that lets a token act for every merchant.
pub const ADMIN_SCOPE: &str = "fluxo:admin";
/// Scope that lets a token close and reopen the books of the merchants it acts for.
pub const CLOSE_SCOPE: &str = "fluxo:close";

/// Who is calling, once their token is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's subject.
    pub subject: String,
    /// Merchants it may act for.
    pub merchants: Vec<String>,
    /// Whether it may act for every merchant.
    pub admin: bool,
    /// Whether it may close and reopen its merchants' books ([`CLOSE_SCOPE`]).
    pub closer: bool,
    /// Rate-limit tier named by the token, if any.
    pub tier: Option<String>,
}

impl Identity {
    /// Whether this caller may act for `merchant`.
    pub fn may_act_for(&self, merchant: &str) -> bool {
        self.admin || self.merchants.iter().any(|m| m == merchant)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    merchants: Vec<String>,
    #[serde(default)]
    scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tier: Option<String>,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    iss: String,
    aud: String,
}

/// Why a request is not authenticated. Deliberately vague towards the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// Signature, issuer, audience, expiry or format rejected.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Where verification keys come from.
#[derive(Debug, Clone)]
pub enum Keys {
    /// A shared secret (development; HS256).
    Hs256(SecretString),
    /// Public keys (RS256/ES256) from a JWKS document; shared so a refresh
    /// from the identity provider's URL replaces them in place.
    Jwks(Arc<RwLock<JwkSet>>),
}

impl Keys {
    /// Keys from a JWKS document.
    pub fn jwks(set: JwkSet) -> Self {
        Self::Jwks(Arc::new(RwLock::new(set)))
    }
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Verifier {
    keys: Keys,
    issuer: String,
    audience: String,
    leeway_secs: u64,
    // Tokens verified lately, by SHA-256 of the token (the token itself is not
    // kept), with the Unix second until which the verification is reused.
    verified: Arc<Mutex<Verified>>,
}

/// Identity and reuse deadline (Unix seconds) by SHA-256 of a token.
type Verified = HashMap<[u8; 32], (Identity, u64)>;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// Loads a JWKS document from a file.
pub fn read_jwks(path: &Path) -> Result<JwkSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not a JWKS document: {e}", path.display()))
}

/// Fetches a JWKS document from the identity provider.
pub async fn fetch_jwks(url: &str) -> Result<JwkSet, String> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(5))).build().into();
        let mut response = agent.get(&url).call().map_err(|e| format!("fetching {url}: {e}"))?;
        response.body_mut().read_json::<JwkSet>().map_err(|e| format!("{url} is not a JWKS document: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Refreshes `keys` from `url` every `every`, keeping the last good set when a
/// fetch fails (the provider rotates keys with overlap, so this is safe).
pub fn refresh_jwks(url: String, keys: &Keys, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
    let Keys::Jwks(shared) = keys else { return None };
    let shared = shared.clone();
    Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match fetch_jwks(&url).await {
                Ok(set) => *shared.write().unwrap_or_else(std::sync::PoisonError::into_inner) = set,
                Err(error) => tracing::warn!(%error, "JWKS refresh failed; keeping the current keys"),
            }
        }
    }))
}

/// The token of an `Authorization: Bearer …` header.
fn bearer_token(header: &HeaderValue) -> Option<&str> {
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

impl Verifier {
    /// A verifier for tokens from `issuer` for `audience`.
    pub fn new(keys: Keys, issuer: &str, audience: &str, leeway_secs: u64) -> Self {
        Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway_secs,
            verified: Arc::default(),
        }
    }

    /// Verifies the `Authorization` header.
    pub fn verify(&self, authorization: Option<&HeaderValue>) -> Result<Identity, AuthError> {
        let token = authorization.and_then(bearer_token).ok_or(AuthError::Missing)?;
        // A token seen lately is not verified again (signature checks, RSA ones
        // above all, cost more than the rest of a request) until its expiry or
        // VERIFIED_FOR_SECS, whichever comes first.
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut verified = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((identity, until)) = verified.get(&digest) {
            if now < *until {
                return Ok(identity.clone());
            }
            verified.remove(&digest);
        }
        drop(verified);
        let (identity, exp) = self.verify_token(token)?;
        let until = exp.saturating_add(self.leeway_secs).min(now.saturating_add(VERIFIED_FOR_SECS));
        let mut verified = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if verified.len() >= VERIFIED_CAPACITY {
            verified.clear();
        }
        verified.insert(digest, (identity.clone(), until));
        Ok(identity)
    }

    /// Whether the `Authorization` header carries a token verified lately, so
    /// that verifying it again costs no signature check.
    pub fn is_known(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(token) = authorization.and_then(bearer_token) else { return false };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let verified = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        verified.get(&digest).is_some_and(|(_, until)| now < *until)
    }

    /// Checks a token's signature and claims; the identity and the expiry (Unix seconds).
    fn verify_token(&self, token: &str) -> Result<(Identity, u64), AuthError> {
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::Invalid(e.to_string());
        let head = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let (key, algorithm) = match &self.keys {
            Keys::Hs256(secret) => {
                (DecodingKey::from_secret(secret.expose_secret().as_bytes()), Algorithm::HS256)
            }
            Keys::Jwks(shared) => {
                if !matches!(head.alg, Algorithm::RS256 | Algorithm::ES256) {
                    return Err(AuthError::Invalid(format!("algorithm {:?} is not accepted", head.alg)));
                }
                let set = shared.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                let jwk = match &head.kid {
                    Some(kid) => set.find(kid),
                    None if set.keys.len() == 1 => set.keys.first(),
                    None => None,
                }
                .ok_or_else(|| AuthError::Invalid("no key matches the token's kid".into()))?;
                (DecodingKey::from_jwk(jwk).map_err(invalid)?, head.alg)
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.leeway_secs;
        // A token is not valid before its `nbf`; one issued in the future (`iat`
        // past now and the leeway) is refused too: its clock or its issuer is wrong.
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(invalid)?.claims;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if claims.iat.is_some_and(|iat| iat > now.saturating_add(self.leeway_secs)) {
            return Err(AuthError::Invalid("the token was issued in the future (iat)".into()));
        }
        let identity = Identity {
            subject: claims.sub,
            merchants: claims.merchants,
            admin: claims.scope.split_whitespace().any(|s| s == ADMIN_SCOPE),
            closer: claims.scope.split_whitespace().any(|s| s == CLOSE_SCOPE),
            tier: claims.tier,
        };
        Ok((identity, claims.exp))
    }
}

/// The claims of a token to mint (development and tests): a subject, the
/// merchants it may act for or the admin scope, and when it is valid.
#[derive(Debug, Clone)]
pub struct TokenSpec<'a> {
    /// `sub`.
    pub subject: &'a str,
    /// `merchants`.
    pub merchants: &'a [&'a str],
    /// Adds the admin scope.
    pub admin: bool,
    /// Adds the close scope.
    pub closer: bool,
    /// `tier`, the rate-limit tier.
    pub tier: Option<&'a str>,
    /// Seconds from now to `exp`; negative mints an expired token.
    pub valid_for_secs: i64,
    /// Seconds from now to `nbf`, when set.
    pub not_before_secs: Option<i64>,
    /// Seconds from now to `iat`, when set (positive: issued in the future).
    pub issued_in_secs: Option<i64>,
}

impl<'a> TokenSpec<'a> {
    /// A token for `subject` acting for `merchants`, valid for an hour.
    pub fn new(subject: &'a str, merchants: &'a [&'a str]) -> Self {
        Self {
            subject,
            merchants,
            admin: false,
            closer: false,
            tier: None,
            valid_for_secs: 3600,
            not_before_secs: None,
            issued_in_secs: None,
        }
    }

    /// A token for `subject` with the admin scope, valid for an hour.
    pub fn admin(subject: &'a str) -> Self {
        Self { admin: true, ..Self::new(subject, &[]) }
    }

    /// Signs it with HS256 for `issuer` and `audience`.
    pub fn sign_hs256(
        &self,
        secret: &SecretString,
        issuer: &str,
        audience: &str,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
            .unwrap_or(i64::MAX);
        let at = |offset: i64| u64::try_from(now.saturating_add(offset)).unwrap_or(0);
        let claims = Claims {
            sub: self.subject.to_owned(),
            merchants: self.merchants.iter().map(|m| (*m).to_owned()).collect(),
            scope: [(self.admin, ADMIN_SCOPE), (self.closer, CLOSE_SCOPE)]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, scope)| *scope)
                .collect::<Vec<_>>()
                .join(" "),
            tier: self.tier.map(str::to_owned),
            exp: at(self.valid_for_secs),
            nbf: self.not_before_secs.map(at),
            iat: self.issued_in_secs.map(at),
            iss: issuer.to_owned(),
            aud: audience.to_owned(),
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
        )
    }
}

/// The development secret in `data_dir`, created on first use (mode 0600),
/// so a laptop install is never an open API.
pub fn dev_secret(data_dir: &Path) -> std::io::Result<SecretString> {
    let path = data_dir.join("dev-jwt-secret");
    if let Ok(existing) = std::fs::read_to_string(&path)
        && existing.trim().len() >= 32
    {
        return Ok(SecretString::from(existing.trim().to_owned()));
    }
    std::fs::create_dir_all(data_dir)?;
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, &secret)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(SecretString::from(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretString {
        SecretString::from("a-development-secret-of-32-bytes!".to_owned())
    }

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn a_valid_token_names_its_merchants() {
        let v = Verifier::new(Keys::Hs256(secret()), "fluxo", "fluxo-api", 0);
        let t = TokenSpec::new("shop", &["m-1"]).sign_hs256(&secret(), "fluxo", "fluxo-api").unwrap();
        let id = v.verify(Some(&bearer(&t))).unwrap();
        assert!(id.may_act_for("m-1"));
        assert!(!id.may_act_for("m-2"));
        let admin = TokenSpec::admin("ops").sign_hs256(&secret(), "fluxo", "fluxo-api").unwrap();
        assert!(v.verify(Some(&bearer(&admin))).unwrap().may_act_for("anyone"));
    }

    /// An ES256 key pair: the JWKS (with `kid`) and the private key to sign with.
    fn es256() -> (String, EncodingKey) {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let mut jwk: serde_json::Value = serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
        jwk["kid"] = "key-1".into();
        jwk["alg"] = "ES256".into();
        jwk["use"] = "sig".into();
        let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        (serde_json::json!({ "keys": [jwk] }).to_string(), EncodingKey::from_ec_pem(pem.as_bytes()).unwrap())
    }

    fn es256_token(key: &EncodingKey, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.into());
        let claims = Claims {
            sub: "shop".into(),
            merchants: vec!["m-1".into()],
            scope: String::new(),
            tier: None,
            exp: u64::MAX / 2,
            nbf: None,
            iat: None,
            iss: "idp".into(),
            aud: "fluxo-api".into(),
        };
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    #[test]
    fn es256_tokens_verify_against_a_jwks_file() {
        let (jwks, key) = es256();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, jwks).unwrap();
        let v = Verifier::new(Keys::jwks(read_jwks(&file).unwrap()), "idp", "fluxo-api", 0);
        let id = v.verify(Some(&bearer(&es256_token(&key, "key-1")))).unwrap();
        assert!(id.may_act_for("m-1"));
        assert!(v.verify(Some(&bearer(&es256_token(&key, "unknown-kid")))).is_err());
        // An HS256 token signed with the public key material must never pass.
        let hs = TokenSpec::admin("s").sign_hs256(&secret(), "idp", "fluxo-api").unwrap();
        assert!(v.verify(Some(&bearer(&hs))).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jwks_are_fetched_from_a_url() {
        let (jwks, key) = es256();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/jwks.json", axum::routing::get(move || async move { jwks }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let set = fetch_jwks(&format!("http://{addr}/jwks.json")).await.unwrap();
        let v = Verifier::new(Keys::jwks(set), "idp", "fluxo-api", 0);
        assert!(v.verify(Some(&bearer(&es256_token(&key, "key-1")))).is_ok());
        assert!(fetch_jwks(&format!("http://{addr}/missing")).await.is_err());
    }

    #[test]
    fn wrong_signature_audience_issuer_and_expiry_are_refused() {
        let v = Verifier::new(Keys::Hs256(secret()), "fluxo", "fluxo-api", 0);
        let other = SecretString::from("another-secret-another-secret-xx".to_owned());
        let cases = [
            TokenSpec::new("s", &["m"]).sign_hs256(&other, "fluxo", "fluxo-api").unwrap(),
            TokenSpec::new("s", &["m"]).sign_hs256(&secret(), "fluxo", "elsewhere").unwrap(),
            TokenSpec::new("s", &["m"]).sign_hs256(&secret(), "intruder", "fluxo-api").unwrap(),
            TokenSpec { valid_for_secs: -120, ..TokenSpec::new("s", &["m"]) }
                .sign_hs256(&secret(), "fluxo", "fluxo-api")
                .unwrap(),
            // Not valid yet (nbf past the leeway), and issued in the future.
            TokenSpec { not_before_secs: Some(120), ..TokenSpec::new("s", &["m"]) }
                .sign_hs256(&secret(), "fluxo", "fluxo-api")
                .unwrap(),
            TokenSpec { issued_in_secs: Some(120), ..TokenSpec::new("s", &["m"]) }
                .sign_hs256(&secret(), "fluxo", "fluxo-api")
                .unwrap(),
        ];
        for token in cases {
            assert!(matches!(v.verify(Some(&bearer(&token))), Err(AuthError::Invalid(_))));
        }
        assert_eq!(v.verify(None), Err(AuthError::Missing));
        // Within the leeway, nbf and iat a little ahead (clock skew) still pass.
        let lenient = Verifier::new(Keys::Hs256(secret()), "fluxo", "fluxo-api", 30);
        let skewed =
            TokenSpec { not_before_secs: Some(10), issued_in_secs: Some(10), ..TokenSpec::new("s", &["m"]) }
                .sign_hs256(&secret(), "fluxo", "fluxo-api")
                .unwrap();
        assert!(lenient.verify(Some(&bearer(&skewed))).is_ok());
        assert_eq!(v.verify(Some(&HeaderValue::from_static("Basic abc"))), Err(AuthError::Missing));
    }

    #[test]
    fn a_remembered_token_is_refused_once_it_expires() {
        let v = Verifier::new(Keys::Hs256(secret()), "fluxo", "fluxo-api", 0);
        let t = TokenSpec { valid_for_secs: 2, ..TokenSpec::new("shop", &["m-1"]) }
            .sign_hs256(&secret(), "fluxo", "fluxo-api")
            .unwrap();
        // Verified, then answered from memory...
        assert!(v.verify(Some(&bearer(&t))).unwrap().may_act_for("m-1"));
        assert!(v.verify(Some(&bearer(&t))).unwrap().may_act_for("m-1"));
        // ...but never past its expiry, and a forged twin is not taken for it.
        let forged = format!("{t}x");
        assert!(matches!(v.verify(Some(&bearer(&forged))), Err(AuthError::Invalid(_))));
        std::thread::sleep(Duration::from_millis(3_100));
        assert!(matches!(v.verify(Some(&bearer(&t))), Err(AuthError::Invalid(_))));
    }
}
