//! Unit tests of `FunctionTree`: placement, repair, reported changes, errors, persistence form.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arbor_p2p::{FunctionTree, Links, NodeId, Side, TreeError};

mod common;
use common::{id, parent, removed};

/// A tree of the first `n` letters joined in order: a; b c; d e f g; h i j ...
fn letters(n: usize) -> FunctionTree {
    let mut tree = FunctionTree::new();
    for c in ('a'..='z').take(n) {
        tree.join(id(&c.to_string())).expect("join");
    }
    tree.check().expect("valid");
    tree
}

fn names(nodes: &[NodeId]) -> Vec<&str> {
    nodes.iter().map(NodeId::as_str).collect()
}

fn parent_of(tree: &FunctionTree, node: &str) -> Option<String> {
    tree.parent(&id(node))
        .expect("member")
        .map(|p| p.as_str().to_owned())
}

fn kids(tree: &FunctionTree, node: &str) -> Vec<String> {
    tree.children(&id(node))
        .expect("member")
        .into_iter()
        .map(|c| c.as_str().to_owned())
        .collect()
}

#[test]
fn join_fills_level_order() {
    let mut tree = FunctionTree::new();
    assert!(tree.is_empty());
    assert_eq!(tree.root(), None);
    assert_eq!(tree.height(), 0);

    let p = tree.join(id("a")).expect("join");
    assert_eq!((p.parent, p.side, p.depth), (None, None, 0));
    assert_eq!(p.changes, vec![parent("a", None)]);

    let p = tree.join(id("b")).expect("join");
    assert_eq!(
        (p.parent, p.side, p.depth),
        (Some(id("a")), Some(Side::Left), 1)
    );
    assert_eq!(p.changes, vec![parent("b", Some("a"))]);

    let p = tree.join(id("c")).expect("join");
    assert_eq!(
        (p.parent, p.side, p.depth),
        (Some(id("a")), Some(Side::Right), 1)
    );

    let expected = [("d", "b"), ("e", "b"), ("f", "c"), ("g", "c"), ("h", "d")];
    for (node, par) in expected {
        let p = tree.join(id(node)).expect("join");
        assert_eq!(p.parent, Some(id(par)), "{node}");
        assert_eq!(p.changes, vec![parent(node, Some(par))]);
    }
    assert_eq!(tree.depth(&id("h")), Ok(3));
    assert_eq!(tree.root(), Some(&id("a")));
    assert_eq!(tree.len(), 8);
    assert_eq!(tree.height(), 4);
    assert_eq!(
        names(tree.members()),
        ["a", "b", "c", "d", "e", "f", "g", "h"]
    );
    assert_eq!(kids(&tree, "a"), ["b", "c"]);
    assert_eq!(kids(&tree, "d"), ["h"]);
    assert!(kids(&tree, "e").is_empty());
    assert_eq!(
        tree.ancestors(&id("h")).expect("member"),
        vec![&id("d"), &id("b"), &id("a")]
    );
    assert!(tree.ancestors(&id("a")).expect("member").is_empty());
    tree.check().expect("valid");
}

#[test]
fn join_twice_is_an_error() {
    let mut tree = letters(3);
    assert_eq!(tree.join(id("b")), Err(TreeError::AlreadyMember(id("b"))));
    assert_eq!(tree.len(), 3);
    tree.check().expect("valid");
}

#[test]
fn unknown_node_is_an_error() {
    let mut tree = letters(3);
    let x = id("x");
    assert_eq!(tree.leave(&x), Err(TreeError::NotMember(x.clone())));
    assert_eq!(tree.fail(&x), Err(TreeError::NotMember(x.clone())));
    assert_eq!(tree.parent(&x), Err(TreeError::NotMember(x.clone())));
    assert_eq!(tree.children(&x), Err(TreeError::NotMember(x.clone())));
    assert_eq!(tree.ancestors(&x), Err(TreeError::NotMember(x.clone())));
    assert_eq!(tree.depth(&x), Err(TreeError::NotMember(x.clone())));
    // Leaving twice is also an error.
    tree.leave(&id("c")).expect("leave");
    assert_eq!(tree.leave(&id("c")), Err(TreeError::NotMember(id("c"))));
    assert_eq!(FunctionTree::new().leave(&x), Err(TreeError::NotMember(x)));
}

#[test]
fn leave_root() {
    let mut tree = letters(7);
    let changes = tree.leave(&id("a")).expect("leave");
    assert_eq!(
        changes,
        vec![
            removed("a"),
            parent("g", None),
            parent("b", Some("g")),
            parent("c", Some("g")),
        ]
    );
    tree.check().expect("valid");
    assert_eq!(tree.root(), Some(&id("g")));
    assert_eq!(kids(&tree, "g"), ["b", "c"]);
    assert_eq!(kids(&tree, "c"), ["f"]);
}

#[test]
fn leave_root_of_two() {
    let mut tree = letters(2);
    assert_eq!(
        tree.leave(&id("a")).expect("leave"),
        vec![removed("a"), parent("b", None)]
    );
    assert_eq!(tree.leave(&id("b")).expect("leave"), vec![removed("b")]);
    assert!(tree.is_empty());
    tree.check().expect("valid");
}

#[test]
fn leave_interior() {
    let mut tree = letters(7);
    let changes = tree.leave(&id("b")).expect("leave");
    assert_eq!(
        changes,
        vec![
            removed("b"),
            parent("g", Some("a")),
            parent("d", Some("g")),
            parent("e", Some("g")),
        ]
    );
    tree.check().expect("valid");
    assert_eq!(kids(&tree, "a"), ["g", "c"]);
}

#[test]
fn leave_parent_of_last_node() {
    // c's right child g is the last node: it replaces c, and only f must switch.
    let mut tree = letters(7);
    assert_eq!(
        tree.leave(&id("c")).expect("leave"),
        vec![removed("c"), parent("g", Some("a")), parent("f", Some("g"))]
    );
    tree.check().expect("valid");
    // A node with one child (d, whose only child is the last node h) is replaced by it.
    let mut tree = letters(8);
    assert_eq!(
        tree.leave(&id("d")).expect("leave"),
        vec![removed("d"), parent("h", Some("b"))]
    );
    tree.check().expect("valid");
}

#[test]
fn leave_leaf() {
    // The last node is simply unlinked.
    let mut tree = letters(7);
    assert_eq!(tree.leave(&id("g")).expect("leave"), vec![removed("g")]);
    tree.check().expect("valid");
    // Another leaf's hole is filled by the last node.
    let mut tree = letters(7);
    assert_eq!(
        tree.leave(&id("d")).expect("leave"),
        vec![removed("d"), parent("g", Some("b"))]
    );
    tree.check().expect("valid");
    assert_eq!(kids(&tree, "b"), ["g", "e"]);
    // Last node moving to its sibling's slot keeps its parent: no parent change to report.
    let mut tree = letters(3);
    assert_eq!(tree.leave(&id("b")).expect("leave"), vec![removed("b")]);
    assert_eq!(tree.side(&id("c")), Ok(Some(Side::Left)));
    tree.check().expect("valid");
}

#[test]
fn fail_node_with_two_subtrees() {
    //            a
    //        b       c
    //      d   e   f   g
    //     h i j
    let mut tree = letters(10);
    let changes = tree.fail(&id("b")).expect("fail");
    assert_eq!(
        changes,
        vec![
            removed("b"),
            parent("j", Some("a")),
            parent("d", Some("j")),
            parent("e", Some("j")),
        ]
    );
    tree.check().expect("valid");
    assert_eq!(kids(&tree, "j"), ["d", "e"]);
    assert_eq!(kids(&tree, "d"), ["h", "i"]);
    assert!(kids(&tree, "e").is_empty());
    assert_eq!(parent_of(&tree, "h").as_deref(), Some("d"));
}

#[test]
fn links_round_trip_and_validation() {
    let tree = letters(10);
    let links = tree.links();
    assert_eq!(FunctionTree::from_links(&links), Ok(tree.clone()));
    assert_eq!(
        FunctionTree::from_links(&BTreeMap::new()),
        Ok(FunctionTree::new())
    );

    let bad = |mutate: &dyn Fn(&mut Links)| {
        let mut l = links.clone();
        mutate(&mut l);
        FunctionTree::from_links(&l)
    };
    // Two roots.
    assert!(matches!(
        bad(&|l| {
            l.insert(id("b"), None);
        }),
        Err(TreeError::Invalid(_))
    ));
    // Two nodes in one slot.
    assert!(matches!(
        bad(&|l| {
            l.insert(id("c"), Some((id("a"), Side::Left)));
        }),
        Err(TreeError::Invalid(_))
    ));
    // Parent not a member.
    assert!(matches!(
        bad(&|l| {
            l.insert(id("z"), Some((id("y"), Side::Left)));
        }),
        Err(TreeError::Invalid(_))
    ));
    // A gap: j moved from e's left slot to g's left slot (not complete).
    assert!(matches!(
        bad(&|l| {
            l.insert(id("j"), Some((id("g"), Side::Left)));
        }),
        Err(TreeError::Invalid(_))
    ));
    // A cycle detached from the root.
    assert!(matches!(
        bad(&|l| {
            l.insert(id("y"), Some((id("z"), Side::Left)));
            l.insert(id("z"), Some((id("y"), Side::Left)));
        }),
        Err(TreeError::Invalid(_))
    ));
}

/// Deterministic pseudo-random numbers (no extra crates).
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *state >> 33
}

#[test]
fn thousand_joins_then_five_hundred_failures() {
    let start = Instant::now();
    let mut tree = FunctionTree::new();
    for i in 0..1000 {
        tree.join(NodeId::new(format!("n{i}"))).expect("join");
    }
    tree.check().expect("valid after joins");
    assert_eq!(tree.height(), 10);
    let mut seed = 42;
    for _ in 0..500 {
        let victim = tree.members()[(lcg(&mut seed) as usize) % tree.len()].clone();
        let changes = tree.fail(&victim).expect("fail");
        assert!(changes.len() <= 4);
        tree.check().expect("valid after failure");
    }
    assert_eq!(tree.len(), 500);
    assert_eq!(tree.height(), 9);
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
}
