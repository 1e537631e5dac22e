//! Running `runc`: a [`runc::Runc`] per container, built from the runtime options, whose
//! invocations are awaited through the shim's reaper.
//!
//! The shim is a child subreaper and containerd-shim's SIGCHLD handler reaps *every* child
//! (`waitpid(-1)`), runc included, and hands the statuses to its monitor. A plain
//! `Child::wait` would then find nothing to wait for, so [`ReaperSpawner`] subscribes to the
//! monitor before spawning and waits for its child's pid there.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::monitor::{Subject, Topic, monitor_subscribe, monitor_unsubscribe};
use runc::Spawner;
use tokio::io::AsyncReadExt;

use crate::error::{Error, Result};
use crate::options::RuntimeOptions;

/// runc's state root when the options name none (the namespace is appended).
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";
/// runc's JSON log in the bundle.
pub const LOG_FILE: &str = "log.json";

/// Spawns runc and waits for it through containerd-shim's reaper (see the module doc).
#[derive(Debug, Default)]
pub struct ReaperSpawner;

#[async_trait]
impl Spawner for ReaperSpawner {
    async fn execute(
        &self,
        mut cmd: runc::Command,
    ) -> runc::Result<(ExitStatus, u32, String, String)> {
        let sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(|e| runc::error::Error::Other(Box::new(e)))?;
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = monitor_unsubscribe(sub.id).await;
                return Err(runc::error::Error::ProcessSpawnFailed(e));
            }
        };
        let pid = child.id().unwrap_or_default();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let read_out = async {
            let mut s = String::new();
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_string(&mut s).await;
            }
            s
        };
        let read_err = async {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut s).await;
            }
            s
        };
        let mut rx = sub.rx;
        let wait_exit = async {
            while let Some(ev) = rx.recv().await {
                if matches!(ev.subject, Subject::Pid(p) if p as u32 == pid) {
                    return Some(ev.exit_code);
                }
            }
            None
        };
        let (out, err, code) = tokio::join!(read_out, read_err, wait_exit);
        let _ = monitor_unsubscribe(sub.id).await;
        // The reaper already collected the status; dropping the child only lets tokio find
        // nothing left to reap.
        drop(child);
        let code = code.unwrap_or(255);
        let status = if code > 128 && code < 128 + 65 {
            ExitStatus::from_raw(code - 128)
        } else {
            ExitStatus::from_raw((code & 0xff) << 8)
        };
        Ok((status, pid, out, err))
    }
}

/// The runc state root for `namespace` under the options' root.
pub fn state_root(opts: &RuntimeOptions, namespace: &str) -> PathBuf {
    let root = if opts.root.is_empty() {
        DEFAULT_RUNC_ROOT
    } else {
        opts.root.as_str()
    };
    Path::new(root).join(namespace)
}

/// A runc client for containers of `namespace` whose bundle (and `log.json`) is `bundle`.
pub fn client(opts: &RuntimeOptions, namespace: &str, bundle: &Path) -> Result<runc::Runc> {
    let binary = if opts.binary_name.is_empty() {
        "runc"
    } else {
        opts.binary_name.as_str()
    };
    let mut g = runc::options::GlobalOpts::new()
        .command(binary)
        .root(state_root(opts, namespace))
        .log(bundle.join(LOG_FILE))
        .log_json()
        .systemd_cgroup(opts.systemd_cgroup);
    g.custom_spawner(Arc::new(ReaperSpawner));
    g.build().map_err(|source| Error::Runc {
        op: "setup",
        source,
        log: String::new(),
    })
}

/// Wraps a runc failure with the last error runc wrote to the bundle's `log.json` (blocking
/// read of a small file, done on the blocking pool).
pub async fn runc_error(op: &'static str, bundle: &Path, source: runc::error::Error) -> Error {
    let path = bundle.join(LOG_FILE);
    let log = tokio::task::spawn_blocking(move || last_log_error(&path))
        .await
        .ok()
        .flatten()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    Error::Runc { op, source, log }
}

/// The message of the last `"level":"error"` line of a runc JSON log.
pub fn last_log_error(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v.get("level")?.as_str()? == "error").then(|| v.get("msg")?.as_str().map(String::from))?
    })
}

/// True when a runc error says the process or container is already gone.
pub fn is_gone(e: &runc::error::Error) -> bool {
    let text = match e {
        runc::error::Error::CommandFailed { stdout, stderr, .. } => format!("{stdout} {stderr}"),
        other => other.to_string(),
    }
    .to_lowercase();
    text.contains("process already finished")
        || text.contains("container not running")
        || text.contains("no such process")
        || text.contains("does not exist")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(LOG_FILE);
        assert_eq!(last_log_error(&p), None);
        std::fs::write(
            &p,
            "{\"level\":\"error\",\"msg\":\"first\"}\n{\"level\":\"info\",\"msg\":\"x\"}\nnot json\n{\"level\":\"error\",\"msg\":\"exec: no such file\"}\n{\"level\":\"warning\",\"msg\":\"w\"}\n",
        )
        .unwrap();
        assert_eq!(last_log_error(&p).as_deref(), Some("exec: no such file"));
    }

    #[test]
    fn state_root_appends_the_namespace() {
        let o = RuntimeOptions::default();
        assert_eq!(state_root(&o, "ns"), Path::new("/run/containerd/runc/ns"));
        let o = RuntimeOptions {
            root: "/r".into(),
            ..Default::default()
        };
        assert_eq!(state_root(&o, "ns"), Path::new("/r/ns"));
    }
}
