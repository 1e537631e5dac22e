//! Snapshot semantics, as containerd's overlayfs snapshotter has them, plus remote layers.
//!
//! Every snapshot has a directory `<root>/snapshots/<id>` with `fs` (its contents: the upper
//! directory of an active snapshot, the layer of a committed one) and `work` (overlayfs'
//! workdir). Mounts stack the `fs` directories of the parent chain as overlay lower dirs.
//! A committed *remote* snapshot's `fs` is a FUSE mount of the layer's blob, so its children
//! stack on it like on any other layer.
//!
//! `Prepare` with `containerd.io/snapshot.ref` and Arbor's layer labels mounts the layer lazily,
//! commits it under the target name and answers `AlreadyExists`, which tells containerd's
//! unpacker to skip download and apply. When that fails for any reason (no labels, registry
//! down, corrupt TOC) the snapshot is prepared as an ordinary one and containerd unpacks the
//! layer itself; the fallback is logged and counted.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arbor_proto::Mount;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::filter::Filters;
use crate::labels::{self, NotRemote};
use crate::meta::{Kind, Meta, Record, RemoteLayer, Usage, now_nanos};
use crate::remote::{Remote, detach, index_usage};

/// Counters of what the snapshotter did (rendered as Prometheus text by [`Snapshotter::render_metrics`]).
#[derive(Default)]
pub struct Counters {
    pub remote_mounts: AtomicU64,
    pub restored: AtomicU64,
    pub restore_failures: AtomicU64,
    fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    ops: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Counters {
    fn fallback(&self, reason: &'static str) {
        *self
            .fallbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Counts one gRPC operation and its outcome (`ok` or a gRPC code name).
    pub fn op(&self, op: &'static str, outcome: &'static str) {
        *self
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((op, outcome))
            .or_default() += 1;
    }

    /// Layers that could not be mounted lazily, by reason.
    pub fn fallbacks(&self, reason: &str) -> u64 {
        self.fallbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(reason)
            .copied()
            .unwrap_or(0)
    }
}

/// The snapshotter.
pub struct Snapshotter {
    root: PathBuf,
    meta: Arc<Meta>,
    remote: Arc<Remote>,
    counters: Arc<Counters>,
    /// Serialises remote prepares of one target (chain ID).
    targets: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("worker thread: {e}")))?
}

impl Snapshotter {
    /// Opens the snapshotter rooted at `root` (metadata in `<root>/metadata.redb`).
    pub fn open(root: &Path, remote: Arc<Remote>) -> Result<Snapshotter> {
        let snaps = root.join("snapshots");
        std::fs::create_dir_all(&snaps)
            .map_err(Error::io(format!("creating {}", snaps.display())))?;
        let meta = Meta::open(&root.join("metadata.redb"))?;
        Ok(Snapshotter {
            root: root.to_path_buf(),
            meta: Arc::new(meta),
            remote,
            counters: Arc::new(Counters::default()),
            targets: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    pub fn remote(&self) -> &Arc<Remote> {
        &self.remote
    }

    fn dir(root: &Path, id: u64) -> PathBuf {
        root.join("snapshots").join(id.to_string())
    }

    /// Mounts every committed remote layer again (daemon start), from the TOCs kept on disk,
    /// without contacting the registry. A layer whose TOC copy is missing or unreadable is
    /// retried from the registry in the background.
    pub async fn restore(self: &Arc<Self>) -> Result<usize> {
        let meta = Arc::clone(&self.meta);
        let all = blocking(move || meta.list()).await?;
        let mut n = 0;
        for (name, rec) in all {
            let Some(layer) = rec.remote.clone() else {
                continue;
            };
            let dir = Self::dir(&self.root, rec.id).join("fs");
            match self.remote.stored_index(&layer).await {
                Ok(index) => match self.mount_blocking(rec.id, layer, index, dir).await {
                    Ok(()) => {
                        n += 1;
                        self.counters.restored.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.counters
                            .restore_failures
                            .fetch_add(1, Ordering::Relaxed);
                        warn!(snapshot = %name, error = %e, "restoring the mount failed");
                    }
                },
                Err(e) => {
                    warn!(snapshot = %name, error = %e, "kept TOC unusable; refetching it in the background");
                    let me = Arc::clone(self);
                    tokio::spawn(async move {
                        let r = match me.remote.fetch_index(&layer).await {
                            Ok(index) => me.mount_blocking(rec.id, layer, index, dir).await,
                            Err(e) => Err(e),
                        };
                        match r {
                            Ok(()) => {
                                me.counters.restored.fetch_add(1, Ordering::Relaxed);
                                info!(snapshot = %name, "mount restored from the registry");
                            }
                            Err(e) => {
                                me.counters.restore_failures.fetch_add(1, Ordering::Relaxed);
                                warn!(snapshot = %name, error = %e, "restoring the mount failed");
                            }
                        }
                    });
                }
            }
        }
        Ok(n)
    }

    async fn mount_blocking(
        &self,
        id: u64,
        layer: RemoteLayer,
        index: Arc<arbor_format::index::LayerIndex>,
        dir: PathBuf,
    ) -> Result<()> {
        let remote = Arc::clone(&self.remote);
        blocking(move || remote.mount(id, &layer, index, &dir)).await
    }

    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let Some(target) = labels.get(labels::TARGET).cloned() {
            match labels::remote_layer(&labels) {
                Ok(layer) => match self.prepare_remote(&target, parent, &labels, layer).await {
                    Ok(()) => return Err(Error::AlreadyExists(target)),
                    Err(Error::AlreadyExists(t)) => return Err(Error::AlreadyExists(t)),
                    Err(e) => {
                        self.counters.fallback("mount_failed");
                        warn!(key, target = %target, error = %e,
                            "lazy mount failed; falling back to an ordinary snapshot (containerd unpacks the layer)");
                    }
                },
                Err(NotRemote::Plain) => {
                    debug!(key, target = %target, "plain layer: ordinary snapshot");
                }
                Err(e) => {
                    self.counters.fallback(e.reason());
                    warn!(key, target = %target, error = %e,
                        "converted layer not mounted lazily; falling back to an ordinary snapshot");
                }
            }
        }
        self.create(key, parent, Kind::Active, labels).await
    }

    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(key, parent, Kind::View, labels).await
    }

    async fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let (meta, root, key, parent) = (
            Arc::clone(&self.meta),
            self.root.clone(),
            key.to_string(),
            parent.to_string(),
        );
        blocking(move || {
            if meta.get(&key)?.is_some() {
                return Err(Error::AlreadyExists(key));
            }
            let id = meta.next_id()?;
            let dir = Self::dir(&root, id);
            for sub in ["fs", "work"] {
                std::fs::create_dir_all(dir.join(sub))
                    .map_err(Error::io(format!("creating {}", dir.display())))?;
            }
            let now = now_nanos();
            let rec = Record {
                id,
                kind,
                parent,
                labels,
                created: now,
                updated: now,
                usage: None,
                remote: None,
            };
            if let Err(e) = meta.create(&key, &rec) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            Self::mounts_of(&meta, &root, &rec)
        })
        .await
    }

    async fn prepare_remote(
        &self,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        layer: RemoteLayer,
    ) -> Result<()> {
        let lock = {
            let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(t.entry(target.to_string()).or_default())
        };
        let _guard = lock.lock().await;
        let result = self
            .prepare_remote_locked(target, parent, labels, layer)
            .await;
        // Drop the per-target lock entry when nobody else waits on it.
        let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&lock) <= 2 {
            t.remove(target);
        }
        result
    }

    async fn prepare_remote_locked(
        &self,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        layer: RemoteLayer,
    ) -> Result<()> {
        let meta = Arc::clone(&self.meta);
        let t = target.to_string();
        if let Some(existing) = blocking(move || meta.get(&t)).await? {
            if existing.kind == Kind::Committed {
                return Err(Error::AlreadyExists(target.into()));
            }
        }
        let index = self.remote.fetch_index(&layer).await?;
        let usage = index_usage(&index);
        let meta = Arc::clone(&self.meta);
        let id = blocking(move || meta.next_id()).await?;
        let dir = Self::dir(&self.root, id);
        self.mount_blocking(id, layer.clone(), index, dir.join("fs"))
            .await?;
        let mut labels = labels.clone();
        labels.insert(labels::REMOTE.into(), "true".into());
        let now = now_nanos();
        let rec = Record {
            id,
            kind: Kind::Committed,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            usage: Some(usage),
            remote: Some(layer.clone()),
        };
        let (meta, remote, t) = (
            Arc::clone(&self.meta),
            Arc::clone(&self.remote),
            target.to_string(),
        );
        blocking(move || {
            if let Err(e) = meta.create(&t, &rec) {
                remote.unmount(id);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            Ok(())
        })
        .await?;
        self.counters.remote_mounts.fetch_add(1, Ordering::Relaxed);
        info!(target, layer = %layer.digest, image = %layer.image_ref, id, "layer mounted lazily");
        Ok(())
    }

    fn mounts_of(meta: &Meta, root: &Path, rec: &Record) -> Result<Vec<Mount>> {
        let fs = |id: u64| Self::dir(root, id).join("fs").display().to_string();
        let parents = meta.ancestors(&rec.parent)?;
        let bind = |src: String, rw: bool| Mount {
            r#type: "bind".into(),
            source: src,
            target: String::new(),
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        };
        if parents.is_empty() {
            return Ok(vec![bind(fs(rec.id), rec.kind == Kind::Active)]);
        }
        if rec.kind == Kind::View && parents.len() == 1 {
            return Ok(vec![bind(fs(parents[0].1.id), false)]);
        }
        let lower = parents
            .iter()
            .map(|(_, p)| fs(p.id))
            .collect::<Vec<_>>()
            .join(":");
        let mut options = vec!["index=off".to_string()];
        if rec.kind == Kind::Active {
            let dir = Self::dir(root, rec.id);
            options.push(format!("workdir={}", dir.join("work").display()));
            options.push(format!("upperdir={}", dir.join("fs").display()));
        } else {
            options.push("ro".into());
        }
        options.push(format!("lowerdir={lower}"));
        Ok(vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }])
    }

    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let (meta, root, key) = (Arc::clone(&self.meta), self.root.clone(), key.to_string());
        blocking(move || {
            let rec = meta
                .get(&key)?
                .ok_or_else(|| Error::NotFound(key.clone()))?;
            if rec.kind == Kind::Committed {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is committed; mount a view or an active child of it"
                )));
            }
            Self::mounts_of(&meta, &root, &rec)
        })
        .await
    }

    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let (meta, root, name, key) = (
            Arc::clone(&self.meta),
            self.root.clone(),
            name.to_string(),
            key.to_string(),
        );
        blocking(move || {
            let rec = meta
                .get(&key)?
                .ok_or_else(|| Error::NotFound(key.clone()))?;
            let usage = disk_usage(&Self::dir(&root, rec.id).join("fs"))?;
            meta.commit(&name, &key, labels, usage)?;
            Ok(())
        })
        .await
    }

    pub async fn remove(&self, key: &str) -> Result<()> {
        let (meta, root, remote, key) = (
            Arc::clone(&self.meta),
            self.root.clone(),
            Arc::clone(&self.remote),
            key.to_string(),
        );
        blocking(move || {
            let rec = meta.remove(&key)?;
            if rec.remote.is_some() {
                remote.unmount(rec.id);
            }
            let dir = Self::dir(&root, rec.id);
            if let Err(e) = remove_snapshot_dir(&dir) {
                // The record is gone; Cleanup retries the directory.
                warn!(key, dir = %dir.display(), error = %e, "removing the snapshot directory failed");
            }
            Ok(())
        })
        .await
    }

    pub async fn stat(&self, key: &str) -> Result<Record> {
        let (meta, key) = (Arc::clone(&self.meta), key.to_string());
        blocking(move || meta.get(&key)?.ok_or(Error::NotFound(key))).await
    }

    /// Updates labels: `paths` empty or `labels` replaces them all, `labels.<k>` sets or
    /// deletes one. Other fields are immutable.
    pub async fn update(
        &self,
        key: &str,
        new_labels: BTreeMap<String, String>,
        paths: Vec<String>,
    ) -> Result<Record> {
        for p in &paths {
            if p != "labels" && !p.starts_with("labels.") {
                return Err(Error::InvalidArgument(format!(
                    "cannot update field {p:?} of a snapshot (only labels)"
                )));
            }
        }
        let (meta, key) = (Arc::clone(&self.meta), key.to_string());
        blocking(move || {
            meta.update_labels(&key, |labels| {
                if paths.is_empty() || paths.iter().any(|p| p == "labels") {
                    *labels = new_labels;
                    return;
                }
                for p in &paths {
                    let k = &p["labels.".len()..];
                    match new_labels.get(k) {
                        Some(v) => {
                            labels.insert(k.to_string(), v.clone());
                        }
                        None => {
                            labels.remove(k);
                        }
                    }
                }
            })
        })
        .await
    }

    pub async fn usage(&self, key: &str) -> Result<Usage> {
        let (meta, root, key) = (Arc::clone(&self.meta), self.root.clone(), key.to_string());
        blocking(move || {
            let rec = meta
                .get(&key)?
                .ok_or_else(|| Error::NotFound(key.clone()))?;
            match (rec.kind, rec.usage) {
                (Kind::Committed, Some(u)) => Ok(u),
                _ => disk_usage(&Self::dir(&root, rec.id).join("fs")),
            }
        })
        .await
    }

    pub async fn list(&self, filters: &[String]) -> Result<Vec<(String, Record)>> {
        let f = Filters::parse(filters)?;
        let meta = Arc::clone(&self.meta);
        let all = blocking(move || meta.list()).await?;
        Ok(all.into_iter().filter(|(k, r)| f.matches(k, r)).collect())
    }

    /// Removes snapshot directories no record refers to (left by crashes or failed removals).
    pub async fn cleanup(&self) -> Result<usize> {
        let (meta, root, remote) = (
            Arc::clone(&self.meta),
            self.root.clone(),
            Arc::clone(&self.remote),
        );
        blocking(move || {
            let ids: std::collections::HashSet<u64> =
                meta.list()?.into_iter().map(|(_, r)| r.id).collect();
            let snaps = root.join("snapshots");
            let mut n = 0;
            let rd = std::fs::read_dir(&snaps)
                .map_err(Error::io(format!("reading {}", snaps.display())))?;
            for e in rd.flatten() {
                let name = e.file_name();
                let id = name.to_str().and_then(|s| s.parse::<u64>().ok());
                if id.is_some_and(|id| ids.contains(&id) || remote.is_mounted(id)) {
                    continue;
                }
                match remove_snapshot_dir(&e.path()) {
                    Ok(()) => n += 1,
                    Err(err) => warn!(dir = %e.path().display(), error = %err, "cleanup failed"),
                }
            }
            Ok(n)
        })
        .await
    }

    /// Prometheus text for the snapshotter's own counters.
    pub fn render_metrics(&self) -> String {
        let c = &self.counters;
        let mut s = String::new();
        s.push_str("# HELP arbor_snapshotter_remote_mounts_total Layers mounted lazily on Prepare.\n# TYPE arbor_snapshotter_remote_mounts_total counter\n");
        s.push_str(&format!(
            "arbor_snapshotter_remote_mounts_total {}\n",
            c.remote_mounts.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP arbor_snapshotter_restored_total Lazy mounts restored at daemon start.\n# TYPE arbor_snapshotter_restored_total counter\n");
        s.push_str(&format!(
            "arbor_snapshotter_restored_total {}\n",
            c.restored.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP arbor_snapshotter_restore_failures_total Lazy mounts that could not be restored.\n# TYPE arbor_snapshotter_restore_failures_total counter\n");
        s.push_str(&format!(
            "arbor_snapshotter_restore_failures_total {}\n",
            c.restore_failures.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP arbor_snapshotter_fallbacks_total Converted layers prepared as ordinary snapshots instead (containerd pulls them), by reason.\n# TYPE arbor_snapshotter_fallbacks_total counter\n");
        for reason in ["mount_failed", "no_source", "bad_annotations"] {
            s.push_str(&format!(
                "arbor_snapshotter_fallbacks_total{{reason=\"{reason}\"}} {}\n",
                c.fallbacks(reason)
            ));
        }
        s.push_str("# HELP arbor_snapshotter_requests_total Snapshots API requests by method and outcome.\n# TYPE arbor_snapshotter_requests_total counter\n");
        for ((op, outcome), n) in c.ops.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            s.push_str(&format!(
                "arbor_snapshotter_requests_total{{method=\"{op}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        s.push_str("# HELP arbor_snapshotter_mounted_layers Layers mounted lazily now.\n# TYPE arbor_snapshotter_mounted_layers gauge\n");
        s.push_str(&format!(
            "arbor_snapshotter_mounted_layers {}\n",
            self.remote.mounted()
        ));
        s
    }
}

/// Removes a snapshot directory, first detaching anything still mounted below it.
fn remove_snapshot_dir(dir: &Path) -> std::io::Result<()> {
    let fs = dir.join("fs");
    if arbor_lazyfs::overlay::is_mounted(&fs) {
        detach(&fs);
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Bytes (allocated) and inodes below `dir`, hard links counted once, not crossing mounts.
fn disk_usage(dir: &Path) -> Result<Usage> {
    use std::os::unix::fs::MetadataExt;
    let top =
        std::fs::symlink_metadata(dir).map_err(Error::io(format!("stat {}", dir.display())))?;
    let dev = top.dev();
    let mut seen = std::collections::HashSet::new();
    let mut u = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) => return Err(Error::io(format!("reading {}", d.display()))(e)),
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev || !seen.insert(m.ino()) {
                continue;
            }
            u.inodes += 1;
            u.size += (m.blocks() * 512) as i64;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(u)
}
