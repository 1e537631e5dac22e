//! [`TreeService`]: the function-tree manager's gRPC service (`arbor.v1.Tree`).
//!
//! It wraps the pure [`arbor_p2p::Manager`] (which decides who is whose parent) with what a
//! network service needs:
//!
//! - a clock: milliseconds since the service was created, read from [`tokio::time::Instant`]
//!   (so tests may pause time);
//! - node addresses: the `host:port` of every member's Peer service, learnt from `Join` and
//!   `Heartbeat`, so that a [`Position`] names its parent and grandparent as dialable
//!   [`Node`]s;
//! - persistence: the manager's [`Snapshot`] is saved to a [`Store`] after every membership
//!   change (join, leave, expiry; not after a mere heartbeat, whose time is not kept across a
//!   restart anyway) and restored when the service is created. The snapshot holds trees and heartbeat
//!   times only, and the [`Store`] trait holds nothing else, so **addresses are not persisted**
//!   (except by [`TreeService::with_etcd`], below):
//!   after a restart they are re-learnt from the members' next heartbeat (every member
//!   heartbeats every couple of seconds) or join; until then a restored member is listed with an
//!   empty `addr`. Restored heartbeat times are reset to the restart, which gives every
//!   restored member one full timeout to heartbeat again before it is failed out;
//! - watch streams: one [`tokio::sync::watch`] channel per watched `(function, node)` holding
//!   that node's current position. After every operation the positions of the watched members
//!   of every tree it touched are recomputed (a node's parent change also changes its
//!   children's grandparent, and an address change changes what its children see), and only the
//!   channels whose value differs are updated. The manager never waits for a watcher: a watch
//!   channel keeps only the latest value, and each stream is fed by its own task;
//! - heartbeat expiry: a background task ([`TreeService::spawn_expiry`]) that fails silent
//!   nodes out of all their trees and notifies the watchers;
//! - high availability ([`TreeService::with_etcd`]): several managers share an etcd cluster
//!   ([`crate::etcd`]); one is elected leader and serves, the others are *standby* and answer
//!   every call with `UNAVAILABLE` ("standby; leader is ADDR", or "standby; no leader elected
//!   yet"), which sends a [`Member`](crate::member::Member) given several manager addresses to
//!   the leader. The leader's state (snapshot **and** member addresses) is written to etcd
//!   after every membership or address change; writes are handed to a background task (latest
//!   wins, the service never waits for etcd) and fenced by the leader's lease, so a deposed
//!   leader cannot overwrite its successor's state. When a standby is elected it loads the
//!   latest state (heartbeat clocks restart then, as in [`TreeService::new`]) and serves; when
//!   a leader loses its lease it goes back to standby, forgets its state and ends every watch
//!   stream, so the members move to the new leader. A [`Candidacy`] drives this.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arbor_p2p::{
    Change, FunctionId, FunctionTree, Manager, ManagerError, MemoryStore, Millis, NodeId, Snapshot,
    Store,
};
use arbor_proto::arbor::tree_server::{Tree, TreeServer};
use arbor_proto::arbor::{
    HeartbeatRequest, HeartbeatResponse, JoinRequest, LeaveRequest, LeaveResponse, ListRequest,
    ListResponse, Node, Position, TreeInfo, WatchRequest,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, debug, error, field, info, info_span, instrument, warn};

use crate::etcd::{Election, EtcdClient, EtcdConfig, EtcdError, EtcdStore, StoredState};

/// How a standby manager's `UNAVAILABLE` message starts when it knows the leader; the
/// leader's `host:port` follows.
pub const STANDBY_PREFIX: &str = "standby; leader is ";

/// The longest function id, node id or address accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// How many positions a watch stream buffers for a slow client before its feeder waits (the
/// manager never waits: the feeder reads the latest value of a watch channel).
const WATCH_BUFFER: usize = 4;

/// Settings of a [`TreeService`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeServiceOptions {
    /// A node silent (no heartbeat, no join) for longer than this fails out of every tree it is
    /// in. Default 6 s (three missed heartbeats of a [`Member`](crate::member::Member) at its default
    /// 2 s interval).
    pub heartbeat_timeout: Duration,
    /// How often [`TreeService::start_expiry`] looks for silent nodes. Default 1 s.
    pub expiry_interval: Duration,
}

impl Default for TreeServiceOptions {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(6),
            expiry_interval: Duration::from_secs(1),
        }
    }
}

/// The `arbor.v1.Tree` service: the function-tree manager on the wire (see the
/// [module docs](self)). Share it as an `Arc` between the gRPC server
/// ([`into_server`](Self::into_server)) and the expiry task
/// ([`spawn_expiry`](Self::spawn_expiry)).
pub struct TreeService {
    state: Mutex<State>,
    start: Instant,
    options: TreeServiceOptions,
    /// The leader as last observed by the election (standby managers name it).
    leader: Option<watch::Receiver<Option<String>>>,
}

/// Whether the service serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// It serves (the only role without etcd).
    Active,
    /// It waits to be elected: every call is refused with `UNAVAILABLE`.
    Standby,
}

/// Where the state is saved.
enum Persist {
    /// A [`Store`]: the snapshot only.
    Store(Box<dyn Store + Send>),
    /// etcd: the snapshot and the member addresses, written in the background.
    Etcd(EtcdStore),
}

/// Everything behind the service's one mutex (never held across an `.await`).
struct State {
    manager: Manager,
    /// `host:port` of each member's Peer service, as last reported.
    addrs: HashMap<NodeId, String>,
    persist: Persist,
    role: Role,
    /// The watched members: their current position, per function.
    watchers: HashMap<FunctionId, HashMap<NodeId, watch::Sender<Position>>>,
}

impl std::fmt::Debug for TreeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("TreeService")
            .field("functions", &st.manager.functions().count())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl TreeService {
    /// A service over `store`: the state last saved there is restored (see the
    /// [module docs](self) for what is and is not restored), and every later membership change
    /// is saved there. Fails if the store cannot be read or holds an invalid snapshot.
    pub fn new(
        store: Box<dyn Store + Send>,
        options: TreeServiceOptions,
    ) -> Result<Self, ManagerError> {
        let manager = match store.load()? {
            Some(mut snapshot) => {
                // Heartbeat times are on the previous service's clock; this one starts at 0.
                for last in snapshot.heartbeats.values_mut() {
                    *last = 0;
                }
                let manager = Manager::restore(snapshot)?;
                info!(
                    functions = manager.functions().count(),
                    "function trees restored from the store"
                );
                manager
            }
            None => Manager::new(),
        };
        Ok(Self {
            state: Mutex::new(State {
                manager,
                addrs: HashMap::new(),
                persist: Persist::Store(store),
                role: Role::Active,
                watchers: HashMap::new(),
            }),
            start: Instant::now(),
            options,
            leader: None,
        })
    }

    /// A service that keeps its state in a fresh [`MemoryStore`] (nothing survives the
    /// process).
    pub fn in_memory(options: TreeServiceOptions) -> Self {
        Self {
            state: Mutex::new(State {
                manager: Manager::new(),
                addrs: HashMap::new(),
                persist: Persist::Store(Box::new(MemoryStore::new())),
                role: Role::Active,
                watchers: HashMap::new(),
            }),
            start: Instant::now(),
            options,
            leader: None,
        }
    }

    /// A *standby* manager whose state lives in etcd and which serves only while elected
    /// leader (see the [module docs](self)). `my_addr` is the `host:port` members dial for this
    /// manager's Tree service (it is what standby managers name as the leader). Also returns
    /// the [`Candidacy`] that campaigns and flips the service between standby and active: keep
    /// it for as long as the service runs, and [`resign`](Candidacy::resign) on a graceful
    /// shutdown. Start the expiry task as usual ([`start_expiry`](Self::start_expiry); it has
    /// nothing to do while standby). Must be called within a Tokio runtime; etcd is contacted
    /// in the background (an unreachable etcd keeps the service standby, retrying).
    pub fn with_etcd(
        etcd: &EtcdConfig,
        my_addr: &str,
        options: TreeServiceOptions,
    ) -> Result<(Arc<Self>, Candidacy), EtcdError> {
        if my_addr.len() > MAX_ID_LEN || !valid_addr(my_addr) {
            return Err(EtcdError::InvalidManagerAddress(my_addr.to_owned()));
        }
        let client = EtcdClient::new(&etcd.endpoints)?;
        let (fence, fence_rx) = watch::channel(0_i64);
        let store = EtcdStore::fenced(client.clone(), &etcd.prefix, fence_rx);
        let election = Election::new(client, &etcd.prefix, my_addr, etcd.lease_ttl);
        let (observed, observed_rx) = watch::channel(None);
        let service = Arc::new(Self {
            state: Mutex::new(State {
                manager: Manager::new(),
                addrs: HashMap::new(),
                persist: Persist::Etcd(store.clone()),
                role: Role::Standby,
                watchers: HashMap::new(),
            }),
            start: Instant::now(),
            options,
            leader: Some(observed_rx.clone()),
        });
        let (stop, stop_rx) = oneshot::channel();
        let span = info_span!("tree_election", manager = my_addr);
        let task = tokio::spawn(
            lead(
                Arc::downgrade(&service),
                election,
                store,
                fence,
                observed,
                stop_rx,
            )
            .instrument(span),
        );
        Ok((
            service,
            Candidacy {
                observed: observed_rx,
                stop: Some(stop),
                task,
            },
        ))
    }

    /// Whether the service serves (always, unless created by [`with_etcd`](Self::with_etcd)
    /// and not leader now).
    pub fn is_active(&self) -> bool {
        self.lock().role == Role::Active
    }

    /// Becomes active with `restored` (the state loaded from etcd, `None` for none): the
    /// trees and addresses are restored, heartbeat clocks restart now.
    fn activate(&self, restored: Option<StoredState>) {
        let now = self.now();
        let mut st = self.lock();
        let (manager, addrs) = match restored {
            Some(StoredState {
                mut snapshot,
                addrs,
            }) => {
                for last in snapshot.heartbeats.values_mut() {
                    *last = now;
                }
                match Manager::restore(snapshot) {
                    Ok(manager) => (manager, addrs),
                    Err(e) => {
                        error!(error = %e, "the stored state is invalid: starting empty");
                        (Manager::new(), BTreeMap::new())
                    }
                }
            }
            None => (Manager::new(), BTreeMap::new()),
        };
        st.addrs = addrs
            .into_iter()
            .map(|(id, addr)| (NodeId::new(id), addr))
            .filter(|(id, _)| !manager.functions_of(id).is_empty())
            .collect();
        info!(
            functions = manager.functions().count(),
            addrs = st.addrs.len(),
            "leader: function trees restored, serving"
        );
        st.manager = manager;
        st.watchers.clear();
        st.role = Role::Active;
    }

    /// Goes back to standby: forgets the state and ends every watch stream.
    fn deactivate(&self) {
        let mut st = self.lock();
        st.role = Role::Standby;
        st.manager = Manager::new();
        st.addrs.clear();
        let watched = st.watchers.drain().count();
        info!(watched, "standby: state dropped, watch streams closed");
    }

    /// `UNAVAILABLE` if the service is standby.
    fn check_active(&self, st: &State) -> Result<(), Status> {
        if st.role == Role::Active {
            return Ok(());
        }
        let leader = self.leader.as_ref().and_then(|rx| rx.borrow().clone());
        Err(Status::unavailable(match leader {
            Some(addr) => format!("{STANDBY_PREFIX}{addr}"),
            None => "standby; no leader elected yet".to_owned(),
        }))
    }

    /// The options the service was created with.
    pub fn options(&self) -> &TreeServiceOptions {
        &self.options
    }

    /// The tonic server for this service, to add to a [`tonic::transport::Server`].
    pub fn into_server(self: Arc<Self>) -> TreeServer<TreeService> {
        TreeServer::from_arc(self)
    }

    /// The manager's current state (what is saved to the store).
    pub fn snapshot(&self) -> Snapshot {
        self.lock().manager.snapshot()
    }

    /// Fails out of every tree each node silent for longer than `timeout`, updates the
    /// watchers and saves the state. Returns the failed nodes (one entry per tree left).
    pub fn expire(&self, timeout: Duration) -> Vec<(FunctionId, NodeId)> {
        let now = self.now();
        let timeout = Millis::try_from(timeout.as_millis()).unwrap_or(Millis::MAX);
        let mut st = self.lock();
        let changes = st.manager.expire(now, timeout);
        if changes.is_empty() {
            return Vec::new();
        }
        let mut functions = BTreeSet::new();
        let mut failed = Vec::new();
        for (function, change) in changes {
            if let Change::Removed { node } = change {
                warn!(%function, %node, "node missed its heartbeats: failed out of the tree");
                failed.push((function.clone(), node));
            }
            functions.insert(function);
        }
        st.save();
        for function in &functions {
            st.refresh(function);
        }
        for (_, node) in &failed {
            st.forget_addr_if_gone(node);
        }
        failed
    }

    /// Starts the expiry task with the service's [`options`](TreeServiceOptions).
    pub fn start_expiry(self: &Arc<Self>) -> JoinHandle<()> {
        self.spawn_expiry(self.options.heartbeat_timeout, self.options.expiry_interval)
    }

    /// Starts a task that calls [`expire`](Self::expire) with `timeout` every `every`. A node
    /// therefore fails out at most `timeout + every` after its last heartbeat. The task holds
    /// only a weak reference: it ends when the service is dropped (or when aborted).
    pub fn spawn_expiry(self: &Arc<Self>, timeout: Duration, every: Duration) -> JoinHandle<()> {
        let service = Arc::downgrade(self);
        let every = every.max(Duration::from_millis(1));
        tokio::spawn(
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(service) = service.upgrade() else {
                        return;
                    };
                    service.expire(timeout);
                }
            }
            .instrument(tracing::info_span!("tree_expiry")),
        )
    }

    /// Ends every open watch stream now (without a `removed` message), e.g. before a graceful
    /// server shutdown, which otherwise waits for the streams. Watching again afterwards works.
    pub fn close_watches(&self) {
        let drained: Vec<_> = self.lock().watchers.drain().collect();
        debug!(functions = drained.len(), "watch streams closed");
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the service was created.
    fn now(&self) -> Millis {
        Millis::try_from(self.start.elapsed().as_millis()).unwrap_or(Millis::MAX)
    }
}

impl State {
    /// Saves the manager's state; a failing store is logged, the service goes on in memory.
    fn save(&mut self) {
        match &mut self.persist {
            Persist::Store(store) => {
                if let Err(e) = self.manager.save_to(&mut **store) {
                    warn!(error = %e, "saving the function trees failed");
                }
            }
            Persist::Etcd(store) => {
                let addrs: BTreeMap<String, String> = self
                    .addrs
                    .iter()
                    .map(|(id, addr)| (id.0.clone(), addr.clone()))
                    .collect();
                store.save_state(&self.manager.snapshot(), &addrs);
            }
        }
    }

    /// Saves after an address change, where addresses are persisted (etcd).
    fn save_addrs(&mut self) {
        if matches!(self.persist, Persist::Etcd(_)) {
            self.save();
        }
    }

    fn node(&self, id: &NodeId) -> Node {
        node_of(id, &self.addrs)
    }

    /// `node`'s position in `function`'s tree, `None` if it is not a member.
    fn position(&self, function: &FunctionId, node: &NodeId) -> Option<Position> {
        let tree = self.manager.tree(function)?;
        position_in(function, tree, node, &self.addrs)
    }

    /// Recomputes the position of every watched member of `function`'s tree and updates the
    /// channels whose position changed; watchers of nodes no longer in the tree get their last
    /// (`removed`) message and are dropped, as are channels nobody listens to any more.
    fn refresh(&mut self, function: &FunctionId) {
        let State {
            manager,
            addrs,
            watchers,
            ..
        } = self;
        let Some(watched) = watchers.get_mut(function) else {
            return;
        };
        let tree = manager.tree(function);
        watched.retain(|node, tx| {
            if tx.is_closed() {
                return false;
            }
            match tree.and_then(|t| position_in(function, t, node, addrs)) {
                Some(position) => {
                    tx.send_if_modified(|current| {
                        if *current == position {
                            false
                        } else {
                            debug!(%function, %node, depth = position.depth, "position changed");
                            *current = position;
                            true
                        }
                    });
                    true
                }
                None => {
                    tx.send_replace(removed(function));
                    false
                }
            }
        });
        if watched.is_empty() {
            watchers.remove(function);
        }
    }

    /// Forgets `node`'s address once it is in no tree any more.
    fn forget_addr_if_gone(&mut self, node: &NodeId) {
        if self.manager.functions_of(node).is_empty() {
            self.addrs.remove(node);
        }
    }

    /// Records `addr` for `node`; true if it differs from the one known.
    fn set_addr(&mut self, node: &NodeId, addr: &str) -> bool {
        if self.addrs.get(node).map(String::as_str) == Some(addr) {
            return false;
        }
        self.addrs.insert(node.clone(), addr.to_owned());
        true
    }
}

/// The election side of a [`TreeService::with_etcd`] service: a task that campaigns for
/// leadership, activates the service when elected (loading the state from etcd) and puts it
/// back to standby when leadership is lost, then campaigns again. Dropping it (or
/// [`abort`](Self::abort)) stops the task *without* resigning, as a crash would: another
/// manager takes over once the lease expires. [`resign`](Self::resign) is the graceful way.
#[derive(Debug)]
pub struct Candidacy {
    observed: watch::Receiver<Option<String>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Candidacy {
    /// The leader's address as last observed (this manager's own while it leads).
    pub fn leader(&self) -> Option<String> {
        self.observed.borrow().clone()
    }

    /// A receiver of the observed leader's address.
    pub fn watch_leader(&self) -> watch::Receiver<Option<String>> {
        self.observed.clone()
    }

    /// Stops campaigning; if leader, goes standby, writes the last state (waiting at most a
    /// third of the lease TTL) and revokes the lease, so a standby takes over at once.
    pub async fn resign(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.task).await
            && !e.is_cancelled()
        {
            warn!(error = %e, "the election task failed");
        }
    }

    /// Stops the task at once, without resigning (as a crash would).
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Candidacy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The election task of [`TreeService::with_etcd`] (see [`Candidacy`]).
async fn lead(
    service: Weak<TreeService>,
    election: Election,
    store: EtcdStore,
    fence: watch::Sender<i64>,
    observed: watch::Sender<Option<String>>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let mut leadership = tokio::select! {
            leadership = election.campaign(&observed) => leadership,
            _ = &mut stop => return,
        };
        let flush_within = leadership.ttl() / 3;
        fence.send_replace(leadership.lease());
        let state = match store.load_state().await {
            Ok(state) => state,
            Err(e) => {
                error!(error = %e, "elected, but the state cannot be read: resigning");
                fence.send_replace(0);
                if let Err(e) = leadership.resign().await {
                    debug!(error = %e, "resigning failed");
                }
                observed.send_replace(None);
                tokio::select! {
                    () = tokio::time::sleep(flush_within) => continue,
                    _ = &mut stop => return,
                }
            }
        };
        let Some(active) = service.upgrade() else {
            fence.send_replace(0);
            let _ = leadership.resign().await;
            return;
        };
        active.activate(state);
        drop(active);
        let stopped = tokio::select! {
            lost = leadership.keep() => {
                warn!(reason = %lost, "leadership lost: back to standby");
                false
            }
            _ = &mut stop => true,
        };
        if let Some(service) = service.upgrade() {
            service.deactivate();
        }
        if stopped && !store.flush(flush_within).await {
            warn!("the last state was not written in time");
        }
        fence.send_replace(0);
        observed.send_replace(None);
        if let Err(e) = leadership.resign().await {
            debug!(error = %e, "revoking the lease failed (it expires by itself)");
        }
        if stopped {
            return;
        }
    }
}

fn node_of(id: &NodeId, addrs: &HashMap<NodeId, String>) -> Node {
    Node {
        id: id.0.clone(),
        addr: addrs.get(id).cloned().unwrap_or_default(),
    }
}

fn position_in(
    function: &FunctionId,
    tree: &FunctionTree,
    node: &NodeId,
    addrs: &HashMap<NodeId, String>,
) -> Option<Position> {
    let ancestors = tree.ancestors(node).ok()?;
    let depth = tree.depth(node).ok()?;
    Some(Position {
        function: function.0.clone(),
        parent: ancestors.first().map(|id| node_of(id, addrs)),
        grandparent: ancestors.get(1).map(|id| node_of(id, addrs)),
        depth: u32::try_from(depth).unwrap_or(u32::MAX),
        removed: false,
    })
}

fn removed(function: &FunctionId) -> Position {
    Position {
        function: function.0.clone(),
        removed: true,
        ..Position::default()
    }
}

/// Checks a function or node id: non-empty, at most [`MAX_ID_LEN`] bytes.
/// The (function, node id) of a Leave or Watch, checked and recorded on the request's span.
fn function_and_node(function: String, node: String) -> Result<(FunctionId, NodeId), Status> {
    let span = Span::current();
    span.record("function", function.as_str());
    span.record("node", node.as_str());
    check_id("function", &function)?;
    check_id("node id", &node)?;
    Ok((FunctionId::new(function), NodeId::new(node)))
}

fn check_id(what: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "{what} is {} bytes long (at most {MAX_ID_LEN})",
            id.len()
        )));
    }
    Ok(())
}

/// Whether `addr` is `host:port`: a host name, an IPv4 address or a bracketed IPv6 address,
/// and a port in 1..=65535.
fn valid_addr(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    if !matches!(port.parse::<u16>(), Ok(p) if p != 0) || host.is_empty() {
        return false;
    }
    match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok()),
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')),
    }
}

fn check_addr(addr: &str) -> Result<(), Status> {
    if addr.len() > MAX_ID_LEN || !valid_addr(addr) {
        return Err(Status::invalid_argument(format!(
            "node addr {addr:?} is not host:port"
        )));
    }
    Ok(())
}

/// Validates a request's node: id checked, `addr` checked unless `addr_optional` and empty.
fn check_node(node: Option<&Node>, addr_optional: bool) -> Result<&Node, Status> {
    let node = node.ok_or_else(|| Status::invalid_argument("node is missing"))?;
    check_id("node id", &node.id)?;
    if !(addr_optional && node.addr.is_empty()) {
        check_addr(&node.addr)?;
    }
    Ok(node)
}

/// Feeds one watch stream from a watch channel: every distinct position, until the node is
/// removed (that last message included), the channel is closed, or the client goes away.
async fn feed(mut rx: watch::Receiver<Position>, out: mpsc::Sender<Result<Position, Status>>) {
    let mut last: Option<Position> = None;
    loop {
        let position = rx.borrow_and_update().clone();
        if last.as_ref() != Some(&position) {
            let end = position.removed;
            if out.send(Ok(position.clone())).await.is_err() || end {
                return;
            }
            last = Some(position);
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = out.closed() => return,
        }
    }
}

#[tonic::async_trait]
impl Tree for TreeService {
    #[instrument(skip_all, fields(function = field::Empty, node = field::Empty))]
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<Position>, Status> {
        let req = request.into_inner();
        let span = Span::current();
        span.record("function", req.function.as_str());
        if let Some(node) = &req.node {
            span.record("node", node.id.as_str());
        }
        check_id("function", &req.function)?;
        let node = check_node(req.node.as_ref(), false)?;
        let function = FunctionId::new(req.function.clone());
        let id = NodeId::new(node.id.clone());
        let now = self.now();

        let mut st = self.lock();
        self.check_active(&st)?;
        let addr_changed = st.set_addr(&id, &node.addr);
        let member = st.manager.tree(&function).is_some_and(|t| t.contains(&id));
        if member {
            st.manager.heartbeat(&id, now);
        } else {
            let placement = st
                .manager
                .join(&function, id.clone(), now)
                .map_err(|e| Status::internal(e.to_string()))?;
            info!(
                parent = placement.parent.as_ref().map(NodeId::as_str),
                depth = placement.depth,
                "joined"
            );
            st.save();
            st.refresh(&function);
        }
        if addr_changed {
            st.save_addrs();
            let functions: Vec<FunctionId> =
                st.manager.functions_of(&id).into_iter().cloned().collect();
            for f in &functions {
                st.refresh(f);
            }
        }
        st.position(&function, &id)
            .map(Response::new)
            .ok_or_else(|| Status::internal("joined node has no position"))
    }

    #[instrument(skip_all, fields(function = field::Empty, node = field::Empty))]
    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let req = request.into_inner();
        let (function, id) = function_and_node(req.function, req.node_id)?;

        let mut st = self.lock();
        self.check_active(&st)?;
        match st.manager.leave(&function, &id) {
            Ok(changes) => {
                info!(moved = changes.len().saturating_sub(1), "left");
                st.save();
                st.refresh(&function);
                st.forget_addr_if_gone(&id);
            }
            Err(e) => debug!(error = %e, "leave of a non-member: nothing to do"),
        }
        Ok(Response::new(LeaveResponse {}))
    }

    #[instrument(skip_all, fields(node = field::Empty))]
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        if let Some(node) = &req.node {
            Span::current().record("node", node.id.as_str());
        }
        let node = check_node(req.node.as_ref(), true)?;
        let id = NodeId::new(node.id.clone());
        let now = self.now();

        let mut st = self.lock();
        self.check_active(&st)?;
        let functions: Vec<FunctionId> =
            st.manager.functions_of(&id).into_iter().cloned().collect();
        // A node in no tree is not tracked: it has nothing to fail out of.
        if !functions.is_empty() {
            st.manager.heartbeat(&id, now);
            if !node.addr.is_empty() && st.set_addr(&id, &node.addr) {
                st.save_addrs();
                for f in &functions {
                    st.refresh(f);
                }
            }
        }
        Ok(Response::new(HeartbeatResponse {
            functions: functions.into_iter().map(|f| f.0).collect(),
        }))
    }

    type WatchStream = ReceiverStream<Result<Position, Status>>;

    #[instrument(skip_all, fields(function = field::Empty, node = field::Empty))]
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let (function, id) = function_and_node(req.function, req.node_id)?;

        let rx = {
            let mut st = self.lock();
            self.check_active(&st)?;
            let position = st.position(&function, &id).ok_or_else(|| {
                Status::not_found(format!("node {id} is not in the tree of {function}"))
            })?;
            let tx = st
                .watchers
                .entry(function)
                .or_default()
                .entry(id)
                .or_insert_with(|| watch::channel(position.clone()).0);
            tx.send_if_modified(|current| {
                let stale = *current != position;
                if stale {
                    *current = position;
                }
                stale
            });
            tx.subscribe()
        };
        let (out, stream) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(feed(rx, out).instrument(Span::current()));
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    #[instrument(skip_all)]
    async fn list(&self, _request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let st = self.lock();
        self.check_active(&st)?;
        let trees = st
            .manager
            .functions()
            .filter_map(|function| {
                let tree = st.manager.tree(function)?;
                Some(TreeInfo {
                    function: function.0.clone(),
                    members: tree.members().iter().map(|id| st.node(id)).collect(),
                })
            })
            .collect();
        Ok(Response::new(ListResponse { trees }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in [
            "127.0.0.1:80",
            "node-1.example:65535",
            "[::1]:9000",
            "a_b:1",
        ] {
            assert!(valid_addr(ok), "{ok}");
        }
        for bad in [
            "",
            "host",
            ":80",
            "host:",
            "host:0",
            "host:70000",
            "::1:80",
            "[::1:80",
            "a b:1",
            "http://h:1",
        ] {
            assert!(!valid_addr(bad), "{bad}");
        }
    }
}
