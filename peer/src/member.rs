//! [`Member`]: a node's client of the Tree service, which keeps the node's place in the trees
//! of the functions it runs.
//!
//! For each joined function a background task joins the tree, opens a `Watch` stream and
//! mirrors the node's [`Position`] into a [`tokio::sync::watch`] channel (`None` while the
//! position is unknown). Whenever the stream breaks (the manager restarted or is unreachable)
//! or reports the node removed although it never left (it was failed out, e.g. after missed
//! heartbeats), the task joins again and re-opens the stream, with exponential backoff between
//! attempts. One heartbeat task per member keeps the node alive in all its trees; when a
//! heartbeat's answer lacks a joined function (the manager forgot the node), that function's
//! task joins again at once. Dropping the member, or [`Member::shutdown`], stops every task
//! without leaving: the manager fails the node out after its heartbeat timeout.
//!
//! A member may know several managers ([`Member::new_multi`]): a leader and standbys sharing
//! their state in etcd ([`TreeService::with_etcd`](crate::tree::TreeService::with_etcd)). It
//! talks to one at a time. When a call to it fails with `UNAVAILABLE` (unreachable, or a
//! standby, whose message names the leader), `UNKNOWN`, `DEADLINE_EXCEEDED` or times out, the
//! member moves to the leader named in the message if it is one of its addresses, else to the
//! next address; every function's task then ends its watch at once, joins again and re-opens
//! the watch on the new manager. The position receivers handed out are the same throughout.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arbor_proto::arbor::tree_client::TreeClient;
use arbor_proto::arbor::{
    HeartbeatRequest, JoinRequest, LeaveRequest, Node, Position, WatchRequest,
};
use thiserror::Error;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::tree::STANDBY_PREFIX;

/// The default interval between heartbeats (a third of the manager's default timeout).
pub const DEFAULT_HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// The first wait before re-joining after a broken watch stream; doubled per failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between re-join attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Deadline of one unary call (join, heartbeat, leave).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of a [`Member`].
#[derive(Debug, Error)]
pub enum Error {
    /// The manager address is not a usable `host:port`.
    #[error("invalid tree manager address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address given.
        addr: String,
        /// Why it was refused.
        reason: String,
    },
    /// The tree manager refused the call or could not be reached.
    #[error("tree manager: {0}")]
    Rpc(Box<tonic::Status>),
    /// The call did not finish within its deadline.
    #[error("tree manager did not answer within {0:?}")]
    Timeout(Duration),
    /// The member was shut down.
    #[error("the member is shut down")]
    ShutDown,
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Self::Rpc(Box::new(status))
    }
}

/// A node's membership in function trees (see the [module docs](self)).
pub struct Member {
    inner: Arc<Inner>,
    heartbeat: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    /// The managers known, in the order given.
    managers: Vec<ManagerConn>,
    /// Index of the manager talked to now.
    current: watch::Sender<usize>,
    node: Node,
    state: Mutex<State>,
}

/// One manager: its address and a (lazily connected) client.
struct ManagerConn {
    addr: String,
    client: TreeClient<Channel>,
}

#[derive(Default)]
struct State {
    shut_down: bool,
    joined: HashMap<String, Joined>,
}

/// One joined function: its position channel and the task that keeps it.
struct Joined {
    position: watch::Sender<Option<Position>>,
    rejoin: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Joined {
    fn stop(self) {
        self.task.abort();
        self.position.send_replace(None);
    }
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("node", &self.inner.node)
            .field("manager", &self.manager())
            .field("functions", &self.functions())
            .finish_non_exhaustive()
    }
}

impl Member {
    /// A member for `node` (its id and its Peer service's `host:port`) of the Tree service at
    /// `manager_addr` (`host:port`, plain HTTP/2). The connection is made lazily and re-made
    /// when it breaks. Starts the heartbeat task (every `heartbeat_every`, see
    /// [`DEFAULT_HEARTBEAT_EVERY`]), so it must be called within a Tokio runtime.
    pub fn new(manager_addr: &str, node: Node, heartbeat_every: Duration) -> Result<Self, Error> {
        Self::new_multi(&[manager_addr], node, heartbeat_every)
    }

    /// A member of whichever of the Tree services at `manager_addrs` leads (a leader and its
    /// standbys, see the [module docs](self)); it starts with the first. Otherwise as
    /// [`new`](Self::new).
    pub fn new_multi<S: AsRef<str>>(
        manager_addrs: &[S],
        node: Node,
        heartbeat_every: Duration,
    ) -> Result<Self, Error> {
        if manager_addrs.is_empty() {
            return Err(Error::InvalidAddress {
                addr: String::new(),
                reason: "no tree manager address given".into(),
            });
        }
        let mut managers: Vec<ManagerConn> = Vec::with_capacity(manager_addrs.len());
        for addr in manager_addrs {
            let addr = addr.as_ref();
            if managers.iter().any(|m| m.addr == addr) {
                continue;
            }
            managers.push(ManagerConn {
                addr: addr.to_owned(),
                client: TreeClient::new(endpoint(addr)?.connect_lazy()),
            });
        }
        let inner = Arc::new(Inner {
            managers,
            current: watch::channel(0).0,
            node,
            state: Mutex::new(State::default()),
        });
        let every = heartbeat_every.max(Duration::from_millis(10));
        let span = info_span!("member_heartbeat", node = %inner.node.id);
        let heartbeat = tokio::spawn(heartbeat_loop(Arc::clone(&inner), every).instrument(span));
        Ok(Self {
            inner,
            heartbeat: Mutex::new(Some(heartbeat)),
        })
    }

    /// The node this member stands for.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// The address of the manager the member talks to now.
    pub fn manager(&self) -> &str {
        let idx = *self.inner.current.borrow();
        &self.inner.managers[idx].addr
    }

    /// Joins `function`'s tree and returns a receiver of the node's position in it, kept up to
    /// date by a background task until [`leave`](Self::leave) or shutdown (`None` while the
    /// position is unknown, e.g. while the manager is unreachable). The first join is made
    /// here, so a refusal or an unreachable manager is reported; later ones are retried.
    /// Joining a function already joined returns another receiver of the same position.
    pub async fn join(&self, function: &str) -> Result<watch::Receiver<Option<Position>>, Error> {
        if let Some(rx) = self.inner.subscribe(function)? {
            return Ok(rx);
        }
        let request = self.inner.join_request(function);
        let position = self
            .inner
            .call_any(|mut client| {
                let request = request.clone();
                async move { client.join(request).await }
            })
            .await?;
        info!(
            function,
            node = %self.inner.node.id,
            depth = position.depth,
            parent = position.parent.as_ref().map(|p| p.id.as_str()),
            "joined the function tree"
        );
        let mut st = self.inner.lock();
        if st.shut_down {
            return Err(Error::ShutDown);
        }
        if let Some(joined) = st.joined.get(function) {
            return Ok(joined.position.subscribe());
        }
        let (tx, rx) = watch::channel(Some(position));
        let rejoin = Arc::new(Notify::new());
        let span = info_span!("member_follow", function, node = %self.inner.node.id);
        let task = tokio::spawn(
            follow(
                Arc::clone(&self.inner),
                function.to_owned(),
                tx.clone(),
                Arc::clone(&rejoin),
            )
            .instrument(span),
        );
        st.joined.insert(
            function.to_owned(),
            Joined {
                position: tx,
                rejoin,
                task,
            },
        );
        Ok(rx)
    }

    /// Leaves `function`'s tree: stops following it (its receivers see `None`, then the channel
    /// closes) and tells the manager, which repairs the tree. Leaving a function not joined
    /// still tells the manager (harmless: leave is idempotent there).
    pub async fn leave(&self, function: &str) -> Result<(), Error> {
        let joined = self.inner.lock().joined.remove(function);
        if let Some(joined) = joined {
            joined.stop();
        }
        let request = LeaveRequest {
            function: function.to_owned(),
            node_id: self.inner.node.id.clone(),
        };
        self.inner
            .call_any(|mut client| {
                let request = request.clone();
                async move { client.leave(request).await }
            })
            .await?;
        info!(function, node = %self.inner.node.id, "left the function tree");
        Ok(())
    }

    /// The functions currently joined, sorted.
    pub fn functions(&self) -> Vec<String> {
        let mut functions: Vec<String> = self.inner.lock().joined.keys().cloned().collect();
        functions.sort();
        functions
    }

    /// Stops the heartbeat task and every function's task, without leaving (the manager fails
    /// the node out after its timeout). Receivers see `None`. Later joins fail with
    /// [`Error::ShutDown`]. Also done on drop.
    pub fn shutdown(&self) {
        if let Some(task) = self
            .heartbeat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        let joined: Vec<Joined> = {
            let mut st = self.inner.lock();
            st.shut_down = true;
            st.joined.drain().map(|(_, j)| j).collect()
        };
        for j in joined {
            j.stop();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of `function`'s position if it is joined already.
    fn subscribe(
        &self,
        function: &str,
    ) -> Result<Option<watch::Receiver<Option<Position>>>, Error> {
        let st = self.lock();
        if st.shut_down {
            return Err(Error::ShutDown);
        }
        Ok(st.joined.get(function).map(|j| j.position.subscribe()))
    }

    fn join_request(&self, function: &str) -> JoinRequest {
        JoinRequest {
            function: function.to_owned(),
            node: Some(self.node.clone()),
        }
    }

    /// The index and client of the manager `idx` (clamped).
    fn client_at(&self, idx: usize) -> (usize, TreeClient<Channel>) {
        let idx = idx.min(self.managers.len() - 1);
        (idx, self.managers[idx].client.clone())
    }

    /// The index and client of the current manager.
    fn client(&self) -> (usize, TreeClient<Channel>) {
        self.client_at(*self.current.borrow())
    }

    /// After `error` from manager `used`: if the error says that manager is unreachable or
    /// standby, moves to the leader the error names (if it is a known address) or to the next
    /// address, unless another task moved away from `used` already. Returns whether the
    /// current manager is now another one than `used`.
    fn failover(&self, used: usize, error: &Error) -> bool {
        let n = self.managers.len();
        if n < 2 || !worth_switching(error) {
            return false;
        }
        let next = leader_named(error)
            .and_then(|addr| self.managers.iter().position(|m| m.addr == addr))
            .filter(|i| *i != used)
            .unwrap_or((used + 1) % n);
        let moved = self.current.send_if_modified(|current| {
            if *current == used {
                *current = next;
                true
            } else {
                false
            }
        });
        if moved {
            info!(
                from = %self.managers[used].addr,
                to = %self.managers[next].addr,
                reason = %error,
                "switching to another tree manager"
            );
        }
        *self.current.borrow() != used
    }

    /// A unary call to the current manager, moving on (see [`failover`](Self::failover)) at
    /// most once per known manager plus once to a named leader.
    async fn call_any<T, F, Fut>(&self, mut f: F) -> Result<T, Error>
    where
        F: FnMut(TreeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut attempts = self.managers.len() + 1;
        loop {
            let (idx, client) = self.client();
            match call(f(client)).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    attempts -= 1;
                    if attempts == 0 || !self.failover(idx, &e) {
                        return Err(e);
                    }
                    debug!(error = %e, "tree manager call failed: trying the next manager");
                }
            }
        }
    }
}

/// The endpoint of the Tree service at `addr` (`host:port`, plain HTTP/2).
fn endpoint(addr: &str) -> Result<Endpoint, Error> {
    let invalid = |reason: String| Error::InvalidAddress {
        addr: addr.to_owned(),
        reason,
    };
    if addr.is_empty() || addr.contains('/') {
        return Err(invalid("expected host:port".into()));
    }
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// Whether `error` says the manager is unreachable, standby or broken (so another may serve).
fn worth_switching(error: &Error) -> bool {
    match error {
        Error::Timeout(_) => true,
        Error::Rpc(status) => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        ),
        Error::InvalidAddress { .. } | Error::ShutDown => false,
    }
}

/// The leader a standby manager named in its `UNAVAILABLE` message.
fn leader_named(error: &Error) -> Option<&str> {
    match error {
        Error::Rpc(status) if status.code() == tonic::Code::Unavailable => status
            .message()
            .strip_prefix(STANDBY_PREFIX)
            .map(str::trim)
            .filter(|addr| !addr.is_empty()),
        _ => None,
    }
}

/// Awaits a unary call within [`CALL_TIMEOUT`].
async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(result) => Ok(result?.into_inner()),
        Err(_) => Err(Error::Timeout(CALL_TIMEOUT)),
    }
}

/// Heartbeats every `every` while some function is joined; asks a function's task to join
/// again when the manager does not know the node in it.
async fn heartbeat_loop(inner: Arc<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if inner.lock().joined.is_empty() {
            continue;
        }
        let (idx, mut client) = inner.client();
        let request = HeartbeatRequest {
            node: Some(inner.node.clone()),
        };
        match call(client.heartbeat(request)).await {
            Ok(response) => {
                let known: HashSet<String> = response.functions.into_iter().collect();
                let st = inner.lock();
                for (function, joined) in &st.joined {
                    if !known.contains(function) {
                        debug!(%function, "manager does not know the node in this tree: re-joining");
                        joined.rejoin.notify_one();
                    }
                }
            }
            Err(e) => {
                debug!(error = %e, "heartbeat failed");
                inner.failover(idx, &e);
            }
        }
    }
}

/// How a watch session ended.
enum Ended {
    /// The manager says the node is no longer in the tree (it was failed out).
    Removed,
    /// The stream ended without a `removed` message (the manager is going away).
    Closed,
    /// The member moved to another manager.
    Switched,
}

/// Keeps `function`'s position in `tx` for ever: join, watch, and again after each break.
async fn follow(
    inner: Arc<Inner>,
    function: String,
    tx: watch::Sender<Option<Position>>,
    rejoin: Arc<Notify>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut progress = false;
        let mut current = inner.current.subscribe();
        let (idx, client) = inner.client_at(*current.borrow_and_update());
        let ended = session(
            &inner,
            client,
            &function,
            &tx,
            &rejoin,
            &mut current,
            &mut progress,
        )
        .await;
        match ended {
            Ok(Ended::Removed) => warn!("the manager removed the node from the tree: re-joining"),
            Ok(Ended::Closed) => info!("the watch stream ended: re-joining"),
            Ok(Ended::Switched) => {
                info!("moved to another tree manager: re-joining there");
                continue;
            }
            Err(e) => {
                let moved = inner.failover(idx, &e);
                debug!(error = %e, ?backoff, moved, "following the tree failed: retrying");
            }
        }
        tx.send_if_modified(|current| current.take().is_some());
        if progress {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Joins `function`'s tree at the manager of `client`, then mirrors its Watch stream into `tx`
/// until it ends or the member moves to another manager (`current` changes). Sets `progress`
/// once the stream delivered a position.
async fn session(
    inner: &Inner,
    mut client: TreeClient<Channel>,
    function: &str,
    tx: &watch::Sender<Option<Position>>,
    rejoin: &Notify,
    current: &mut watch::Receiver<usize>,
    progress: &mut bool,
) -> Result<Ended, Error> {
    let update = |position: Position| {
        tx.send_if_modified(|current| {
            if current.as_ref() == Some(&position) {
                false
            } else {
                debug!(
                    depth = position.depth,
                    parent = position.parent.as_ref().map(|p| p.id.as_str()),
                    "position"
                );
                *current = Some(position);
                true
            }
        });
    };
    update(call(client.join(inner.join_request(function))).await?);
    let mut stream = client
        .watch(WatchRequest {
            function: function.to_owned(),
            node_id: inner.node.id.clone(),
        })
        .await?
        .into_inner();
    loop {
        tokio::select! {
            message = stream.message() => match message? {
                Some(position) if position.removed => return Ok(Ended::Removed),
                Some(position) => {
                    *progress = true;
                    update(position);
                }
                None => return Ok(Ended::Closed),
            },
            () = rejoin.notified() => {
                update(call(client.join(inner.join_request(function))).await?);
            }
            Ok(()) = current.changed() => return Ok(Ended::Switched),
        }
    }
}
