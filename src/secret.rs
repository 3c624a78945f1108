//! Secrets: wrapped so they cannot be printed, and loaded from a file or from a systemd
//! credential (`$CREDENTIALS_DIRECTORY/NAME`, set by `LoadCredential=`; for `check` run
//! outside the service, the file the unit's `LoadCredential=` names).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A secret value. `Debug`/`Display` print `[redacted]`; use [`Secret::expose`] deliberately.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from: `{ file = "/etc/runnervisor/pat" }` or
/// `{ credential = "github-pat" }` (a systemd credential of the service).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SecretSource {
    File(PathBuf),
    Credential(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("{path} is readable by other users (mode {mode:o}): chmod 0600 or 0640 it")]
    WorldReadable { path: PathBuf, mode: u32 },
    #[error(
        "credential {name:?} requested but $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit, or a file)"
    )]
    NoCredentialsDirectory { name: String },
    #[error("credential name {name:?} must be a plain file name")]
    BadCredentialName { name: String },
    #[error("credential {name:?} is not loaded by {unit} (add LoadCredential={name}:FILE to it)")]
    NotInUnit { name: String, unit: String },
}

/// Where `{ credential = NAME }` is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `$CREDENTIALS_DIRECTORY`: the service's, where systemd copied them.
    Dir(PathBuf),
    /// The files the unit's `LoadCredential=NAME:FILE` lines name, by name (`unit`: the
    /// unit file's path): what systemd would copy, for `check` run from a shell.
    Unit { unit: String, files: BTreeMap<String, PathBuf> },
}

impl SecretSource {
    /// The path this source reads, given where credentials are (if anywhere).
    pub fn path(&self, credentials: Option<&Credentials>) -> Result<PathBuf, SecretError> {
        match self {
            SecretSource::File(p) => Ok(p.clone()),
            SecretSource::Credential(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(SecretError::BadCredentialName { name: name.clone() });
                }
                match credentials {
                    None => Err(SecretError::NoCredentialsDirectory { name: name.clone() }),
                    Some(Credentials::Dir(dir)) => Ok(dir.join(name)),
                    Some(Credentials::Unit { unit, files }) => files
                        .get(name)
                        .cloned()
                        .ok_or_else(|| SecretError::NotInUnit { name: name.clone(), unit: unit.clone() }),
                }
            }
        }
    }

    /// Reads the secret (trimmed). Files readable by "other" are refused.
    pub fn load(&self, credentials: Option<&Credentials>) -> Result<Secret, SecretError> {
        let path = self.path(credentials)?;
        let meta = std::fs::metadata(&path).map_err(|source| SecretError::Read { path: path.clone(), source })?;
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Err(SecretError::WorldReadable { path, mode });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| SecretError::Read { path: path.clone(), source })?;
        let text = text.trim();
        if text.is_empty() {
            return Err(SecretError::Empty { path });
        }
        Ok(Secret::new(text))
    }
}

/// `$CREDENTIALS_DIRECTORY`, when systemd provides one.
pub fn credentials_dir() -> Option<Credentials> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(|d| Credentials::Dir(PathBuf::from(d)))
}

/// The credentials a command run from a shell reads (`check`, `scale-set delete`): the
/// service's directory when it runs under one, else the files the installed unit loads
/// ([`crate::systemd::unit_credentials`]), else none.
pub fn credentials_outside_service() -> Option<Credentials> {
    credentials_dir().or_else(|| {
        let dirs = crate::systemd::UNIT_DIRS.map(Path::new);
        let (unit, files) = crate::systemd::unit_credentials(&dirs, crate::systemd::UNIT)?;
        Some(Credentials::Unit { unit: unit.display().to_string(), files })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("ghp_supersecret");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "ghp_supersecret");
    }

    #[test]
    fn loads_from_file_and_credentials_dir() {
        let dir = crate::test_support::tempdir();
        let f = dir.join("pat");
        std::fs::write(&f, "ghp_x\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(SecretSource::File(f.clone()).load(None).unwrap().expose(), "ghp_x");
        let creds = Credentials::Dir(dir.to_path_buf());
        assert_eq!(SecretSource::Credential("pat".into()).load(Some(&creds)).unwrap().expose(), "ghp_x");
        let unit = Credentials::Unit { unit: "u".into(), files: [("github-pat".to_string(), f.clone())].into() };
        assert_eq!(SecretSource::Credential("github-pat".into()).load(Some(&unit)).unwrap().expose(), "ghp_x");
        let err = SecretSource::Credential("pat".into()).load(Some(&unit)).unwrap_err();
        assert_eq!(err.to_string(), "credential \"pat\" is not loaded by u (add LoadCredential=pat:FILE to it)");
        assert!(matches!(
            SecretSource::Credential("pat".into()).load(None),
            Err(SecretError::NoCredentialsDirectory { .. })
        ));
        assert!(matches!(
            SecretSource::Credential("../etc/passwd".into()).load(Some(&creds)),
            Err(SecretError::BadCredentialName { .. })
        ));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretSource::File(f.clone()).load(None).unwrap_err();
        assert!(err.to_string().contains("readable by other users"), "{err}");
        std::fs::write(dir.join("empty"), "  \n").unwrap();
        std::fs::set_permissions(dir.join("empty"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(SecretSource::File(dir.join("empty")).load(None), Err(SecretError::Empty { .. })));
    }
}
