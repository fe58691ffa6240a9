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

pub fn mint(secret: &str, sub: &str, ttl_seconds: u64, allow_weak: bool) -> anyhow::Result<String> {
    if ttl_seconds == 0 {
        bail!("a TTL of zero makes a token that is already expired; pass a positive --ttl");
    }
    if secret.len() < MIN_SECRET_BYTES && !allow_weak {
        bail!(
            "the secret is {} bytes; at least {MIN_SECRET_BYTES} are needed (pass --allow-weak-secret to insist)",
            secret.len()
        );
    }
    if sub.trim().is_empty() {
        bail!("--sub must name a principal");
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({"sub": sub, "iat": now, "exp": now + ttl_seconds});
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
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

    #[test]
    fn refuses_zero_ttl_and_short_secrets() {
        let long = "x".repeat(32);
        assert!(mint(&long, "a", 0, false).is_err());
        assert!(mint("short", "a", 60, false).is_err());
        assert!(mint("short", "a", 60, true).is_ok());
        assert!(mint(&long, "a", 60, false).is_ok());
    }
}
