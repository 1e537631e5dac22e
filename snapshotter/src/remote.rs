//! Lazily mounted layers: reading a layer's TOC (from the registry once, then from the copy
//! kept under `<root>/tocs`), mounting it through the FUSE filesystem at a snapshot's `fs`
//! directory, prefetching it, and unmounting it. The node's one [`Fetcher`] (chunk caches,
//! single flight, verification, metrics) serves every mount; one [`StoreSource`] per
//! repository fetches the bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arbor_fetch::blocks::BlockTable;
use arbor_fetch::learn::{Recorder, learned_windows};
use arbor_fetch::prefetch::{PrefetchOptions, prefetch_layer_learned};
use arbor_fetch::source::{Limits, StoreSource};
use arbor_fetch::toc::{check_position, fetch_layer_toc, index_from_stored};
use arbor_fetch::{BlobSource, Fetcher, LayerHandle};
use arbor_format::Digest;
use arbor_format::footer::TocPosition;
use arbor_format::index::LayerIndex;
use arbor_lazyfs::holder::{HolderClient, Kept};
use arbor_lazyfs::{MountOptions, Mounted, Negotiated, adopt_layer, mount_layer, overlay};
use arbor_oci::Store;
use arbor_oci::auth::CredentialStore;
use arbor_oci::manifest::Descriptor;
use arbor_oci::reference::Reference;
use arbor_oci::registry::{ClientOptions, RegistryClient};
use bytes::Bytes;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, warn};

use crate::error::{Error, Result};
use crate::meta::{RemoteLayer, Usage};

/// How remote layers are fetched and served.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// FUSE worker threads of the process, shared by every mounted layer.
    pub fuse_threads: usize,
    /// Prefetch a layer's prefetch section in the background once it is mounted.
    pub prefetch: bool,
    /// How the rest of the layer is prefetched after the prefetch section.
    pub prefetch_opts: PrefetchOptions,
    /// Registry hosts (`host` or `host:port`) spoken to over plain HTTP.
    pub plain_http_hosts: Vec<String>,
    /// Requests in flight per registry host.
    pub registry_concurrency: usize,
    /// Retries of failed registry requests.
    pub registry_retries: u32,
    /// Docker config file with credentials (`None`: `$DOCKER_CONFIG` or `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    /// Registries or repository prefixes lazy layers may be fetched from (empty: any); see
    /// [`crate::labels::registry_allowed`].
    pub allow_registries: Vec<String>,
    /// Trust containerd's CRI labels to name a layer's source (see [`crate::labels`]).
    pub trust_cri_labels: bool,
    /// Longest a lazy Prepare may spend reading the TOC (and waiting for another Prepare of
    /// the same layer) before it falls back to an ordinary snapshot.
    pub toc_timeout: std::time::Duration,
    /// Read every lazily mounted layer through in the background and take it out of service
    /// if its blob, diff ID (chain ID) or TOC lies (see `snapshotter::verify`).
    pub verify_layers: bool,
    /// Longest a Prepare waits for the proof of another image's unproved lazy layer that holds
    /// its chain ID before it answers `Unavailable` (see `snapshotter::share`).
    pub proof_wait: std::time::Duration,
    /// Learning start-up sets from reported starts (see [`crate::learn`]).
    pub learn: crate::learn::LearnOptions,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            fuse_threads: 2,
            prefetch: true,
            prefetch_opts: PrefetchOptions::default(),
            plain_http_hosts: Vec::new(),
            registry_concurrency: 8,
            registry_retries: 4,
            docker_config: None,
            allow_registries: Vec::new(),
            trust_cri_labels: true,
            toc_timeout: std::time::Duration::from_secs(30),
            verify_layers: true,
            proof_wait: std::time::Duration::from_secs(300),
            learn: Default::default(),
        }
    }
}

/// A repository's store (for TOC reads) and fetch source (for chunks).
type RepoSource = (Store, Arc<dyn BlobSource>);

struct Active {
    mounted: Mounted,
    /// The function tree the layer is read and served in.
    tree: Option<(Arc<crate::trees::Trees>, String)>,
    prefetch: Option<JoinHandle<()>>,
    handle: Arc<LayerHandle>,
    layer: RemoteLayer,
    mounted_at: std::time::SystemTime,
}

/// A mounted lazy layer, as [`Remote::mounted_layers`] reports it.
#[derive(Clone)]
pub struct MountedLayer {
    pub dir: PathBuf,
    pub handle: Arc<LayerHandle>,
    pub layer: RemoteLayer,
    pub mounted_at: std::time::SystemTime,
}

/// The node's lazily mounted layers.
pub struct Remote {
    fetcher: Arc<Fetcher>,
    opts: RemoteOptions,
    toc_dir: PathBuf,
    tls: RegistryClient,
    plain: RegistryClient,
    /// Clients for TOC reads on Prepare: one retry, inside the Prepare's deadline.
    toc_tls: RegistryClient,
    toc_plain: RegistryClient,
    limits: Arc<Limits>,
    stores: Mutex<HashMap<String, RepoSource>>,
    mounts: Mutex<HashMap<u64, Active>>,
    rt: tokio::runtime::Handle,
    /// Learned start-up sets, by image manifest.
    sets: crate::learn::SetStore,
    /// Function trees, when this node takes part in them (`[p2p]`).
    trees: std::sync::OnceLock<Arc<crate::trees::Trees>>,
    /// The fd holder keeping every mount's FUSE connection (`fuse.handover`).
    holder: std::sync::OnceLock<Mutex<HolderClient>>,
    /// Connections a predecessor left in the holder, by mount directory, until adopted.
    inventory: Mutex<HashMap<PathBuf, Kept>>,
    /// Layers adopted from a predecessor.
    adopted: std::sync::atomic::AtomicU64,
    /// TOCs read ahead of their Prepare ([`Remote::read_tocs_ahead`]).
    ahead: Mutex<TocsAhead>,
    /// Prepares that took a TOC read ahead.
    tocs_ahead_used: std::sync::atomic::AtomicU64,
}

/// A TOC read and validated: the index, and the compressed bytes kept on disk.
type ReadToc = (Arc<LayerIndex>, Bytes);

/// A TOC being read ahead: the reader holds the lock until the result is in.
type AheadToc = Arc<tokio::sync::Mutex<Option<std::result::Result<ReadToc, String>>>>;

/// TOCs read ahead, by the exact layer they were read for ([`ahead_key`]), and the images
/// whose layers' TOCs were asked for recently.
#[derive(Default)]
struct TocsAhead {
    tocs: HashMap<String, AheadToc>,
    images: HashMap<String, std::time::Instant>,
}

/// How long a TOC read ahead waits for its Prepare (then it is dropped), and how long an
/// image's layers are not read ahead again.
const AHEAD_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// At most this many layers of one image are read ahead.
const AHEAD_MAX_LAYERS: usize = 64;

/// Everything that decides a layer's TOC: a TOC read ahead serves only a Prepare of exactly
/// this layer.
fn ahead_key(l: &RemoteLayer) -> String {
    format!(
        "{} {} {} {} {}",
        l.image_ref,
        l.digest,
        l.blob_size,
        l.toc_position,
        l.toc_digest.as_deref().unwrap_or("-")
    )
}

/// The lazy layer a manifest's descriptor names, read as [`crate::labels::remote_layer`]
/// reads a Prepare's labels (the descriptor's annotations are the labels `arbor pull` and
/// CRI pass), from `of`'s repository; `None` for a layer that is not lazy or is refused.
fn sibling_layer(of: &RemoteLayer, d: &Descriptor, allow: &[String]) -> Option<RemoteLayer> {
    let mut l = crate::labels::layer_toc(&d.annotations)
        .ok()?
        .layer(d.digest.clone(), of.image_ref.clone(), allow)
        .ok()?;
    l.manifest = of.manifest.clone();
    l.function = of.function.clone();
    Some(l)
}

/// What the holder keeps with a connection, to adopt it.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptMeta {
    digest: String,
    snapshot: u64,
    negotiated: Negotiated,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Remote {
    pub fn new(
        fetcher: Arc<Fetcher>,
        opts: RemoteOptions,
        toc_dir: &Path,
        rt: tokio::runtime::Handle,
    ) -> Result<Remote> {
        std::fs::create_dir_all(toc_dir)
            .map_err(Error::io(format!("creating {}", toc_dir.display())))?;
        let creds = match &opts.docker_config {
            Some(p) => CredentialStore::from_file(p),
            None => CredentialStore::load_default(),
        }
        .map_err(|e| Error::Internal(format!("reading registry credentials: {e}")))?;
        let client = |plain_http, retries| {
            RegistryClient::new(
                ClientOptions {
                    plain_http,
                    retries,
                    ..Default::default()
                },
                creds.clone(),
            )
            .map_err(|e| Error::Internal(format!("creating the registry client: {e}")))
        };
        Ok(Remote {
            tls: client(false, opts.registry_retries)?,
            plain: client(true, opts.registry_retries)?,
            toc_tls: client(false, opts.registry_retries.min(1))?,
            toc_plain: client(true, opts.registry_retries.min(1))?,
            limits: Limits::new(opts.registry_concurrency),
            fetcher,
            opts,
            sets: crate::learn::SetStore::open(&toc_dir.with_file_name("startup-sets"))?,
            toc_dir: toc_dir.to_path_buf(),
            stores: Mutex::new(HashMap::new()),
            mounts: Mutex::new(HashMap::new()),
            rt,
            trees: Default::default(),
            holder: Default::default(),
            inventory: Default::default(),
            adopted: Default::default(),
            ahead: Default::default(),
            tocs_ahead_used: Default::default(),
        })
    }

    /// Starts reading the TOCs of the other layers of `layer`'s image (its manifest, when the
    /// labels name one) in the background, at once: containerd prepares an image's layers
    /// one after another, each waiting for its TOC, and the prefetch of the first layers
    /// mounted would make later TOC reads queue behind it on the link. A Prepare of one of
    /// those layers then takes its TOC ([`Remote::fetch_index`]) instead of reading it.
    ///
    /// Only a hint: the manifest is read by digest (verified) from `layer`'s repository, each
    /// TOC is verified against the digest its descriptor gives, a TOC serves only a Prepare
    /// of exactly the layer it was read for, and anything that fails leaves the Prepare to
    /// read its TOC itself. Layers whose TOC this node already keeps are skipped; once per
    /// image per [`AHEAD_TTL`], at most [`AHEAD_MAX_LAYERS`] layers.
    pub fn read_tocs_ahead(self: &Arc<Self>, layer: &RemoteLayer) {
        let Some(manifest) = layer.manifest.clone() else {
            return;
        };
        {
            let mut a = lock(&self.ahead);
            let now = std::time::Instant::now();
            a.images.retain(|_, t| now.duration_since(*t) < AHEAD_TTL);
            let image = format!("{}@{manifest}", layer.image_ref);
            if a.images.contains_key(&image) {
                return;
            }
            a.images.insert(image, now);
        }
        let (me, first) = (Arc::clone(self), layer.clone());
        let span = tracing::info_span!("read_tocs_ahead", image = %layer.image_ref, %manifest);
        self.rt.spawn(
            async move {
                let siblings = match me.sibling_layers(&first, &manifest).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "not reading TOCs ahead");
                        return;
                    }
                };
                for l in siblings {
                    let key = ahead_key(&l);
                    let cell: AheadToc = Arc::new(tokio::sync::Mutex::new(None));
                    let Ok(mut guard) = Arc::clone(&cell).try_lock_owned() else {
                        continue;
                    };
                    {
                        let mut a = lock(&me.ahead);
                        if a.tocs.contains_key(&key) {
                            continue;
                        }
                        a.tocs.insert(key.clone(), Arc::clone(&cell));
                    }
                    let me = Arc::clone(&me);
                    tokio::spawn(
                        async move {
                            let r = me.read_toc(&l).await.map_err(|e| e.to_string());
                            if let Err(e) = &r {
                                tracing::debug!(layer = %l.digest, error = %e, "TOC read ahead failed");
                            }
                            *guard = Some(r);
                            drop(guard);
                            // Not taken by a Prepare in time (the pull stopped): dropped.
                            tokio::time::sleep(AHEAD_TTL).await;
                            let mut a = lock(&me.ahead);
                            if a.tocs.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                                a.tocs.remove(&key);
                            }
                        }
                        .in_current_span(),
                    );
                }
            }
            .instrument(span),
        );
    }

    /// The lazy layers of `manifest` other than `first`, whose TOCs this node does not keep.
    async fn sibling_layers(
        &self,
        first: &RemoteLayer,
        manifest: &str,
    ) -> Result<Vec<RemoteLayer>> {
        let (store, _) = self.store(&first.image_ref)?;
        let (bytes, media_type) = store
            .manifest(manifest)
            .await
            .map_err(|e| Error::Internal(format!("reading manifest {manifest}: {e}")))?;
        let m = match arbor_oci::manifest::parse_manifest(&bytes, &media_type) {
            Ok(arbor_oci::manifest::ManifestKind::Image(m)) => m,
            Ok(_) => return Err(Error::Internal(format!("{manifest} is an index"))),
            Err(e) => return Err(Error::Internal(format!("manifest {manifest}: {e}"))),
        };
        let mut out = Vec::new();
        for d in m.layers.iter().take(AHEAD_MAX_LAYERS) {
            let Some(l) = sibling_layer(first, d, &self.opts.allow_registries) else {
                continue;
            };
            if l.digest == first.digest || self.toc_path(&l).is_ok_and(|p| p.exists()) {
                continue;
            }
            out.push(l);
        }
        Ok(out)
    }

    /// Keeps every mount's FUSE connection in `holder` from now on, and takes the inventory
    /// of those a predecessor left there (adopted by [`Remote::mount`]). Blocking.
    pub fn set_holder(&self, holder: HolderClient) -> Result<usize> {
        let kept = holder
            .list()
            .map_err(|e| Error::Internal(format!("listing the fd holder: {e}")))?;
        let n = kept.len();
        let mut inv = lock(&self.inventory);
        for k in kept {
            inv.insert(PathBuf::from(&k.name), k);
        }
        drop(inv);
        let _ = self.holder.set(Mutex::new(holder));
        Ok(n)
    }

    /// The live connection a predecessor left for `dir`, if it serves `digest` and is still
    /// mounted there; anything else kept for `dir` is forgotten.
    fn adoptable(&self, dir: &Path, digest: &str) -> Option<(std::os::fd::OwnedFd, Negotiated)> {
        let kept = lock(&self.inventory).remove(dir)?;
        let meta: Option<KeptMeta> = serde_json::from_value(kept.meta).ok();
        match meta {
            Some(m) if m.digest == digest && overlay::is_mounted(dir) => {
                Some((kept.fd, m.negotiated))
            }
            _ => {
                warn!(dir = %dir.display(), "kept connection does not match; mounting anew");
                self.holder_forget(dir);
                None
            }
        }
    }

    fn holder_forget(&self, dir: &Path) {
        if let Some(h) = self.holder.get()
            && let Err(e) = lock(h).forget(&dir.to_string_lossy())
        {
            warn!(dir = %dir.display(), error = %e, "fd holder: forgetting failed");
        }
    }

    fn holder_keep(&self, id: u64, digest: &str, mounted: &Mounted) {
        let (Some(h), Some(session)) = (self.holder.get(), mounted.session()) else {
            return;
        };
        let Some(negotiated) = session.negotiated() else {
            return;
        };
        let meta = KeptMeta {
            digest: digest.to_string(),
            snapshot: id,
            negotiated,
        };
        let r = serde_json::to_value(&meta)
            .map_err(std::io::Error::other)
            .and_then(|m| lock(h).keep(&mounted.dir().to_string_lossy(), m, &session.dup_fd()?));
        if let Err(e) = r {
            warn!(dir = %mounted.dir().display(), error = %e,
                "fd holder: keeping the connection failed; this mount will not survive a restart");
        }
    }

    /// Prepares since start that took their TOC from [`Remote::read_tocs_ahead`].
    pub fn tocs_read_ahead(&self) -> u64 {
        self.tocs_ahead_used
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Layers adopted from a predecessor since start.
    pub fn adopted(&self) -> u64 {
        self.adopted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets and detaches what a predecessor left in the holder and no snapshot claimed
    /// (a layer removed, or taken out of service, while no arbord ran). Blocking.
    pub fn reconcile_inventory(&self) -> usize {
        let left: Vec<(PathBuf, Kept)> = lock(&self.inventory).drain().collect();
        for (dir, _) in &left {
            warn!(dir = %dir.display(), "kept connection of no mounted snapshot; detaching it");
            self.holder_forget(dir);
            if overlay::is_mounted(dir) {
                detach(dir);
            }
        }
        left.len()
    }

    pub fn options(&self) -> &RemoteOptions {
        &self.opts
    }

    /// Takes part in function trees from now on: layers mounted later that name a function
    /// (or an image manifest) and carry a block table are read and served through `trees`.
    pub fn set_trees(&self, trees: Arc<crate::trees::Trees>) {
        let _ = self.trees.set(trees);
    }

    /// The node's function trees, if it takes part in them.
    pub fn trees(&self) -> Option<&Arc<crate::trees::Trees>> {
        self.trees.get()
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    /// The learned start-up sets.
    pub fn sets(&self) -> &crate::learn::SetStore {
        &self.sets
    }

    /// Every mounted lazy layer.
    pub fn mounted_layers(&self) -> Vec<MountedLayer> {
        lock(&self.mounts)
            .values()
            .map(|a| MountedLayer {
                dir: a.mounted.dir().to_path_buf(),
                handle: Arc::clone(&a.handle),
                layer: a.layer.clone(),
                mounted_at: a.mounted_at,
            })
            .collect()
    }

    /// The windows of `handle` that the learned set of `manifest` names, if there is one.
    fn learned_for(
        &self,
        manifest: Option<&str>,
        handle: &LayerHandle,
    ) -> Vec<(usize, Vec<arbor_fetch::fetcher::ChunkRef>)> {
        let Some(m) = manifest else {
            return Vec::new();
        };
        let Some(set) = self.sets.get(m) else {
            return Vec::new();
        };
        let applied = learned_windows(handle, &set);
        if applied.ignored > 0 {
            self.sets.ignored("stale_reads", applied.ignored as u64);
            warn!(layer = %handle.digest, manifest = m, ignored = applied.ignored, "the learned start-up set names files or chunks this layer lacks: ignored");
        }
        if !applied.windows.is_empty() {
            info!(layer = %handle.digest, manifest = m, chunks = applied.chunks, windows = applied.windows.len(), "fetching the learned start-up set first");
        }
        applied.windows
    }

    /// Starts fetching the learned set of `manifest` on every mounted layer it names (a set
    /// that arrived after its layers were mounted), beside their running prefetch.
    pub fn apply_set(&self, manifest: &str) {
        let Some(set) = self.sets.get(manifest) else {
            return;
        };
        let handles: Vec<Arc<LayerHandle>> = lock(&self.mounts)
            .values()
            .filter(|a| set.layers.contains(&a.layer.digest))
            .map(|a| Arc::clone(&a.handle))
            .collect();
        for handle in handles {
            self.apply_to(manifest, handle);
        }
    }

    /// Starts fetching the learned set of `manifest` for one mounted layer, beside its
    /// running prefetch (windows and chunks it has by then are skipped).
    fn apply_to(&self, manifest: &str, handle: Arc<LayerHandle>) {
        let windows = self.learned_for(Some(manifest), &handle);
        if windows.is_empty() {
            return;
        }
        let opts = PrefetchOptions {
            rest: false,
            ..self.opts.prefetch_opts.clone()
        };
        // Detached: it ends by itself.
        drop(self.rt.spawn(prefetch_layer_learned(
            Arc::clone(&self.fetcher),
            handle,
            opts,
            windows,
        )));
    }

    fn plain_http(&self, registry: &str) -> bool {
        let host = registry
            .rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(registry, |(h, _)| h);
        self.opts
            .plain_http_hosts
            .iter()
            .any(|h| h == registry || h == host)
    }

    /// The store and fetch source for the repository of `image_ref` (no network traffic).
    pub(crate) fn store(&self, image_ref: &str) -> Result<RepoSource> {
        let r = Reference::parse(image_ref)
            .map_err(|e| Error::InvalidArgument(format!("image reference: {e}")))?;
        // Checked here too, for every source (restored mounts included), not only on Prepare.
        if !crate::labels::registry_allowed(&self.opts.allow_registries, image_ref) {
            return Err(Error::FailedPrecondition(format!(
                "registry of {image_ref:?} is not in registry.allow"
            )));
        }
        let key = format!("{}/{}", r.registry, r.repository);
        let mut stores = lock(&self.stores);
        if let Some(s) = stores.get(&key) {
            return Ok(s.clone());
        }
        let client = if self.plain_http(&r.registry) {
            &self.plain
        } else {
            &self.tls
        };
        let store = Store::Registry {
            client: client.clone(),
            reference: r,
        };
        let source: Arc<dyn BlobSource> = Arc::new(StoreSource::new(store.clone(), &self.limits));
        stores.insert(key, (store.clone(), Arc::clone(&source)));
        Ok((store, source))
    }

    fn toc_path(&self, layer: &RemoteLayer) -> Result<PathBuf> {
        let d = Digest::parse(&layer.digest)
            .map_err(|_| Error::InvalidArgument(format!("bad layer digest {:?}", layer.digest)))?;
        Ok(self.toc_dir.join(format!("{}.toc", d.hex())))
    }

    /// Reads the layer's TOC from the registry (or takes it from [`Remote::read_tocs_ahead`]
    /// when that read it for exactly this layer), validates it and keeps a copy on disk.
    pub async fn fetch_index(&self, layer: &RemoteLayer) -> Result<Arc<LayerIndex>> {
        let ahead = lock(&self.ahead).tocs.remove(&ahead_key(layer));
        let mut taken = None;
        if let Some(cell) = ahead {
            match cell.lock().await.take() {
                Some(Ok(toc)) => {
                    self.tocs_ahead_used
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    taken = Some(toc);
                }
                Some(Err(e)) => {
                    tracing::debug!(layer = %layer.digest, error = %e, "the TOC read ahead failed; reading it again");
                }
                None => {}
            }
        }
        let (index, bytes) = match taken {
            Some(toc) => toc,
            None => self.read_toc(layer).await?,
        };
        // Kept only for a layer prepared: a TOC read ahead for a Prepare that never came
        // leaves nothing on disk.
        let path = self.toc_path(layer)?;
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        Ok(index)
    }

    /// Reads and validates the layer's TOC: through the function's tree when the layer has
    /// one and the annotations gave the TOC's digest ([`Remote::read_toc_from_tree`]), else
    /// (or when that fails) from the registry.
    async fn read_toc(&self, layer: &RemoteLayer) -> Result<ReadToc> {
        if let Some(toc) = self.read_toc_from_tree(layer).await {
            return Ok(toc);
        }
        self.read_toc_from_registry(layer).await
    }

    /// The layer's TOC through its function's tree (parent, grandparent, registry), checked
    /// against the TOC digest: in a burst of starts only the root reads it from the registry.
    /// `None` when the layer has no tree or no TOC digest (a peer's bytes could not be
    /// checked), or the read or its check failed: the caller reads the registry.
    async fn read_toc_from_tree(&self, layer: &RemoteLayer) -> Option<ReadToc> {
        let trees = self.trees.get()?;
        let function = layer.function.as_ref().or(layer.manifest.as_ref())?;
        let digest = Digest::parse(layer.toc_digest.as_ref()?).ok()?;
        let pos = toc_position(layer).ok()?;
        check_position(&pos, layer.blob_size, &Default::default()).ok()?;
        let (_, registry) = self.store(&layer.image_ref).ok()?;
        let (bytes, route) = match trees
            .read_unblocked(function, &layer.digest, pos.offset, pos.length, registry)
            .await
        {
            Ok(got) => got,
            Err(e) => {
                warn!(layer = %layer.digest, error = %e, "reading the TOC through the function tree failed; reading the registry");
                return None;
            }
        };
        match index_from_stored(bytes.clone(), pos, Some(digest)).await {
            Ok(index) => {
                trees.note_toc(&route);
                Some((Arc::new(index), bytes))
            }
            Err(e) => {
                warn!(layer = %layer.digest, route, error = %e, "the TOC from the function tree failed its check; reading the registry");
                None
            }
        }
    }

    /// Reads and validates the layer's TOC from the registry.
    async fn read_toc_from_registry(&self, layer: &RemoteLayer) -> Result<ReadToc> {
        let (store, _) = self.store(&layer.image_ref)?;
        // The same repository through the one-retry client: a Prepare waits for this read,
        // and its deadline (`toc_timeout`) covers the whole of it.
        let store = match store {
            Store::Registry { reference, .. } => {
                let toc_client = if self.plain_http(&reference.registry) {
                    &self.toc_plain
                } else {
                    &self.toc_tls
                };
                Store::Registry {
                    client: toc_client.clone(),
                    reference,
                }
            }
            other => other,
        };
        let mut desc = Descriptor {
            media_type: arbor_format::MEDIA_TYPE_LAYER_ZSTD.into(),
            digest: layer.digest.clone(),
            size: layer.blob_size,
            platform: None,
            annotations: Default::default(),
            extra: Default::default(),
        };
        desc.annotations.insert(
            arbor_format::ANN_ARBOR_TOC_POSITION.into(),
            layer.toc_position.clone(),
        );
        if let Some(d) = &layer.toc_digest {
            desc.annotations
                .insert(arbor_format::ANN_ARBOR_TOC_DIGEST.into(), d.clone());
        }
        let toc = fetch_layer_toc(&store, &desc)
            .await
            .map_err(|e| Error::Internal(format!("reading the TOC of {}: {e}", layer.digest)))?;
        Ok((Arc::new(toc.index), toc.compressed))
    }

    /// Deletes the kept TOCs of layers in none of `keep` (layer digests' hex) that are older
    /// than `min_age` (a Prepare writes its TOC before its record exists), and returns how
    /// many it deleted. Without it `<root>/tocs/` would keep a TOC for every lazy layer the
    /// node ever prepared.
    pub fn prune_tocs(
        &self,
        keep: &std::collections::HashSet<String>,
        min_age: std::time::Duration,
    ) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.toc_dir) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".toc")) else {
                continue;
            };
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age);
            if keep.contains(hex) || !old {
                continue;
            }
            match std::fs::remove_file(e.path()) {
                Ok(()) => n += 1,
                Err(err) => {
                    warn!(file = %e.path().display(), error = %err, "deleting a TOC no snapshot uses failed")
                }
            }
        }
        n
    }

    /// The compressed TOC kept on disk and where it sits in the blob, for a layer whose TOC
    /// digest is known (what its children in a function tree may read from this node; they
    /// check it against that digest). Blocking; `None` when unreadable.
    fn kept_toc(&self, layer: &RemoteLayer) -> Option<(u64, Bytes)> {
        layer.toc_digest.as_ref()?;
        let pos = toc_position(layer).ok()?;
        let bytes = std::fs::read(self.toc_path(layer).ok()?).ok()?;
        (bytes.len() as u64 == pos.length).then(|| (pos.offset, Bytes::from(bytes)))
    }

    /// The layer's index from the TOC kept on disk (no network); verified against the TOC
    /// digest when there is one.
    pub async fn stored_index(&self, layer: &RemoteLayer) -> Result<Arc<LayerIndex>> {
        let path = self.toc_path(layer)?;
        let p2 = path.clone();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(&p2))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(Error::io(format!("reading {}", path.display())))?;
        let pos = toc_position(layer)
            .map_err(|e| Error::Internal(format!("stored TOC position: {e}")))?;
        let digest = match &layer.toc_digest {
            Some(d) => Some(
                Digest::parse(d)
                    .map_err(|_| Error::Internal(format!("stored TOC digest {d:?}")))?,
            ),
            None => None,
        };
        let index = index_from_stored(Bytes::from(bytes), pos, digest)
            .await
            .map_err(|e| Error::Internal(format!("TOC kept in {}: {e}", path.display())))?;
        Ok(Arc::new(index))
    }

    /// Mounts the layer at `dir` (created if needed; a dead mount left there by an earlier
    /// run is detached first) for snapshot `id` and starts its prefetch. Blocking (mount).
    pub fn mount(
        &self,
        id: u64,
        layer: &RemoteLayer,
        index: Arc<LayerIndex>,
        dir: &Path,
    ) -> Result<()> {
        let (_, registry) = self.store(&layer.image_ref)?;
        // In a function tree the blob is read block by block through the tree (parent,
        // grandparent, registry) and kept to serve this node's children.
        let function = layer.function.clone().or_else(|| layer.manifest.clone());
        let (source, tree) = match (self.trees.get(), function, BlockTable::from_index(&index)) {
            (Some(trees), Some(f), Some(table)) => {
                let s = trees.attach(&f, &layer.digest, layer.blob_size, table, registry)?;
                if let Some((offset, toc)) = self.kept_toc(layer) {
                    s.keep_toc(offset, toc);
                }
                (s as Arc<dyn BlobSource>, Some((Arc::clone(trees), f)))
            }
            _ => (registry, None),
        };
        // Undone if the mount below fails.
        let detach_tree = |tree: &Option<(Arc<crate::trees::Trees>, String)>| {
            if let Some((t, f)) = tree {
                t.detach(f, &layer.digest);
            }
        };
        let unit = self.fetcher.options().fetch_unit;
        let handle = Arc::new(LayerHandle::new(
            &layer.digest,
            layer.blob_size,
            index,
            vec![source],
            unit,
        ));
        let adopt = self.adoptable(dir, &layer.digest);
        let learn = &self.opts.learn;
        // An adopted layer's reads are not a fresh start: nothing to learn from them.
        if learn.enabled && adopt.is_none() {
            handle.record(Arc::new(Recorder::new(learn.max_chunks, learn.max_age)));
        }
        let learned = self.learned_for(layer.manifest.as_deref(), &handle);
        let had_set = !learned.is_empty();
        self.fetcher
            .metrics()
            .layer(&layer.digest, handle.index.data_end);
        if adopt.is_none() && overlay::is_mounted(dir) {
            // Left over from an earlier run of the daemon whose connection nobody kept
            // ("transport endpoint is not connected"); detach it before mounting again.
            detach(dir);
        }
        let opts = MountOptions {
            threads: self.opts.fuse_threads,
            allow_other: true,
        };
        let adopted = adopt.is_some();
        let mounted = match adopt {
            Some((fd, negotiated)) => adopt_layer(
                Arc::clone(&handle),
                Arc::clone(&self.fetcher),
                self.rt.clone(),
                dir,
                fd,
                negotiated,
            )
            .map_err(Error::io(format!(
                "adopting layer {} at {}",
                layer.digest,
                dir.display()
            ))),
            None => std::fs::create_dir_all(dir)
                .map_err(Error::io(format!("creating {}", dir.display())))
                .and_then(|()| {
                    mount_layer(
                        Arc::clone(&handle),
                        Arc::clone(&self.fetcher),
                        self.rt.clone(),
                        dir,
                        &opts,
                    )
                    .map_err(Error::io(format!(
                        "mounting layer {} at {}",
                        layer.digest,
                        dir.display()
                    )))
                }),
        }
        .inspect_err(|_| detach_tree(&tree))?;
        if adopted {
            self.adopted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.holder_keep(id, &layer.digest, &mounted);
        }
        let late = Arc::clone(&handle);
        let prefetch = (self.opts.prefetch || !learned.is_empty()).then(|| {
            let mut opts = self.opts.prefetch_opts.clone();
            if !self.opts.prefetch {
                opts.rest = false;
            }
            self.rt.spawn(prefetch_layer_learned(
                Arc::clone(&self.fetcher),
                Arc::clone(&handle),
                opts,
                learned,
            ))
        });
        lock(&self.mounts).insert(
            id,
            Active {
                mounted,
                tree,
                prefetch,
                handle,
                layer: layer.clone(),
                mounted_at: std::time::SystemTime::now(),
            },
        );
        // A set that arrived (PutStartupSet) while this layer was being mounted: its
        // `apply_set` did not see the layer in the table yet.
        if !had_set && let Some(m) = &layer.manifest {
            self.apply_to(m, late);
        }
        Ok(())
    }

    pub fn is_mounted(&self, id: u64) -> bool {
        lock(&self.mounts).contains_key(&id)
    }

    /// Unmounts snapshot `id`'s layer (if mounted). Blocking.
    pub fn unmount(&self, id: u64) {
        let active = lock(&self.mounts).remove(&id);
        if let Some(a) = active {
            self.finish(id, a);
        }
    }

    /// Stops serving layer `id` at once, then unmounts it: containers still running on it
    /// (whose overlays keep the detached mount) get EIO from every further lookup and read,
    /// and lose what the kernel cached of it ([`Mounted::poison`]).
    pub fn poison_and_unmount(&self, id: u64) {
        // Out of the table first: the invalidations go to the kernel without holding its lock.
        let active = lock(&self.mounts).remove(&id);
        if let Some(a) = active {
            a.mounted.poison();
            self.finish(id, a);
        }
    }

    fn finish(&self, id: u64, a: Active) {
        if let Some(p) = a.prefetch {
            p.abort();
        }
        if let Some((trees, f)) = &a.tree {
            trees.detach(f, &a.layer.digest);
        }
        let dir = a.mounted.dir().to_path_buf();
        self.holder_forget(&dir);
        if let Err(e) = a.mounted.unmount() {
            warn!(id, dir = %dir.display(), error = %e, "unmount failed; detaching");
            detach(&dir);
        }
        info!(id, dir = %dir.display(), "layer unmounted");
    }

    /// Unmounts every layer (daemon shutdown). Blocking.
    pub fn unmount_all(&self) {
        let ids: Vec<u64> = lock(&self.mounts).keys().copied().collect();
        for id in ids {
            self.unmount(id);
        }
    }

    /// Hands every layer over to a successor (shutdown with `fuse.handover`): stops reading
    /// their FUSE requests, answers those taken (within `timeout` in all), and leaves them
    /// mounted, their connections kept by the holder. Returns the layers released and the
    /// requests still unanswered at the deadline. Blocking.
    pub fn release_all(&self, timeout: std::time::Duration) -> (usize, usize) {
        let all: Vec<(u64, Active)> = lock(&self.mounts).drain().collect();
        let deadline = std::time::Instant::now() + timeout;
        let mut unanswered = 0;
        let n = all.len();
        for (_, a) in all {
            if let Some(p) = a.prefetch {
                p.abort();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            unanswered += a.mounted.release(left);
        }
        (n, unanswered)
    }

    /// Number of layers mounted.
    pub fn mounted(&self) -> usize {
        lock(&self.mounts).len()
    }
}

/// Disk use as reported for a lazily mounted layer: its files' sizes and entry count.
pub fn index_usage(index: &LayerIndex) -> Usage {
    Usage {
        size: index.entries.iter().map(|e| e.size as i64).sum(),
        inodes: index.entries.len() as i64,
    }
}

/// Lazily detaches whatever is mounted at `dir`.
pub fn detach(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        warn!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "detaching failed");
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("renaming to {}", path.display())))
}

/// Where the layer's TOC sits in its blob, from the position the labels recorded.
fn toc_position(layer: &RemoteLayer) -> std::result::Result<TocPosition, arbor_format::Error> {
    TocPosition::parse_annotation(arbor_format::ANN_ARBOR_TOC_POSITION, &layer.toc_position)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::labels::{self, Trust};

    const LAYER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const TOC: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const MANIFEST: &str =
        "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn annotations() -> BTreeMap<String, String> {
        [
            (arbor_format::ANN_ARBOR_TOC_POSITION, "1000:200:800:1"),
            (arbor_format::ANN_ARBOR_TOC_DIGEST, TOC),
            (arbor_format::ANN_ARBOR_BLOB_SIZE, "2000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// A layer read from a manifest's descriptor keys its TOC exactly as the Prepare of that
    /// layer (labels = the descriptor's annotations + where to fetch) does, or the TOC read
    /// ahead would never be taken; a descriptor without a TOC digest is not read ahead.
    #[test]
    fn a_sibling_layer_matches_the_prepare_of_that_layer() {
        let mut l = annotations();
        l.insert(labels::TARGET.into(), "chain".into());
        l.insert(labels::CRI_LAYER_DIGEST.into(), LAYER.into());
        l.insert(labels::CRI_IMAGE_REF.into(), "r.example/fn:1".into());
        l.insert(labels::CRI_MANIFEST.into(), MANIFEST.into());
        let trust = Trust {
            pull_key: None,
            cri_labels: true,
            allow: vec![],
        };
        let prepared = labels::remote_layer(&l, &trust).unwrap();
        let first = RemoteLayer {
            digest: "sha256:4444444444444444444444444444444444444444444444444444444444444444"
                .into(),
            ..prepared.clone()
        };
        let d = Descriptor {
            media_type: arbor_format::MEDIA_TYPE_LAYER_ZSTD.into(),
            digest: LAYER.into(),
            size: 2000,
            annotations: annotations(),
            ..Default::default()
        };
        let sibling = sibling_layer(&first, &d, &[]).unwrap();
        assert_eq!(ahead_key(&sibling), ahead_key(&prepared));
        assert_eq!(sibling.manifest.as_deref(), Some(MANIFEST));

        let mut unbound = d.clone();
        unbound
            .annotations
            .remove(arbor_format::ANN_ARBOR_TOC_DIGEST);
        assert!(sibling_layer(&first, &unbound, &[]).is_none());
        let mut outside = d.clone();
        outside
            .annotations
            .insert(arbor_format::ANN_ARBOR_BLOB_SIZE.into(), "1100".into());
        assert!(
            sibling_layer(&first, &outside, &[]).is_none(),
            "TOC past the blob's end"
        );
        let mut other = d;
        other.digest = "sha256:5555".into();
        assert!(sibling_layer(&first, &other, &[]).is_none(), "not a digest");
    }
}
