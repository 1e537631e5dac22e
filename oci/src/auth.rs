//! Registry credentials: `~/.docker/config.json` (`auths`, `credsStore`, `credHelpers`) and
//! `WWW-Authenticate` challenge parsing. Secrets never appear in `Debug` output or logs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
///
/// The config file is untrusted input that must not take a daemon down: a file that cannot
/// be read or parsed is logged and treated as empty (anonymous access), and the file is read
/// again whenever its modification time (or size, or inode) changes, so credentials written
/// or rotated later are picked up without a restart. A changed file that does not parse
/// keeps the previous contents (it may be half written); a deleted one means no credentials.
/// Credential helpers run with a timeout ([`HELPER_TIMEOUT`]) and are killed on expiry.
/// Clones share the file and what was loaded from it.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    file: Option<Arc<AuthFile>>,
    explicit: HashMap<String, Credentials>,
    helper_timeout: Duration,
}

impl Default for CredentialStore {
    fn default() -> Self {
        CredentialStore {
            file: None,
            explicit: HashMap::new(),
            helper_timeout: HELPER_TIMEOUT,
        }
    }
}

/// Longest a `docker-credential-*` helper may run before it is killed and the lookup fails.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest config file read (a real one is a few KiB).
const MAX_CONFIG_SIZE: u64 = 4 << 20;

/// What identifies a version of the file: (modification time, size, inode).
type Stamp = (SystemTime, u64, u64);

#[derive(Debug)]
struct AuthFile {
    path: PathBuf,
    loaded: Mutex<(Option<Stamp>, DockerConfig)>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        m.len(),
        m.ino(),
    ))
}

fn read_config(path: &Path) -> Result<DockerConfig> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path.display(), e))?;
    let mut text = Vec::new();
    f.take(MAX_CONFIG_SIZE + 1)
        .read_to_end(&mut text)
        .map_err(|e| Error::io(path.display(), e))?;
    if text.len() as u64 > MAX_CONFIG_SIZE {
        return Err(Error::Credentials(format!(
            "{}: larger than {MAX_CONFIG_SIZE} bytes",
            path.display()
        )));
    }
    serde_json::from_slice(&text)
        .map_err(|e| Error::Credentials(format!("{}: {e}", path.display())))
}

impl AuthFile {
    /// The config as of the file's current version, reloading it if it changed. Blocking.
    fn current(&self) -> DockerConfig {
        let now = stamp(&self.path);
        let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if l.0 == now && now.is_some() {
            return l.1.clone();
        }
        let first = l.0.is_none();
        match now {
            None => {
                if !first && !l.1.auths.is_empty() {
                    tracing::info!(path = %self.path.display(), "credentials file is gone; anonymous access");
                }
                *l = (None, DockerConfig::default());
            }
            Some(st) => match read_config(&self.path) {
                Ok(c) => {
                    if !first {
                        tracing::info!(path = %self.path.display(), "credentials file changed, reloaded");
                    }
                    *l = (Some(st), c);
                }
                Err(e) => {
                    // Keep what was there (the file may be half written); parsed again when it
                    // changes next.
                    tracing::warn!(error = %e, "ignoring unusable credentials file (anonymous access unless it held usable credentials before)");
                    l.0 = Some(st);
                }
            },
        }
        l.1.clone()
    }
}

/// The Docker config file location: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

impl CredentialStore {
    /// Uses the default Docker config (see [`default_config_path`]); a missing file means no
    /// stored credentials until it appears. Never fails (see the type's docs).
    pub fn load_default() -> Result<CredentialStore> {
        match default_config_path() {
            Some(p) => CredentialStore::from_file(&p),
            None => Ok(CredentialStore::default()),
        }
    }

    /// Uses a Docker-format config file (`--authfile`). Never fails: an unreadable or
    /// malformed file is logged and means anonymous access until it is fixed.
    pub fn from_file(path: &Path) -> Result<CredentialStore> {
        let file = AuthFile {
            path: path.to_path_buf(),
            loaded: Mutex::new((None, DockerConfig::default())),
        };
        let _ = file.current();
        Ok(CredentialStore {
            file: Some(Arc::new(file)),
            ..Default::default()
        })
    }

    /// The config file in use, if any.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Sets how long a credential helper may run (default [`HELPER_TIMEOUT`]).
    pub fn set_helper_timeout(&mut self, t: Duration) {
        self.helper_timeout = t;
    }

    /// Adds credentials for one registry that take precedence over the config file.
    pub fn set(&mut self, registry: &str, creds: Credentials) {
        self.explicit.insert(registry.to_string(), creds);
    }

    /// Credentials for `registry` (as named in references, e.g. `docker.io`), if any. The
    /// file check and any credential helper run on a blocking thread.
    pub async fn lookup(&self, registry: &str) -> Result<Option<Credentials>> {
        if let Some(c) = self.explicit.get(registry) {
            return Ok(Some(c.clone()));
        }
        if self.file.is_none() {
            return Ok(None);
        }
        let (me, r) = (self.clone(), registry.to_string());
        tokio::task::spawn_blocking(move || me.lookup_blocking(&r))
            .await
            .map_err(|e| Error::Credentials(format!("credential lookup failed: {e}")))?
    }

    /// [`CredentialStore::lookup`] on the calling thread (blocks: file system, helpers).
    pub fn lookup_blocking(&self, registry: &str) -> Result<Option<Credentials>> {
        if let Some(c) = self.explicit.get(registry) {
            return Ok(Some(c.clone()));
        }
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let config = file.current();
        let keys = config_keys(registry);
        if let Some(helper) = keys.iter().find_map(|k| config.cred_helpers.get(k)) {
            return run_helper(helper, &keys[0], self.helper_timeout);
        }
        for k in &keys {
            if let Some(entry) = config.auths.get(k)
                && let Some(c) = decode_entry(entry, k)?
            {
                return Ok(Some(c));
            }
        }
        if let Some(store) = &config.creds_store {
            return run_helper(store, &keys[0], self.helper_timeout);
        }
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

fn run_helper(helper: &str, server: &str, timeout: Duration) -> Result<Option<Credentials>> {
    if !helper
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Error::Credentials(format!(
            "bad credential helper name {helper:?}"
        )));
    }
    let program = format!("docker-credential-{helper}");
    let fail = |e: std::io::Error| Error::Credentials(format!("{program}: {e}"));
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(fail)?;
    let deadline = Instant::now() + timeout;
    // stdin and stdout are served by threads, so a helper that neither reads nor writes (or
    // fills a pipe) cannot block this one past the deadline.
    if let Some(mut stdin) = child.stdin.take() {
        let server = server.to_string();
        std::thread::spawn(move || {
            let _ = stdin.write_all(server.as_bytes());
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(mut stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut out = Vec::new();
            let _ = (&mut stdout).take(1 << 20).read_to_end(&mut out);
            let _ = tx.send(out);
        });
    }
    let status = loop {
        match child.try_wait().map_err(fail)? {
            Some(st) => break st,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(helper = %program, secs = timeout.as_secs_f64(), "credential helper timed out and was killed");
                return Err(Error::Credentials(format!(
                    "{program} did not answer within {:.1} s; killed",
                    timeout.as_secs_f64()
                )));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let stdout = rx
        .recv_timeout(
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100),
        )
        .unwrap_or_default();
    if !status.success() {
        let msg = String::from_utf8_lossy(&stdout);
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
    let h: HelperOut = serde_json::from_slice(&stdout)
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
        let c = s.lookup_blocking("127.0.0.1:5000").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret")
        );
        assert!(s.lookup_blocking("docker.io").unwrap().is_some());
        assert!(s.lookup_blocking("other:1").unwrap().is_none());
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::write(&p, r#"{"auths":{"h":{"auth":"!!"}}}"#).unwrap();
        assert!(
            CredentialStore::from_file(&p)
                .unwrap()
                .lookup_blocking("h")
                .is_err()
        );
    }
}
