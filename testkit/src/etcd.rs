//! A private single-member `etcd` (Debian package `etcd-server`, 3.4) on 127.0.0.1, for the
//! tree manager's state and leader election.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util;

/// Where Debian installs etcd.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// An `etcd` process with its client and peer URLs on free `127.0.0.1` ports and its data dir
/// in a temp dir. Dropping it kills the process and removes the directory.
pub struct Etcd {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    log: PathBuf,
    addr: String,
}

impl Etcd {
    /// Starts etcd and waits until `GET /health` says it is healthy.
    pub fn start() -> Result<Etcd> {
        let bin = util::require_tool(ETCD_BIN, "etcd-server")?;
        let dir = util::temp_dir("arbor-etcd-")?;
        let base = dir.path().to_path_buf();
        let mut etcd = Etcd {
            child: None,
            log: base.join("etcd.log"),
            dir: Some(dir),
            addr: String::new(),
        };
        // A free port may be taken by someone else before etcd binds it: retry.
        let mut last_err = None;
        for attempt in 0..5 {
            let client = format!("http://127.0.0.1:{}", util::free_port()?);
            let peer = format!("http://127.0.0.1:{}", util::free_port()?);
            etcd.addr = client.trim_start_matches("http://").to_owned();
            let data = base.join(format!("data-{attempt}"));
            let logf = File::create(&etcd.log)?;
            let mut cmd = Command::new(&bin);
            cmd.arg("--name")
                .arg("arbor-test")
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(&client)
                .arg("--advertise-client-urls")
                .arg(&client)
                .arg("--listen-peer-urls")
                .arg(&peer)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer)
                .arg("--initial-cluster")
                .arg(format!("arbor-test={peer}"))
                .arg("--initial-cluster-state")
                .arg("new")
                .stdin(Stdio::null())
                .stdout(logf.try_clone()?)
                .stderr(logf);
            // etcd reads ETCD_* variables as flags: keep the caller's out.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(k);
                }
            }
            etcd.child = Some(
                cmd.spawn()
                    .with_context(|| format!("spawning {}", bin.display()))?,
            );
            match etcd.wait_ready() {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    let tail = util::log_tail(&etcd.log, 30);
                    if let Some(mut c) = etcd.child.take() {
                        util::terminate(&mut c, Duration::from_secs(2));
                    }
                    if tail.contains("address already in use") {
                        last_err = Some(e);
                        continue;
                    }
                    bail!(
                        "etcd did not come up on {}: {e:#}; log tail ({}):\n{tail}",
                        etcd.addr,
                        etcd.log.display()
                    );
                }
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context("etcd: could not bind free ports in 5 attempts"))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let addr = self.addr.clone();
        let mut last = String::from("no answer");
        let ok = util::wait_until(READY_TIMEOUT, || {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("etcd exited early ({st})");
            }
            match util::http_get(&addr, "/health", None) {
                Ok((200, body)) if body.contains("true") => Ok(true),
                Ok((code, body)) => {
                    last = format!("HTTP {code}: {body:.200}");
                    Ok(false)
                }
                Err(e) => {
                    last = format!("{e:#}");
                    Ok(false)
                }
            }
        })?;
        if !ok {
            bail!("GET http://{addr}/health not healthy after {READY_TIMEOUT:?} (last: {last})");
        }
        Ok(())
    }

    /// "127.0.0.1:PORT" of the client URL.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// "http://127.0.0.1:PORT", the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// etcd's log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Pid of the etcd process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = self.dir.take() {
            util::dispose_dir(d, "etcd");
        }
    }
}
