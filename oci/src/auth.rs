//! Registry credentials: `~/.docker/config.json` (`auths`, `credsStore`, `credHelpers`) and
//! `WWW-Authenticate` challenge parsing. Secrets never appear in `Debug` output or logs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(rename = "credsStore", default)]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Default, Clone, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(rename = "identitytoken", default)]
    identity_token: Option<String>,
}

impl fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthEntry(<redacted>)")
    }
}

/// Where credentials come from, in order: explicit ones, then the Docker config file.
#[derive(Debug, Default, Clone)]
pub struct CredentialStore {
    config: DockerConfig,
    explicit: HashMap<String, Credentials>,
    path: Option<PathBuf>,
}

/// The Docker config file location: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

impl CredentialStore {
    /// Loads the default Docker config; a missing file means no stored credentials.
    pub fn load_default() -> Result<CredentialStore> {
        match default_config_path() {
            Some(p) if p.exists() => CredentialStore::from_file(&p),
            _ => Ok(CredentialStore::default()),
        }
    }

    /// Loads a Docker-format config file (`--authfile`).
    pub fn from_file(path: &Path) -> Result<CredentialStore> {
        let text = std::fs::read(path).map_err(|e| Error::io(path.display(), e))?;
        let config: DockerConfig = serde_json::from_slice(&text)
            .map_err(|e| Error::Credentials(format!("{}: {e}", path.display())))?;
        Ok(CredentialStore {
            config,
            explicit: HashMap::new(),
            path: Some(path.to_path_buf()),
        })
    }

    /// Adds credentials for one registry that take precedence over the config file.
    pub fn set(&mut self, registry: &str, creds: Credentials) {
        self.explicit.insert(registry.to_string(), creds);
    }

    /// Credentials for `registry` (as named in references, e.g. `docker.io`), if any.
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>> {
        if let Some(c) = self.explicit.get(registry) {
            return Ok(Some(c.clone()));
        }
        let keys = config_keys(registry);
        if let Some(helper) = keys.iter().find_map(|k| self.config.cred_helpers.get(k)) {
            return run_helper(helper, &keys[0]);
        }
        for k in &keys {
            if let Some(entry) = self.config.auths.get(k)
                && let Some(c) = decode_entry(entry, k)?
            {
                return Ok(Some(c));
            }
        }
        if let Some(store) = &self.config.creds_store {
            return run_helper(store, &keys[0]);
        }
        let _ = &self.path;
        Ok(None)
    }
}

/// The keys under which Docker stores a registry's credentials.
fn config_keys(registry: &str) -> Vec<String> {
    if registry == crate::reference::DOCKER_HUB {
        return vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
            "registry-1.docker.io".into(),
        ];
    }
    vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ]
}

fn decode_entry(e: &AuthEntry, key: &str) -> Result<Option<Credentials>> {
    if let Some(tok) = &e.identity_token
        && !tok.is_empty()
    {
        // An identity token is a refresh token; the token endpoint accepts it as the password
        // of the special user "<token>".
        return Ok(Some(Credentials {
            username: "<token>".into(),
            password: tok.clone(),
        }));
    }
    if let Some(auth) = &e.auth
        && !auth.is_empty()
    {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| Error::Credentials(format!("auth for {key} is not base64")))?;
        let text = String::from_utf8(raw)
            .map_err(|_| Error::Credentials(format!("auth for {key} is not UTF-8")))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| Error::Credentials(format!("auth for {key} is not user:password")))?;
        return Ok(Some(Credentials {
            username: u.into(),
            password: p.into(),
        }));
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

fn run_helper(helper: &str, server: &str) -> Result<Option<Credentials>> {
    if !helper
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Error::Credentials(format!(
            "bad credential helper name {helper:?}"
        )));
    }
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Credentials(format!("{program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .map_err(|e| Error::Credentials(format!("{program}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Credentials(format!("{program}: {e}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stdout);
        if msg.contains("credentials not found") {
            return Ok(None);
        }
        return Err(Error::Credentials(format!(
            "{program} get failed: {}",
            msg.trim()
        )));
    }
    #[derive(Deserialize)]
    struct HelperOut {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let h: HelperOut = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Credentials(format!("{program} printed bad JSON: {e}")))?;
    Ok(Some(Credentials {
        username: h.username,
        password: h.secret,
    }))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic` (lowercase).
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parses `Scheme k="v", k2=v2`; quoted values may contain commas.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
    }

    #[test]
    fn docker_config_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#),
        )
        .unwrap();
        let s = CredentialStore::from_file(&p).unwrap();
        let c = s.lookup("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert!(s.lookup("docker.io").unwrap().is_some());
        assert!(s.lookup("other:1").unwrap().is_none());
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::write(&p, r#"{"auths":{"h":{"auth":"!!"}}}"#).unwrap();
        assert!(CredentialStore::from_file(&p).unwrap().lookup("h").is_err());
    }
}
