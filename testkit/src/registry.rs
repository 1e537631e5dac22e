//! A private `docker-registry` (distribution 2.8) instance on 127.0.0.1.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util;

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A `docker-registry` process serving plain HTTP on `127.0.0.1:<free port>`, with filesystem
/// storage in a temp dir and blob/manifest deletion enabled. Dropping it stops the process and
/// removes the storage.
pub struct Registry {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    storage: PathBuf,
    log: PathBuf,
    addr: String,
    creds: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry without authentication and waits until `GET /v2/` answers.
    pub fn start() -> Result<Registry> {
        Self::start_inner(None)
    }

    /// Starts a registry requiring htpasswd basic auth for `user`/`password` (bcrypt file made
    /// with `htpasswd -Bbn`).
    pub fn start_with_basic_auth(user: &str, password: &str) -> Result<Registry> {
        Self::start_inner(Some((user, password)))
    }

    /// Starts a registry without authentication inside the network namespace `ns`, listening
    /// on `<ns.ns_addr()>:5000` (storage in a temp dir on the host filesystem, as
    /// [`Registry::start`]), and waits until `GET /v2/` answers from the host, i.e. through the
    /// namespace's shaped link. Drop the registry before the namespace (dropping the namespace
    /// first kills the registry anyway).
    pub fn start_in_netns(ns: &crate::netns::Namespace) -> Result<Registry> {
        let bin = util::require_tool(REGISTRY_BIN, "docker-registry")?;
        let dir = util::temp_dir("arbor-registry-")?;
        let base = dir.path().to_path_buf();
        let storage = base.join("storage");
        std::fs::create_dir_all(&storage)?;
        let log = base.join("registry.log");
        let addr = format!("{}:5000", ns.ns_addr());
        let config = base.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: \"{storage}\"\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {addr}\n  secret: arbor-testkit-not-a-secret\n",
                storage = storage.display(),
            ),
        )?;
        let logf = File::create(&log)?;
        let mut cmd = ns.exec(&bin);
        cmd.arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        util::scrub_env(&mut cmd, "REGISTRY_");
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {} in netns {}", bin.display(), ns.name()))?;
        let mut reg = Registry {
            child: Some(child),
            dir: Some(dir),
            storage,
            log,
            addr,
            creds: None,
        };
        if let Err(e) = reg.wait_ready() {
            let tail = util::log_tail(&reg.log, 30);
            // Dropping `reg` stops the process and removes the directory.
            bail!(
                "docker-registry did not come up on {} in netns {}: {e:#}; log tail ({}):\n{tail}",
                reg.addr,
                ns.name(),
                reg.log.display()
            );
        }
        Ok(reg)
    }

    fn start_inner(auth: Option<(&str, &str)>) -> Result<Registry> {
        let bin = util::require_tool(REGISTRY_BIN, "docker-registry")?;
        let dir = util::temp_dir("arbor-registry-")?;
        let base = dir.path().to_path_buf();
        let storage = base.join("storage");
        std::fs::create_dir_all(&storage)?;
        let log = base.join("registry.log");

        let auth_yaml = match auth {
            None => String::new(),
            Some((user, password)) => {
                let htpasswd = util::require_tool("htpasswd", "apache2-utils")?;
                let line = util::run_checked(
                    Command::new(htpasswd).args(["-Bbn", user, password]),
                    Duration::from_secs(30),
                )?;
                let path = base.join("htpasswd");
                std::fs::write(&path, format!("{}\n", line.trim()))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: arbor-testkit\n    path: \"{}\"\n",
                    path.display()
                )
            }
        };

        let mut reg = Registry {
            child: None,
            dir: Some(dir),
            storage,
            log,
            addr: String::new(),
            creds: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        };

        let config = base.join("config.yml");
        let storage_dir = reg.storage.clone();
        let (child, addr) = util::start_on_free_port(
            "docker-registry",
            &reg.log,
            READY_TIMEOUT,
            "/v2/",
            // 401 is the healthy answer of a registry with auth enabled.
            |code, _| code == 200 || code == 401,
            |_| {
                let addr = format!("127.0.0.1:{}", util::free_port()?);
                std::fs::write(
                    &config,
                    format!(
                        "version: 0.1\n\
                         log:\n  level: info\n  accesslog:\n    disabled: false\n\
                         storage:\n  filesystem:\n    rootdirectory: \"{storage}\"\n  delete:\n    enabled: true\n  \
                         maintenance:\n    uploadpurging:\n      enabled: false\n\
                         http:\n  addr: {addr}\n  secret: arbor-testkit-not-a-secret\n\
                         {auth_yaml}",
                        storage = storage_dir.display(),
                    ),
                )?;
                let mut cmd = Command::new(&bin);
                cmd.arg("serve").arg(&config);
                // distribution lets REGISTRY_* variables override the config file: keep them out.
                util::scrub_env(&mut cmd, "REGISTRY_");
                Ok((cmd, addr))
            },
        )?;
        reg.child = Some(child);
        reg.addr = addr;
        Ok(reg)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let child = self
            .child
            .as_mut()
            .context("docker-registry is not running")?;
        // 401 is the healthy answer of a registry with auth enabled.
        util::wait_http_ready(
            child,
            "docker-registry",
            &self.addr,
            "/v2/",
            READY_TIMEOUT,
            |code, _| code == 200 || code == 401,
        )
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// "http://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes containerd's registry host config for this registry (plain HTTP, pull and
    /// resolve) under `dir/certs.d/<addr>/hosts.toml`; returns `dir/certs.d`, the CRI
    /// `registry.config_path`.
    pub fn write_cri_hosts(&self, dir: &Path) -> Result<PathBuf> {
        let certs = dir.join("certs.d");
        let host_dir = certs.join(self.addr());
        std::fs::create_dir_all(&host_dir)?;
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"http://{a}\"\n[host.\"http://{a}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                a = self.addr()
            ),
        )?;
        Ok(certs)
    }

    /// `ADDR/<repo_and_tag>`, e.g. `reference("app:v1")` = "127.0.0.1:PORT/app:v1".
    /// The OCI image manifest `repo:tag` (GET /v2/REPO/manifests/TAG), as JSON.
    pub fn manifest(&self, repo: &str, tag: &str) -> Result<serde_json::Value> {
        let (code, body) = util::http_request(
            &self.addr,
            "GET",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[(
                "Accept".into(),
                "application/vnd.oci.image.manifest.v1+json".into(),
            )],
            &[],
        )?;
        anyhow::ensure!(code == 200, "GET manifest {repo}:{tag}: HTTP {code}");
        Ok(serde_json::from_slice(&body)?)
    }

    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{}", self.addr, repo_and_tag)
    }

    /// The filesystem storage root (contains `docker/registry/v2/...`).
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// The registry's log file (stdout and stderr, including the access log).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The basic-auth credentials the registry was started with.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Pid of the registry process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            util::terminate(&mut c, Duration::from_secs(5));
        }
        if let Some(d) = self.dir.take() {
            util::dispose_dir(d, "registry");
        }
    }
}
