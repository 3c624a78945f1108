//! GitHub App authentication: an RS256 JWT (`iat` 60 s in the past, `exp` 9 minutes
//! ahead, `iss` the app id) signs the request for an installation token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs1v15::SigningKey;
use rsa::sha2::Sha256;
use rsa::signature::{SignatureEncoding, Signer};

use super::GhError;
use crate::secret::Secret;

pub struct AppSigner {
    app_id: u64,
    key: SigningKey<Sha256>,
}

impl std::fmt::Debug for AppSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppSigner {{ app_id: {}, key: [redacted] }}", self.app_id)
    }
}

impl AppSigner {
    /// Reads the App's private key: PKCS#1 (`BEGIN RSA PRIVATE KEY`, what GitHub hands out)
    /// or PKCS#8 (`BEGIN PRIVATE KEY`).
    pub fn new(app_id: u64, pem: &Secret) -> Result<Self, GhError> {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let key = rsa::PrivateKey::from_pkcs1_pem(pem.expose())
            .or_else(|_| rsa::PrivateKey::from_pkcs8_pem(pem.expose()))
            .map_err(|_| GhError::Auth("the private key is not an RSA key in PEM form".into()))?;
        Ok(AppSigner { app_id, key: SigningKey::new(key) })
    }

    pub fn jwt(&self, now: SystemTime) -> Secret {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({"iat": now - 60, "exp": now + 540, "iss": self.app_id.to_string()});
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{claims}");
        let sig = self.key.sign(input.as_bytes());
        Secret::new(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_claims_and_signature_verify_with_the_simulator() {
        let out = std::process::Command::new("openssl").args(["genrsa", "-traditional", "2048"]).output().unwrap();
        let pem = String::from_utf8(out.stdout).unwrap();
        assert!(pem.contains("BEGIN RSA PRIVATE KEY"));
        let signer = AppSigner::new(99, &Secret::new(pem.clone())).unwrap();
        let now = SystemTime::now();
        let jwt = signer.jwt(now);
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let t = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(claims["iat"], t - 60);
        assert_eq!(claims["exp"], t + 540);
        assert_eq!(claims["iss"], "99");
        // Verified by an independent implementation of GitHub's rules.
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::pkcs8::EncodePublicKey;
        let public = rsa::PrivateKey::from_pkcs1_pem(&pem)
            .unwrap()
            .to_public_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        let app = github_sim::auth::AppKey::from_pem(99, None, &public).unwrap();
        assert_eq!(app.verify(jwt.expose(), now), Ok(()));
        assert!(format!("{signer:?}").contains("redacted"));
        assert!(AppSigner::new(1, &Secret::new("not a key")).is_err());
    }
}
