//! Credentials as GitHub checks them: personal access tokens, GitHub App JWTs (RS256)
//! and the installation tokens exchanged for them.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::sha2::Sha256;
use rsa::signature::Verifier;

/// Longest JWT lifetime GitHub accepts: `exp` at most 10 minutes after now.
pub const MAX_JWT_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("A JSON web token could not be decoded")]
    Malformed,
    #[error("'alg' must be RS256")]
    Algorithm,
    #[error("A JSON web token could not be decoded")]
    Signature,
    #[error("'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued")]
    IssuedInFuture,
    #[error(
        "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires"
    )]
    Expired,
    #[error("'Expiration time' claim ('exp') is too far in the future")]
    TooLong,
    #[error("'Issuer' claim ('iss') must be an Integer")]
    Issuer,
    #[error("Integration not found")]
    UnknownApp,
}

pub struct AppKey {
    pub app_id: u64,
    pub client_id: Option<String>,
    pub key: VerifyingKey<Sha256>,
}

impl AppKey {
    /// Reads a PEM public key, SPKI (`BEGIN PUBLIC KEY`) or PKCS#1 (`BEGIN RSA PUBLIC KEY`).
    pub fn from_pem(app_id: u64, client_id: Option<String>, pem: &str) -> Result<Self, String> {
        use rsa::pkcs1::DecodeRsaPublicKey;
        use rsa::pkcs8::DecodePublicKey;
        let key = rsa::PublicKey::from_public_key_pem(pem)
            .or_else(|_| rsa::PublicKey::from_pkcs1_pem(pem))
            .map_err(|e| format!("not an RSA public key in PEM form: {e}"))?;
        Ok(AppKey { app_id, client_id, key: VerifyingKey::new(key) })
    }

    /// Verifies a GitHub App JWT: RS256 signature, `iat` not in the future (60 s of drift
    /// allowed), `exp` in the future and at most 10 minutes away, `iss` the app id or client id.
    pub fn verify(&self, jwt: &str, now: SystemTime) -> Result<(), JwtError> {
        let mut parts = jwt.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(JwtError::Malformed);
        };
        let decode = |x: &str| URL_SAFE_NO_PAD.decode(x).map_err(|_| JwtError::Malformed);
        let header: serde_json::Value = serde_json::from_slice(&decode(h)?).map_err(|_| JwtError::Malformed)?;
        if header["alg"] != "RS256" {
            return Err(JwtError::Algorithm);
        }
        let sig = Signature::try_from(decode(s)?.as_slice()).map_err(|_| JwtError::Signature)?;
        self.key.verify(format!("{h}.{p}").as_bytes(), &sig).map_err(|_| JwtError::Signature)?;
        let claims: serde_json::Value = serde_json::from_slice(&decode(p)?).map_err(|_| JwtError::Malformed)?;
        let now = crate::time::unix(now) as i64;
        let iat = claims["iat"].as_i64().ok_or(JwtError::IssuedInFuture)?;
        let exp = claims["exp"].as_i64().ok_or(JwtError::Expired)?;
        if iat > now + 60 {
            return Err(JwtError::IssuedInFuture);
        }
        if exp <= now {
            return Err(JwtError::Expired);
        }
        if exp > now + MAX_JWT_LIFETIME.as_secs() as i64 + 60 || exp - iat > MAX_JWT_LIFETIME.as_secs() as i64 + 60 {
            return Err(JwtError::TooLong);
        }
        let iss_ok = match &claims["iss"] {
            serde_json::Value::Number(n) => n.as_u64() == Some(self.app_id),
            serde_json::Value::String(s) => {
                s.parse::<u64>().ok() == Some(self.app_id) || self.client_id.as_deref() == Some(s.as_str())
            }
            _ => return Err(JwtError::Issuer),
        };
        if !iss_ok {
            return Err(JwtError::UnknownApp);
        }
        Ok(())
    }
}

/// What an `Authorization` header carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Token(String),
    Jwt(String),
    None,
}

/// `Bearer x` / `token x`; three dot-separated parts make a JWT.
pub fn parse_authorization(value: Option<&str>) -> Credential {
    let Some(v) = value else {
        return Credential::None;
    };
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .or_else(|| v.strip_prefix("token "))
        .unwrap_or("")
        .trim();
    if token.is_empty() {
        Credential::None
    } else if token.split('.').count() == 3 && token.starts_with("ey") {
        Credential::Jwt(token.to_string())
    } else {
        Credential::Token(token.to_string())
    }
}

/// Installation tokens issued by `POST /app/installations/{id}/access_tokens`.
#[derive(Default)]
pub struct InstallationTokens {
    tokens: HashMap<String, SystemTime>,
}

impl InstallationTokens {
    pub fn issue(&mut self, ttl: Duration, now: SystemTime) -> (String, SystemTime) {
        self.tokens.retain(|_, exp| *exp > now);
        let token = crate::model::token("ghs_", 36);
        let expires = now + ttl;
        self.tokens.insert(token.clone(), expires);
        (token, expires)
    }

    pub fn valid(&self, token: &str, now: SystemTime) -> bool {
        self.tokens.get(token).is_some_and(|exp| *exp > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use rsa::pkcs1v15::SigningKey;
    use rsa::pkcs8::EncodePublicKey;
    use rsa::signature::{SignatureEncoding, Signer};

    pub fn keypair() -> (SigningKey<Sha256>, String) {
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .output()
            .expect("openssl");
        let pem = String::from_utf8(out.stdout).unwrap();
        use rsa::pkcs8::DecodePrivateKey;
        let private = rsa::PrivateKey::from_pkcs8_pem(&pem).unwrap();
        let public = private.to_public_key().to_public_key_pem(Default::default()).unwrap();
        (SigningKey::new(private), public)
    }

    fn jwt(key: &SigningKey<Sha256>, claims: serde_json::Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let p = URL_SAFE_NO_PAD.encode(claims.to_string());
        let sig = key.sign(format!("{h}.{p}").as_bytes());
        format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    #[test]
    fn jwt_rules() {
        let (signing, public) = keypair();
        let app = AppKey::from_pem(42, Some("Iv1.abc".into()), &public).unwrap();
        let now = SystemTime::now();
        let t = crate::time::unix(now) as i64;
        let ok = jwt(&signing, serde_json::json!({"iat": t - 60, "exp": t + 540, "iss": "42"}));
        assert_eq!(app.verify(&ok, now), Ok(()));
        let by_client = jwt(&signing, serde_json::json!({"iat": t - 60, "exp": t + 540, "iss": "Iv1.abc"}));
        assert_eq!(app.verify(&by_client, now), Ok(()));
        let numeric = jwt(&signing, serde_json::json!({"iat": t, "exp": t + 60, "iss": 42}));
        assert_eq!(app.verify(&numeric, now), Ok(()));
        let expired = jwt(&signing, serde_json::json!({"iat": t - 700, "exp": t - 100, "iss": "42"}));
        assert_eq!(app.verify(&expired, now), Err(JwtError::Expired));
        let too_long = jwt(&signing, serde_json::json!({"iat": t, "exp": t + 3600, "iss": "42"}));
        assert_eq!(app.verify(&too_long, now), Err(JwtError::TooLong));
        let future = jwt(&signing, serde_json::json!({"iat": t + 300, "exp": t + 500, "iss": "42"}));
        assert_eq!(app.verify(&future, now), Err(JwtError::IssuedInFuture));
        let other_app = jwt(&signing, serde_json::json!({"iat": t, "exp": t + 60, "iss": "43"}));
        assert_eq!(app.verify(&other_app, now), Err(JwtError::UnknownApp));
        let (other_key, _) = keypair();
        let forged = jwt(&other_key, serde_json::json!({"iat": t, "exp": t + 60, "iss": "42"}));
        assert_eq!(app.verify(&forged, now), Err(JwtError::Signature));
        assert_eq!(app.verify("a.b", now), Err(JwtError::Malformed));
    }

    #[test]
    fn authorization_header_forms() {
        assert_eq!(parse_authorization(Some("token ghp_x")), Credential::Token("ghp_x".into()));
        assert_eq!(parse_authorization(Some("Bearer ghs_y")), Credential::Token("ghs_y".into()));
        assert!(matches!(parse_authorization(Some("Bearer eyA.eyB.sig")), Credential::Jwt(_)));
        assert_eq!(parse_authorization(Some("Basic abc")), Credential::None);
        assert_eq!(parse_authorization(None), Credential::None);
    }

    #[test]
    fn installation_tokens_expire() {
        let mut t = InstallationTokens::default();
        let now = SystemTime::now();
        let (tok, exp) = t.issue(Duration::from_secs(3600), now);
        assert!(tok.starts_with("ghs_"));
        assert!(t.valid(&tok, now));
        assert!(!t.valid(&tok, exp));
        assert!(!t.valid("ghs_other", now));
    }
}
