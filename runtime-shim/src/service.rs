//! The task service: containerd's `containerd.task.v2.Task` API over runc, for every
//! container of this shim.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::monitor::{Subject, Topic, monitor_subscribe};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Task, TtrpcContext};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message, MessageDyn, MessageField};
use containerd_shim_protos::shim::oci::ProcessDetails;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, context::Context};
use containerd_shim_protos::types::task::ProcessInfo;
use runc::Spawner;
use runc::options::{CreateOpts, DeleteOpts, ExecOpts, KillOpts};
use tokio::sync::{Mutex, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::cgroup;
use crate::container::{Container, Phase, Process, SpecInfo};
use crate::error::{Error, Result};
use crate::options::RuntimeOptions;
use crate::probe::{Phases, StartProbe, Started};
use crate::runc_client::{ReaperSpawner, client, is_gone, runc_error, state_root};
use crate::stdio::{Prepared, Stdio};

/// How long Delete waits for a process's output to drain.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// The task service of one shim process. Cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    containers: Mutex<HashMap<String, Arc<Mutex<Container>>>>,
    exit: Arc<ExitSignal>,
    probe: Arc<dyn StartProbe>,
    cgroups: cgroup::Mode,
    oom_tx: mpsc::UnboundedSender<String>,
}

impl TaskService {
    /// A service for `namespace`, publishing through `publisher`; `exit` is signalled by a
    /// Shutdown once no container is left. Starts the exit and OOM event loops.
    pub async fn new(
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
        probe: Arc<dyn StartProbe>,
    ) -> TaskService {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        let svc = TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                publisher,
                containers: Mutex::new(HashMap::new()),
                exit,
                probe,
                cgroups: cgroup::mode(),
                oom_tx,
            }),
        };
        match monitor_subscribe(Topic::Pid).await {
            Ok(exits) => {
                tokio::spawn(svc.clone().process_exits(exits.rx));
            }
            Err(e) => tracing::error!(error = %e, "no exit events: monitor subscription failed"),
        }
        tokio::spawn(svc.clone().publish_ooms(oom_rx));
        svc
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .inner
            .publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            warn!(topic, error = %e, "publishing an event failed");
        }
    }

    async fn container(&self, id: &str) -> Result<Arc<Mutex<Container>>> {
        self.inner
            .containers
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    /// Every reaped child's exit: a container's init or exec process gets its status, Waits
    /// wake up and TaskExit goes to containerd. (runc's own exits arrive here too: no match.)
    async fn process_exits(
        self,
        mut rx: mpsc::UnboundedReceiver<containerd_shim::monitor::ExitEvent>,
    ) {
        while let Some(ev) = rx.recv().await {
            let Subject::Pid(pid) = ev.subject else {
                continue;
            };
            let Ok(pid) = u32::try_from(pid) else {
                continue;
            };
            let status = u32::try_from(ev.exit_code).unwrap_or(255);
            let all: Vec<_> = self
                .inner
                .containers
                .lock()
                .await
                .values()
                .cloned()
                .collect();
            for c in all {
                let mut c = c.lock().await;
                let Container {
                    id, init, execs, ..
                } = &mut *c;
                let found = std::iter::once(init)
                    .chain(execs.values_mut())
                    .find(|p| p.pid == pid && p.phase != Phase::Stopped && p.exit.is_none());
                let Some(p) = found else { continue };
                let exit = p.set_exited(status);
                let exec_id = p.exec_id.clone();
                let id = id.clone();
                info!(container = %id, exec = %exec_id, pid, status, "process exited");
                if exec_id.is_empty() && c.spec.shares_pid_namespace() {
                    // Its other processes would outlive it: runc kill --all.
                    let runc = c.runc.clone();
                    let cid = id.clone();
                    tokio::spawn(async move {
                        let _ = runc
                            .kill(&cid, libc::SIGKILL as u32, Some(&KillOpts::new().all(true)))
                            .await;
                    });
                }
                drop(c);
                let ev = TaskExit {
                    container_id: id.clone(),
                    id: if exec_id.is_empty() { id } else { exec_id },
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(exit.timestamp()),
                    ..Default::default()
                };
                self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                    .await;
                break;
            }
        }
    }

    async fn publish_ooms(self, mut rx: mpsc::UnboundedReceiver<String>) {
        while let Some(id) = rx.recv().await {
            info!(container = %id, "OOM kill in the container's cgroup");
            let ev = TaskOOM {
                container_id: id,
                ..Default::default()
            };
            self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev))
                .await;
        }
    }

    async fn do_create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse> {
        let phases = Phases::new();
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let options = RuntimeOptions::decode(req.options.as_ref())?;
        tracing::info!(
            container = %id,
            options = req.options.as_ref().map_or("", |a| a.type_url.as_str()),
            runc = %options.binary_name,
            "runtime options"
        );
        let runc = Arc::new(client(&options, &self.inner.namespace, &bundle)?);
        let (spec, opts) = {
            let (b, o) = (bundle.clone(), options.clone());
            blocking(move || {
                o.store(&b)?;
                SpecInfo::read(&b)
            })
            .await
            .map(|s| (s, options.clone()))?
        };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let container = Arc::new(Mutex::new(Container {
            id: id.clone(),
            bundle: bundle.clone(),
            runc: runc.clone(),
            options: opts,
            init: Process::new("", stdio.clone()),
            execs: HashMap::new(),
            rootfs_mounted: false,
            paused: false,
            spec,
            phases,
            rootfs_mounts: req
                .rootfs
                .iter()
                .map(|m| arbor_proto::Mount {
                    r#type: m.type_.clone(),
                    source: m.source.clone(),
                    target: m.target.clone(),
                    options: m.options.clone(),
                })
                .collect(),
        }));
        // Held until the pid is recorded: an exit of it waits for this lock.
        let mut c = container.clone().lock_owned().await;
        {
            let mut all = self.inner.containers.lock().await;
            if all.contains_key(&id) {
                return Err(Error::AlreadyExists(format!("container {id}")));
            }
            all.insert(id.clone(), container);
        }
        match self.create_locked(&mut c, &req, &stdio).await {
            Ok(pid) => {
                drop(c);
                let ev = TaskCreate {
                    container_id: id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    checkpoint: req.checkpoint.clone(),
                    pid,
                    ..Default::default()
                };
                self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
                    .await;
                Ok(CreateTaskResponse {
                    pid,
                    ..Default::default()
                })
            }
            Err(e) => {
                if c.rootfs_mounted {
                    let _ = unmount(c.rootfs()).await;
                }
                drop(c);
                self.inner.containers.lock().await.remove(&id);
                Err(e)
            }
        }
    }

    async fn create_locked(
        &self,
        c: &mut Container,
        req: &CreateTaskRequest,
        stdio: &Stdio,
    ) -> Result<u32> {
        let rootfs = c.rootfs();
        if !req.rootfs.is_empty() {
            let r = rootfs.clone();
            blocking(move || {
                std::fs::create_dir_all(&r).map_err(Error::io(format!("creating {}", r.display())))
            })
            .await?;
            for m in &req.rootfs {
                containerd_shim::util::mount_rootfs(m, &rootfs).await?;
                c.rootfs_mounted = true;
            }
        }
        let prepared = Prepared::new(stdio, c.options.io_uid, c.options.io_gid)?;
        let pid_file = c.bundle.join("init.pid");
        let mut opts = CreateOpts::new()
            .pid_file(&pid_file)
            .no_pivot(c.options.no_pivot_root)
            .no_new_keyring(c.options.no_new_keyring);
        if let Some(io) = prepared.runc_io() {
            opts = opts.io(io);
        }
        if let Some(sock) = prepared.console_socket() {
            opts = opts.console_socket(sock);
        }
        if let Err(e) = c.runc.create(&c.id, &c.bundle, Some(&opts)).await {
            return Err(runc_error("create", &c.bundle, e).await);
        }
        let pid = read_pid(&pid_file).await?;
        c.phases.mark_created();
        match prepared.connect(stdio).await {
            Ok(io) => c.init.io = io,
            Err(e) => {
                let _ = c
                    .runc
                    .delete(&c.id, Some(&DeleteOpts::new().force(true)))
                    .await;
                return Err(e);
            }
        }
        c.init.pid = pid;
        self.watch_oom(&c.id, pid);
        debug!(container = %c.id, pid, "created");
        Ok(pid)
    }

    /// Starts the OOM watch of the container's memory cgroup (a failure is logged: stats and
    /// the task work without it).
    fn watch_oom(&self, id: &str, pid: u32) {
        let mode = self.inner.cgroups;
        let tx = self.inner.oom_tx.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let Ok(pid) = i32::try_from(pid) else { return };
            let Some(dir) = cgroup::memory_cgroup(mode, pid) else {
                warn!(container = %id, "no memory cgroup found: no OOM events");
                return;
            };
            let cid = id.clone();
            if let Err(e) = cgroup::watch_oom(mode, dir, move || {
                let _ = tx.send(cid.clone());
            }) {
                warn!(container = %id, error = %e, "cannot watch for OOM kills");
            }
        });
    }

    async fn do_start(&self, req: StartRequest) -> Result<StartResponse> {
        let container = self.container(&req.id).await?;
        let mut c = container.lock().await;
        if req.exec_id.is_empty() {
            if c.init.phase != Phase::Created {
                return Err(Error::FailedPrecondition(format!(
                    "container {} was already started",
                    req.id
                )));
            }
            if let Err(e) = c.runc.start(&c.id).await {
                return Err(runc_error("start", &c.bundle, e).await);
            }
            let pid = c.init.pid;
            if c.init.phase == Phase::Created {
                c.init.phase = Phase::Running;
            }
            c.phases.mark_started(pid);
            let started = Started {
                namespace: self.inner.namespace.clone(),
                container_id: c.id.clone(),
                bundle: c.bundle.display().to_string(),
                annotations: c.spec.annotations.clone(),
                phases: c.phases.clone(),
                rootfs: c.rootfs_mounts.clone(),
            };
            drop(c);
            let probe = self.inner.probe.clone();
            tokio::spawn(async move { probe.started(started).await });
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                .await;
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
        let mut guard = c;
        let c = &mut *guard;
        let p = c
            .execs
            .get_mut(&req.exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {} in {}", req.exec_id, req.id)))?;
        if p.phase != Phase::Created {
            return Err(Error::FailedPrecondition(format!(
                "exec {} was already started",
                req.exec_id
            )));
        }
        let spec = p
            .spec
            .clone()
            .ok_or_else(|| Error::FailedPrecondition("exec without a process spec".into()))?;
        let prepared = Prepared::new(&p.stdio, c.options.io_uid, c.options.io_gid)?;
        let pid_file = c.bundle.join(format!("{}.pid", req.exec_id));
        let mut opts = ExecOpts::new().pid_file(&pid_file).detach(true);
        if let Some(io) = prepared.runc_io() {
            opts = opts.io(io);
        }
        if let Some(sock) = prepared.console_socket() {
            opts = opts.console_socket(sock);
        }
        if let Err(e) = c.runc.exec(&c.id, &spec, Some(&opts)).await {
            return Err(runc_error("exec", &c.bundle, e).await);
        }
        let pid = read_pid(&pid_file).await?;
        let _ = tokio::fs::remove_file(&pid_file).await;
        p.io = prepared.connect(&p.stdio.clone()).await?;
        p.pid = pid;
        p.phase = Phase::Running;
        let ev = TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid,
            ..Default::default()
        };
        drop(guard);
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn do_delete(&self, req: DeleteRequest) -> Result<DeleteResponse> {
        let container = self.container(&req.id).await?;
        let mut c = container.lock().await;
        if !req.exec_id.is_empty() {
            let p = c
                .execs
                .get_mut(&req.exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {} in {}", req.exec_id, req.id)))?;
            if p.phase == Phase::Running {
                return Err(Error::FailedPrecondition(format!(
                    "exec {} is still running",
                    req.exec_id
                )));
            }
            p.io.wait_output(OUTPUT_DRAIN).await;
            let p = c
                .execs
                .remove(&req.exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {} in {}", req.exec_id, req.id)))?;
            let exit = p.exit.unwrap_or(crate::container::Exit {
                status: 0,
                at: std::time::SystemTime::now(),
            });
            return Ok(DeleteResponse {
                pid: p.pid,
                exit_status: exit.status,
                exited_at: MessageField::some(exit.timestamp()),
                ..Default::default()
            });
        }
        if c.init.phase == Phase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is still running",
                req.id
            )));
        }
        if let Err(e) = c
            .runc
            .delete(&c.id, Some(&DeleteOpts::new().force(true)))
            .await
            && !is_gone(&e)
        {
            return Err(runc_error("delete", &c.bundle, e).await);
        }
        // A container deleted before it ran: runc killed its init; let the reaper report it.
        let mut exited = c.init.subscribe();
        let pid = c.init.pid;
        drop(c);
        let _ =
            tokio::time::timeout(Duration::from_secs(2), exited.wait_for(|e| e.is_some())).await;
        let mut c = container.lock().await;
        c.init.io.wait_output(OUTPUT_DRAIN).await;
        for p in c.execs.values_mut() {
            p.io.wait_output(Duration::from_millis(100)).await;
        }
        if c.rootfs_mounted {
            unmount(c.rootfs()).await?;
            c.rootfs_mounted = false;
        }
        let exit = c.init.set_exited(137);
        drop(c);
        self.inner.containers.lock().await.remove(&req.id);
        let ev = TaskDelete {
            container_id: req.id.clone(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            id: req.id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn do_exec(&self, req: ExecProcessRequest) -> Result<()> {
        let container = self.container(&req.id).await?;
        let value = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()))?;
        let mut spec: oci_spec::runtime::Process =
            serde_json::from_slice(value).map_err(|source| Error::Json {
                what: "exec process spec",
                source,
            })?;
        spec.set_terminal(Some(req.terminal));
        let mut c = container.lock().await;
        if c.init.phase == Phase::Stopped {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                req.id
            )));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!("exec {}", req.exec_id)));
        }
        let mut p = Process::new(
            &req.exec_id,
            Stdio {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        );
        p.spec = Some(spec);
        c.execs.insert(req.exec_id.clone(), p);
        drop(c);
        let ev = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(())
    }

    async fn do_kill(&self, req: KillRequest) -> Result<()> {
        let container = self.container(&req.id).await?;
        let c = container.lock().await;
        let gone = || Error::NotFound("process already finished".into());
        if !req.exec_id.is_empty() {
            let p = c
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {} in {}", req.exec_id, req.id)))?;
            if p.phase != Phase::Running || p.pid == 0 {
                return Err(gone());
            }
            let pid = i32::try_from(p.pid).map_err(|_| gone())?;
            let sig = i32::try_from(req.signal)
                .map_err(|_| Error::InvalidArgument(format!("signal {}", req.signal)))?;
            // SAFETY: kill(2) has no memory preconditions; the pid is our exited-not-reaped
            // or live child (the reaper has not reported it).
            if unsafe { libc::kill(pid, sig) } != 0 {
                return Err(gone());
            }
            return Ok(());
        }
        if c.init.phase == Phase::Stopped && !req.all {
            return Err(gone());
        }
        let opts = KillOpts::new().all(req.all);
        match c.runc.kill(&c.id, req.signal, Some(&opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Err(gone()),
            Err(e) => Err(runc_error("kill", &c.bundle, e).await),
        }
    }

    async fn do_state(&self, req: StateRequest) -> Result<StateResponse> {
        let container = self.container(&req.id).await?;
        let c = container.lock().await;
        let p = c
            .process(&req.exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {} in {}", req.exec_id, req.id)))?;
        let mut r = StateResponse {
            id: if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: p.pid,
            status: EnumOrUnknown::new(p.status(c.paused)),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        if let Some(e) = p.exit {
            r.exit_status = e.status;
            r.exited_at = MessageField::some(e.timestamp());
        }
        Ok(r)
    }

    async fn do_pids(&self, req: PidsRequest) -> Result<PidsResponse> {
        let container = self.container(&req.id).await?;
        let (runc, bundle, execs) = {
            let c = container.lock().await;
            let execs: HashMap<u32, String> = c
                .execs
                .values()
                .filter(|p| p.pid != 0)
                .map(|p| (p.pid, p.exec_id.clone()))
                .collect();
            (c.runc.clone(), c.bundle.clone(), execs)
        };
        let pids = match runc.ps(&req.id).await {
            Ok(p) => p,
            Err(e) => return Err(runc_error("ps", &bundle, e).await),
        };
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let pid = u32::try_from(pid).unwrap_or(0);
            let mut info = ProcessInfo {
                pid,
                ..Default::default()
            };
            if let Some(exec_id) = execs.get(&pid) {
                let d = ProcessDetails {
                    exec_id: exec_id.clone(),
                    ..Default::default()
                };
                let value = d.write_to_bytes().map_err(|source| Error::Protobuf {
                    what: "process details",
                    source,
                })?;
                info.info = MessageField::some(Any {
                    type_url: "containerd.runc.v1.ProcessDetails".into(),
                    value,
                    ..Default::default()
                });
            }
            processes.push(info);
        }
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        let container = self.container(id).await?;
        let mut c = container.lock().await;
        let r = if pause {
            c.runc.pause(id).await
        } else {
            c.runc.resume(id).await
        };
        if let Err(e) = r {
            return Err(runc_error(if pause { "pause" } else { "resume" }, &c.bundle, e).await);
        }
        c.paused = pause;
        drop(c);
        if pause {
            let ev = TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
                .await;
        } else {
            let ev = TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        Ok(())
    }

    async fn do_stats(&self, req: StatsRequest) -> Result<StatsResponse> {
        let container = self.container(&req.id).await?;
        let (options, bundle) = {
            let c = container.lock().await;
            (c.options.clone(), c.bundle.clone())
        };
        let binary = if options.binary_name.is_empty() {
            "runc".to_string()
        } else {
            options.binary_name.clone()
        };
        let mut cmd = runc::Command::new(binary);
        cmd.arg("--root")
            .arg(state_root(&options, &self.inner.namespace))
            .args(["events", "--stats", &req.id])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let (status, _, out, err) = match ReaperSpawner.execute(cmd).await {
            Ok(r) => r,
            Err(e) => return Err(runc_error("events", &bundle, e).await),
        };
        if !status.success() {
            return Err(Error::NotFound(format!(
                "runc events --stats {}: {}",
                req.id,
                err.trim()
            )));
        }
        let ev: serde_json::Value =
            serde_json::from_str(out.trim()).map_err(|source| Error::Json {
                what: "runc events --stats",
                source,
            })?;
        let data = ev.get("data").cloned().unwrap_or_default();
        Ok(StatsResponse {
            stats: MessageField::some(cgroup::metrics(self.inner.cgroups, &data)?),
            ..Default::default()
        })
    }

    async fn do_update(&self, req: UpdateTaskRequest) -> Result<()> {
        let container = self.container(&req.id).await?;
        let value = req
            .resources
            .as_ref()
            .map(|a| a.value.as_slice())
            .ok_or_else(|| Error::InvalidArgument("update without resources".into()))?;
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(value).map_err(|source| Error::Json {
                what: "update resources",
                source,
            })?;
        let c = container.lock().await;
        match c.runc.update(&c.id, &resources).await {
            Ok(()) => Ok(()),
            Err(e) => Err(runc_error("update", &c.bundle, e).await),
        }
    }
}

async fn read_pid(path: &Path) -> Result<u32> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(Error::io(format!("reading {}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("{}: not a pid: {text:?}", path.display())))
}

/// Unmounts everything at and below `rootfs` (blocking, on the blocking pool).
pub async fn unmount(rootfs: PathBuf) -> Result<()> {
    blocking(move || {
        let target = rootfs.display().to_string();
        containerd_shim::mount::umount_recursive(Some(&target), 0).or_else(|e| {
            warn!(rootfs = %target, error = %e, "unmount failed; detaching");
            containerd_shim::mount::umount_recursive(Some(&target), libc::MNT_DETACH)
        })?;
        Ok(())
    })
    .await
}

/// Runs blocking work on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("blocking task")(std::io::Error::other(e)))?
}

fn rpc<T>(r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        warn!(error = %e, "request failed");
        e.into()
    })
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let span = info_span!("create", container = %req.id);
        rpc(self.do_create(req).instrument(span).await)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let span = info_span!("start", container = %req.id, exec = %req.exec_id);
        rpc(self.do_start(req).instrument(span).await)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        let span = info_span!("delete", container = %req.id, exec = %req.exec_id);
        rpc(self.do_delete(req).instrument(span).await)
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let span = info_span!("exec", container = %req.id, exec = %req.exec_id);
        rpc(self.do_exec(req).instrument(span).await).map(|()| Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let span =
            info_span!("kill", container = %req.id, exec = %req.exec_id, signal = req.signal);
        rpc(self.do_kill(req).instrument(span).await).map(|()| Empty::new())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        rpc(self.do_state(req).await)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let rx = async {
            let container = self.container(&req.id).await?;
            let c = container.lock().await;
            c.process(&req.exec_id)
                .map(Process::subscribe)
                .ok_or_else(|| Error::NotFound(format!("exec {} in {}", req.exec_id, req.id)))
        };
        let mut rx = rpc(rx.await)?;
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .ok()
            .and_then(|e| *e)
            .ok_or_else(|| {
                ttrpc::Error::from(Error::NotFound(format!("process of {} is gone", req.id)))
            })?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.timestamp()),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        rpc(self.do_pids(req).await)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        let span = info_span!("pause", container = %req.id);
        rpc(self.do_pause(&req.id, true).instrument(span).await).map(|()| Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        let span = info_span!("resume", container = %req.id);
        rpc(self.do_pause(&req.id, false).instrument(span).await).map(|()| Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let r = async {
            let container = self.container(&req.id).await?;
            let c = container.lock().await;
            let p = c
                .process(&req.exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {} in {}", req.exec_id, req.id)))?;
            p.io.resize(req.width, req.height)
        };
        rpc(r.await).map(|()| Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let r = async {
            let container = self.container(&req.id).await?;
            let mut c = container.lock().await;
            let p = c
                .process_mut(&req.exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {} in {}", req.exec_id, req.id)))?;
            if req.stdin {
                p.io.close_stdin();
            }
            Ok(())
        };
        rpc(r.await).map(|()| Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        rpc(self.do_update(req).await).map(|()| Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        rpc(self.do_stats(req).await)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let pid = match self.container(&req.id).await {
            Ok(c) => c.lock().await.init.pid,
            Err(_) => 0,
        };
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.inner.containers.lock().await.is_empty() {
            info!("no container left: shim exits");
            self.inner.exit.signal();
        }
        Ok(Empty::new())
    }
}
