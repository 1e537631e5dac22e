//! What the shim knows about each container and process: ids, bundle, stdio, pid, status,
//! exit, and the start phases.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::api::Status;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use serde::Deserialize;
use tokio::sync::watch;

use crate::options::RuntimeOptions;
use crate::probe::Phases;
use crate::stdio::{ProcessIo, Stdio};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal that killed it.
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    pub fn timestamp(&self) -> Timestamp {
        timestamp(self.at)
    }
}

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// A process's life: `Created` (runc create / exec added), `Running`, `Stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Created,
    Running,
    Stopped,
}

/// The container's init process or one exec'd process.
pub struct Process {
    /// "" for the init process.
    pub exec_id: String,
    pub stdio: Stdio,
    pub pid: u32,
    pub phase: Phase,
    pub exit: Option<Exit>,
    exited: watch::Sender<Option<Exit>>,
    pub io: ProcessIo,
    /// The OCI process of an exec, kept from Exec until its Start.
    pub spec: Option<oci_spec::runtime::Process>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: Stdio) -> Process {
        Process {
            exec_id: exec_id.to_string(),
            stdio,
            pid: 0,
            phase: Phase::Created,
            exit: None,
            exited: watch::channel(None).0,
            io: ProcessIo::default(),
            spec: None,
        }
    }

    /// Records the exit (once) and wakes every Wait.
    pub fn set_exited(&mut self, status: u32) -> Exit {
        if let Some(e) = self.exit {
            return e;
        }
        let e = Exit {
            status,
            at: SystemTime::now(),
        };
        self.exit = Some(e);
        self.phase = Phase::Stopped;
        self.exited.send_replace(Some(e));
        e
    }

    /// A receiver that sees the exit.
    pub fn subscribe(&self) -> watch::Receiver<Option<Exit>> {
        self.exited.subscribe()
    }

    pub fn status(&self, paused: bool) -> Status {
        match self.phase {
            Phase::Created => Status::CREATED,
            Phase::Running if paused => Status::PAUSED,
            Phase::Running => Status::RUNNING,
            Phase::Stopped => Status::STOPPED,
        }
    }
}

/// One container of this shim (a pod's containers share one shim).
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub runc: Arc<runc::Runc>,
    pub options: RuntimeOptions,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    pub rootfs_mounted: bool,
    pub paused: bool,
    pub spec: SpecInfo,
    pub phases: Phases,
    /// The rootfs mounts containerd passed (for the start report to arbord).
    pub rootfs_mounts: Vec<arbor_proto::Mount>,
}

impl Container {
    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }

    /// The init process (`exec_id` empty) or an exec.
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

/// What the shim reads from the bundle's `config.json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SpecInfo {
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    #[serde(default)]
    linux: Option<SpecLinux>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct SpecLinux {
    #[serde(default)]
    namespaces: Vec<SpecNamespace>,
}

#[derive(Debug, Clone, Deserialize)]
struct SpecNamespace {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: Option<String>,
}

impl SpecInfo {
    /// Reads `<bundle>/config.json` (blocking).
    pub fn read(bundle: &Path) -> crate::error::Result<SpecInfo> {
        let path = bundle.join("config.json");
        let data = std::fs::read(&path).map_err(crate::error::Error::io(format!(
            "reading {}",
            path.display()
        )))?;
        serde_json::from_slice(&data).map_err(|source| crate::error::Error::Json {
            what: "config.json",
            source,
        })
    }

    /// True when the container has no pid namespace of its own (it shares the host's or a
    /// sandbox's): then its other processes outlive init and must be killed with it.
    pub fn shares_pid_namespace(&self) -> bool {
        !self.linux.as_ref().is_some_and(|l| {
            l.namespaces
                .iter()
                .any(|n| n.kind == "pid" && n.path.as_deref().unwrap_or("").is_empty())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_namespace_sharing() {
        let own: SpecInfo = serde_json::from_str(
            r#"{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/proc/1/ns/net"}]}}"#,
        )
        .unwrap();
        assert!(!own.shares_pid_namespace());
        let joined: SpecInfo = serde_json::from_str(
            r#"{"annotations":{"a":"b"},"linux":{"namespaces":[{"type":"pid","path":"/proc/9/ns/pid"}]}}"#,
        )
        .unwrap();
        assert!(joined.shares_pid_namespace());
        assert_eq!(joined.annotations["a"], "b");
        let none: SpecInfo = serde_json::from_str("{}").unwrap();
        assert!(none.shares_pid_namespace());
    }

    #[tokio::test]
    async fn exit_is_recorded_once_and_wakes_waiters() {
        let mut p = Process::new("", Stdio::default());
        let mut rx = p.subscribe();
        assert_eq!(p.status(false), Status::CREATED);
        p.phase = Phase::Running;
        assert_eq!(p.status(true), Status::PAUSED);
        let e = p.set_exited(137);
        assert_eq!(p.set_exited(0), e);
        let got = rx.wait_for(|e| e.is_some()).await.unwrap().unwrap();
        assert_eq!(got.status, 137);
        assert_eq!(p.status(false), Status::STOPPED);
    }
}
