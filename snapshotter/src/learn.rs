//! Start-up sets learned from real cold starts, and arbord's `arbor.v1.Starts` service.
//!
//! Every lazily mounted layer records the chunks its files are first asked for
//! ([`arbor_fetch::learn::Recorder`]). When a container becomes ready, whoever saw it (the
//! runtime shim, `arbor run --wait-ready`) reports it with its rootfs mounts ([`StartsService`],
//! `Ready`). arbord finds the lazy layers under that rootfs, waits the grace period (the
//! first invocation reads more), and keeps, per image manifest, the chunks those layers were
//! first asked for between the start and then, merged in first-read order: the image's
//! start-up set ([`arbor_format::startup::StartupSet`], one JSON file per manifest under
//! `<root>/startup-sets/`). A layer that served reads before the container started is not
//! learned from: reads already in the page cache never reach arbord, so its record would
//! miss them.
//!
//! A later cold mount of a layer of that image fetches the set's windows of the layer first,
//! before its prefetch section ([`crate::Remote::mount`]). Sets also arrive from the registry
//! (`PutStartupSet`, from `arbor pull`); a set is only ever applied to layers of the manifest
//! it names and each of its reads is looked up in the layer's own TOC, so a wrong or stale set
//! costs bandwidth, never correctness.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arbor_fetch::learn::merge_reads;
use arbor_format::startup::{SCHEMA_VERSION, StartupSet};
use arbor_proto::arbor as api;
use arbor_proto::types::Mount;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use crate::error::{Error, Result};
use crate::remote::{MountedLayer, Remote};

/// How start-up sets are learned.
#[derive(Debug, Clone)]
pub struct LearnOptions {
    /// Record first reads and learn sets from reported starts.
    pub enabled: bool,
    /// Reads this long after ready still count (the first invocation).
    pub grace: Duration,
    /// A mount records for this long at most.
    pub max_age: Duration,
    /// A mount records this many chunks at most.
    pub max_chunks: usize,
}

impl Default for LearnOptions {
    fn default() -> Self {
        LearnOptions {
            enabled: true,
            grace: Duration::from_secs(2),
            max_age: Duration::from_secs(600),
            max_chunks: 1 << 16,
        }
    }
}

/// The sets kept on disk, one file per manifest (`<hex>.json`), cached in memory.
pub struct SetStore {
    dir: PathBuf,
    cache: Mutex<HashMap<String, Arc<StartupSet>>>,
    learned: AtomicU64,
    imported: AtomicU64,
    ignored: Mutex<BTreeMap<&'static str, u64>>,
    phases: Mutex<BTreeMap<String, (u64, f64)>>,
    ready: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SetStore {
    pub fn open(dir: &Path) -> Result<SetStore> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        Ok(SetStore {
            dir: dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
            learned: AtomicU64::new(0),
            imported: AtomicU64::new(0),
            ignored: Mutex::new(BTreeMap::new()),
            phases: Mutex::new(BTreeMap::new()),
            ready: AtomicU64::new(0),
        })
    }

    fn path(&self, manifest: &str) -> Option<PathBuf> {
        let d = arbor_format::Digest::parse(manifest).ok()?;
        Some(self.dir.join(format!("{}.json", d.hex())))
    }

    /// The set of `manifest`, if one is kept (a file that no longer parses is ignored, with
    /// the reason logged, and removed).
    pub fn get(&self, manifest: &str) -> Option<Arc<StartupSet>> {
        if let Some(s) = lock(&self.cache).get(manifest) {
            return Some(Arc::clone(s));
        }
        let path = self.path(manifest)?;
        let bytes = std::fs::read(&path).ok()?;
        match StartupSet::parse(&bytes).and_then(|s| s.check_manifest(manifest).map(|_| s)) {
            Ok(set) => {
                let set = Arc::new(set);
                lock(&self.cache).insert(manifest.to_string(), Arc::clone(&set));
                Some(set)
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "ignoring a kept start-up set");
                self.ignored("bad_document", 1);
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps `set` for its manifest (replacing an older one). Blocking (a small file).
    pub fn put(&self, set: StartupSet) -> Result<Arc<StartupSet>> {
        set.validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let path = self
            .path(&set.manifest)
            .ok_or_else(|| Error::InvalidArgument(format!("bad manifest {:?}", set.manifest)))?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, set.to_json())
            .map_err(Error::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path)
            .map_err(Error::io(format!("renaming to {}", path.display())))?;
        let set = Arc::new(set);
        lock(&self.cache).insert(set.manifest.clone(), Arc::clone(&set));
        Ok(set)
    }

    /// Counts sets or reads left out, by reason.
    pub fn ignored(&self, reason: &'static str, n: u64) {
        *lock(&self.ignored).entry(reason).or_default() += n;
    }

    /// Prometheus text of the learning counters and the start phases.
    pub fn render_metrics(&self) -> String {
        let mut s = String::new();
        s.push_str("# HELP arbor_startup_sets_learned_total Start-up sets learned from reported starts.\n# TYPE arbor_startup_sets_learned_total counter\n");
        s.push_str(&format!(
            "arbor_startup_sets_learned_total {}\n",
            self.learned.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP arbor_startup_sets_imported_total Start-up sets received (from the registry, through arbor pull).\n# TYPE arbor_startup_sets_imported_total counter\n");
        s.push_str(&format!(
            "arbor_startup_sets_imported_total {}\n",
            self.imported.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP arbor_startup_sets_ignored_total Start-up sets, or reads of them, left out, by reason.\n# TYPE arbor_startup_sets_ignored_total counter\n");
        for (reason, n) in lock(&self.ignored).iter() {
            s.push_str(&format!(
                "arbor_startup_sets_ignored_total{{reason=\"{reason}\"}} {n}\n"
            ));
        }
        s.push_str("# HELP arbor_starts_ready_total Container starts reported ready.\n# TYPE arbor_starts_ready_total counter\n");
        s.push_str(&format!(
            "arbor_starts_ready_total {}\n",
            self.ready.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP arbor_start_phase_seconds Time of each phase of reported starts (layers, create, start, port).\n# TYPE arbor_start_phase_seconds summary\n");
        for (phase, (n, sum)) in lock(&self.phases).iter() {
            s.push_str(&format!(
                "arbor_start_phase_seconds_sum{{phase=\"{phase}\"}} {sum}\n"
            ));
            s.push_str(&format!(
                "arbor_start_phase_seconds_count{{phase=\"{phase}\"}} {n}\n"
            ));
        }
        s
    }

    fn phase(&self, name: &str, secs: f64) {
        // Bounded label set: only well-formed short names count.
        if name.is_empty()
            || name.len() > 32
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            return;
        }
        let mut p = lock(&self.phases);
        if p.len() >= 16 && !p.contains_key(name) {
            return;
        }
        let e = p.entry(name.to_string()).or_default();
        e.0 += 1;
        e.1 += secs;
    }
}

/// The directories a rootfs stacks, top first: an overlay's `upperdir` is left out (it is
/// the container's own), its `lowerdir`s kept; a bind mount's source.
pub fn rootfs_dirs(rootfs: &[Mount]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for m in rootfs {
        match m.r#type.as_str() {
            "overlay" => {
                for o in &m.options {
                    if let Some(l) = o.strip_prefix("lowerdir=") {
                        out.extend(l.split(':').filter(|p| !p.is_empty()).map(PathBuf::from));
                    }
                }
            }
            "bind" | "rbind" | "" => out.push(PathBuf::from(&m.source)),
            _ => {}
        }
    }
    out
}

/// The lazy layers under `rootfs`, top first.
pub fn layers_of(remote: &Remote, rootfs: &[Mount]) -> Vec<MountedLayer> {
    let mounted = remote.mounted_layers();
    rootfs_dirs(rootfs)
        .iter()
        .filter_map(|d| mounted.iter().find(|m| &m.dir == d).cloned())
        .collect()
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn from_nanos(n: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(n.max(0) as u64)
}

/// Learns the set of one start: the chunks first read on its fresh layers from `started` to
/// `until`, merged in first-read order. `None` if no layer was fresh or nothing was read.
pub fn learn_set(
    layers: &[MountedLayer],
    manifest: &str,
    function: Option<String>,
    started: SystemTime,
    ready: SystemTime,
    until: SystemTime,
) -> Option<StartupSet> {
    let mut parts = Vec::new();
    for l in layers {
        let Some(rec) = l.handle.recorder() else {
            continue;
        };
        if rec.read_before(started) {
            info!(layer = %l.layer.digest, "layer served reads before this start: not learned from");
            continue;
        }
        parts.push((l.handle.as_ref(), rec.reads_between(started, until)));
    }
    if parts.iter().all(|(_, r)| r.is_empty()) {
        return None;
    }
    let mut set = StartupSet {
        schema_version: SCHEMA_VERSION,
        manifest: manifest.to_string(),
        function,
        learned: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        ready_ms: ready
            .duration_since(started)
            .ok()
            .map(|d| d.as_millis() as u64),
        layers: parts.iter().map(|(h, _)| h.digest.clone()).collect(),
        reads: Vec::new(),
    };
    merge_reads(&mut set, &parts);
    Some(set)
}

/// arbord's `arbor.v1.Starts` service.
pub struct StartsService {
    remote: Arc<Remote>,
}

impl StartsService {
    pub fn new(remote: Arc<Remote>) -> StartsService {
        StartsService { remote }
    }

    pub fn into_server(self) -> api::starts_server::StartsServer<StartsService> {
        api::starts_server::StartsServer::new(self)
    }
}

#[tonic::async_trait]
impl api::starts_server::Starts for StartsService {
    #[instrument(skip_all)]
    async fn layers(
        &self,
        req: Request<api::LayersRequest>,
    ) -> std::result::Result<Response<api::LayersResponse>, Status> {
        let req = req.into_inner();
        let layers = layers_of(&self.remote, &req.rootfs)
            .into_iter()
            .map(|l| api::Layer {
                digest: l.layer.digest.clone(),
                mounted_unix_nano: unix_nanos(l.mounted_at),
                manifest: l.layer.manifest.clone().unwrap_or_default(),
                learning: l.handle.recorder().is_some(),
            })
            .collect();
        Ok(Response::new(api::LayersResponse { layers }))
    }

    #[instrument(skip_all, fields(ns, id, function))]
    async fn ready(
        &self,
        req: Request<api::ReadyRequest>,
    ) -> std::result::Result<Response<api::ReadyResponse>, Status> {
        let req = req.into_inner();
        let span = tracing::Span::current();
        span.record("ns", req.namespace.as_str());
        span.record("id", req.container_id.as_str());
        span.record("function", req.function.as_str());
        let sets = self.remote.sets();
        sets.ready.fetch_add(1, Ordering::Relaxed);
        for p in &req.phases {
            if p.end_unix_nano >= p.start_unix_nano {
                sets.phase(&p.name, (p.end_unix_nano - p.start_unix_nano) as f64 / 1e9);
            }
        }
        let layers = layers_of(&self.remote, &req.rootfs);
        let manifest = if !req.manifest.is_empty() {
            arbor_format::Digest::parse(&req.manifest)
                .map_err(|_| Status::invalid_argument("manifest is not a sha256 digest"))?;
            Some(req.manifest.clone())
        } else {
            layers.iter().find_map(|l| l.layer.manifest.clone())
        };
        let (Some(manifest), true) = (manifest, self.remote.options().learn.enabled) else {
            info!(
                layers = layers.len(),
                "start reported ready; nothing to learn (no lazy layer with a known image)"
            );
            return Ok(Response::new(api::ReadyResponse::default()));
        };
        let started = from_nanos(req.started_unix_nano);
        let ready = from_nanos(req.ready_unix_nano);
        if req.ready_unix_nano < req.started_unix_nano || req.started_unix_nano <= 0 {
            return Err(Status::invalid_argument(
                "ready_unix_nano must follow started_unix_nano",
            ));
        }
        let chunks = layers
            .iter()
            .filter_map(|l| l.handle.recorder())
            .map(|r| r.reads_between(started, SystemTime::now()).len() as u64)
            .sum();
        let grace = self.remote.options().learn.grace;
        let until = ready + grace;
        let function = (!req.function.is_empty()).then(|| req.function.clone());
        let remote = Arc::clone(&self.remote);
        let m = manifest.clone();
        tokio::spawn(async move {
            if let Ok(wait) = until.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            let Some(set) = learn_set(&layers, &m, function, started, ready, until) else {
                info!(manifest = %m, "nothing read on fresh layers during this start: no set learned");
                return;
            };
            let (n, nl) = (set.chunk_count(), set.layers.len());
            let r2 = Arc::clone(&remote);
            match tokio::task::spawn_blocking(move || r2.sets().put(set)).await {
                Ok(Ok(_)) => {
                    remote.sets().learned.fetch_add(1, Ordering::Relaxed);
                    info!(manifest = %m, chunks = n, layers = nl, "start-up set learned");
                }
                Ok(Err(e)) => {
                    warn!(manifest = %m, error = %e, "cannot keep the learned start-up set")
                }
                Err(e) => warn!(manifest = %m, error = %e, "learning task failed"),
            }
        });
        Ok(Response::new(api::ReadyResponse { manifest, chunks }))
    }

    #[instrument(skip_all)]
    async fn get_startup_set(
        &self,
        req: Request<api::GetStartupSetRequest>,
    ) -> std::result::Result<Response<api::GetStartupSetResponse>, Status> {
        let m = req.into_inner().manifest;
        let set = self
            .remote
            .sets()
            .get(&m)
            .map(|s| s.to_json())
            .unwrap_or_default();
        Ok(Response::new(api::GetStartupSetResponse { set }))
    }

    #[instrument(skip_all, fields(source))]
    async fn put_startup_set(
        &self,
        req: Request<api::PutStartupSetRequest>,
    ) -> std::result::Result<Response<api::PutStartupSetResponse>, Status> {
        let req = req.into_inner();
        tracing::Span::current().record("source", req.source.as_str());
        let set = match StartupSet::parse(&req.set) {
            Ok(s) => s,
            Err(e) => {
                self.remote.sets().ignored("bad_document", 1);
                warn!(error = %e, "start-up set refused");
                return Err(Status::invalid_argument(e.to_string()));
            }
        };
        let (manifest, chunks) = (set.manifest.clone(), set.chunk_count() as u64);
        let r = Arc::clone(&self.remote);
        tokio::task::spawn_blocking(move || r.sets().put(set))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::from)?;
        self.remote.sets().imported.fetch_add(1, Ordering::Relaxed);
        info!(manifest = %manifest, chunks, source = %req.source, "start-up set received");
        self.remote.apply_set(&manifest);
        Ok(Response::new(api::PutStartupSetResponse {
            manifest,
            chunks,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_dirs_of_overlay_and_bind() {
        let overlay = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                "workdir=/r/snapshots/9/work".into(),
                "upperdir=/r/snapshots/9/fs".into(),
                "lowerdir=/r/snapshots/8/fs:/r/snapshots/7/fs".into(),
            ],
        };
        assert_eq!(
            rootfs_dirs(&[overlay]),
            vec![
                PathBuf::from("/r/snapshots/8/fs"),
                PathBuf::from("/r/snapshots/7/fs")
            ]
        );
        let bind = Mount {
            r#type: "bind".into(),
            source: "/r/snapshots/3/fs".into(),
            target: String::new(),
            options: vec!["ro".into(), "rbind".into()],
        };
        assert_eq!(
            rootfs_dirs(&[bind]),
            vec![PathBuf::from("/r/snapshots/3/fs")]
        );
        let tmpfs = Mount {
            r#type: "tmpfs".into(),
            source: "tmpfs".into(),
            target: String::new(),
            options: vec![],
        };
        assert!(rootfs_dirs(&[tmpfs]).is_empty());
    }

    #[test]
    fn the_store_keeps_sets_and_drops_bad_files() {
        let d = tempfile::tempdir().unwrap();
        let store = SetStore::open(d.path()).unwrap();
        let m = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        assert!(store.get(m).is_none());
        let mut set = StartupSet {
            schema_version: SCHEMA_VERSION,
            manifest: m.into(),
            function: None,
            learned: String::new(),
            ready_ms: None,
            layers: vec![m.into()],
            reads: vec![],
        };
        set.push(0, "a", 0);
        store.put(set.clone()).unwrap();
        // Read back from disk by a new store.
        let again = SetStore::open(d.path()).unwrap();
        assert_eq!(*again.get(m).unwrap(), set);
        // A file damaged on disk is ignored and removed.
        let p = store.path(m).unwrap();
        std::fs::write(&p, b"{not json").unwrap();
        let third = SetStore::open(d.path()).unwrap();
        assert!(third.get(m).is_none());
        assert!(!p.exists());
        assert!(
            third
                .render_metrics()
                .contains("reason=\"bad_document\"} 1")
        );
        // A set filed under another manifest's name is not used for it.
        let other = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
        std::fs::write(store.path(other).unwrap(), set.to_json()).unwrap();
        assert!(third.get(other).is_none());
    }
}
