//! Token verification: HS256 JWTs signed with `auth.jwt.token_jwt_secret`.
//!
//! One verifier serves every door that takes a token: control channels,
//! private dials, the Engine API and `token_auth` tunnels.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;

/// Seconds of clock skew tolerated on `exp` and `nbf`: tokens are minted by
/// other machines whose clocks drift a little, never by minutes.
const LEEWAY_SECONDS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token was presented")]
    Missing,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm is not HS256")]
    WrongAlgorithm,
    #[error("token names no principal (sub, userId or clientId)")]
    NoPrincipal,
    #[error("token is malformed")]
    Malformed,
}

/// The claim that makes a token an operator's: `"strait_admin": true`.
/// Only the holder of the engine's secret can mint one, so it grants no more
/// than the secret already does, and operators need no second secret.
pub const ADMIN_CLAIM: &str = "strait_admin";

/// The token of an `Authorization: Bearer <token>` value (the scheme in any
/// case), or `None` when the value is not a Bearer credential. The one
/// parser for every door that takes a header: the Engine API and
/// `token_auth` tunnels.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// `sub`, else `userId`, else `clientId`: the owner of what it creates.
    pub id: String,
    /// An operator token: sees and acts on every principal's objects.
    pub admin: bool,
}

impl Principal {
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into(), admin: false }
    }

    /// Whether this principal may see and act on what `owner` created.
    pub fn sees(&self, owner: &str) -> bool {
        self.admin || self.id == owner
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)?;
        if self.admin { f.write_str(" (admin)") } else { Ok(()) }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
    #[serde(rename = "clientId")]
    client_id: Option<String>,
    /// Any other type than `true` is no admin marker, not a bad token.
    #[serde(rename = "strait_admin", default)]
    admin: Option<serde_json::Value>,
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is checked when present; CE accepts long-lived tokens without it.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = LEEWAY_SECONDS;
        Self { key: DecodingKey::from_secret(secret), validation }
    }

    pub fn verify(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let token = token.map(str::trim).filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::WrongAlgorithm);
        }
        let data = decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm,
                _ => AuthError::Malformed,
            }
        })?;
        let claims = data.claims;
        let admin = claims.admin == Some(serde_json::Value::Bool(true));
        [claims.sub, claims.user_id, claims.client_id]
            .into_iter()
            .flatten()
            .find(|p| !p.is_empty())
            .map(|id| Principal { id, admin })
            .ok_or(AuthError::NoPrincipal)
    }
}

/// Mints an HS256 token for `sub`, valid for `ttl_seconds` from now (no
/// `exp` when `None`). Used by `strait-engine dev` and the tests; the
/// `strait token` command is the operator's tool.
pub fn mint(secret: &[u8], sub: &str, ttl_seconds: Option<u64>) -> String {
    mint_with(secret, sub, ttl_seconds, false)
}

/// [`mint`], with the admin claim when `admin`.
pub fn mint_with(secret: &[u8], sub: &str, ttl_seconds: Option<u64>, admin: bool) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = serde_json::json!({"sub": sub, "iat": now});
    if admin {
        claims[ADMIN_CLAIM] = serde_json::json!(true);
    }
    if let Some(ttl) = ttl_seconds {
        claims["exp"] = serde_json::json!(now + ttl as i64);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn mint(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn principal_comes_from_sub_then_user_id_then_client_id() {
        let v = Verifier::new(SECRET);
        let t = mint(json!({"sub": "alice", "userId": "u", "exp": now() + 60}), SECRET);
        assert_eq!(v.verify(Some(&t)).unwrap(), Principal::new("alice"));
        let t = mint(json!({"userId": "u1", "clientId": "c"}), SECRET);
        assert_eq!(v.verify(Some(&t)).unwrap().id, "u1");
        let t = mint(json!({"clientId": "c1"}), SECRET);
        assert_eq!(v.verify(Some(&t)).unwrap().id, "c1");
        let t = mint(json!({"exp": now() + 60}), SECRET);
        assert_eq!(v.verify(Some(&t)), Err(AuthError::NoPrincipal));
    }

    #[test]
    fn admin_claim_must_be_true() {
        let v = Verifier::new(SECRET);
        let admin = v.verify(Some(&super::mint_with(SECRET, "ops", Some(60), true))).unwrap();
        assert!(admin.admin && admin.sees("alice") && admin.sees("ops"));
        let plain = v.verify(Some(&super::mint(SECRET, "bob", Some(60)))).unwrap();
        assert!(!plain.admin && plain.sees("bob") && !plain.sees("alice"));
        for claim in [json!("true"), json!(1), json!(false)] {
            let t = mint(json!({"sub": "x", "strait_admin": claim}), SECRET);
            assert_eq!(v.verify(Some(&t)), Ok(Principal::new("x")), "{claim}");
        }
    }

    #[test]
    fn refuses_bad_expired_immature_and_foreign_tokens() {
        let v = Verifier::new(SECRET);
        assert_eq!(v.verify(None), Err(AuthError::Missing));
        assert_eq!(v.verify(Some("not.a.jwt")), Err(AuthError::Malformed));
        let t = mint(json!({"sub": "a"}), b"another-secret-another-secret-xx");
        assert_eq!(v.verify(Some(&t)), Err(AuthError::BadSignature));
        let t = mint(json!({"sub": "a", "exp": now() - 3600}), SECRET);
        assert_eq!(v.verify(Some(&t)), Err(AuthError::Expired));
        let t = mint(json!({"sub": "a", "nbf": now() + 3600}), SECRET);
        assert_eq!(v.verify(Some(&t)), Err(AuthError::NotYetValid));
        let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"})), b64(json!({"sub": "a"})));
        assert!(v.verify(Some(&none)).is_err());
        let hs512 =
            encode(&Header::new(Algorithm::HS512), &json!({"sub": "a"}), &EncodingKey::from_secret(SECRET)).unwrap();
        assert_eq!(v.verify(Some(&hs512)), Err(AuthError::WrongAlgorithm));
    }
}
