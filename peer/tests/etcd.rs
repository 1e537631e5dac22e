//! The tree manager's state in a real etcd (a private `etcd` per test, `arbor_testkit::Etcd`):
//! the store round-trips a snapshot across clients, a standby manager names the leader and
//! takes over when it resigns, and when the active manager dies the standby is elected, serves
//! the same trees and the members (given both addresses) follow it.

mod common;
use common::{ids, node, wait_for};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arbor_p2p::{FunctionId, Manager, NodeId, Snapshot, Store};
use arbor_peer::etcd::{Campaign, Election, EtcdClient, EtcdConfig, EtcdStore};
use arbor_peer::member::Member;
use arbor_peer::tree::{TreeService, TreeServiceOptions};
use arbor_proto::arbor::tree_client::TreeClient;
use arbor_proto::arbor::{HeartbeatRequest, JoinRequest, ListRequest, TreeInfo};
use arbor_testkit::Etcd;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
/// The leader lease of the managers under test (etcd's minimum).
const TTL: Duration = Duration::from_secs(2);

/// True (after saying why) if the test cannot run here.
fn skip(test: &str) -> bool {
    if arbor_testkit::skip_unless_tools(test, &[arbor_testkit::etcd::ETCD_BIN]) {
        return true;
    }
    !arbor_testkit::is_root() && arbor_testkit::skip(test, "needs root")
}

fn config(etcd: &Etcd, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        lease_ttl: TTL,
        prefix: prefix.to_owned(),
        ..EtcdConfig::new(&[etcd.endpoint()])
    }
}

async fn client(addr: &str) -> TreeClient<Channel> {
    TreeClient::connect(format!("http://{addr}")).await.unwrap()
}

async fn list(c: &mut TreeClient<Channel>) -> Result<Vec<TreeInfo>, tonic::Status> {
    c.list(ListRequest {}).await.map(|r| r.into_inner().trees)
}

/// Polls `f` every 50 ms until it holds, at most [`WAIT`].
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sample_snapshot() -> Snapshot {
    let mut manager = Manager::new();
    for i in 0..5 {
        let id = NodeId::new(format!("n{i}"));
        manager
            .join(&FunctionId::new("f1"), id, 100 + i as u64)
            .unwrap();
    }
    manager
        .join(&FunctionId::new("f2"), NodeId::new("n3"), 200)
        .unwrap();
    manager.snapshot()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_round_trips_a_snapshot_across_clients() {
    if skip("the_etcd_store_round_trips_a_snapshot_across_clients") {
        return;
    }
    let etcd = Etcd::start().unwrap();
    let prefix = "/test/store";
    let client = EtcdClient::new(&[etcd.endpoint()]).unwrap();
    let store = EtcdStore::new(client.clone(), prefix);
    assert_eq!(store.load_state().await.unwrap(), None);

    let snapshot = sample_snapshot();
    let addrs: BTreeMap<String, String> = (0..5).map(|i| (format!("n{i}"), node(i).addr)).collect();
    // Superseded states may be skipped; the last one is written.
    store.save_state(&Snapshot::default(), &BTreeMap::new());
    store.save_state(&snapshot, &addrs);
    assert!(store.flush(WAIT).await, "the state is written");
    assert!(store.writes() >= 1);

    // A new client (as a new process would have) reads the same state, async and through
    // the sync `Store` trait from inside this runtime.
    let other = EtcdStore::new(EtcdClient::new(&[etcd.addr()]).unwrap(), prefix);
    let loaded = other.load_state().await.unwrap().expect("a stored state");
    assert_eq!(loaded.snapshot, snapshot);
    assert_eq!(loaded.addrs, addrs);
    assert_eq!(Store::load(&other).unwrap(), Some(snapshot.clone()));

    // A TreeService over the store restores the trees.
    let service = TreeService::new(Box::new(other), TreeServiceOptions::default()).unwrap();
    assert_eq!(service.snapshot().functions, snapshot.functions);

    // A fenced store writes nothing while not leader, nor with a lease that does not hold
    // the leader key.
    let (fence, fence_rx) = watch::channel(0_i64);
    let fenced = EtcdStore::fenced(client.clone(), prefix, fence_rx);
    fenced.save_state(&Snapshot::default(), &BTreeMap::new());
    assert!(fenced.flush(WAIT).await);
    fence.send_replace(12_345);
    fenced.save_state(&Snapshot::default(), &BTreeMap::new());
    assert!(fenced.flush(WAIT).await);
    assert_eq!(fenced.writes(), 0);
    assert_eq!(
        store.load_state().await.unwrap().map(|s| s.snapshot),
        Some(snapshot)
    );

    // A garbled value is reported as corrupt.
    client
        .put(store.snapshot_key(), b"{not json", 0)
        .await
        .unwrap();
    assert!(store.load_state().await.is_err());
    assert!(matches!(
        Store::load(&store),
        Err(arbor_p2p::StoreError::Corrupt(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_names_the_leader_and_takes_over_when_it_resigns() {
    if skip("a_standby_names_the_leader_and_takes_over_when_it_resigns") {
        return;
    }
    let etcd = Etcd::start().unwrap();
    let config = config(&etcd, "/test/standby");
    let etcd_client = EtcdClient::new(&config.endpoints).unwrap();

    // Someone else leads (its address need not answer).
    let other = Election::new(etcd_client.clone(), &config.prefix, "10.9.9.9:7100", TTL);
    let Campaign::Won(leadership) = other.try_campaign().await.unwrap() else {
        panic!("the first campaign wins");
    };
    let late = Election::new(etcd_client.clone(), &config.prefix, "10.9.9.8:1", TTL);
    match late.try_campaign().await.unwrap() {
        Campaign::Lost { leader } => assert_eq!(leader, "10.9.9.9:7100"),
        Campaign::Won(_) => panic!("two leaders"),
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (service, candidacy) =
        TreeService::with_etcd(&config, &addr, TreeServiceOptions::default()).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Arc::clone(&service).into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut c = client(&addr).await;
    eventually("the standby to observe the leader", async || {
        candidacy.leader().as_deref() == Some("10.9.9.9:7100")
    })
    .await;
    assert!(!service.is_active());
    let e = list(&mut c).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.message(), "standby; leader is 10.9.9.9:7100");
    let e = c
        .join(JoinRequest {
            function: "fn".into(),
            node: Some(node(0)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");

    // The leader resigns: the standby is elected at its next attempt and serves.
    let resigned = Instant::now();
    leadership.resign().await.unwrap();
    eventually("the standby to take over", async || service.is_active()).await;
    assert!(resigned.elapsed() < TTL, "took {:?}", resigned.elapsed());
    assert_eq!(
        other.leader().await.unwrap().as_deref(),
        Some(addr.as_str())
    );
    assert!(list(&mut c).await.unwrap().is_empty());
    c.join(JoinRequest {
        function: "fn".into(),
        node: Some(node(0)),
    })
    .await
    .unwrap();

    // A graceful shutdown resigns: the key is gone, the service is standby again, and its
    // last state is in etcd.
    candidacy.resign().await;
    assert!(!service.is_active());
    assert_eq!(other.leader().await.unwrap(), None);
    let stored = EtcdStore::new(etcd_client, &config.prefix)
        .load_state()
        .await
        .unwrap()
        .expect("a stored state");
    assert_eq!(stored.snapshot.functions.len(), 1);
    assert_eq!(stored.addrs.get("n0"), Some(&node(0).addr));
    server.abort();
}

/// A manager in its own thread and runtime, so that killing it ends every task and
/// connection at once, as a crash would (no resignation: its lease expires).
struct ManagerThread {
    addr: String,
    service: Arc<TreeService>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ManagerThread {
    fn start(config: &EtcdConfig) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (kill, killed) = oneshot::channel::<()>();
        let (started, service) = std::sync::mpsc::channel();
        let (config, my_addr) = (config.clone(), addr.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let (service, candidacy) =
                    TreeService::with_etcd(&config, &my_addr, TreeServiceOptions::default())
                        .unwrap();
                let _expiry = service.start_expiry();
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(Arc::clone(&service).into_server())
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                            listener,
                        )),
                );
                started.send(service).unwrap();
                let _ = killed.await;
                drop(candidacy);
            });
            runtime.shutdown_background();
        });
        Self {
            addr,
            service: service.recv().unwrap(),
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for ManagerThread {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_when_the_leader_dies_and_members_follow() {
    if skip("the_standby_takes_over_when_the_leader_dies_and_members_follow") {
        return;
    }
    let etcd = Etcd::start().unwrap();
    let config = config(&etcd, "/test/failover");
    let managers = [ManagerThread::start(&config), ManagerThread::start(&config)];
    eventually("a leader", async || {
        managers.iter().any(|m| m.service.is_active())
    })
    .await;
    // Exactly one leads, also a while later.
    tokio::time::sleep(TTL).await;
    let active: Vec<usize> = (0..2)
        .filter(|&i| managers[i].service.is_active())
        .collect();
    assert_eq!(active.len(), 1, "exactly one leader");
    let [a, b] = managers;
    let (mut leader, standby) = if active[0] == 0 { (a, b) } else { (b, a) };
    let mut standby_client = client(&standby.addr).await;
    let e = list(&mut standby_client).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.message(), format!("standby; leader is {}", leader.addr));

    // Four members know both managers; half of them try the standby first.
    let every = Duration::from_millis(200);
    let mut members = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..4 {
        let addrs = if i % 2 == 0 {
            [standby.addr.as_str(), leader.addr.as_str()]
        } else {
            [leader.addr.as_str(), standby.addr.as_str()]
        };
        let member = Member::new_multi(&addrs, node(i), every).unwrap();
        let rx = member.join("fn").await.unwrap();
        assert!(rx.borrow().is_some(), "n{i} placed");
        assert_eq!(member.manager(), leader.addr);
        members.push(member);
        receivers.push(rx);
    }
    let mut leader_client = client(&leader.addr).await;
    let before = list(&mut leader_client).await.unwrap();
    assert_eq!(ids(&before[0]), ["n0", "n1", "n2", "n3"]);
    // The state reaches etcd in the background.
    let reader = EtcdStore::new(EtcdClient::new(&config.endpoints).unwrap(), &config.prefix);
    eventually("the state in etcd", async || {
        reader.load_state().await.ok().flatten().is_some_and(|s| {
            s.addrs.len() == 4
                && s.snapshot
                    .functions
                    .get(&FunctionId::new("fn"))
                    .is_some_and(|t| t.parents.len() == 4)
        })
    })
    .await;

    // The leader dies.
    let died = Instant::now();
    leader.kill();
    eventually("the standby to take over", async || {
        standby.service.is_active()
    })
    .await;
    let took = died.elapsed();
    eprintln!("the standby took over after {took:?}");
    assert!(took < TTL * 3, "took over after {took:?}");
    // The same tree, addresses included.
    let after = list(&mut standby_client).await.unwrap();
    assert_eq!(after, before);

    // Every member moves to the new leader and is placed there, exactly once.
    for (i, member) in members.iter().enumerate() {
        eventually(&format!("n{i} on the new leader"), async || {
            member.manager() == standby.addr
        })
        .await;
    }
    let tree = list(&mut standby_client).await.unwrap();
    assert_eq!(tree.len(), 1);
    let mut placed = ids(&tree[0]);
    placed.sort_unstable();
    assert_eq!(
        placed,
        ["n0", "n1", "n2", "n3"],
        "every member exactly once"
    );
    for (i, rx) in receivers.iter_mut().enumerate() {
        let k = tree[0].members.iter().position(|n| n.id == format!("n{i}"));
        let k = k.expect("placed");
        let parent = (k > 0).then(|| tree[0].members[(k - 1) / 2].clone());
        wait_for(rx, &format!("n{i}'s position"), |p| {
            p.as_ref().is_some_and(|p| p.parent == parent)
        })
        .await;
    }

    // Their watches are open on the new leader: n1 leaves, n3 (the last) takes its place
    // and is told so.
    members[1].leave("fn").await.unwrap();
    wait_for(&mut receivers[3], "n3 moved under the root", |p| {
        p.as_ref()
            .is_some_and(|p| p.depth == 1 && p.parent.as_ref() == Some(&node(0)))
    })
    .await;
    assert_eq!(
        ids(&list(&mut standby_client).await.unwrap()[0]),
        ["n0", "n3", "n2"]
    );
    // The new leader knows the members in the tree.
    let r = standby_client
        .heartbeat(HeartbeatRequest {
            node: Some(node(2)),
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().functions, ["fn"]);
    drop(members);
    drop(standby);
}
