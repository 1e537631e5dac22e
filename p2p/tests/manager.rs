//! Unit tests of `Manager`, liveness, and snapshot persistence.

use arbor_p2p::store::SNAPSHOT_VERSION;
use arbor_p2p::{
    FunctionId, Manager, ManagerError, MemoryStore, NodeId, Side, Snapshot, Store, TreeError,
    TreeSnapshot,
};

mod common;
use common::{id, parent, removed};

fn fid(s: &str) -> FunctionId {
    FunctionId::from(s)
}

/// f: a; b c. g: c; a. Heartbeats from the joins at 0..=4.
fn sample() -> Manager {
    let mut m = Manager::new();
    let (f, g) = (fid("f"), fid("g"));
    m.join(&f, id("a"), 0).expect("join");
    m.join(&f, id("b"), 1).expect("join");
    m.join(&f, id("c"), 2).expect("join");
    m.join(&g, id("c"), 3).expect("join");
    m.join(&g, id("a"), 4).expect("join");
    m
}

#[test]
fn functions_have_independent_trees() {
    let m = sample();
    let f = m.tree(&fid("f")).expect("tree f");
    let g = m.tree(&fid("g")).expect("tree g");
    assert_eq!(f.root(), Some(&id("a")));
    assert_eq!(g.root(), Some(&id("c")));
    assert_eq!(g.parent(&id("a")), Ok(Some(&id("c"))));
    assert_eq!(
        m.functions().collect::<Vec<_>>(),
        vec![&fid("f"), &fid("g")]
    );
    assert_eq!(m.functions_of(&id("a")), vec![&fid("f"), &fid("g")]);
    assert_eq!(m.functions_of(&id("b")), vec![&fid("f")]);
    assert!(m.tree(&fid("h")).is_none());
}

#[test]
fn join_errors_and_leave_errors() {
    let mut m = sample();
    assert!(matches!(
        m.join(&fid("f"), id("a"), 9),
        Err(ManagerError::Tree {
            source: TreeError::AlreadyMember(_),
            ..
        })
    ));
    assert!(matches!(
        m.leave(&fid("h"), &id("a")),
        Err(ManagerError::UnknownFunction(_))
    ));
    assert!(matches!(
        m.fail(&fid("f"), &id("x")),
        Err(ManagerError::Tree {
            source: TreeError::NotMember(_),
            ..
        })
    ));
}

#[test]
fn leaving_the_last_member_drops_the_tree() {
    let mut m = sample();
    assert_eq!(
        m.leave(&fid("g"), &id("c")).expect("leave"),
        vec![removed("c"), parent("a", None)]
    );
    assert_eq!(
        m.leave(&fid("g"), &id("a")).expect("leave"),
        vec![removed("a")]
    );
    assert!(m.tree(&fid("g")).is_none());
    assert!(matches!(
        m.leave(&fid("g"), &id("a")),
        Err(ManagerError::UnknownFunction(_))
    ));
    // Heartbeats are per node, not per tree: a stays known.
    assert_eq!(m.last_heartbeat(&id("a")), Some(4));
}

#[test]
fn heartbeats_never_go_backwards() {
    let mut m = Manager::new();
    m.heartbeat(&id("a"), 10);
    m.heartbeat(&id("a"), 5);
    assert_eq!(m.last_heartbeat(&id("a")), Some(10));
    m.heartbeat(&id("a"), 20);
    assert_eq!(m.last_heartbeat(&id("a")), Some(20));
}

#[test]
fn expire_fails_stale_nodes_out_of_every_tree() {
    let mut m = sample();
    m.heartbeat(&id("a"), 100);
    m.heartbeat(&id("b"), 100);
    // c last seen at 3: at now = 13 with timeout 10 it is exactly at the limit, still alive.
    assert!(m.expire(13, 10).is_empty());
    let changes = m.expire(14, 10);
    assert_eq!(
        changes,
        vec![
            (fid("f"), removed("c")),
            (fid("g"), removed("c")),
            (fid("g"), parent("a", None)),
        ]
    );
    assert_eq!(m.last_heartbeat(&id("c")), None);
    assert!(m.functions_of(&id("c")).is_empty());
    assert_eq!(m.tree(&fid("g")).and_then(|t| t.root()), Some(&id("a")));
    // Everyone else times out later; all trees disappear.
    let changes = m.expire(1000, 10);
    assert_eq!(
        changes,
        vec![
            (fid("f"), removed("a")),
            (fid("f"), parent("b", None)),
            (fid("g"), removed("a")),
            (fid("f"), removed("b")),
        ]
    );
    assert_eq!(m.functions().count(), 0);
    assert_eq!(m, Manager::new());
}

#[test]
fn snapshot_restore_is_identity() {
    let mut m = sample();
    for i in 0..20 {
        m.join(&fid("big"), NodeId::new(format!("n{i}")), 50 + i)
            .expect("join");
    }
    m.fail(&fid("big"), &id("n3")).expect("fail");
    m.leave(&fid("big"), &id("n0")).expect("leave");
    m.heartbeat(&id("idle"), 7);

    let snap = m.snapshot();
    assert_eq!(snap.version, SNAPSHOT_VERSION);
    let restored = Manager::restore(snap.clone()).expect("restore");
    assert_eq!(restored, m);
    assert_eq!(restored.snapshot(), snap);
    for f in m.functions() {
        let (a, b) = (m.tree(f).expect("tree"), restored.tree(f).expect("tree"));
        assert_eq!(a.parent_map(), b.parent_map());
        assert_eq!(a.members(), b.members());
    }

    let mut store = MemoryStore::new();
    assert!(Manager::load_from(&store).expect("load").is_none());
    m.save_to(&mut store).expect("save");
    assert_eq!(store.saves(), 1);
    assert_eq!(Manager::load_from(&store).expect("load"), Some(m.clone()));
    assert_eq!(store.load().expect("load"), Some(snap));
}

#[test]
fn restore_rejects_bad_snapshots() {
    let good = sample().snapshot();

    let mut s = good.clone();
    s.version = 99;
    assert!(matches!(
        Manager::restore(s),
        Err(ManagerError::InvalidSnapshot(_))
    ));

    let mut s = good.clone();
    s.heartbeats.remove(&id("b"));
    assert!(matches!(
        Manager::restore(s),
        Err(ManagerError::InvalidSnapshot(_))
    ));

    let mut s = good.clone();
    let mut tree = TreeSnapshot::default();
    tree.parents.insert(id("a"), None);
    tree.parents.insert(id("b"), Some((id("a"), Side::Right)));
    s.functions.insert(fid("h"), tree);
    assert!(matches!(
        Manager::restore(s),
        Err(ManagerError::InvalidSnapshot(_))
    ));

    // Empty trees in a snapshot are tolerated and dropped.
    let mut s = good;
    s.functions.insert(fid("empty"), TreeSnapshot::default());
    let m = Manager::restore(s).expect("restore");
    assert!(m.tree(&fid("empty")).is_none());
    assert_eq!(
        Manager::restore(Snapshot::default()).expect("restore"),
        Manager::new()
    );
}
