//! `arbor mount REF DIR`: every layer of an image through the lazy FUSE filesystem, stacked
//! read-only with overlayfs at DIR, until DIR is unmounted or the command is interrupted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use arbor_convert::image;
use arbor_fetch::fetcher::FetcherOptions;
use arbor_fetch::prefetch::{PrefetchOptions, prefetch_layer};
use arbor_fetch::source::{Limits, StoreSource};
use arbor_fetch::{BlobSource, ChunkCache, Fetcher, LayerHandle, Metrics};
use arbor_lazyfs::{MountOptions, Privileges, mount_layer_with, overlay};
use arbor_oci::Store;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Settings of one `arbor mount`.
pub struct MountArgs {
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub fetch_unit: u64,
    pub sequential_read_ahead: usize,
    pub max_request: u64,
    pub prefetch: bool,
    pub prefetch_rest: bool,
    pub prefetch_rate: u64,
    pub prefetch_rest_while_active: bool,
    pub prefetch_rest_eager: bool,
    pub metrics_addr: Option<String>,
    pub state_dir: PathBuf,
    pub fuse_threads: usize,
    /// Bytes pushed into the page cache ahead of a reader going through a directory in
    /// order (0: off).
    pub push_ahead: u64,
    pub registry_concurrency: usize,
    /// Honour setuid/setgid bits of the image's files (default: `nosuid`).
    pub allow_suid: bool,
    /// Let device nodes of the image be opened (default: `nodev`).
    pub allow_dev: bool,
    /// Let users other than root use the mount (FUSE `allow_other`; default: root only).
    pub allow_other: bool,
}

pub async fn run(
    store: Store,
    name: &str,
    platforms: &[String],
    dir: &Path,
    a: MountArgs,
) -> Result<()> {
    if !arbor_lazyfs_is_root() {
        bail!("arbor mount needs root (it mounts FUSE and overlay filesystems)");
    }
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("mount point {}", dir.display()))?;
    let resolved = image::resolve(&store, platforms).await?;
    if resolved.images.len() != 1 {
        bail!(
            "{name} has {} platforms; choose one with --platform",
            resolved.images.len()
        );
    }
    let img = &resolved.images[0];
    let metrics = Arc::new(Metrics::default());
    let (cache_dir, cache_size) = (a.cache_dir.clone(), a.cache_size);
    let cache = Arc::new(
        tokio::task::spawn_blocking(move || ChunkCache::open(&cache_dir, cache_size))
            .await?
            .with_context(|| format!("opening the chunk cache in {}", a.cache_dir.display()))?,
    );
    let fetcher = Fetcher::new(
        cache,
        Arc::clone(&metrics),
        FetcherOptions {
            fetch_unit: a.fetch_unit,
            sequential_read_ahead: a.sequential_read_ahead,
            max_request: a.max_request,
            background_while_active: a.prefetch_rest_while_active,
            ..Default::default()
        },
    );
    let limits = Limits::new(a.registry_concurrency);
    let source: Arc<dyn BlobSource> = Arc::new(StoreSource::new(store.clone(), &limits));
    let mut handles = Vec::new();
    for (i, l) in img.manifest.layers.iter().enumerate() {
        let (index, _) = arbor_fetch::toc::read_layer_toc(&store, l).await.with_context(|| {
            format!(
                "layer {i} ({}, {}) is not lazily readable; convert the image with `arbor convert` first",
                l.digest, l.media_type
            )
        })?;
        metrics.layer(&l.digest, index.data_end);
        handles.push(Arc::new(LayerHandle::new(
            &l.digest,
            l.size,
            Arc::new(index),
            vec![Arc::clone(&source)],
            a.fetch_unit,
        )));
    }
    // The layer mounts live in a directory only root can traverse: the union at DIR is the
    // one way in, with its own flags.
    let state = a.state_dir.join(format!("mount-{}", std::process::id()));
    create_dirs_0700(&a.state_dir)
        .with_context(|| format!("creating {}", a.state_dir.display()))?;
    private_dir(&state).with_context(|| format!("creating {}", state.display()))?;
    let privileges = Privileges {
        suid: a.allow_suid,
        dev: a.allow_dev,
    };
    let rt = tokio::runtime::Handle::current();
    let mut mounts = Vec::new();
    let mut lowers = Vec::new();
    let cleanup_layers = |mounts: Vec<arbor_lazyfs::Mounted>, state: &Path| {
        for m in mounts {
            let _ = m.unmount();
        }
        let _ = std::fs::remove_dir_all(state);
    };
    arbor_lazyfs::push::set_push_ahead(a.push_ahead);
    for (i, h) in handles.iter().enumerate() {
        let p = state.join(format!("layer-{i}"));
        private_dir(&p)?;
        let opts = MountOptions {
            threads: a.fuse_threads,
            allow_other: a.allow_other,
        };
        match mount_layer_with(
            Arc::clone(h),
            Arc::clone(&fetcher),
            rt.clone(),
            &p,
            &opts,
            privileges,
        ) {
            Ok(m) => mounts.push(m),
            Err(e) => {
                cleanup_layers(mounts, &state);
                return Err(e).with_context(|| format!("mounting layer {i} at {}", p.display()));
            }
        }
        lowers.push(p);
    }
    let (l2, d2) = (lowers.clone(), dir.clone());
    let union = tokio::task::spawn_blocking(move || {
        overlay::mount_readonly_union_with(&l2, &d2, privileges)
    })
    .await?;
    if let Err(e) = union {
        cleanup_layers(mounts, &state);
        return Err(e).with_context(|| format!("mounting the overlay at {}", dir.display()));
    }
    let mut prefetches = Vec::new();
    if a.prefetch {
        for h in &handles {
            let opts = PrefetchOptions {
                rest: a.prefetch_rest,
                rest_rate: a.prefetch_rate,
                rest_eager: a.prefetch_rest_eager,
                ..Default::default()
            };
            prefetches.push(tokio::spawn(prefetch_layer(
                Arc::clone(&fetcher),
                Arc::clone(h),
                opts,
            )));
        }
    }
    // Write-back of fetched chunks to the disk cache, like dirty page writeback.
    let writeback = {
        let f = Arc::clone(&fetcher);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                f.flush().await;
            }
        })
    };
    let metrics_task = match &a.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?;
            let m = Arc::clone(&metrics);
            Some(tokio::spawn(arbor_fetch::metrics::serve(
                listener,
                Arc::new(move || m.render()),
            )))
        }
        None => None,
    };
    eprintln!(
        "mounted {name} ({} layers) at {}; stop with Ctrl-C or `umount {}`",
        handles.len(),
        dir.display(),
        dir.display()
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let reason = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break "interrupted",
            _ = term.recv() => break "terminated",
            _ = poll.tick() => {
                let d = dir.clone();
                if !tokio::task::spawn_blocking(move || overlay::is_mounted(&d)).await.unwrap_or(true) {
                    break "unmounted";
                }
            }
        }
    };
    info!(reason, "stopping");
    for p in prefetches {
        p.abort();
    }
    writeback.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let d = dir.clone();
    tokio::task::spawn_blocking(move || {
        if overlay::is_mounted(&d) {
            let _ = overlay::unmount(&d);
        }
        cleanup_layers(mounts, &state);
    })
    .await?;
    fetcher.flush_all().await;
    eprintln!(
        "{reason}: unmounted {}; fetched {} bytes from the registry in {} requests",
        dir.display(),
        metrics.source_bytes("registry") + metrics.source_bytes("layout"),
        metrics.source_requests("registry") + metrics.source_requests("layout"),
    );
    Ok(())
}

/// Creates `dir` and its missing parents with mode 0700 (existing ones keep theirs: the
/// state directory may be shared, e.g. /run/arbor).
fn create_dirs_0700(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `dir`, a directory of this mount's own, with mode 0700 (also if it existed).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    create_dirs_0700(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn arbor_lazyfs_is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
