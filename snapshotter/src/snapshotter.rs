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

use std::collections::{BTreeMap, HashMap, HashSet};
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
use tracing::Instrument;

mod share;
mod verify;
pub use verify::VERIFIED;

/// Counters of what the snapshotter did (rendered as Prometheus text by [`Snapshotter::render_metrics`]).
#[derive(Default)]
pub struct Counters {
    pub remote_mounts: AtomicU64,
    pub restored: AtomicU64,
    pub restore_failures: AtomicU64,
    fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    ops: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    verifications: Mutex<BTreeMap<verify::Outcome, u64>>,
}

impl Counters {
    fn verification(&self, outcome: verify::Outcome) {
        *self
            .verifications
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(outcome)
            .or_default() += 1;
    }

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
    /// What may name a lazy layer's source.
    trust: labels::Trust,
    /// Proofs of lazy layers running now, by snapshot name.
    proofs: Mutex<HashMap<String, Arc<verify::Proof>>>,
    /// Unproved lazy snapshots whose `Stat`s are answered at once until then (see `share`).
    graces: Mutex<HashMap<String, std::time::Instant>>,
    /// Ids whose directory may exist before their record: reserved by a Prepare/View that
    /// has not finished. Cleanup holds this lock while it decides what is orphaned, so it
    /// never removes the directory of a snapshot about to be recorded (containerd's
    /// overlayfs snapshotter gets the same from doing both in one metadata transaction).
    in_flight: Arc<Mutex<HashSet<u64>>>,
    #[cfg(test)]
    pub(crate) after_dirs: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Removes a reserved id from the in-flight set when dropped (after the record is written
/// or the directory removed).
struct InFlight {
    set: Arc<Mutex<HashSet<u64>>>,
    id: u64,
}

impl InFlight {
    fn new(set: &Arc<Mutex<HashSet<u64>>>, id: u64) -> InFlight {
        set.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        InFlight {
            set: Arc::clone(set),
            id,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
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
        let pull_key = labels::ensure_pull_key(root).map_err(Error::io(format!(
            "creating the pull key {}",
            root.join(labels::PULL_KEY_FILE).display()
        )))?;
        let o = remote.options();
        let trust = labels::Trust {
            pull_key: Some(pull_key),
            cri_labels: o.trust_cri_labels,
            allow: o.allow_registries.clone(),
        };
        Ok(Snapshotter {
            root: root.to_path_buf(),
            meta: Arc::new(meta),
            remote,
            counters: Arc::new(Counters::default()),
            targets: Mutex::new(HashMap::new()),
            trust,
            proofs: Mutex::new(HashMap::new()),
            graces: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
            #[cfg(test)]
            after_dirs: None,
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
            if rec.labels.get(VERIFIED).map(String::as_str) == Some("false") {
                warn!(snapshot = %name, "not mounting a lazy layer that lied (remove its image)");
                continue;
            }
            let dir = Self::dir(&self.root, rec.id).join("fs");
            match self.remote.stored_index(&layer).await {
                Ok(index) => match self.mount_blocking(rec.id, layer.clone(), index, dir).await {
                    Ok(()) => {
                        n += 1;
                        self.counters.restored.fetch_add(1, Ordering::Relaxed);
                        if rec.labels.get(VERIFIED).map(String::as_str) != Some("true") {
                            self.spawn_verification(
                                name.clone(),
                                rec.id,
                                rec.parent.clone(),
                                layer,
                            );
                        }
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
        self: &Arc<Self>,
        key: &str,
        parent: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.drop_own_labels(key, &mut labels);
        if let Some(target) = labels.get(labels::TARGET).cloned() {
            let remote = labels::remote_layer(&labels, &self.trust);
            // The blob this Prepare is for, as far as it says: what decides whether a lazy
            // layer already committed under the target may be shared with it (see `share`).
            let claim = match &remote {
                Ok(l) => Some(l.digest.clone()),
                Err(_) => labels
                    .get(labels::CRI_LAYER_DIGEST)
                    .or_else(|| labels.get(labels::ARBOR_LAYER_DIGEST))
                    .cloned(),
            };
            if self.settle_existing(&target, claim.as_deref()).await? {
                return Err(Error::AlreadyExists(target));
            }
            match remote {
                Ok(layer) => match self
                    .prepare_remote_detached(&target, parent, &labels, layer)
                    .await
                {
                    Ok(()) => {
                        self.verify_committed(&target).await;
                        return Err(Error::AlreadyExists(target));
                    }
                    Err(Error::AlreadyExists(t)) => return Err(Error::AlreadyExists(t)),
                    // Another image committed the target meanwhile and it may not be shared:
                    // an ordinary snapshot would be committed over it (and share it) too.
                    Err(e @ (Error::Unavailable(_) | Error::FailedPrecondition(_))) => {
                        return Err(e);
                    }
                    Err(e @ Error::Timeout(_)) => {
                        self.counters.fallback("toc_timeout");
                        warn!(key, target = %target, error = %e,
                            "reading the TOC took too long; falling back to an ordinary snapshot (containerd unpacks the layer)");
                    }
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

    /// Drops labels only arbord sets (`labels::OWN`) from a client's request.
    fn drop_own_labels(&self, key: &str, labels: &mut BTreeMap<String, String>) {
        let dropped = labels::strip_own(labels);
        if !dropped.is_empty() {
            warn!(key, ?dropped, "ignoring labels only arbord may set");
        }
    }

    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        mut labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.drop_own_labels(key, &mut labels);
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
        let in_flight = Arc::clone(&self.in_flight);
        #[cfg(test)]
        let hook = self.after_dirs.clone();
        blocking(move || {
            if meta.get(&key)?.is_some() {
                return Err(Error::AlreadyExists(key));
            }
            let id = meta.next_id()?;
            let _in_flight = InFlight::new(&in_flight, id);
            let dir = Self::dir(&root, id);
            for sub in ["fs", "work"] {
                if let Err(e) = std::fs::create_dir_all(dir.join(sub)) {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(Error::io(format!("creating {}", dir.display()))(e));
                }
            }
            #[cfg(test)]
            if let Some(h) = hook {
                h();
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

    /// Runs the remote prepare in its own task, so that it finishes (mounted and recorded, or
    /// undone) even when containerd's request is cancelled (tonic then drops this future):
    /// a half-done prepare would leave a FUSE mount no record owns.
    async fn prepare_remote_detached(
        self: &Arc<Self>,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        layer: RemoteLayer,
    ) -> Result<()> {
        let (me, target, parent, labels) = (
            Arc::clone(self),
            target.to_string(),
            parent.to_string(),
            labels.clone(),
        );
        let span = tracing::Span::current();
        tokio::spawn(
            async move { me.prepare_remote(&target, &parent, &labels, layer).await }
                .instrument(span),
        )
        .await
        .map_err(|e| Error::Internal(format!("remote prepare task: {e}")))?
    }

    async fn prepare_remote(
        &self,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        layer: RemoteLayer,
    ) -> Result<()> {
        // One deadline for waiting on another prepare of the layer and reading its TOC; the
        // mount and record after it are local and always finish.
        let deadline = tokio::time::Instant::now() + self.remote.options().toc_timeout;
        let lock = {
            let mut t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(t.entry(target.to_string()).or_default())
        };
        let result = match tokio::time::timeout_at(deadline, lock.lock()).await {
            Ok(_guard) => {
                self.prepare_remote_locked(target, parent, labels, layer, deadline)
                    .await
            }
            Err(_) => Err(Error::Timeout(format!(
                "another prepare of {target} did not finish within {:?}",
                self.remote.options().toc_timeout
            ))),
        };
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
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        let meta = Arc::clone(&self.meta);
        let t = target.to_string();
        if let Some(existing) = blocking(move || meta.get(&t)).await? {
            if existing.kind == Kind::Committed {
                // Committed by another Prepare since `settle_existing` looked.
                let claim = Some(layer.digest.as_str());
                return match share::sharing(&existing, claim, self.remote.options().verify_layers) {
                    share::Sharing::Share => Err(Error::AlreadyExists(target.into())),
                    _ => Err(Error::Unavailable(format!(
                        "another image committed a different, unproved layer under chain ID \
                         {target} at the same time; retry"
                    ))),
                };
            }
        }
        self.remote.read_tocs_ahead(&layer);
        let index = match tokio::time::timeout_at(deadline, self.remote.fetch_index(&layer)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "reading the TOC of {} from {} took longer than {:?}",
                    layer.digest,
                    layer.image_ref,
                    self.remote.options().toc_timeout
                )));
            }
        };
        let usage = index_usage(&index);
        let meta = Arc::clone(&self.meta);
        let id = blocking(move || meta.next_id()).await?;
        let in_flight = InFlight::new(&self.in_flight, id);
        let dir = Self::dir(&self.root, id);
        if let Err(e) = self
            .mount_blocking(id, layer.clone(), index, dir.join("fs"))
            .await
        {
            let (remote, d) = (Arc::clone(&self.remote), dir.clone());
            let _ = blocking(move || {
                remote.unmount(id);
                let _ = remove_snapshot_dir(&d);
                Ok(())
            })
            .await;
            return Err(e);
        }
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
                let _ = remove_snapshot_dir(&dir);
                return Err(e);
            }
            Ok(())
        })
        .await?;
        drop(in_flight);
        self.grant_stat_grace(target);
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
        mut labels: BTreeMap<String, String>,
    ) -> Result<()> {
        self.drop_own_labels(name, &mut labels);
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

    /// The record of `key` as it is now.
    pub async fn record_of(&self, key: &str) -> Result<Record> {
        let (meta, k) = (Arc::clone(&self.meta), key.to_string());
        blocking(move || meta.get(&k)?.ok_or(Error::NotFound(k))).await
    }

    /// The record of `key`; for a lazy layer not proved yet, asked for past its grace, once
    /// its proof has a verdict (see `share::settle_stat`).
    pub async fn stat(self: &Arc<Self>, key: &str) -> Result<Record> {
        let rec = self.record_of(key).await?;
        self.settle_stat(key, rec).await
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
                // Labels only arbord sets keep their values whatever the update says.
                let own: Vec<(&str, Option<String>)> = labels::OWN
                    .into_iter()
                    .map(|k| (k, labels.get(k).cloned()))
                    .collect();
                if paths.is_empty() || paths.iter().any(|p| p == "labels") {
                    *labels = new_labels;
                } else {
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
                }
                for (k, v) in own {
                    match v {
                        Some(v) => labels.insert(k.to_string(), v),
                        None => labels.remove(k),
                    };
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

    /// Removes snapshot directories no record refers to (left by crashes or failed removals),
    /// and kept TOCs of layers no snapshot uses (older than [`TOC_MIN_AGE`]).
    pub async fn cleanup(&self) -> Result<usize> {
        let (meta, root, remote) = (
            Arc::clone(&self.meta),
            self.root.clone(),
            Arc::clone(&self.remote),
        );
        let in_flight = Arc::clone(&self.in_flight);
        blocking(move || {
            // Held until the scan is done: an id leaves the set only after its record is
            // written, so every directory is either in flight or recorded when looked at.
            let in_flight = in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let records = meta.list()?;
            let ids: std::collections::HashSet<u64> = records.iter().map(|(_, r)| r.id).collect();
            // TOCs of layers no snapshot refers to any more.
            let layers: std::collections::HashSet<String> = records
                .iter()
                .filter_map(|(_, r)| r.remote.as_ref())
                .filter_map(|l| arbor_format::Digest::parse(&l.digest).ok())
                .map(|d| d.hex())
                .collect();
            let tocs = remote.prune_tocs(&layers, TOC_MIN_AGE);
            if tocs > 0 {
                info!(tocs, "deleted the kept TOCs of layers no snapshot uses");
            }
            let snaps = root.join("snapshots");
            let mut n = 0;
            let rd = std::fs::read_dir(&snaps)
                .map_err(Error::io(format!("reading {}", snaps.display())))?;
            for e in rd.flatten() {
                let name = e.file_name();
                let id = name.to_str().and_then(|s| s.parse::<u64>().ok());
                if id.is_some_and(|id| {
                    ids.contains(&id) || in_flight.contains(&id) || remote.is_mounted(id)
                }) {
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
        s.push_str("# HELP arbor_snapshotter_adopted_total Lazy mounts restored by adopting the FUSE connection a predecessor left in the fd holder (still mounted, never remounted).\n# TYPE arbor_snapshotter_adopted_total counter\n");
        s.push_str(&format!(
            "arbor_snapshotter_adopted_total {}\n",
            self.remote.adopted()
        ));
        s.push_str("# HELP arbor_snapshotter_tocs_read_ahead_total Lazy Prepares whose TOC was read ahead, with the other layers of the image, when the image's first layer was prepared.\n# TYPE arbor_snapshotter_tocs_read_ahead_total counter\n");
        s.push_str(&format!(
            "arbor_snapshotter_tocs_read_ahead_total {}\n",
            self.remote.tocs_read_ahead()
        ));
        s.push_str("# HELP arbor_snapshotter_restore_failures_total Lazy mounts that could not be restored.\n# TYPE arbor_snapshotter_restore_failures_total counter\n");
        s.push_str(&format!(
            "arbor_snapshotter_restore_failures_total {}\n",
            c.restore_failures.load(Ordering::Relaxed)
        ));
        s.push_str("# HELP arbor_snapshotter_fallbacks_total Converted layers prepared as ordinary snapshots instead (containerd pulls them), by reason.\n# TYPE arbor_snapshotter_fallbacks_total counter\n");
        for reason in [
            "mount_failed",
            "no_source",
            "bad_annotations",
            "unauthenticated",
            "registry_not_allowed",
            "toc_timeout",
        ] {
            s.push_str(&format!(
                "arbor_snapshotter_fallbacks_total{{reason=\"{reason}\"}} {}\n",
                c.fallbacks(reason)
            ));
        }
        s.push_str("# HELP arbor_snapshotter_layer_verifications_total Lazily mounted layers read through in the background and compared with their digest, diff ID and TOC, by result (lied: taken out of service).\n# TYPE arbor_snapshotter_layer_verifications_total counter\n");
        {
            let v = c.verifications.lock().unwrap_or_else(|p| p.into_inner());
            for o in [
                verify::Outcome::Proved,
                verify::Outcome::Lied,
                verify::Outcome::Failed,
            ] {
                s.push_str(&format!(
                    "arbor_snapshotter_layer_verifications_total{{result=\"{}\"}} {}\n",
                    o.label(),
                    v.get(&o).copied().unwrap_or(0)
                ));
            }
        }
        s.push_str("# HELP arbor_snapshotter_requests_total Snapshots API requests by method and outcome.\n# TYPE arbor_snapshotter_requests_total counter\n");
        for ((op, outcome), n) in c.ops.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            s.push_str(&format!(
                "arbor_snapshotter_requests_total{{method=\"{op}\",outcome=\"{outcome}\"}} {n}\n"
            ));
        }
        s.push_str("# HELP arbor_snapshotter_unreadable_records Snapshot records in metadata.redb that cannot be decoded (skipped; logged).\n# TYPE arbor_snapshotter_unreadable_records gauge\n");
        s.push_str(&format!(
            "arbor_snapshotter_unreadable_records {}\n",
            self.meta.unreadable().len()
        ));
        s.push_str("# HELP arbor_snapshotter_mounted_layers Layers mounted lazily now.\n# TYPE arbor_snapshotter_mounted_layers gauge\n");
        s.push_str(&format!(
            "arbor_snapshotter_mounted_layers {}\n",
            self.remote.mounted()
        ));
        s
    }
}

/// Kept TOCs younger than this are never pruned by Cleanup: a Prepare writes its layer's TOC
/// before the snapshot's record exists.
pub const TOC_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(600);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(root: &Path) -> Snapshotter {
        let cache = Arc::new(arbor_fetch::ChunkCache::open(&root.join("cache"), 1 << 20).unwrap());
        let fetcher = arbor_fetch::Fetcher::new(
            cache,
            Arc::new(arbor_fetch::Metrics::default()),
            Default::default(),
        );
        let remote = Arc::new(
            Remote::new(
                fetcher,
                crate::RemoteOptions::default(),
                &root.join("tocs"),
                tokio::runtime::Handle::current(),
            )
            .unwrap(),
        );
        Snapshotter::open(root, remote).unwrap()
    }

    /// A Prepare has created its directories but not yet written its record when Cleanup
    /// runs: Cleanup must not take the directory for an orphan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cleanup_never_deletes_a_preparing_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = open(tmp.path());
        let (at_dirs_tx, at_dirs_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        s.after_dirs = Some(Arc::new(move || {
            at_dirs_tx.send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
        }));
        let s = Arc::new(s);
        let s2 = Arc::clone(&s);
        let prep = tokio::spawn(async move { s2.prepare("k", "", BTreeMap::new()).await });
        tokio::task::spawn_blocking(move || at_dirs_rx.recv().unwrap())
            .await
            .unwrap();
        // The directory exists, its record does not yet.
        assert_eq!(
            std::fs::read_dir(tmp.path().join("snapshots"))
                .unwrap()
                .count(),
            1
        );
        assert_eq!(
            s.cleanup().await.unwrap(),
            0,
            "cleanup removed a preparing snapshot"
        );
        go_tx.send(()).unwrap();
        let mounts = prep.await.unwrap().unwrap();
        let upper = Path::new(&mounts[0].source);
        assert!(upper.is_dir(), "{} is gone", upper.display());
        // Once recorded it is still not an orphan; once removed, nothing is left.
        assert_eq!(s.cleanup().await.unwrap(), 0);
        s.remove("k").await.unwrap();
        assert_eq!(
            std::fs::read_dir(tmp.path().join("snapshots"))
                .unwrap()
                .count(),
            0
        );
    }

    /// Cleanup deletes kept TOCs no snapshot uses once they are old enough; a TOC a record
    /// refers to, or one just written (a Prepare in flight), stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cleanup_prunes_old_tocs_no_snapshot_uses() {
        let tmp = tempfile::tempdir().unwrap();
        let s = open(tmp.path());
        let tocs = tmp.path().join("tocs");
        let old = std::time::SystemTime::now() - TOC_MIN_AGE - std::time::Duration::from_secs(60);
        let write = |hex: &str, modified: Option<std::time::SystemTime>| {
            let f = std::fs::File::create(tocs.join(format!("{hex}.toc"))).unwrap();
            if let Some(t) = modified {
                f.set_modified(t).unwrap();
            }
        };
        let (used, unused, fresh) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        write(&used, Some(old));
        write(&unused, Some(old));
        write(&fresh, None);
        std::fs::write(tocs.join("notes.txt"), b"not a TOC").unwrap();
        let rec = Record {
            id: 7,
            kind: Kind::Committed,
            parent: String::new(),
            labels: BTreeMap::new(),
            created: 0,
            updated: 0,
            usage: None,
            remote: Some(RemoteLayer {
                image_ref: "127.0.0.1:5000/a/b:c".into(),
                digest: format!("sha256:{used}"),
                blob_size: 100,
                toc_position: "1:2:3:4".into(),
                toc_digest: None,
                manifest: None,
                function: None,
            }),
        };
        s.meta.create("used", &rec).unwrap();
        s.cleanup().await.unwrap();
        let left: std::collections::BTreeSet<String> = std::fs::read_dir(&tocs)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let want: std::collections::BTreeSet<String> = [
            format!("{used}.toc"),
            format!("{fresh}.toc"),
            "notes.txt".to_string(),
        ]
        .into();
        assert_eq!(left, want);
    }

    /// A lazy Prepare whose TOC read stalls falls back to an ordinary snapshot within the
    /// deadline (the registry here accepts connections and never answers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_toc_read_falls_back_within_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = stall.local_addr().unwrap();
        let held = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for c in stall.incoming().take(64) {
                conns.push(c);
            }
        });
        let cache =
            Arc::new(arbor_fetch::ChunkCache::open(&tmp.path().join("cache"), 1 << 20).unwrap());
        let fetcher = arbor_fetch::Fetcher::new(
            cache,
            Arc::new(arbor_fetch::Metrics::default()),
            Default::default(),
        );
        let remote = Arc::new(
            Remote::new(
                fetcher,
                crate::RemoteOptions {
                    plain_http_hosts: vec!["127.0.0.1".into()],
                    toc_timeout: std::time::Duration::from_secs(2),
                    ..Default::default()
                },
                &tmp.path().join("tocs"),
                tokio::runtime::Handle::current(),
            )
            .unwrap(),
        );
        let s = Arc::new(Snapshotter::open(tmp.path(), remote).unwrap());
        let key = labels::read_pull_key(tmp.path()).unwrap();
        let digest = format!("sha256:{}", "1".repeat(64));
        let chain = format!("sha256:{}", "2".repeat(64));
        let image = format!("{addr}/fn/stall:v1");
        let l: BTreeMap<String, String> = [
            (arbor_format::ANN_ARBOR_TOC_POSITION, "1000:200:800:1"),
            (arbor_format::ANN_ARBOR_TOC_DIGEST, digest.as_str()),
            (arbor_format::ANN_ARBOR_BLOB_SIZE, "2000"),
            (labels::TARGET, chain.as_str()),
            (labels::ARBOR_LAYER_DIGEST, digest.as_str()),
            (labels::ARBOR_IMAGE_REF, image.as_str()),
            (
                labels::PULL_MAC,
                &labels::pull_mac(&key, &digest, &image, &chain),
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let t0 = std::time::Instant::now();
        // Two prepares of the same layer: the second waits for the first, within the same
        // kind of deadline.
        let (a, b) = tokio::join!(s.prepare("a", "", l.clone()), s.prepare("b", "", l.clone()));
        let took = t0.elapsed();
        assert_eq!(a.unwrap()[0].r#type, "bind");
        assert_eq!(b.unwrap()[0].r#type, "bind");
        assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
        assert_eq!(s.counters().fallbacks("toc_timeout"), 2);
        assert!(s.render_metrics().contains("reason=\"toc_timeout\"} 2"));
        drop(held);
    }
}
