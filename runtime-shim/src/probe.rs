//! **Function awareness hooks in here (not implemented yet).**
//!
//! Each container records its start phases ([`Phases`]): when Create was asked for, when
//! `runc create` was done, and when Start was done (with the init pid). After Start the task
//! service hands them to a [`StartProbe`] on a background task. Later work will implement one
//! that, from a thread `setns`'d into `/proc/<pid>/ns/net`, polls the function's TCP port
//! until it opens (the "port open" phase) and reports all phases to arbord. Today the probe is
//! [`NoProbe`], which does nothing.

use std::time::{Instant, SystemTime};

use async_trait::async_trait;

/// When a container passed each start phase (wall clock for reports, monotonic for spans).
#[derive(Debug, Clone)]
pub struct Phases {
    /// The Create request arrived.
    pub create_requested: (SystemTime, Instant),
    /// `runc create` returned (the init process exists, stopped before the user's program).
    pub runc_created: Option<(SystemTime, Instant)>,
    /// `runc start` returned: the user's program runs as `pid`.
    pub started: Option<(SystemTime, Instant, u32)>,
}

impl Phases {
    pub fn new() -> Phases {
        Phases {
            create_requested: (SystemTime::now(), Instant::now()),
            runc_created: None,
            started: None,
        }
    }

    pub fn mark_created(&mut self) {
        self.runc_created = Some((SystemTime::now(), Instant::now()));
    }

    pub fn mark_started(&mut self, pid: u32) {
        self.started = Some((SystemTime::now(), Instant::now(), pid));
    }
}

impl Default for Phases {
    fn default() -> Self {
        Phases::new()
    }
}

/// What the probe is told about a started container.
#[derive(Debug, Clone)]
pub struct Started {
    pub namespace: String,
    pub container_id: String,
    pub bundle: String,
    /// The OCI spec's annotations (CRI forwards the `arbor.io/*` ones).
    pub annotations: std::collections::HashMap<String, String>,
    pub phases: Phases,
}

/// Runs in the background after a container started.
#[async_trait]
pub trait StartProbe: Send + Sync {
    async fn started(&self, container: Started);
}

/// The probe used today: nothing.
#[derive(Debug, Default)]
pub struct NoProbe;

#[async_trait]
impl StartProbe for NoProbe {
    async fn started(&self, _container: Started) {}
}
