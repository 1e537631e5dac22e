//! A private single-member `etcd` (Debian package `etcd-server`, 3.4) on 127.0.0.1, for the
//! tree manager's state and leader election.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Result;

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
        let (child, addr) = util::start_on_free_port(
            "etcd",
            &etcd.log,
            READY_TIMEOUT,
            "/health",
            |code, body| code == 200 && body.contains("true"),
            |attempt| {
                let client = format!("http://127.0.0.1:{}", util::free_port()?);
                let peer = format!("http://127.0.0.1:{}", util::free_port()?);
                let mut cmd = Command::new(&bin);
                cmd.arg("--name")
                    .arg("arbor-test")
                    .arg("--data-dir")
                    .arg(base.join(format!("data-{attempt}")))
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
                    .arg("new");
                // etcd reads ETCD_* variables as flags: keep the caller's out.
                util::scrub_env(&mut cmd, "ETCD_");
                Ok((cmd, client.trim_start_matches("http://").to_owned()))
            },
        )?;
        etcd.child = Some(child);
        etcd.addr = addr;
        Ok(etcd)
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
