//! `strait token`: mint an HS256 token for a self-hosted engine.

use anyhow::bail;

/// A secret shorter than this is refused unless the caller insists: HS256
/// keys should carry at least the hash's 256 bits.
pub const MIN_SECRET_BYTES: usize = 32;

/// Parses `90`, `90s`, `15m`, `12h`, `30d`.
pub fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| anyhow::anyhow!("TTL {text:?} is not a number with s, m, h or d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("TTL {text:?} has an unknown unit (use s, m, h or d)"),
    };
    Ok(n.saturating_mul(scale))
}

/// The claim that makes a token an operator's: the engine shows its holder
/// every principal's objects and lets it act on them.
pub const ADMIN_CLAIM: &str = "strait_admin";

/// What a minted token says.
pub struct Claims<'a> {
    /// The principal (`sub`).
    pub sub: &'a str,
    pub ttl_seconds: u64,
    /// Sets [`ADMIN_CLAIM`].
    pub admin: bool,
}

pub fn mint(secret: &str, claims: &Claims<'_>, allow_weak: bool) -> anyhow::Result<String> {
    if claims.ttl_seconds == 0 {
        bail!("a TTL of zero makes a token that is already expired; pass a positive --ttl");
    }
    if secret.len() < MIN_SECRET_BYTES && !allow_weak {
        bail!(
            "the secret is {} bytes; at least {MIN_SECRET_BYTES} are needed (pass --allow-weak-secret to insist)",
            secret.len()
        );
    }
    if claims.sub.trim().is_empty() {
        bail!("--sub must name a principal");
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let mut body = serde_json::json!({"sub": claims.sub, "iat": now, "exp": now.saturating_add(claims.ttl_seconds)});
    if claims.admin {
        body[ADMIN_CLAIM] = serde_json::Value::Bool(true);
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &body,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90").unwrap(), 90);
        assert_eq!(parse_ttl("15m").unwrap(), 900);
        assert_eq!(parse_ttl("2h").unwrap(), 7200);
        assert_eq!(parse_ttl("30d").unwrap(), 2_592_000);
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("soon").is_err());
    }

    fn claims(sub: &str, ttl_seconds: u64, admin: bool) -> Claims<'_> {
        Claims { sub, ttl_seconds, admin }
    }

    #[test]
    fn refuses_zero_ttl_and_short_secrets() {
        let long = "x".repeat(32);
        assert!(mint(&long, &claims("a", 0, false), false).is_err());
        assert!(mint("short", &claims("a", 60, false), false).is_err());
        assert!(mint("short", &claims("a", 60, false), true).is_ok());
        assert!(mint(&long, &claims("a", 60, false), false).is_ok());
        assert!(mint(&long, &claims(" ", 60, false), false).is_err());
    }

    /// The claims of `token`, checked against `secret`.
    fn verified(token: &str, secret: &str) -> jsonwebtoken::errors::Result<serde_json::Value> {
        let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
        let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        Ok(jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)?.claims)
    }

    #[test]
    fn admin_tokens_carry_the_claim_and_verify_with_the_secret() {
        let secret = "s".repeat(32);
        let token = mint(&secret, &claims("ops", 600, true), false).unwrap();
        let body = verified(&token, &secret).unwrap();
        assert_eq!(body["sub"], "ops");
        assert_eq!(body[ADMIN_CLAIM], true);
        assert!(verified(&token, &"t".repeat(32)).is_err(), "another secret does not verify it");

        let plain = verified(&mint(&secret, &claims("ci", 600, false), false).unwrap(), &secret).unwrap();
        assert!(plain.get(ADMIN_CLAIM).is_none(), "only --admin sets the claim: {plain}");
    }
}
