//! The scope runners are registered in, and the GitHub URLs derived from the config.

use super::GitHubConfig;

/// Where runners are registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Repository { owner: String, name: String },
    Organization(String),
    Enterprise(String),
}

impl Scope {
    /// REST path prefix: `repos/o/r`, `orgs/o`, `enterprises/e`.
    pub fn api_path(&self) -> String {
        match self {
            Scope::Repository { owner, name } => format!("repos/{owner}/{name}"),
            Scope::Organization(o) => format!("orgs/{o}"),
            Scope::Enterprise(e) => format!("enterprises/{e}"),
        }
    }
    /// Whether a delivery about `repository` ("owner/name"), from an enterprise account
    /// `enterprise` (its slug, when the payload names one), is within this scope.
    /// Logins and names compare case-insensitively, as GitHub's do.
    pub fn admits(&self, repository: &str, enterprise: Option<&str>) -> bool {
        match self {
            Scope::Repository { owner, name } => repository.eq_ignore_ascii_case(&format!("{owner}/{name}")),
            Scope::Organization(o) => {
                repository.split_once('/').is_some_and(|(owner, _)| owner.eq_ignore_ascii_case(o))
            }
            Scope::Enterprise(e) => enterprise.is_some_and(|slug| slug.eq_ignore_ascii_case(e)),
        }
    }
    /// Path under the web URL given to `config.sh --url`.
    pub fn web_path(&self) -> String {
        match self {
            Scope::Repository { owner, name } => format!("{owner}/{name}"),
            Scope::Organization(o) => o.clone(),
            Scope::Enterprise(e) => format!("enterprises/{e}"),
        }
    }
}

impl GitHubConfig {
    pub fn scope(&self) -> Scope {
        if let Some(r) = &self.repository {
            let (owner, name) = r.split_once('/').unwrap_or((r, ""));
            Scope::Repository { owner: owner.into(), name: name.into() }
        } else if let Some(o) = &self.organization {
            Scope::Organization(o.clone())
        } else {
            Scope::Enterprise(self.enterprise.clone().unwrap_or_default())
        }
    }

    /// `https://github.com` for api.github.com; `https://HOST` for `https://HOST/api/v3`.
    pub fn web_url(&self) -> String {
        if let Some(w) = &self.web_url {
            return w.trim_end_matches('/').to_string();
        }
        let api = self.api_url.trim_end_matches('/');
        if api == "https://api.github.com" {
            "https://github.com".into()
        } else {
            api.trim_end_matches("/api/v3").to_string()
        }
    }
}
