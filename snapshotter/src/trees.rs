//! Function trees on this node: which layers it serves in which function's tree, where their
//! missing blocks come from, and what its Peer service may hand its children.
//!
//! A lazily mounted layer that belongs to a function (the `containerd.io/snapshot/arbor.function`
//! label, else the image manifest) and carries a block table is read through an
//! [`arbor_fetch::blocks::BlockSource`]: its blocks are kept in the node's
//! [`arbor_fetch::blocks::BlockStore`] and the missing ones come from the layer's
//! [`arbor_fetch::router::Router`], whose routes follow the node's position in the function's
//! tree: parent, grandparent (each a [`arbor_peer::PeerSource`] with a stall deadline), then
//! the registry. The first layer of a function joins its tree in the background (a Prepare waits
//! for the manager only to read the layer's TOC through the tree, [`Trees::read_unblocked`]; a
//! new layer's first fetches wait up to `join_wait` for the position, then read the registry;
//! neither waits once a join has failed); every position change the manager streams swaps the routes of all
//! the function's layers at once.
//! When the last layer of a function is unmounted the node keeps serving its children for
//! `idle_leave`, then leaves the tree and deletes the function's blocks.
//!
//! [`Trees`] is also the [`arbor_peer::server::Provider`] of the node's Peer service: a child
//! gets the same `BlockSource` the node reads from, so a block the node is still fetching is sent
//! the moment it is proved. A node is never asked by its parent chain, and never asks its
//! subtree: routes only point up.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_fetch::BlobSource;
use arbor_fetch::blocks::{BlockSource, BlockStore, BlockTable};
use arbor_fetch::router::{Route, Router};
use arbor_peer::{Member, PeerSource};
use arbor_proto::arbor::Position;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use crate::error::{Error, Result};

/// How this node takes part in function trees.
#[derive(Debug, Clone)]
pub struct TreeOptions {
    /// This node's id in every tree.
    pub node_id: String,
    /// A parent silent (no bytes, no keep-alive) for this long is given up for the next route.
    pub peer_stall: Duration,
    /// Bound on one read from a peer.
    pub peer_timeout: Duration,
    /// Bound on one read from the registry.
    pub registry_timeout: Duration,
    /// How long a function's tree is kept (and served) after its last layer is unmounted.
    pub idle_leave: Duration,
    /// How long a freshly mounted layer's first fetches wait for the node's place in the tree
    /// before they go to the registry (in a burst every node but the root would otherwise
    /// read the registry until its place arrives).
    pub join_wait: Duration,
}

struct Served {
    source: Arc<BlockSource>,
    /// The registry source of the layer's repository (its last route).
    registry: Arc<dyn BlobSource>,
    size: u64,
    /// Mounts reading through this layer now (0: kept only to serve children).
    mounts: usize,
}

struct Function {
    /// True once the node's place in the tree is known, or once joining failed (the manager
    /// is unreachable: waiting for a place is pointless until a retry succeeds). Reads that
    /// would go to the registry wait for it, up to `join_wait`.
    placed: tokio::sync::watch::Sender<bool>,
    layers: HashMap<String, Served>,
    position: Option<Position>,
    watcher: Option<JoinHandle<()>>,
    leave: Option<JoinHandle<()>>,
}

impl Default for Function {
    fn default() -> Self {
        Function {
            placed: tokio::sync::watch::Sender::new(false),
            layers: HashMap::new(),
            position: None,
            watcher: None,
            leave: None,
        }
    }
}

/// This node's function trees; see the module docs.
pub struct Trees {
    opts: TreeOptions,
    store: Arc<BlockStore>,
    member: Arc<Member>,
    rt: tokio::runtime::Handle,
    functions: Mutex<HashMap<String, Function>>,
    /// Verified TOCs read through the trees, by route ([`Trees::note_toc`]).
    tocs: Mutex<std::collections::BTreeMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Trees {
    pub fn new(
        opts: TreeOptions,
        store: Arc<BlockStore>,
        member: Arc<Member>,
        rt: tokio::runtime::Handle,
    ) -> Arc<Trees> {
        Arc::new(Trees {
            opts,
            store,
            member,
            rt,
            functions: Mutex::new(HashMap::new()),
            tocs: Default::default(),
        })
    }

    /// The source a mount of layer `digest` (of `function`) reads its blob through. Never
    /// blocks on the network.
    pub fn attach(
        self: &Arc<Self>,
        function: &str,
        digest: &str,
        size: u64,
        table: BlockTable,
        registry: Arc<dyn BlobSource>,
    ) -> Result<Arc<BlockSource>> {
        let mut fns = lock(&self.functions);
        let f = fns.entry(function.to_string()).or_default();
        if let Some(l) = f.leave.take() {
            l.abort();
        }
        if let Some(s) = f.layers.get_mut(digest) {
            s.mounts += 1;
            return Ok(Arc::clone(&s.source));
        }
        let routes = self.routes(function, f.position.as_ref(), Arc::clone(&registry));
        let router = Arc::new(Router::new(routes));
        let source = self
            .store
            .layer(digest, table, router)
            .map_err(|e| Error::Internal(format!("block store: {e}")))?;
        if !*f.placed.borrow() {
            source.wait_for_routes(
                f.placed.subscribe(),
                tokio::time::Instant::now() + self.opts.join_wait,
            );
        }
        f.layers.insert(
            digest.to_string(),
            Served {
                source: Arc::clone(&source),
                registry,
                size,
                mounts: 1,
            },
        );
        if f.watcher.is_none() {
            f.watcher = Some(self.spawn_watch(function));
        }
        Ok(source)
    }

    /// A mount of layer `digest` ended. When no layer of `function` is mounted any more the
    /// node leaves its tree after `idle_leave` (serving its children until then).
    pub fn detach(self: &Arc<Self>, function: &str, digest: &str) {
        let mut fns = lock(&self.functions);
        let Some(f) = fns.get_mut(function) else {
            return;
        };
        if let Some(s) = f.layers.get_mut(digest) {
            s.mounts = s.mounts.saturating_sub(1);
        }
        self.leave_when_idle(function, f);
    }

    /// With no layer of `function` mounted, leaves its tree after `idle_leave` (unless a
    /// mount comes first).
    fn leave_when_idle(self: &Arc<Self>, function: &str, f: &mut Function) {
        if f.layers.values().all(|s| s.mounts == 0) && f.leave.is_none() {
            let me = Arc::clone(self);
            let function = function.to_string();
            let idle = self.opts.idle_leave;
            f.leave = Some(self.rt.spawn(async move {
                tokio::time::sleep(idle).await;
                me.leave(&function).await;
            }));
        }
    }

    /// Counts a TOC read through the tree that passed its check, by the route that served it.
    pub fn note_toc(&self, route: &str) {
        *lock(&self.tocs).entry(route.to_string()).or_default() += 1;
    }

    /// Bytes `[offset, offset + len)` of blob `digest` past its block table (a layer's TOC,
    /// read before the layer is mounted) through `function`'s tree: parent, grandparent,
    /// then `registry`. Joins the tree if this node is not in it yet and waits up to
    /// `join_wait` for its place, as a mount's first fetches do. A parent answers from the
    /// TOC it kept when it mounted the layer ([`BlockSource::keep_toc`]), so only the root
    /// reads it from the registry. Not verified here: the caller checks the TOC digest.
    pub async fn read_unblocked(
        self: &Arc<Self>,
        function: &str,
        digest: &str,
        offset: u64,
        len: u64,
        registry: Arc<dyn BlobSource>,
    ) -> std::result::Result<(bytes::Bytes, String), arbor_fetch::SourceError> {
        let mut placed = {
            let mut fns = lock(&self.functions);
            let f = fns.entry(function.to_string()).or_default();
            if f.watcher.is_none() {
                f.watcher = Some(self.spawn_watch(function));
            }
            f.placed.subscribe()
        };
        let _ = tokio::time::timeout(self.opts.join_wait, placed.wait_for(|v| *v)).await;
        let pos = lock(&self.functions)
            .get(function)
            .and_then(|f| f.position.clone());
        let router = Router::new(self.routes(function, pos.as_ref(), registry));
        let got = router.read_routed(digest, offset, len).await;
        // Joined only for this read, if no layer of the function gets mounted.
        if let Some(f) = lock(&self.functions).get_mut(function) {
            self.leave_when_idle(function, f);
        }
        got
    }

    /// Leaves `function`'s tree now (if no layer of it is mounted) and deletes its blocks.
    async fn leave(&self, function: &str) {
        let gone = {
            let mut fns = lock(&self.functions);
            match fns.get(function) {
                Some(f) if f.layers.values().all(|s| s.mounts == 0) => fns.remove(function),
                _ => None,
            }
        };
        let Some(f) = gone else { return };
        if let Some(w) = f.watcher {
            w.abort();
        }
        if let Err(e) = self.member.leave(function).await {
            warn!(function, error = %e, "leaving the function's tree failed (the manager fails the node out when it stops heartbeating for it)");
        }
        let still_used: Vec<String> = lock(&self.functions)
            .values()
            .flat_map(|f| f.layers.keys().cloned())
            .collect();
        for digest in f.layers.keys() {
            if !still_used.contains(digest)
                && let Err(e) = self.store.remove(digest)
            {
                warn!(layer = %digest, error = %e, "removing the layer's blocks failed");
            }
        }
        info!(function, "left the function's tree");
    }

    /// Joins `function`'s tree and follows the position the manager streams.
    fn spawn_watch(self: &Arc<Self>, function: &str) -> JoinHandle<()> {
        let me = Arc::clone(self);
        let function = function.to_string();
        let span = info_span!("function_tree", function = %function);
        self.rt.spawn(
            async move {
                let mut rx = loop {
                    match me.member.join(&function).await {
                        Ok(rx) => break rx,
                        Err(e) => {
                            warn!(error = %e, "joining the function's tree failed; reading the registry, retrying");
                            if let Some(f) = lock(&me.functions).get(&function) {
                                f.placed.send_replace(true);
                            }
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                };
                loop {
                    let pos = rx.borrow_and_update().clone();
                    me.set_position(&function, pos);
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
            .instrument(span),
        )
    }

    /// Points every layer of `function` at its new parent and grandparent.
    fn set_position(&self, function: &str, pos: Option<Position>) {
        let mut fns = lock(&self.functions);
        let Some(f) = fns.get_mut(function) else {
            return;
        };
        info!(
            function,
            parent = pos
                .as_ref()
                .and_then(|p| p.parent.as_ref())
                .map(|n| n.id.as_str())
                .unwrap_or("-"),
            depth = pos.as_ref().map(|p| p.depth),
            "position in the function's tree"
        );
        for s in f.layers.values() {
            let routes = self.routes(function, pos.as_ref(), Arc::clone(&s.registry));
            s.source.upstream().set_routes(routes);
            s.source.upstream().forgive();
        }
        if pos.as_ref().is_some_and(|p| !p.removed) {
            f.placed.send_replace(true);
        }
        f.position = pos;
    }

    /// parent → grandparent → registry (the peers only while the position is known).
    fn routes(
        &self,
        function: &str,
        pos: Option<&Position>,
        registry: Arc<dyn BlobSource>,
    ) -> Vec<Route> {
        let mut routes = Vec::new();
        // The peers' channels spawn their workers on the runtime.
        let _rt = self.rt.enter();
        if let Some(p) = pos.filter(|p| !p.removed) {
            for (name, node) in [("parent", &p.parent), ("grandparent", &p.grandparent)] {
                let Some(node) = node else { continue };
                match PeerSource::new(
                    &node.addr,
                    function,
                    &self.opts.node_id,
                    self.opts.peer_stall,
                ) {
                    Ok(s) => routes.push(Route::new(name, Arc::new(s), self.opts.peer_timeout)),
                    Err(e) => {
                        warn!(function, peer = %node.addr, error = %e, "cannot read from this peer")
                    }
                }
            }
        }
        routes.push(Route::new("registry", registry, self.opts.registry_timeout));
        routes
    }

    /// The block source of layer `digest` in whichever function's tree serves it.
    pub fn source_of(&self, digest: &str) -> Option<Arc<dyn BlobSource>> {
        lock(&self.functions)
            .values()
            .find_map(|f| f.layers.get(digest))
            .map(|s| Arc::clone(&s.source) as Arc<dyn BlobSource>)
    }

    /// Prometheus text for the trees: position, per-route traffic and errors, blocks.
    pub fn render_metrics(&self, out: &mut String) {
        let fns = lock(&self.functions);
        let _ = writeln!(
            out,
            "# HELP arbor_p2p_tree_depth This node's depth in each function's tree (0: root, -1: not placed yet)."
        );
        let _ = writeln!(out, "# TYPE arbor_p2p_tree_depth gauge");
        for (name, f) in fns.iter() {
            let depth = f
                .position
                .as_ref()
                .filter(|p| !p.removed)
                .map_or(-1, |p| i64::from(p.depth));
            let _ = writeln!(
                out,
                "arbor_p2p_tree_depth{{function=\"{}\"}} {depth}",
                escape(name)
            );
        }
        let _ = writeln!(
            out,
            "# HELP arbor_p2p_route_bytes_total Blob bytes each route served this node's function-tree layers."
        );
        let _ = writeln!(out, "# TYPE arbor_p2p_route_bytes_total counter");
        let _ = writeln!(
            out,
            "# HELP arbor_p2p_route_errors_total Failed reads per route and kind (bad: bytes that failed verification)."
        );
        let _ = writeln!(out, "# TYPE arbor_p2p_route_errors_total counter");
        let _ = writeln!(
            out,
            "# HELP arbor_p2p_blocks_total Blocks of function-tree layers, by where they came from."
        );
        let _ = writeln!(out, "# TYPE arbor_p2p_blocks_total counter");
        let mut bytes: HashMap<(String, String), u64> = HashMap::new();
        let mut errors: HashMap<(String, String, &'static str), u64> = HashMap::new();
        let (mut local, mut fetched, mut corrupt) = (0u64, 0u64, 0u64);
        for (name, f) in fns.iter() {
            for s in f.layers.values() {
                for r in s.source.upstream().stats() {
                    *bytes.entry((name.clone(), r.name.clone())).or_default() += r.bytes;
                    for (kind, n) in [
                        ("lacks", r.lacks),
                        ("timeout", r.timeouts),
                        ("unavailable", r.unavailable),
                        ("refused", r.refused),
                        ("short", r.short),
                        ("bad", r.bad),
                    ] {
                        *errors
                            .entry((name.clone(), r.name.clone(), kind))
                            .or_default() += n;
                    }
                }
                let b = s.source.stats();
                local += b.local;
                fetched += b.fetched;
                corrupt += b.corrupt + b.local_corrupt;
            }
        }
        for ((f, r), n) in bytes {
            let _ = writeln!(
                out,
                "arbor_p2p_route_bytes_total{{function=\"{}\",route=\"{r}\"}} {n}",
                escape(&f)
            );
        }
        for ((f, r, k), n) in errors {
            let _ = writeln!(
                out,
                "arbor_p2p_route_errors_total{{function=\"{}\",route=\"{r}\",kind=\"{k}\"}} {n}",
                escape(&f)
            );
        }
        let _ = writeln!(out, "arbor_p2p_blocks_total{{from=\"store\"}} {local}");
        let _ = writeln!(out, "arbor_p2p_blocks_total{{from=\"fetched\"}} {fetched}");
        let _ = writeln!(out, "arbor_p2p_blocks_total{{from=\"corrupt\"}} {corrupt}");
        let _ = writeln!(
            out,
            "# HELP arbor_p2p_tocs_total Layer TOCs read through function trees (and checked against their digest), by the route that served them."
        );
        let _ = writeln!(out, "# TYPE arbor_p2p_tocs_total counter");
        for (r, n) in lock(&self.tocs).iter() {
            let _ = writeln!(out, "arbor_p2p_tocs_total{{route=\"{}\"}} {n}", escape(r));
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl arbor_peer::server::Provider for Trees {
    fn source(&self, function: &str, digest: &str) -> Option<(Arc<dyn BlobSource>, u64)> {
        let fns = lock(&self.functions);
        let s = fns.get(function)?.layers.get(digest)?;
        Some((Arc::clone(&s.source) as Arc<dyn BlobSource>, s.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_fetch::source::ReadFuture;
    use arbor_proto::arbor::Node;

    /// A registry holding one blob in memory.
    struct Blob(&'static [u8]);

    impl BlobSource for Blob {
        fn kind(&self) -> &'static str {
            "registry"
        }
        fn read_range<'a>(&'a self, _d: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
            let b = bytes::Bytes::from_static(&self.0[offset as usize..(offset + len) as usize]);
            Box::pin(async move { Ok(b) })
        }
    }

    /// With the manager unreachable the join fails at once, and a TOC read goes to the
    /// registry then instead of waiting out `join_wait` (every Prepare would).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_toc_read_does_not_wait_for_an_unreachable_manager() {
        let dir = tempfile::tempdir().unwrap();
        // Port 1 on loopback: connection refused.
        let member = Arc::new(
            Member::new(
                "127.0.0.1:1",
                Node {
                    id: "n0".into(),
                    addr: "127.0.0.1:2".into(),
                },
                Duration::from_secs(1),
            )
            .unwrap(),
        );
        let trees = Trees::new(
            TreeOptions {
                node_id: "n0".into(),
                peer_stall: Duration::from_secs(1),
                peer_timeout: Duration::from_secs(5),
                registry_timeout: Duration::from_secs(5),
                idle_leave: Duration::from_secs(60),
                join_wait: Duration::from_secs(30),
            },
            BlockStore::new(dir.path()).unwrap(),
            member,
            tokio::runtime::Handle::current(),
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        let started = std::time::Instant::now();
        let (got, route) = trees
            .read_unblocked("f", &digest, 6, 5, Arc::new(Blob(b"hello world!")))
            .await
            .unwrap();
        assert_eq!((&got[..], route.as_str()), (&b"world"[..], "registry"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited {:?} for a manager that cannot answer",
            started.elapsed()
        );
    }
}
