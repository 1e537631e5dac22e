//! Running the daemon: opens the store and caches under the root, restores the lazy mounts
//! of earlier runs (from kept TOCs, without the registry), then serves containerd's snapshots
//! API and Arbor's `arbor.v1.Starts` (start reports, learned start-up sets) on a unix socket and Prometheus metrics over HTTP until SIGTERM or SIGINT, when it
//! writes cached chunks back and unmounts its layers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arbor_fetch::blocks::BlockStore;
use arbor_fetch::fetcher::FetcherOptions;
use arbor_fetch::prefetch::PrefetchOptions;
use arbor_fetch::{ChunkCache, Fetcher, Metrics};
use arbor_lazyfs::holder::HolderClient;
use arbor_peer::etcd::EtcdConfig;
use arbor_peer::server::PeerServiceOptions;
use arbor_peer::tree::{Candidacy, TreeServiceOptions};
use arbor_peer::{Member, PeerService, TreeService};
use arbor_proto::arbor::Node;
use arbor_snapshotter::learn::StartsService;
use arbor_snapshotter::trees::{TreeOptions, Trees};
use arbor_snapshotter::{Remote, RemoteOptions, Service, Snapshotter};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::config::Config;

/// Holds an exclusive lock on `<root>/arbord.lock` for the life of the daemon, so two daemons
/// never share a root.
struct RootLock {
    _file: std::fs::File,
}

impl RootLock {
    fn take(root: &Path) -> Result<RootLock> {
        use std::os::unix::io::AsRawFd;
        let p = root.join("arbord.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another arbord is using {} ({}: {})",
                root.display(),
                p.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(RootLock { _file: f })
    }
}

/// Binds the socket with mode 0600, replacing a stale socket file but never a live one.
fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another process", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // Create it private from the start: no window in which others could connect.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let l = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let l = l.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Opens the chunk cache. The cache repairs what is wrong inside it; if its directory itself
/// is unusable (e.g. a file in its place), that is moved aside as `cache.broken-<secs>` and a
/// fresh cache is started: a damaged cache costs refetches, never a node without arbord.
fn open_cache(dir: &Path, budget: u64) -> Result<ChunkCache> {
    match ChunkCache::open(dir, budget) {
        Ok(c) => Ok(c),
        Err(e) => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = dir.with_file_name(format!("cache.broken-{secs}"));
            warn!(dir = %dir.display(), error = %e, aside = %aside.display(), "unusable chunk cache; moving it aside and starting an empty one");
            std::fs::rename(dir, &aside)
                .with_context(|| format!("moving {} aside", dir.display()))?;
            ChunkCache::open(dir, budget)
                .with_context(|| format!("opening the chunk cache in {}", dir.display()))
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.root)
        .with_context(|| format!("creating {}", cfg.root.display()))?;
    std::fs::set_permissions(&cfg.root, std::fs::Permissions::from_mode(0o700))?;
    let _lock = RootLock::take(&cfg.root)?;

    let metrics = Arc::new(Metrics::default());
    // Scanning a large cache takes a while: not on a runtime thread.
    let (dir, budget) = (cfg.root.join("cache"), cfg.cache.disk_size.0);
    let cache = Arc::new(tokio::task::spawn_blocking(move || open_cache(&dir, budget)).await??);
    let fetcher = Fetcher::new(
        cache,
        Arc::clone(&metrics),
        FetcherOptions {
            fetch_unit: cfg.fetch.unit.0,
            memory_budget: cfg.cache.memory_size.0,
            fetch_timeout: Duration::from_secs(cfg.fetch.timeout_secs),
            background_while_active: cfg.prefetch.rest_while_active,
            read_ahead: cfg.fetch.read_ahead,
            group_read_ahead: cfg.fetch.group_read_ahead.0,
            group_concurrency: cfg.fetch.group_concurrency,
            sequential_read_ahead: cfg.fetch.sequential_read_ahead,
            max_request: cfg.fetch.max_request.0,
            ..FetcherOptions::default()
        },
    );
    arbor_lazyfs::push::set_push_ahead(cfg.fuse.push_ahead.0);
    let remote = Arc::new(Remote::new(
        Arc::clone(&fetcher),
        RemoteOptions {
            fuse_threads: cfg.fuse.threads,
            prefetch: cfg.prefetch.enabled,
            prefetch_opts: PrefetchOptions {
                rest: cfg.prefetch.rest,
                rest_rate: cfg.prefetch.rest_rate.0,
                concurrency: cfg.prefetch.concurrency,
                rest_delay: Duration::from_secs(cfg.prefetch.rest_delay_secs),
                rest_eager: cfg.prefetch.rest_eager,
            },
            plain_http_hosts: cfg.registry.plain_http.clone(),
            registry_concurrency: cfg.fetch.registry_concurrency,
            registry_retries: cfg.fetch.retries,
            docker_config: (!cfg.registry.docker_config.is_empty())
                .then(|| PathBuf::from(&cfg.registry.docker_config)),
            allow_registries: cfg.registry.allow.clone(),
            trust_cri_labels: cfg.registry.trust_cri_labels,
            toc_timeout: Duration::from_secs(cfg.fetch.toc_timeout_secs),
            verify_layers: cfg.fetch.verify_layers,
            proof_wait: Duration::from_secs(cfg.fetch.proof_wait_secs),
            learn: arbor_snapshotter::learn::LearnOptions {
                enabled: cfg.learn.enabled,
                grace: Duration::from_secs(cfg.learn.grace_secs),
                max_age: Duration::from_secs(cfg.learn.max_age_secs),
                max_chunks: cfg.learn.max_chunks,
            },
        },
        &cfg.root.join("tocs"),
        tokio::runtime::Handle::current(),
    )?);
    let p2p = start_p2p(&cfg, &remote).await?;
    if cfg.fuse.handover {
        let (r, root) = (Arc::clone(&remote), cfg.root.clone());
        let kept = tokio::task::spawn_blocking(move || {
            let exe = std::env::current_exe().context("finding arbord's own binary")?;
            let holder = HolderClient::connect_or_spawn(
                &root.join("fdholder.sock"),
                &exe,
                &root.join("fdholder.log"),
            )
            .context("starting the fd holder (fuse.handover)")?;
            anyhow::Ok(r.set_holder(holder)?)
        })
        .await??;
        info!(
            kept,
            "fd holder answers; connections it kept will be adopted"
        );
    }
    let snap = Arc::new(Snapshotter::open(&cfg.root, Arc::clone(&remote))?);
    let restored = snap.restore().await?;
    let r = Arc::clone(&remote);
    let orphans = tokio::task::spawn_blocking(move || r.reconcile_inventory()).await?;
    info!(restored, orphans, "lazy mounts restored");

    let listener = bind_socket(&cfg.address)?;
    let (gateway, gateway_task) = start_gateway(&cfg).await?;
    let metrics_task = if cfg.metrics.address.is_empty() {
        None
    } else {
        let l = tokio::net::TcpListener::bind(&cfg.metrics.address)
            .await
            .with_context(|| format!("binding the metrics endpoint {}", cfg.metrics.address))?;
        let (m, s, r) = (Arc::clone(&metrics), Arc::clone(&snap), Arc::clone(&remote));
        let peer = p2p.peer.clone();
        let gw = gateway.clone();
        Some(tokio::spawn(arbor_fetch::metrics::serve(
            l,
            Arc::new(move || {
                let mut text = m.render();
                text.push_str(&s.render_metrics());
                text.push_str(&r.sets().render_metrics());
                if let Some(t) = r.trees() {
                    t.render_metrics(&mut text);
                }
                if let Some(p) = &peer {
                    render_peer_metrics(&p.stats(), &mut text);
                }
                if let Some(g) = &gw {
                    g.render_metrics(&mut text);
                }
                text
            }),
        )))
    };
    let writeback = {
        let f = Arc::clone(&fetcher);
        let every = Duration::from_secs(cfg.cache.writeback_interval_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                f.flush().await;
            }
        })
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let gw = gateway.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
        if let Some(g) = gw {
            // Without hand-over, instances lose their layers with this arbord, and their
            // snapshots are removed through it: they are stopped while it still serves.
            // With it, they are left running for the next arbord to adopt.
            g.shutdown().await;
        }
    };
    info!(
        socket = %cfg.address.display(),
        root = %cfg.root.display(),
        metrics = %cfg.metrics.address,
        ready_ms = started.elapsed().as_millis() as u64,
        "arbord serving containerd's snapshots API"
    );
    let served = tonic::transport::Server::builder()
        .add_service(Service::new(Arc::clone(&snap)).into_server())
        .add_service(StartsService::new(Arc::clone(&remote)).into_server())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    if let Err(e) = &served {
        warn!(error = %e, "gRPC server stopped with an error");
    }
    writeback.abort();
    if let Some(t) = gateway_task {
        t.abort();
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    // A leading manager hands over at once (its lease revoked) instead of after the lease.
    if let Some(c) = p2p.candidacy {
        c.resign().await;
    }
    if let Some(m) = &p2p.manager {
        m.close_watches();
    }
    for t in p2p.tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.address);
    fetcher.flush_all().await;
    let r = Arc::clone(&remote);
    if cfg.fuse.handover {
        let timeout = Duration::from_millis(cfg.fuse.release_timeout_ms);
        let (layers, unanswered) =
            tokio::task::spawn_blocking(move || r.release_all(timeout)).await?;
        info!(
            layers,
            unanswered, "layers left mounted for the next arbord (fuse.handover)"
        );
    } else {
        tokio::task::spawn_blocking(move || r.unmount_all()).await?;
    }
    info!("stopped");
    served.context("serving the snapshots API")
}

/// Starts the function gateway (`functions.enabled`): its API task and handle.
async fn start_gateway(
    cfg: &Config,
) -> Result<(
    Option<arbor_gateway::Gateway>,
    Option<tokio::task::JoinHandle<()>>,
)> {
    let f = &cfg.functions;
    if !f.enabled {
        return Ok((None, None));
    }
    let dir = cfg.root.join("functions");
    let opts = arbor_gateway::GatewayOptions {
        target: arbor_client::Target {
            address: f.containerd.clone(),
            namespace: f.namespace.clone(),
            snapshotter: f.snapshotter.clone(),
        },
        runtime: f.runtime.clone(),
        net: arbor_gateway::NetConfig {
            bin_dirs: f.cni_bin_dirs.clone(),
            bridge: f.bridge.clone(),
            subnet: f.subnet.clone(),
            masquerade: f.masquerade,
            netns_dir: dir.join("netns"),
            ipam_dir: dir.join("ipam"),
        },
        dir,
        plain_http_hosts: cfg.registry.plain_http.clone(),
        docker_config: (!cfg.registry.docker_config.is_empty())
            .then(|| PathBuf::from(&cfg.registry.docker_config)),
        max_body: f.max_body.0 as usize,
        max_response: f.max_response.0 as usize,
        stop_grace: Duration::from_secs(f.stop_grace_secs),
        cgroup_parent: (!f.cgroup_parent.is_empty()).then(|| f.cgroup_parent.clone()),
        // Instances read their layers through FUSE: with hand-over those stay mounted across
        // a restart, and so can the instances.
        adopt: cfg.fuse.handover,
    };
    let token = if f.token_file.is_empty() {
        None
    } else {
        let t = std::fs::read_to_string(&f.token_file)
            .with_context(|| format!("reading functions.token_file {}", f.token_file))?;
        let t = t.trim().to_string();
        anyhow::ensure!(
            !t.is_empty(),
            "functions.token_file {} is empty",
            f.token_file
        );
        Some(t)
    };
    let gw = arbor_gateway::Gateway::start(opts)
        .await
        .context("starting the function gateway")?;
    let l = tokio::net::TcpListener::bind(&f.listen)
        .await
        .with_context(|| format!("binding the function API on {}", f.listen))?;
    let router = arbor_gateway::api::router(gw.clone(), token);
    let listen = f.listen.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = arbor_gateway::api::serve(l, router, std::future::pending()).await {
            warn!(error = %e, "the function API stopped");
        }
    });
    info!(address = %listen, "function API serving (arbor fn)");
    Ok((Some(gw), Some(task)))
}

/// What runs for function trees: the Peer service's handle (for its metrics) and the tasks
/// serving the Peer and Tree services.
#[derive(Default)]
struct P2p {
    peer: Option<Arc<PeerService<Trees>>>,
    /// The tree manager, if this arbord runs one, and its place in the etcd election.
    manager: Option<Arc<TreeService>>,
    candidacy: Option<Candidacy>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts the tree manager (`p2p.run_manager`) and this node's part in function trees
/// (`p2p.enabled`): the block store, the member client, the Peer service.
async fn start_p2p(cfg: &Config, remote: &Arc<Remote>) -> Result<P2p> {
    let p = &cfg.p2p;
    let mut out = P2p::default();
    if p.run_manager {
        let listen = if p.manager_listen.is_empty() {
            p.manager.0.first().cloned().unwrap_or_default()
        } else {
            p.manager_listen.clone()
        };
        let l = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("binding the tree manager on {listen}"))?;
        let opts = TreeServiceOptions {
            heartbeat_timeout: Duration::from_secs(p.heartbeat_timeout_secs),
            ..Default::default()
        };
        let svc = if p.etcd.is_empty() {
            Arc::new(TreeService::in_memory(opts))
        } else {
            let mut etcd = EtcdConfig::new(&p.etcd);
            etcd.prefix = p.etcd_prefix.clone();
            let (svc, candidacy) = TreeService::with_etcd(&etcd, &listen, opts)
                .context("starting the tree manager over etcd")?;
            out.candidacy = Some(candidacy);
            svc
        };
        out.tasks.push(svc.start_expiry());
        let server = tonic::transport::Server::builder()
            .add_service(Arc::clone(&svc).into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l));
        out.tasks.push(tokio::spawn(async move {
            if let Err(e) = server.await {
                warn!(error = %e, "the tree manager stopped");
            }
        }));
        info!(address = %listen, etcd = %p.etcd.join(","), "tree manager serving arbor.v1.Tree");
        out.manager = Some(svc);
    }
    if !p.enabled {
        return Ok(out);
    }
    let node_id = if p.node_id.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    } else {
        p.node_id.clone()
    };
    anyhow::ensure!(
        !node_id.is_empty(),
        "p2p.node_id is empty and the host has no name"
    );
    let advertise = if p.advertise.is_empty() {
        p.listen.clone()
    } else {
        p.advertise.clone()
    };
    let member = Member::new_multi(
        &p.manager.0,
        Node {
            id: node_id.clone(),
            addr: advertise.clone(),
        },
        Duration::from_secs(p.heartbeat_secs),
    )
    .context("the tree manager's address")?;
    let blocks = BlockStore::new(cfg.root.join("blocks"))
        .with_context(|| format!("creating {}", cfg.root.join("blocks").display()))?;
    let trees = Trees::new(
        TreeOptions {
            node_id: node_id.clone(),
            peer_stall: Duration::from_millis(p.peer_stall_ms),
            peer_timeout: Duration::from_secs(p.peer_timeout_secs),
            registry_timeout: Duration::from_secs(cfg.fetch.timeout_secs),
            idle_leave: Duration::from_secs(p.idle_leave_secs),
            join_wait: Duration::from_millis(p.join_wait_ms),
        },
        blocks,
        Arc::new(member),
        tokio::runtime::Handle::current(),
    );
    remote.set_trees(Arc::clone(&trees));
    let peer = Arc::new(PeerService::new(
        trees,
        PeerServiceOptions {
            upload_limit: p.upload_limit.0,
            layer_wait: Duration::from_millis(p.layer_wait_ms),
            ..Default::default()
        },
    ));
    let l = tokio::net::TcpListener::bind(&p.listen)
        .await
        .with_context(|| format!("binding the peer service on {}", p.listen))?;
    let server = tonic::transport::Server::builder()
        .add_service(PeerService::clone(&peer).into_server())
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l));
    out.tasks.push(tokio::spawn(async move {
        if let Err(e) = server.await {
            warn!(error = %e, "the peer service stopped");
        }
    }));
    info!(node = %node_id, listen = %p.listen, advertise = %advertise, manager = %p.manager, "serving function trees (arbor.v1.Peer)");
    out.peer = Some(peer);
    Ok(out)
}

/// Prometheus text for the Peer service.
fn render_peer_metrics(s: &arbor_peer::server::PeerServiceStats, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP arbor_p2p_served_requests_total Peer requests from this node's children, by outcome."
    );
    let _ = writeln!(out, "# TYPE arbor_p2p_served_requests_total counter");
    for (outcome, n) in [
        ("completed", s.completed),
        ("refused", s.refused),
        ("not_found", s.not_found),
        ("busy", s.busy),
        ("failed", s.failed),
        ("cancelled", s.cancelled),
    ] {
        let _ = writeln!(
            out,
            "arbor_p2p_served_requests_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP arbor_p2p_served_bytes_total Blob bytes sent to children, by child node."
    );
    let _ = writeln!(out, "# TYPE arbor_p2p_served_bytes_total counter");
    for (node, n) in &s.bytes_by_node {
        let node = node.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(out, "arbor_p2p_served_bytes_total{{node=\"{node}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP arbor_p2p_served_inflight Peer requests streaming now."
    );
    let _ = writeln!(out, "# TYPE arbor_p2p_served_inflight gauge");
    let _ = writeln!(out, "arbor_p2p_served_inflight {}", s.inflight);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_cache_dir_does_not_stop_start() {
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("cache");
        // Damage inside the cache is repaired by the cache itself.
        std::fs::create_dir_all(cache.join("chunks")).unwrap();
        std::fs::write(cache.join("chunks/ab"), b"not a directory").unwrap();
        std::fs::write(cache.join("tmp"), b"not a directory").unwrap();
        open_cache(&cache, 1 << 20).expect("a damaged cache must not stop arbord");
        assert!(!cache.join("chunks/ab").exists());
        assert!(cache.join("tmp").is_dir());
        // The cache directory itself unusable (a file in its place): moved aside.
        std::fs::remove_dir_all(&cache).unwrap();
        std::fs::write(&cache, b"not a directory").unwrap();
        let c = open_cache(&cache, 1 << 20).expect("an unusable cache must not stop arbord");
        assert_eq!(c.usage(), (0, 0));
        assert!(cache.is_dir());
        let aside: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("cache.broken-"))
            .collect();
        assert_eq!(aside.len(), 1);
    }
}
