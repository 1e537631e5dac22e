//! The Tree service and the member client over real TCP on 127.0.0.1: tree shape and
//! addresses, watch notifications on repair, heartbeat expiry, a member following its position
//! through a leave and a manager restart, state restored from a store, and input validation.

mod common;
use common::{ids, node, wait_for};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbor_p2p::{MemoryStore, Snapshot, Store, StoreError};
use arbor_peer::member::Member;
use arbor_peer::tree::{TreeService, TreeServiceOptions};
use arbor_proto::arbor::tree_client::TreeClient;
use arbor_proto::arbor::{
    HeartbeatRequest, JoinRequest, LeaveRequest, ListRequest, Node, Position, TreeInfo,
    WatchRequest,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::Channel;

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(5);

/// A Tree service served on 127.0.0.1.
struct Served {
    addr: SocketAddr,
    service: Arc<TreeService>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Served {
    async fn start(service: TreeService) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener, Arc::new(service))
    }

    fn on(listener: TcpListener, service: Arc<TreeService>) -> Self {
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        let server = Arc::clone(&service).into_server();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = signal.await;
                    },
                )
                .await
                .unwrap();
        });
        Self {
            addr,
            service,
            shutdown,
            task,
        }
    }

    async fn client(&self) -> TreeClient<Channel> {
        TreeClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// Stops the server gracefully: no new calls, open watch streams ended, port released.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        let mut task = self.task;
        tokio::time::timeout(WAIT, async {
            loop {
                // Streams opened before the shutdown took effect are ended too.
                self.service.close_watches();
                tokio::select! {
                    done = &mut task => return done.unwrap(),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
        .await
        .expect("the server stops");
    }
}

fn options() -> TreeServiceOptions {
    TreeServiceOptions::default()
}

/// The position of member `i` of a complete tree filled in join order `n0, n1, ...`.
fn expected(function: &str, i: usize) -> Position {
    let parent = (i > 0).then(|| (i - 1) / 2);
    let grandparent = parent.filter(|p| *p > 0).map(|p| (p - 1) / 2);
    Position {
        function: function.into(),
        parent: parent.map(node),
        grandparent: grandparent.map(node),
        depth: (usize::BITS - (i + 1).leading_zeros() - 1),
        removed: false,
    }
}

fn position(
    function: &str,
    parent: Option<usize>,
    grandparent: Option<usize>,
    depth: u32,
) -> Position {
    Position {
        function: function.into(),
        parent: parent.map(node),
        grandparent: grandparent.map(node),
        depth,
        removed: false,
    }
}

async fn join(c: &mut TreeClient<Channel>, function: &str, n: Node) -> Position {
    c.join(JoinRequest {
        function: function.into(),
        node: Some(n),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn open_watch(c: &mut TreeClient<Channel>, function: &str, id: &str) -> Streaming<Position> {
    c.watch(WatchRequest {
        function: function.into(),
        node_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn next(s: &mut Streaming<Position>) -> Option<Position> {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("a watch message in time")
        .unwrap()
}

/// Asserts the stream delivers nothing within `quiet`.
async fn assert_quiet(s: &mut Streaming<Position>, quiet: Duration, who: &str) {
    if let Ok(m) = tokio::time::timeout(quiet, s.message()).await {
        panic!("{who} was told {m:?}");
    }
}

async fn list(c: &mut TreeClient<Channel>) -> Vec<TreeInfo> {
    c.list(ListRequest {}).await.unwrap().into_inner().trees
}

#[tokio::test]
async fn seven_members_form_a_complete_binary_tree() {
    let served = Served::start(TreeService::in_memory(options())).await;
    let mut c = served.client().await;
    for i in 0..7 {
        assert_eq!(join(&mut c, "fn", node(i)).await, expected("fn", i), "n{i}");
    }
    // Joining again is idempotent: the same position, the same tree.
    assert_eq!(join(&mut c, "fn", node(4)).await, expected("fn", 4));
    let trees = list(&mut c).await;
    assert_eq!(trees.len(), 1);
    assert_eq!(trees[0].function, "fn");
    assert_eq!(trees[0].members, (0..7).map(node).collect::<Vec<_>>());
    // Spot checks of the formula: a leaf's parent and grandparent, with their addresses.
    let leaf = expected("fn", 6);
    assert_eq!(leaf.parent.unwrap().addr, "10.0.0.2:7000");
    assert_eq!(leaf.grandparent.unwrap().id, "n0");
    assert_eq!(leaf.depth, 2);
    served.stop().await;
}

#[tokio::test]
async fn a_leaving_inner_node_notifies_exactly_the_affected_watchers() {
    let served = Served::start(TreeService::in_memory(options())).await;
    let mut c = served.client().await;
    // 10 members: n1 has children n3, n4; n3 has n7, n8; n4 has n9 (the last one).
    let mut streams = Vec::new();
    for i in 0..10 {
        join(&mut c, "fn", node(i)).await;
    }
    for i in 0..10 {
        let mut s = open_watch(&mut c, "fn", &format!("n{i}")).await;
        assert_eq!(
            next(&mut s).await,
            Some(expected("fn", i)),
            "first message of n{i}"
        );
        streams.push(s);
    }
    c.leave(LeaveRequest {
        function: "fn".into(),
        node_id: "n1".into(),
    })
    .await
    .unwrap();

    // The leaver: a last `removed` message, then the end of the stream.
    let last = next(&mut streams[1]).await.unwrap();
    assert!(last.removed);
    assert_eq!(last.function, "fn");
    assert_eq!(next(&mut streams[1]).await, None);
    // n9 (the last node) moved into n1's place.
    assert_eq!(
        next(&mut streams[9]).await,
        Some(position("fn", Some(0), None, 1))
    );
    // n1's children now stream from n9.
    for i in [3, 4] {
        assert_eq!(
            next(&mut streams[i]).await,
            Some(position("fn", Some(9), Some(0), 2)),
            "n{i}"
        );
    }
    // n3's children keep their parent but have a new grandparent.
    for i in [7, 8] {
        assert_eq!(
            next(&mut streams[i]).await,
            Some(position("fn", Some(3), Some(9), 3)),
            "n{i}"
        );
    }
    // Nobody is told anything more, and the unaffected are told nothing at all.
    for (i, s) in streams.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        assert_quiet(
            s,
            Duration::from_millis(if i == 0 { 300 } else { 20 }),
            &format!("n{i}"),
        )
        .await;
    }
    let trees = list(&mut c).await;
    assert_eq!(
        ids(&trees[0]),
        ["n0", "n9", "n2", "n3", "n4", "n5", "n6", "n7", "n8"]
    );
    // Leaving again, or leaving an unknown tree, is fine.
    for function in ["fn", "nope"] {
        c.leave(LeaveRequest {
            function: function.into(),
            node_id: "n1".into(),
        })
        .await
        .unwrap();
    }
    served.stop().await;
}

#[tokio::test]
async fn a_silent_member_fails_out_and_its_children_are_reparented() {
    let timeout = Duration::from_millis(300);
    let every = Duration::from_millis(50);
    let served = Served::start(TreeService::in_memory(options())).await;
    let expiry = served.service.spawn_expiry(timeout, every);
    let mut c = served.client().await;
    let joined = tokio::time::Instant::now();
    join(&mut c, "fn", node(0)).await;
    join(&mut c, "fn", node(1)).await;
    join(&mut c, "fn", node(2)).await;
    let mut root = open_watch(&mut c, "fn", "n0").await;
    let mut child = open_watch(&mut c, "fn", "n1").await;
    assert_eq!(next(&mut root).await, Some(expected("fn", 0)));
    assert_eq!(next(&mut child).await, Some(expected("fn", 1)));

    // n1 and n2 keep heartbeating; n0 is silent from its join on.
    let beating = {
        let mut c = c.clone();
        tokio::spawn(async move {
            loop {
                for i in [1, 2] {
                    let r = c
                        .heartbeat(HeartbeatRequest {
                            node: Some(node(i)),
                        })
                        .await
                        .unwrap();
                    assert_eq!(r.into_inner().functions, ["fn"]);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let gone = next(&mut root).await.unwrap();
    let after = joined.elapsed();
    assert!(gone.removed, "{gone:?}");
    assert!(after >= timeout, "failed out after {after:?}");
    assert!(
        after <= timeout + every + Duration::from_millis(500),
        "failed out after {after:?}"
    );
    assert_eq!(next(&mut root).await, None);
    // n2 (the last) took the root's place; n1 now streams from it.
    assert_eq!(
        next(&mut child).await,
        Some(position("fn", Some(2), None, 1))
    );
    assert_eq!(ids(&list(&mut c).await[0]), ["n2", "n1"]);
    let r = c
        .heartbeat(HeartbeatRequest {
            node: Some(node(0)),
        })
        .await
        .unwrap();
    assert!(r.into_inner().functions.is_empty(), "the manager forgot n0");
    beating.abort();
    expiry.abort();
    served.stop().await;
}

#[tokio::test]
async fn a_member_follows_its_position_and_rejoins_a_restarted_manager() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Served::on(listener, Arc::new(TreeService::in_memory(options())));
    let every = Duration::from_millis(100);
    let root = Member::new(&addr.to_string(), node(0), every).unwrap();
    let child = Member::new(&addr.to_string(), node(1), every).unwrap();

    let root_rx = root.join("fn").await.unwrap();
    assert_eq!(*root_rx.borrow(), Some(expected("fn", 0)));
    let mut rx = child.join("fn").await.unwrap();
    wait_for(&mut rx, "the root as parent", |p| {
        p.as_ref().and_then(|p| p.parent.as_ref()) == Some(&node(0))
    })
    .await;
    assert_eq!(child.functions(), ["fn"]);

    // The root leaves: the child becomes the root.
    root.leave("fn").await.unwrap();
    assert!(root.functions().is_empty());
    assert_eq!(*root_rx.borrow(), None);
    wait_for(&mut rx, "no parent", |p| {
        p.as_ref()
            .is_some_and(|p| p.parent.is_none() && p.depth == 0)
    })
    .await;

    // The manager restarts on the same port with nothing stored: the member finds out and
    // joins again by itself.
    let service = Arc::clone(&served.service);
    served.stop().await;
    drop(service);
    wait_for(&mut rx, "no known position", Option::is_none).await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let served = Served::on(listener, Arc::new(TreeService::in_memory(options())));
    wait_for(&mut rx, "a position again", |p| {
        p.as_ref()
            .is_some_and(|p| p.parent.is_none() && p.depth == 0)
    })
    .await;
    let mut c = served.client().await;
    assert_eq!(list(&mut c).await[0].members, [node(1)]);
    // The new root still heartbeats: the new manager knows it in its tree.
    tokio::time::sleep(every * 3).await;
    let r = c
        .heartbeat(HeartbeatRequest {
            node: Some(node(1)),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().functions, ["fn"]);

    child.shutdown();
    assert!(child.join("other").await.is_err());
    assert!(Member::new("http://x:1", node(2), every).is_err());
    served.stop().await;
}

/// A store shared between the test and a service.
#[derive(Clone, Default)]
struct SharedStore(Arc<Mutex<MemoryStore>>);

impl Store for SharedStore {
    fn load(&self) -> Result<Option<Snapshot>, StoreError> {
        self.0.lock().unwrap().load()
    }

    fn save(&mut self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.0.lock().unwrap().save(snapshot)
    }
}

#[tokio::test]
async fn a_service_over_a_previous_services_store_lists_the_same_trees() {
    let store = SharedStore::default();
    let first = Served::start(TreeService::new(Box::new(store.clone()), options()).unwrap()).await;
    let mut c = first.client().await;
    for i in 0..5 {
        join(&mut c, "f1", node(i)).await;
    }
    join(&mut c, "f2", node(2)).await;
    join(&mut c, "f2", node(5)).await;
    c.leave(LeaveRequest {
        function: "f1".into(),
        node_id: "n1".into(),
    })
    .await
    .unwrap();
    let before = list(&mut c).await;
    first.stop().await;
    assert!(store.0.lock().unwrap().saves() >= 8);

    let copy = store.0.lock().unwrap().clone();
    let second = Served::start(TreeService::new(Box::new(copy), options()).unwrap()).await;
    let mut c = second.client().await;
    let after = list(&mut c).await;
    let shape = |trees: &[TreeInfo]| {
        trees
            .iter()
            .map(|t| (t.function.clone(), ids(t).join(",")))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&after), shape(&before));
    assert_eq!(
        shape(&after),
        [
            ("f1".to_string(), "n0,n4,n2,n3".to_string()),
            ("f2".into(), "n2,n5".into())
        ]
    );
    // Addresses are not in the snapshot: re-learnt from the next heartbeat.
    assert!(after[0].members.iter().all(|n| n.addr.is_empty()));
    let r = c
        .heartbeat(HeartbeatRequest {
            node: Some(node(2)),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().functions, ["f1", "f2"]);
    let after = list(&mut c).await;
    assert_eq!(after[1].members[0], node(2));
    // Restored members can be watched.
    let mut s = open_watch(&mut c, "f1", "n3").await;
    let p = next(&mut s).await.unwrap();
    assert_eq!(
        (p.parent.map(|n| n.id), p.depth),
        (Some("n4".to_string()), 2)
    );
    second.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused() {
    let served = Served::start(TreeService::in_memory(options())).await;
    let mut c = served.client().await;
    let long = "x".repeat(257);
    let bad_joins = [
        ("", node(0)),
        (long.as_str(), node(0)),
        (
            "fn",
            Node {
                id: String::new(),
                addr: "h:1".into(),
            },
        ),
        (
            "fn",
            Node {
                id: long.clone(),
                addr: "h:1".into(),
            },
        ),
        (
            "fn",
            Node {
                id: "a".into(),
                addr: String::new(),
            },
        ),
        (
            "fn",
            Node {
                id: "a".into(),
                addr: "no-port".into(),
            },
        ),
        (
            "fn",
            Node {
                id: "a".into(),
                addr: "h:0".into(),
            },
        ),
        (
            "fn",
            Node {
                id: "a".into(),
                addr: "h:99999".into(),
            },
        ),
        (
            "fn",
            Node {
                id: "a".into(),
                addr: "http://h:1".into(),
            },
        ),
    ];
    for (function, n) in bad_joins {
        let what = format!("{function:.8}/{n:?}");
        let e = c
            .join(JoinRequest {
                function: function.into(),
                node: Some(n),
            })
            .await
            .expect_err(&what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
    }
    let e = c
        .join(JoinRequest {
            function: "fn".into(),
            node: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .heartbeat(HeartbeatRequest {
            node: Some(Node {
                id: String::new(),
                addr: String::new(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .leave(LeaveRequest {
            function: String::new(),
            node_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(list(&mut c).await.is_empty(), "nothing was joined");

    // Watching a non-member: NOT_FOUND, whether the tree exists or not.
    join(&mut c, "fn", node(0)).await;
    for (function, id) in [("fn", "n1"), ("other", "n0")] {
        let e = c
            .watch(WatchRequest {
                function: function.into(),
                node_id: id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{function}/{id}");
    }
    let e = c
        .watch(WatchRequest {
            function: "fn".into(),
            node_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    served.stop().await;
}
