//! `arbor run`: runs an image through containerd's API, as `ctr run` does, without `ctr`.
//!
//! 1. The image is pulled with [`crate::pull`] when containerd does not have it (or always,
//!    or never: [`PullPolicy`]).
//! 2. Its record and config are read from containerd (images and content services; an
//!    index is resolved to this host's platform); the top chain ID comes from the diff IDs.
//! 3. Under a lease (so containerd's GC cannot race the creation, as ctr holds one), the
//!    container's snapshot is prepared (key = container id, parent = that chain ID), mounted read-only for a moment to look up the user in its
//!    `/etc/passwd` and `/etc/group`, the OCI runtime spec is built ([`spec`]) and the
//!    container record is created (spec, runtime, snapshotter and key, image, labels).
//! 4. The task is created on the snapshot's mounts with stdio over FIFOs ([`stdio`]),
//!    started, SIGINT/SIGTERM are forwarded to it (`Kill`), with a terminal SIGWINCH becomes
//!    `ResizePty`; its exit status is returned.
//! 5. Unless kept (or detached), the task, the container and the snapshot are deleted.
//!
//! Each step is a `tracing` span; the moments a cold start is made of are reported to an
//! [`Observer`] as they happen and returned in [`RunOutcome::phases`].

pub mod spec;
pub mod stdio;
pub mod task;

mod rootfs;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use arbor_oci::Store;
use arbor_proto::Mount;
use arbor_proto::containerd::services::containers::v1::containers_client::ContainersClient;
use arbor_proto::containerd::services::containers::v1::{
    Container, CreateContainerRequest, DeleteContainerRequest, container::Runtime,
};
use arbor_proto::containerd::services::content::v1::ReadContentRequest;
use arbor_proto::containerd::services::content::v1::content_client::ContentClient;
use arbor_proto::containerd::services::images::v1::GetImageRequest;
use arbor_proto::containerd::services::images::v1::images_client::ImagesClient;
use arbor_proto::containerd::services::leases::v1::leases_client::LeasesClient;
use arbor_proto::containerd::services::leases::v1::{
    CreateRequest as LeaseCreate, DeleteRequest as LeaseDelete,
};
use arbor_proto::containerd::services::tasks::v1::tasks_client::TasksClient;
use arbor_proto::containerd::services::tasks::v1::{
    CloseIoRequest, CreateTaskRequest, DeleteTaskRequest, KillRequest, ResizePtyRequest,
    StartRequest, WaitRequest,
};
use arbor_proto::snapshots::snapshots_client::SnapshotsClient;
use arbor_proto::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tonic::Code;
use tonic::transport::Channel;
use tracing::{Instrument as _, info_span};

use crate::error::{Context as _, Error, Result, Rpc as _};
use crate::pull::{self, PullReport, Target};
pub use spec::{ImageConfig, MountSpec, SpecOptions};
pub use stdio::Stdio;

/// A gRPC request in containerd's namespace, under a lease if given.
fn req<T>(t: &Target, lease: Option<&str>, m: T) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(m);
    let ns = t.namespace.parse().map_err(|_| {
        Error::Invalid(format!(
            "namespace {:?} is not a valid header value",
            t.namespace
        ))
    })?;
    r.metadata_mut().insert(arbor_proto::NAMESPACE_HEADER, ns);
    if let Some(l) = lease {
        r.metadata_mut()
            .insert("containerd-lease", l.parse().ctx("lease id")?);
    }
    Ok(r)
}

/// containerd's runc shim, the default runtime.
pub const DEFAULT_RUNTIME: &str = "io.containerd.runc.v2";
/// The type URL containerd stores a runtime spec under.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// When to pull the image before running it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// When containerd has no image record by that name (`arbor run`'s default).
    #[default]
    Missing,
    /// Always (`--pull`).
    Always,
    /// Never: an image containerd lacks is an error.
    Never,
}

/// Everything `arbor run` takes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The image reference (containerd's image name).
    pub image: String,
    /// Container id (also the snapshot key).
    pub id: String,
    /// The process and its limits ([`spec::build_spec`]).
    pub spec: SpecOptions,
    /// Labels of the container record.
    pub labels: BTreeMap<String, String>,
    /// Runtime (shim) name, e.g. [`DEFAULT_RUNTIME`] or `io.containerd.arbor.v1`.
    pub runtime: String,
    /// Keep the container and its snapshot after the task exits (the task is deleted).
    pub keep: bool,
    /// Return once the task has started, leaving it running (implies keep).
    pub detach: bool,
    pub stdio: Stdio,
    pub pull: PullPolicy,
    /// Platforms to pull (default: this host's).
    pub platforms: Vec<String>,
    /// Wait until the function's port opens, and report the start to arbord
    /// (`--wait-ready`).
    pub ready: Option<ReadyOptions>,
}

/// How `--wait-ready` waits.
#[derive(Debug, Clone)]
pub struct ReadyOptions {
    /// The TCP port probed inside the container's network namespace.
    pub port: u16,
    /// Longest wait for it.
    pub timeout: Duration,
    /// The function's name (`arbor.io/function`), for the report.
    pub function: String,
}

/// A start that became ready: when, phase by phase (contiguous, so they add up to
/// `seconds`), and what arbord made of it.
#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    /// From the start of the run to the port opening.
    pub seconds: f64,
    /// (name, seconds): `pull`, `create` (container and task), `start`, `port`.
    pub phases: Vec<(String, f64)>,
    /// The lazy layers arbord mounted for it, and the last one's mount time since the start
    /// (the "layers ready" point), when arbord serves them.
    pub lazy_layers: usize,
    pub layers_ready_seconds: Option<f64>,
    /// The manifest arbord learns a start-up set for ("" if none), or why it was not told.
    pub learning: String,
}

impl RunOptions {
    /// Defaults for `image` as container `id`: the runc shim, pull if missing, caller's stdio.
    pub fn new(image: impl Into<String>, id: impl Into<String>) -> RunOptions {
        RunOptions {
            image: image.into(),
            id: id.into(),
            spec: SpecOptions::default(),
            labels: BTreeMap::new(),
            runtime: DEFAULT_RUNTIME.into(),
            keep: false,
            detach: false,
            stdio: Stdio::Inherit,
            pull: PullPolicy::Missing,
            platforms: Vec::new(),
            ready: None,
        }
    }
}

/// A moment of a run, for cold-start accounting (and, later, `--wait-ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The image is in containerd (pulled now, or found).
    Pulled,
    /// The snapshot is prepared and the container record exists.
    ContainerCreated,
    /// The shim has created the task (process not started yet).
    TaskCreated,
    /// The process runs.
    TaskStarted,
    /// The function's port opened (`--wait-ready`).
    Ready,
    /// The process has exited.
    Exited,
}

/// When a phase was reached, since [`run`] was called.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PhaseTime {
    pub phase: Phase,
    pub seconds: f64,
}

/// Told about a run as it goes (all methods default to nothing). Called inline: return
/// quickly, spawn anything long (a readiness probe on [`Phase::TaskStarted`]).
pub trait Observer: Send + Sync {
    /// The image was pulled (not called when containerd already had it).
    fn pulled(&self, _report: &PullReport) {}
    /// `phase` was reached `since` the run began.
    fn phase(&self, _phase: Phase, _since: Duration) {}
    /// The function became ready (`--wait-ready`); called from a background task.
    fn ready(&self, _ready: &Ready) {}
}

/// An [`Observer`] that observes nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

/// How a run ended.
#[derive(Debug, Serialize)]
pub struct RunOutcome {
    pub id: String,
    /// The task's pid (on the host).
    pub pid: u32,
    /// The exit status (128 + signal for a signalled process); `None` when detached.
    pub exit_status: Option<u32>,
    pub phases: Vec<PhaseTime>,
    /// The pull report, when the image was pulled.
    pub pull: Option<PullReport>,
    /// With `--wait-ready`: when it became ready (`None` if it never did before it exited or
    /// the wait timed out).
    pub ready: Option<Ready>,
}

struct Clock<'a> {
    t0: Instant,
    wall0: std::time::SystemTime,
    phases: Vec<PhaseTime>,
    observer: &'a dyn Observer,
}

impl Clock<'_> {
    fn mark(&mut self, phase: Phase) {
        let since = self.t0.elapsed();
        tracing::debug!(?phase, seconds = since.as_secs_f64(), "run phase");
        self.phases.push(PhaseTime {
            phase,
            seconds: since.as_secs_f64(),
        });
        self.observer.phase(phase, since);
    }
}

/// Runs `opts.image` as container `opts.id` in containerd at `t` (see the module
/// documentation). `store` is where the image is pulled from when it must be (`None`: an
/// image containerd lacks is an error).
pub async fn run(
    t: &Target,
    store: Option<&Store>,
    opts: &RunOptions,
    observer: &dyn Observer,
) -> Result<RunOutcome> {
    let mut clock = Clock {
        t0: Instant::now(),
        wall0: std::time::SystemTime::now(),
        phases: Vec::new(),
        observer,
    };
    if opts.id.is_empty() || opts.id.contains('/') {
        return Err(Error::Invalid(format!(
            "container id {:?} must be non-empty and have no '/'",
            opts.id
        )));
    }
    let pulled = ensure_image(t, store, opts)
        .instrument(info_span!("ensure_image", image = %opts.image))
        .await?;
    if let Some(r) = &pulled {
        observer.pulled(r);
    }
    clock.mark(Phase::Pulled);

    let ch = pull::connect(t).await?;
    let image = read_image(&ch, t, &opts.image)
        .instrument(info_span!("read_image", image = %opts.image))
        .await?;
    let mounts = create_container(&ch, t, opts, &image)
        .instrument(info_span!("create_container", id = %opts.id))
        .await?;
    clock.mark(Phase::ContainerCreated);

    let result = run_task(&ch, t, opts, mounts, &image.manifest, &mut clock)
        .instrument(info_span!("task", id = %opts.id))
        .await;
    // Detached: everything stays. Otherwise the task is gone; the container and its
    // snapshot go too unless kept (also when the run failed).
    let remove = match &result {
        Ok((_, None, _)) => false,
        _ => !opts.keep,
    };
    if remove {
        remove_container(&ch, t, opts)
            .instrument(info_span!("remove_container", id = %opts.id))
            .await;
    }
    let (pid, exit_status, ready) = result?;
    Ok(RunOutcome {
        id: opts.id.clone(),
        pid,
        exit_status,
        phases: clock.phases,
        pull: pulled,
        ready,
    })
}

async fn ensure_image(
    t: &Target,
    store: Option<&Store>,
    opts: &RunOptions,
) -> Result<Option<PullReport>> {
    let need = match opts.pull {
        PullPolicy::Always => true,
        PullPolicy::Missing => !pull::has_image(t, &opts.image).await?,
        PullPolicy::Never => false,
    };
    if !need {
        return Ok(None);
    }
    let Some(store) = store else {
        return Err(Error::Invalid(format!(
            "containerd has no image {} and there is nowhere to pull it from",
            opts.image
        )));
    };
    Ok(Some(
        pull::pull(store, &opts.image, &opts.platforms, t).await?,
    ))
}

/// What a container is made from.
#[derive(Debug)]
struct ImageInfo {
    /// The platform manifest's digest.
    manifest: String,
    config: ImageConfig,
    /// The chain ID of the top layer: the parent of the container's snapshot.
    top_chain: String,
}

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

async fn read_blob(ch: &Channel, t: &Target, digest: &str) -> Result<Vec<u8>> {
    let limit = arbor_oci::manifest::MAX_CONFIG_OR_MANIFEST as usize;
    let mut c = ContentClient::new(ch.clone());
    let mut stream = c
        .read(req(
            t,
            None,
            ReadContentRequest {
                digest: digest.into(),
                offset: 0,
                size: 0,
            },
        )?)
        .await
        .rpc(format!("reading {digest} from containerd's content store"))?
        .into_inner();
    let mut data = Vec::new();
    while let Some(m) = stream
        .message()
        .await
        .rpc(format!("reading {digest} from containerd's content store"))?
    {
        data.extend_from_slice(&m.data);
        if data.len() > limit {
            return Err(Error::Invalid(format!(
                "{digest} is larger than {limit} bytes"
            )));
        }
    }
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    if digest.starts_with("sha256:") && got != digest {
        return Err(Error::Invalid(format!(
            "content {digest} in containerd hashes to {got}"
        )));
    }
    Ok(data)
}

fn host_platform() -> (&'static str, &'static str) {
    ("linux", pull::host_arch())
}

/// The manifest of an index for this host's platform.
fn pick_manifest(index: &serde_json::Value) -> Option<String> {
    let (os, arch) = host_platform();
    index["manifests"].as_array()?.iter().find_map(|m| {
        let p = &m["platform"];
        (p["os"] == os && p["architecture"] == arch)
            .then(|| m["digest"].as_str().map(str::to_string))
            .flatten()
    })
}

async fn read_image(ch: &Channel, t: &Target, name: &str) -> Result<ImageInfo> {
    let mut ic = ImagesClient::new(ch.clone());
    let img = match ic
        .get(req(t, None, GetImageRequest { name: name.into() })?)
        .await
    {
        Ok(r) => r.into_inner().image,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(s).rpc(format!("getting the image {name}")),
    };
    let target = img
        .and_then(|i| i.target)
        .ok_or_else(|| Error::Invalid(format!("containerd has no image {name}")))?;
    let mut digest = target.digest.clone();
    let mut media_type = target.media_type.clone();
    let manifest: serde_json::Value = loop {
        let bytes = read_blob(ch, t, &digest).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).ctx(format!("parsing the manifest {digest}"))?;
        let mt = v["mediaType"].as_str().unwrap_or(&media_type).to_string();
        if INDEX_TYPES.contains(&mt.as_str()) || v.get("manifests").is_some() {
            let (os, arch) = host_platform();
            digest = pick_manifest(&v).ok_or_else(|| Error::NoPlatform {
                image: name.to_string(),
                platforms: format!("{os}/{arch}"),
            })?;
            media_type = String::new();
            continue;
        }
        break v;
    };
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| Error::Invalid(format!("the manifest {digest} names no config")))?;
    let config_bytes = read_blob(ch, t, config_digest).await?;
    let mut info = parse_config(&config_bytes)?;
    info.manifest = digest;
    Ok(info)
}

fn parse_config(bytes: &[u8]) -> Result<ImageInfo> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ctx("parsing the image config")?;
    let config: ImageConfig = match v.get("config") {
        Some(c) if !c.is_null() => {
            serde_json::from_value(c.clone()).ctx("reading the image config's config")?
        }
        _ => ImageConfig::default(),
    };
    let diff_ids = arbor_convert::image::diff_ids(&v).ctx("reading the config's diff IDs")?;
    let top_chain = pull::chain_ids(&diff_ids)
        .pop()
        .ok_or_else(|| Error::Invalid("the image has no layers".into()))?;
    Ok(ImageInfo {
        manifest: String::new(),
        config,
        top_chain,
    })
}

/// The lease the container is created under, deleted when this is.
async fn with_lease<T>(
    ch: &Channel,
    t: &Target,
    id: &str,
    f: impl AsyncFnOnce(&str) -> Result<T>,
) -> Result<T> {
    let lease_id = format!(
        "arbor-run-{id}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let expire = time::OffsetDateTime::now_utc() + Duration::from_secs(24 * 3600);
    let mut lc = LeasesClient::new(ch.clone());
    lc.create(req(
        t,
        None,
        LeaseCreate {
            id: lease_id.clone(),
            labels: [(
                "containerd.io/gc.expire".to_string(),
                expire
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            )]
            .into(),
        },
    )?)
    .await
    .rpc("creating a lease")?;
    let result = f(&lease_id).await;
    if let Err(e) = lc
        .delete(req(
            t,
            None,
            LeaseDelete {
                id: lease_id,
                sync: false,
            },
        )?)
        .await
    {
        tracing::warn!(error = %e, "deleting the run's lease");
    }
    result
}

/// Prepares the snapshot, builds the spec and creates the container record; the snapshot's
/// mounts (the task's rootfs).
async fn create_container(
    ch: &Channel,
    t: &Target,
    opts: &RunOptions,
    image: &ImageInfo,
) -> Result<Vec<Mount>> {
    with_lease(ch, t, &opts.id, async |lease| {
        let mut sc = SnapshotsClient::new(ch.clone());
        // A read-only rootfs is still an active snapshot: runc creates mount points in it
        // before it remounts it read-only (a view would refuse the first mkdir).
        let mounts = sc
            .prepare(req(
                t,
                Some(lease),
                PrepareSnapshotRequest {
                    snapshotter: t.snapshotter.clone(),
                    key: opts.id.clone(),
                    parent: image.top_chain.clone(),
                    labels: HashMap::new(),
                },
            )?)
            .await
            .map(|r| r.into_inner().mounts);
        let mounts = match mounts {
            Ok(m) => m,
            Err(s) if s.code() == Code::NotFound => {
                return Err(Error::Invalid(format!(
                    "{} is not unpacked in snapshotter {} ({}): `arbor pull` it (or run with --pull)",
                    opts.image,
                    t.snapshotter,
                    s.message()
                )));
            }
            Err(s) => {
                return Err(s).rpc(format!(
                    "preparing snapshot {} on {}",
                    opts.id, image.top_chain
                ));
            }
        };
        let result = async {
            // A mount and reads through it (perhaps through a lazy layer served by the
            // same process): off the async runtime, in a mount namespace of its own.
            let spec = {
                let (mounts, config, spec_opts) =
                    (mounts.clone(), image.config.clone(), opts.spec.clone());
                let (ns, id) = (t.namespace.clone(), opts.id.clone());
                let span = info_span!("build_spec");
                rootfs::in_private_mounts(move || {
                    let _span = span.entered();
                    let rootfs = rootfs::TempMount::mount(&mounts)?;
                    let cx = spec::SpecContext::host(&ns, &id, Some(rootfs.path()));
                    spec::build_spec(&config, &spec_opts, &cx)
                })
                .await??
            };
            let spec_json = serde_json::to_vec(&spec).ctx("serialising the runtime spec")?;
            let mut cc = ContainersClient::new(ch.clone());
            cc.create(req(
                t,
                Some(lease),
                CreateContainerRequest {
                    container: Some(Container {
                        id: opts.id.clone(),
                        labels: opts
                            .labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        image: opts.image.clone(),
                        runtime: Some(Runtime {
                            name: opts.runtime.clone(),
                            options: None,
                        }),
                        spec: Some(prost_types::Any {
                            type_url: SPEC_TYPE_URL.into(),
                            value: spec_json,
                        }),
                        snapshotter: t.snapshotter.clone(),
                        snapshot_key: opts.id.clone(),
                        ..Default::default()
                    }),
                },
            )?)
            .await
            .rpc(format!("creating container {}", opts.id))?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            remove_snapshot(ch, t, &opts.id).await;
            return Err(e);
        }
        Ok(mounts)
    })
    .await
}

async fn remove_snapshot(ch: &Channel, t: &Target, key: &str) {
    let mut sc = SnapshotsClient::new(ch.clone());
    let Ok(r) = req(
        t,
        None,
        RemoveSnapshotRequest {
            snapshotter: t.snapshotter.clone(),
            key: key.into(),
        },
    ) else {
        return;
    };
    if let Err(e) = sc.remove(r).await
        && e.code() != Code::NotFound
    {
        tracing::warn!(key, error = %e, "removing the container's snapshot");
    }
}

/// Deletes the task (if any), the container record and its snapshot (`ctr run --rm`).
async fn remove_container(ch: &Channel, t: &Target, opts: &RunOptions) {
    remove_container_id(ch, t, &opts.id).await
}

pub(crate) async fn remove_container_id(ch: &Channel, t: &Target, id: &str) {
    let mut tc = TasksClient::new(ch.clone());
    if let Ok(r) = req(
        t,
        None,
        DeleteTaskRequest {
            container_id: id.into(),
        },
    ) {
        let _ = tc.delete(r).await;
    }
    let mut cc = ContainersClient::new(ch.clone());
    if let Ok(r) = req(t, None, DeleteContainerRequest { id: id.into() })
        && let Err(e) = cc.delete(r).await
        && e.code() != Code::NotFound
    {
        tracing::warn!(id, error = %e, "deleting the container");
    }
    remove_snapshot(ch, t, id).await;
}

/// Creates, starts and (unless detached) waits for the task, then deletes it. (pid, exit
/// status; `None` when detached.)
async fn run_task(
    ch: &Channel,
    t: &Target,
    opts: &RunOptions,
    mounts: Vec<Mount>,
    manifest: &str,
    clock: &mut Clock<'_>,
) -> Result<(u32, Option<u32>, Option<Ready>)> {
    let rootfs = mounts.clone();
    let id = opts.id.as_str();
    let tty = opts.spec.tty;
    let stdio = if opts.detach && opts.stdio == Stdio::Inherit {
        Stdio::Null
    } else {
        opts.stdio.clone()
    };
    let prepared = stdio::Prepared::new(&stdio, tty)?;
    let (stdin, stdout, stderr) = prepared.uris();
    let mut tc = TasksClient::new(ch.clone());
    let created = tc
        .create(req(
            t,
            None,
            CreateTaskRequest {
                container_id: id.into(),
                rootfs: mounts,
                stdin,
                stdout,
                stderr,
                terminal: tty,
                ..Default::default()
            },
        )?)
        .instrument(info_span!("create_task"))
        .await
        .rpc(format!("creating task {id}"))?
        .into_inner();
    clock.mark(Phase::TaskCreated);

    let mut attached = match prepared {
        stdio::Prepared::Fifos(f) => Some(f.attach()?),
        stdio::Prepared::Plain { .. } => None,
    };
    let raw = (tty && attached.is_some()).then(stdio::RawTerminal::enter);

    // Wait is asked before Start, so no exit goes unseen.
    let wait = {
        let mut tc = tc.clone();
        let r = req(
            t,
            None,
            WaitRequest {
                container_id: id.into(),
                exec_id: String::new(),
            },
        )?;
        tokio::spawn(async move { tc.wait(r).await })
    };
    let started = tc
        .start(req(
            t,
            None,
            StartRequest {
                container_id: id.into(),
                exec_id: String::new(),
            },
        )?)
        .instrument(info_span!("start_task"))
        .await;
    if let Err(s) = started {
        wait.abort();
        drop(raw);
        return Err(s).rpc(format!("starting task {id}"));
    }
    clock.mark(Phase::TaskStarted);
    let probe = opts.ready.clone().map(|r| {
        let (t, id, manifest) = (t.clone(), id.to_string(), manifest.to_string());
        let marks: Vec<(Phase, f64)> = clock.phases.iter().map(|p| (p.phase, p.seconds)).collect();
        let (t0, wall0, pid) = (clock.t0, clock.wall0, created.pid);
        tokio::spawn(
            wait_ready(t, id, manifest, rootfs, r, marks, t0, wall0, pid)
                .instrument(info_span!("wait_ready")),
        )
    });
    if opts.detach {
        wait.abort();
        let ready = match probe {
            Some(p) => {
                let r = p.await.map_err(|e| Error::Other {
                    what: "waiting for the port".into(),
                    cause: Box::new(e),
                })??;
                clock.mark(Phase::Ready);
                clock.observer.ready(&r);
                Some(r)
            }
            None => None,
        };
        return Ok((created.pid, None, ready));
    }
    // Attached: the probe runs beside the container, and says when it is ready.
    let ready_seen = std::sync::Arc::new(std::sync::Mutex::new(None::<Ready>));
    let probe = probe.map(|p| {
        let seen = std::sync::Arc::clone(&ready_seen);
        async move {
            match p.await {
                Ok(Ok(r)) => {
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
                    Some(r)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the function did not get ready");
                    None
                }
                Err(_) => None,
            }
        }
    });
    let probe = async move {
        match probe {
            Some(p) => p.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(probe);
    let mut probe_done = false;

    let resize = |tc: &mut TasksClient<Channel>| {
        let r = stdio::terminal_size().and_then(|(w, h)| {
            req(
                t,
                None,
                ResizePtyRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                    width: w,
                    height: h,
                },
            )
            .ok()
        });
        let mut tc = tc.clone();
        async move {
            if let Some(r) = r
                && let Err(e) = tc.resize_pty(r).await
            {
                tracing::debug!(error = %e, "resizing the container's terminal");
            }
        }
    };
    if tty {
        resize(&mut tc).await;
    }

    use tokio::signal::unix::{SignalKind, signal};
    let mut sigint = signal(SignalKind::interrupt()).ctx("handling SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).ctx("handling SIGTERM")?;
    let mut sigwinch = signal(SignalKind::window_change()).ctx("handling SIGWINCH")?;
    tokio::pin!(wait);
    let status = loop {
        let stdin_closed = async {
            match attached.as_mut() {
                Some(a) => a.stdin_closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            w = &mut wait => {
                let w = w.map_err(|e| Error::Other { what: "waiting for the task".into(), cause: Box::new(e) })?;
                break w.rpc(format!("waiting for task {id}"))?.into_inner().exit_status;
            }
            _ = sigint.recv() => kill(&mut tc, t, id, libc::SIGINT, false).await,
            _ = sigterm.recv() => kill(&mut tc, t, id, libc::SIGTERM, false).await,
            _ = sigwinch.recv(), if tty => resize(&mut tc).await,
            r = &mut probe, if !probe_done => {
                probe_done = true;
                if let Some(r) = r {
                    clock.mark(Phase::Ready);
                    clock.observer.ready(&r);
                }
            }
            _ = stdin_closed => {
                if let Ok(r) = req(t, None, CloseIoRequest { container_id: id.into(), exec_id: String::new(), stdin: true })
                    && let Err(e) = tc.close_io(r).await
                {
                    tracing::debug!(error = %e, "closing the container's stdin");
                }
            }
        }
    };
    clock.mark(Phase::Exited);
    if let Some(a) = attached.as_mut() {
        a.drain(Duration::from_secs(10)).await;
    }
    drop(raw);
    drop(attached);
    if let Err(e) = tc
        .delete(req(
            t,
            None,
            DeleteTaskRequest {
                container_id: id.into(),
            },
        )?)
        .instrument(info_span!("delete_task"))
        .await
    {
        tracing::warn!(error = %e, "deleting the task");
    }
    let ready = ready_seen.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok((created.pid, Some(status), ready))
}

/// Waits for the function's port, then reports the start to the arbord behind the
/// container's snapshotter (if it is one), which learns the image's start-up set from it.
/// `marks`: the run's phases so far (seconds since `t0`).
#[allow(clippy::too_many_arguments)]
async fn wait_ready(
    t: Target,
    id: String,
    manifest: String,
    rootfs: Vec<Mount>,
    r: ReadyOptions,
    marks: Vec<(Phase, f64)>,
    t0: Instant,
    wall0: std::time::SystemTime,
    pid: u32,
) -> Result<Ready> {
    let opened = crate::ready::wait_port(pid, r.port, r.timeout).await?;
    let seconds = t0.elapsed().as_secs_f64();
    let at = |p: Phase| marks.iter().find(|(x, _)| *x == p).map(|(_, s)| *s);
    let pulled = at(Phase::Pulled).unwrap_or(0.0);
    let created = at(Phase::TaskCreated).unwrap_or(pulled);
    let started = at(Phase::TaskStarted).unwrap_or(created);
    let phases = vec![
        ("pull".to_string(), pulled),
        ("create".to_string(), created - pulled),
        ("start".to_string(), started - created),
        ("port".to_string(), seconds - started),
    ];
    let wall = |s: f64| wall0 + Duration::from_secs_f64(s.max(0.0));
    let mut ready = Ready {
        seconds,
        phases,
        lazy_layers: 0,
        layers_ready_seconds: None,
        learning: String::new(),
    };
    let arbord = match pull::arbord(&t).await {
        Ok(c) => c,
        Err(e) => {
            ready.learning = format!("not reported ({e})");
            return Ok(ready);
        }
    };
    if let Ok(l) = crate::ready::layers(&arbord, rootfs.clone()).await {
        ready.lazy_layers = l.layers.len();
        ready.layers_ready_seconds = l
            .layers
            .iter()
            .map(|x| x.mounted_unix_nano)
            .max()
            .map(|n| (n - crate::ready::unix_nanos(wall0)) as f64 / 1e9)
            .filter(|s| *s >= 0.0);
    }
    let report = arbor_proto::arbor::ReadyRequest {
        namespace: t.namespace.clone(),
        container_id: id,
        function: r.function.clone(),
        rootfs,
        manifest,
        started_unix_nano: crate::ready::unix_nanos(wall0),
        ready_unix_nano: crate::ready::unix_nanos(opened),
        phases: vec![
            crate::ready::phase("pull", wall0, wall(pulled)),
            crate::ready::phase("create", wall(pulled), wall(created)),
            crate::ready::phase("start", wall(created), wall(started)),
            crate::ready::phase("port", wall(started), opened),
        ],
    };
    ready.learning = match crate::ready::report(&arbord, report).await {
        Ok(a) if !a.manifest.is_empty() => a.manifest,
        Ok(_) => "nothing to learn (no fresh lazy layer)".into(),
        Err(e) => format!("not reported ({e})"),
    };
    Ok(ready)
}

/// Sends `sig` to the task of container `id` (every process of it with `all`); a task
/// already gone is not worth a warning.
async fn kill(tc: &mut TasksClient<Channel>, t: &Target, id: &str, sig: i32, all: bool) {
    tracing::debug!(sig, all, "signalling the task");
    let Ok(r) = req(
        t,
        None,
        KillRequest {
            container_id: id.into(),
            exec_id: String::new(),
            signal: sig as u32,
            all,
        },
    ) else {
        return;
    };
    if let Err(e) = tc.kill(r).await
        && e.code() != Code::NotFound
    {
        tracing::warn!(error = %e, "sending signal {sig} to the task");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_gives_the_top_chain_and_the_process_config() {
        let cfg = json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"], "WorkingDir": "/w", "User": "1:2"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb"]}
        });
        let info = parse_config(&serde_json::to_vec(&cfg).unwrap()).unwrap();
        assert_eq!(
            info.top_chain,
            pull::chain_ids(&["sha256:aa".into(), "sha256:bb".into()])[1]
        );
        assert_eq!(info.config.working_dir.as_deref(), Some("/w"));
        assert_eq!(info.config.user.as_deref(), Some("1:2"));
        assert_eq!(info.config.env, Some(vec!["A=1".to_string()]));
        // No config section at all is an empty one; no layers is an error.
        let bare = json!({"rootfs": {"type": "layers", "diff_ids": ["sha256:aa"]}});
        let info = parse_config(&serde_json::to_vec(&bare).unwrap()).unwrap();
        assert_eq!(info.config, ImageConfig::default());
        assert_eq!(info.top_chain, "sha256:aa");
        let none = json!({"config": {}, "rootfs": {"type": "layers", "diff_ids": []}});
        assert!(parse_config(&serde_json::to_vec(&none).unwrap()).is_err());
    }

    #[test]
    fn index_resolves_to_this_platform() {
        let (os, arch) = host_platform();
        let idx = json!({"manifests": [
            {"digest": "sha256:other", "platform": {"os": "linux", "architecture": "s390x"}},
            {"digest": "sha256:mine", "platform": {"os": os, "architecture": arch}},
        ]});
        assert_eq!(pick_manifest(&idx).as_deref(), Some("sha256:mine"));
        assert_eq!(pick_manifest(&json!({"manifests": []})), None);
    }
}
