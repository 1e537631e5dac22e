//! Property tests: random join / leave / fail sequences keep every invariant, and the reported
//! changes are exactly the diff of the parent map.

use std::collections::{BTreeMap, BTreeSet};

use arbor_p2p::{Change, FunctionId, FunctionTree, Manager, NodeId};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Join,
    Leave(usize),
    Fail(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Join),
        1 => any::<usize>().prop_map(Op::Leave),
        1 => any::<usize>().prop_map(Op::Fail),
    ]
}

/// The changes implied by two parent maps: `Removed` for members gone, `Parent` for members
/// that are new or whose parent differs.
fn diff(
    before: &BTreeMap<NodeId, Option<NodeId>>,
    after: &BTreeMap<NodeId, Option<NodeId>>,
) -> Vec<Change> {
    let mut out: Vec<Change> = before
        .keys()
        .filter(|n| !after.contains_key(*n))
        .map(|n| Change::Removed { node: n.clone() })
        .collect();
    for (node, parent) in after {
        if before.get(node) != Some(parent) {
            out.push(Change::Parent {
                node: node.clone(),
                parent: parent.clone(),
            });
        }
    }
    out.sort();
    out
}

fn ceil_log2_plus_one(n: usize) -> usize {
    // ceil(log2(n + 1)) = number of bits of n.
    (usize::BITS - n.leading_zeros()) as usize
}

/// Checks the shape from the parent map alone, independently of `FunctionTree::check`: one
/// root, at most two children each, every member reachable, AVL-balanced, height within bound.
fn independent_check(parents: &BTreeMap<NodeId, Option<NodeId>>) -> Result<usize, String> {
    let mut children: BTreeMap<&NodeId, Vec<&NodeId>> = BTreeMap::new();
    let mut roots = Vec::new();
    for (node, parent) in parents {
        match parent {
            None => roots.push(node),
            Some(p) => {
                if !parents.contains_key(p) {
                    return Err(format!("{node}'s parent {p} is not a member"));
                }
                children.entry(p).or_default().push(node);
            }
        }
    }
    if children.values().any(|c| c.len() > 2) {
        return Err("a node with more than two children".into());
    }
    let Some(root) = roots.first() else {
        return if parents.is_empty() {
            Ok(0)
        } else {
            Err("no root".into())
        };
    };
    if roots.len() != 1 {
        return Err(format!("{} roots", roots.len()));
    }
    fn height(
        node: &NodeId,
        children: &BTreeMap<&NodeId, Vec<&NodeId>>,
        seen: &mut usize,
    ) -> Result<usize, String> {
        *seen += 1;
        let mut hs = [0usize; 2];
        for (i, c) in children.get(node).into_iter().flatten().enumerate() {
            hs[i] = height(c, children, seen)?;
        }
        if hs[0].abs_diff(hs[1]) > 1 {
            return Err(format!("{node} unbalanced: {hs:?}"));
        }
        Ok(1 + hs[0].max(hs[1]))
    }
    let mut seen = 0;
    let h = height(root, &children, &mut seen)?;
    if seen != parents.len() {
        return Err(format!("{seen} of {} members reachable", parents.len()));
    }
    if h > ceil_log2_plus_one(parents.len()) + 1 {
        return Err(format!("height {h} with {} members", parents.len()));
    }
    Ok(h)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_operations_keep_invariants(ops in prop::collection::vec(op(), 0..200)) {
        let mut tree = FunctionTree::new();
        let mut live: BTreeSet<NodeId> = BTreeSet::new();
        let mut next = 0u32;
        for op in ops {
            let before = tree.parent_map();
            let mut changes = match op {
                Op::Join => {
                    let node = NodeId::new(format!("n{next}"));
                    next += 1;
                    live.insert(node.clone());
                    let placement = tree.join(node.clone()).expect("join");
                    prop_assert_eq!(tree.parent(&node).expect("member"), placement.parent.as_ref());
                    placement.changes
                }
                Op::Leave(i) | Op::Fail(i) => {
                    if live.is_empty() {
                        continue;
                    }
                    let victim = tree.members()[i % tree.len()].clone();
                    live.remove(&victim);
                    let changes = if matches!(op, Op::Leave(_)) {
                        tree.leave(&victim)
                    } else {
                        tree.fail(&victim)
                    }
                    .expect("remove");
                    prop_assert!(!tree.contains(&victim));
                    changes
                }
            };
            if let Err(e) = tree.check() {
                return Err(TestCaseError::fail(e));
            }
            let after = tree.parent_map();
            match independent_check(&after) {
                Ok(h) => prop_assert_eq!(h, tree.height()),
                Err(e) => return Err(TestCaseError::fail(e)),
            }
            // Every live node exactly once, nothing else.
            prop_assert_eq!(after.keys().cloned().collect::<BTreeSet<_>>(), live.clone());
            prop_assert_eq!(tree.members().len(), live.len());
            prop_assert!(tree.height() <= ceil_log2_plus_one(tree.len()) + 1);
            // No duplicate changes, and exactly the diff.
            let n = changes.len();
            changes.sort();
            changes.dedup();
            prop_assert_eq!(changes.len(), n);
            prop_assert_eq!(changes, diff(&before, &after));
            // Ancestor chains end at the root and have length depth.
            for m in tree.members() {
                let chain = tree.ancestors(m).expect("member");
                prop_assert_eq!(chain.len(), tree.depth(m).expect("member"));
                prop_assert_eq!(chain.last().copied().or(Some(m)), tree.root());
            }
        }
    }

    #[test]
    fn manager_snapshot_round_trips(
        ops in prop::collection::vec((0u8..3, 0usize..4, 0usize..30, 0u64..100), 0..150),
    ) {
        let mut m = Manager::new();
        for (kind, f, node, now) in ops {
            let function = FunctionId::new(format!("f{f}"));
            let node = NodeId::new(format!("n{node}"));
            match kind {
                0 => { let _ = m.join(&function, node, now); }
                1 => { let _ = m.leave(&function, &node); }
                _ => { let _ = m.expire(now, 50); }
            }
            for f in m.functions().cloned().collect::<Vec<_>>() {
                let tree = m.tree(&f).expect("listed");
                prop_assert!(!tree.is_empty());
                if let Err(e) = tree.check() {
                    return Err(TestCaseError::fail(e));
                }
                for member in tree.members() {
                    prop_assert!(m.last_heartbeat(member).is_some());
                }
            }
        }
        let restored = Manager::restore(m.snapshot()).expect("restore");
        prop_assert_eq!(restored, m);
    }
}
