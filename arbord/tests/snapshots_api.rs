//! `arbord`'s snapshots API spoken to directly (as containerd's proxy plugin does), without
//! containerd: the semantics containerd relies on, bad keys, concurrency, and the lazy path's
//! labels. Needs root (FUSE mounts) and the packages from `scripts/setup.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use arbor_proto::snapshots::snapshots_client::SnapshotsClient;
use arbor_proto::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    UsageRequest, ViewSnapshotRequest,
};
use arbor_testkit::{
    Arbord, ArbordOptions, Registry, busybox_image, skip_unless_root, skip_unless_tools,
    skopeo_push, write_oci_layout,
};
use tonic::Code;
use tonic::transport::Channel;

/// A request naming only the snapshotter and a key.
macro_rules! keyed {
    ($t:ident, $key:expr) => {
        $t {
            snapshotter: "arbor".into(),
            key: ($key).into(),
        }
    };
}

fn start() -> Arbord {
    Arbord::start(&ArbordOptions {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
        // These tests commit real layers under made-up chain IDs, which the background proof
        // of lazy layers (tested in hostile.rs) rightly takes out of service.
        config: Some("[fetch]\nverify_layers = false\n".into()),
        ..Default::default()
    })
    .expect("starting arbord")
}

async fn client(a: &Arbord) -> SnapshotsClient<Channel> {
    let ch = arbor_proto::connect(a.socket())
        .await
        .expect("connecting to arbord");
    SnapshotsClient::new(ch)
}

fn prepare(key: &str, parent: &str, labels: &[(&str, &str)]) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "arbor".into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn list(c: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Vec<Info> {
    let mut s = c
        .list(ListSnapshotsRequest {
            snapshotter: "arbor".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        out.extend(m.info);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_semantics_bad_keys_and_concurrent_prepare() {
    if skip_unless_root("snapshot_semantics_bad_keys_and_concurrent_prepare") {
        return;
    }
    let a = start();
    let mut c = client(&a).await;
    // The socket is private.
    let mode = std::fs::metadata(a.socket()).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.unwrap(), 0o600);

    // A key that does not exist: NotFound everywhere, nothing created.
    let k = || "default/1/nope".to_string();
    let sn = || "arbor".to_string();
    assert_eq!(
        code(c.stat(keyed!(StatSnapshotRequest, k())).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.mounts(keyed!(MountsRequest, k())).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.remove(keyed!(RemoveSnapshotRequest, k())).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.usage(keyed!(UsageRequest, k())).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.commit(CommitSnapshotRequest {
                snapshotter: sn(),
                name: "x".into(),
                key: k(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(c.prepare(prepare("child", "no-such-parent", &[])).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.prepare(prepare("", "", &[])).await),
        Code::InvalidArgument
    );

    // 16 concurrent Prepares of one key: exactly one wins.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            code(c.prepare(prepare("k1", "", &[])).await)
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    assert_eq!(
        codes.iter().filter(|c| **c == Code::Ok).count(),
        1,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == Code::AlreadyExists).count(),
        15,
        "{codes:?}"
    );

    // Write into the active snapshot through its bind mount source, commit, stack a child.
    let m = c
        .mounts(keyed!(MountsRequest, "k1"))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    std::fs::write(Path::new(&m[0].source).join("hello"), b"hi").unwrap();
    c.commit(CommitSnapshotRequest {
        snapshotter: sn(),
        name: "l1".into(),
        key: "k1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code(c.stat(keyed!(StatSnapshotRequest, "k1")).await),
        Code::NotFound
    );
    let info = c
        .stat(keyed!(StatSnapshotRequest, "l1"))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(info.kind, Kind::Committed as i32);
    let u = c
        .usage(keyed!(UsageRequest, "l1"))
        .await
        .unwrap()
        .into_inner();
    assert!(u.size > 0 && u.inodes == 1, "{u:?}");
    // Mounting a committed snapshot is refused; a view of it is a read-only bind.
    assert_eq!(
        code(c.mounts(keyed!(MountsRequest, "l1")).await),
        Code::FailedPrecondition
    );
    let v = c
        .view(ViewSnapshotRequest {
            snapshotter: sn(),
            key: "v1".into(),
            parent: "l1".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        (
            v[0].r#type.as_str(),
            v[0].options.contains(&"ro".to_string())
        ),
        ("bind", true)
    );
    let p = c
        .prepare(prepare("k2", "l1", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(p[0].r#type, "overlay");
    assert!(
        p[0].options.iter().any(|o| o.starts_with("upperdir=")),
        "{:?}",
        p[0].options
    );
    // A parent with children cannot go.
    assert_eq!(
        code(c.remove(keyed!(RemoveSnapshotRequest, "l1")).await),
        Code::FailedPrecondition
    );

    // Labels: set one, replace all; other fields are immutable.
    let mut i = info.clone();
    i.labels = [("a".to_string(), "1".to_string())].into();
    let up = c
        .update(UpdateSnapshotRequest {
            snapshotter: sn(),
            info: Some(i.clone()),
            update_mask: Some(prost_types_mask(&["labels.a"])),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(up.labels.get("a").map(String::as_str), Some("1"));
    assert_eq!(
        code(
            c.update(UpdateSnapshotRequest {
                snapshotter: sn(),
                info: Some(i),
                update_mask: Some(prost_types_mask(&["parent"]))
            })
            .await
        ),
        Code::InvalidArgument
    );
    // Walk with containerd's filter syntax.
    assert_eq!(list(&mut c, &[]).await.len(), 3);
    let f = list(&mut c, &["labels.\"a\"==1,kind==committed"]).await;
    assert_eq!(
        f.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["l1"]
    );
    assert_eq!(list(&mut c, &["parent==l1"]).await.len(), 2);

    // Cleanup removes directories no snapshot owns, and nothing else.
    let orphan = a.root().join("snapshots").join("999");
    std::fs::create_dir_all(orphan.join("fs")).unwrap();
    c.cleanup(CleanupRequest { snapshotter: sn() })
        .await
        .unwrap();
    assert!(!orphan.exists());
    assert_eq!(list(&mut c, &[]).await.len(), 3);

    for k in ["k2", "v1", "l1"] {
        c.remove(keyed!(RemoveSnapshotRequest, k)).await.unwrap();
    }
    assert!(list(&mut c, &[]).await.is_empty());
    assert_eq!(
        std::fs::read_dir(a.root().join("snapshots"))
            .unwrap()
            .count(),
        0
    );
    assert!(
        a.metric("arbor_snapshotter_requests_total{method=\"prepare\",outcome=\"already_exists\"}")
            .unwrap()
            >= 15.0
    );
}

fn prost_types_mask(paths: &[&str]) -> prost_types::FieldMask {
    prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    }
}

/// The labels `arbor pull` sends for layer `i` of the converted image at `reference` to the
/// arbord rooted at `root` (whose pull key authenticates them).
fn remote_labels(
    root: &Path,
    reference: &str,
    layer: &serde_json::Value,
    chain: &str,
) -> Vec<(String, String)> {
    let mut l: Vec<(String, String)> = layer["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    l.push(("containerd.io/snapshot.ref".into(), chain.into()));
    l.push((
        "containerd.io/snapshot/arbor.layer-digest".into(),
        layer["digest"].as_str().unwrap().into(),
    ));
    l.push((
        "containerd.io/snapshot/arbor.image-ref".into(),
        reference.into(),
    ));
    let key = arbor_snapshotter::labels::read_pull_key(root).expect("arbord's pull key");
    let digest = layer["digest"].as_str().unwrap();
    l.push((
        arbor_snapshotter::labels::PULL_MAC.into(),
        arbor_snapshotter::labels::pull_mac(&key, digest, reference, chain),
    ));
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_remote_prepares_mount_once_and_unlabelled_layers_fall_back() {
    let test = "concurrent_remote_prepares_mount_once_and_unlabelled_layers_fall_back";
    if skip_unless_root(test) || skip_unless_tools(test, &["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, dst, layer) = converted_image(tmp.path());
    let layer = &layer;

    let a = start();
    let c = client(&a).await;
    let chain = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let labels = remote_labels(a.root(), &dst, layer, chain);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = c.clone();
        let labels = labels.clone();
        tasks.push(tokio::spawn(async move {
            let l: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            code(
                c.prepare(prepare(&format!("ns/{i}/extract {chain}"), "", &l))
                    .await,
            )
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            Code::AlreadyExists,
            "every remote prepare reports the snapshot ready"
        );
    }
    assert_eq!(
        a.metric("arbor_snapshotter_remote_mounts_total").unwrap(),
        1.0
    );
    assert_eq!(arbor_testkit::mounts_below(a.root()).len(), 1);
    // containerd's follow-up: List with its filter, then Stat.
    let mut c2 = c.clone();
    let found = list(
        &mut c2,
        &[&format!(
            "labels.\"containerd.io/snapshot.ref\"=={chain},parent==\"\""
        )],
    )
    .await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, chain);
    assert_eq!(found[0].kind, Kind::Committed as i32);

    // The same layer without digest/image labels (ctr-style): ordinary snapshot, counted.
    let plain: Vec<(String, String)> = labels
        .iter()
        .filter(|(k, _)| {
            !k.contains("layer-digest") && !k.contains("image-ref") && !k.contains("pull-mac")
        })
        .map(|(k, v)| {
            if k == "containerd.io/snapshot.ref" {
                (
                    k.clone(),
                    "sha256:2222222222222222222222222222222222222222222222222222222222222222"
                        .into(),
                )
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect();
    let l: Vec<(&str, &str)> = plain
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mounts = c2
        .prepare(prepare("ns/9/extract x", "", &l))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "bind");
    assert_eq!(
        a.metric("arbor_snapshotter_fallbacks_total{reason=\"no_source\"}")
            .unwrap(),
        1.0
    );

    // Removing the remote snapshot unmounts it.
    c2.remove(keyed!(RemoveSnapshotRequest, chain))
        .await
        .unwrap();
    assert_eq!(arbor_testkit::mounts_below(a.root()).len(), 0);
}

/// A converted busybox image in a fresh registry: (registry, converted reference, its first
/// layer's manifest entry).
fn converted_image(tmp: &Path) -> (Registry, String, serde_json::Value) {
    let reg = Registry::start().unwrap();
    let layout = tmp.join("layout");
    write_oci_layout(&layout, "v1", &busybox_image(vec![], &["/bin/true"])).unwrap();
    let src = reg.reference("fn/bb:v1");
    skopeo_push(&layout, "v1", &src, None).unwrap();
    let dst = reg.reference("fn/bb:v1-arbor");
    let arbor = Path::new(env!("CARGO_BIN_EXE_arbord")).with_file_name("arbor");
    let out = Command::new(&arbor)
        .args(["convert", "--plain-http", &src, &dst])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = reg.manifest("fn/bb", "v1-arbor").unwrap();
    (reg, dst, m["layers"][0].clone())
}

/// Hostile clients (#9): containerd cancels a Prepare (its caller went away; tonic drops the
/// request's future) at any point of a lazy mount. Each one must end whole: mounted and
/// recorded (containerd's garbage collector removes it), or not at all; never a FUSE mount
/// no snapshot owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_prepare_leaves_no_mount() {
    let test = "cancelled_prepare_leaves_no_mount";
    if skip_unless_root(test) || skip_unless_tools(test, &["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, dst, layer) = converted_image(tmp.path());
    let a = start();
    let c = client(&a).await;
    for i in 0..40u64 {
        let chain = format!("sha256:{:064x}", i + 1);
        let labels = remote_labels(a.root(), &dst, &layer, &chain);
        let l: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut c = c.clone();
        let cut = std::time::Duration::from_millis(2 * i);
        let _ = tokio::time::timeout(
            cut,
            c.prepare(prepare(&format!("ns/{i}/extract {chain}"), "", &l)),
        )
        .await;
    }
    // Let every prepare that was started finish.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut c2 = c.clone();
    let all = list(&mut c2, &[]).await;
    let remote: Vec<&Info> = all
        .iter()
        .filter(|i| i.labels.contains_key("containerd.io/snapshot/arbor.remote"))
        .collect();
    assert_eq!(
        arbor_testkit::mounts_below(a.root()).len(),
        remote.len(),
        "mounts without a snapshot record (cancelled prepares leaked them)"
    );
    for i in &all {
        c2.remove(keyed!(RemoveSnapshotRequest, i.name.clone()))
            .await
            .unwrap();
    }
    assert_eq!(arbor_testkit::mounts_below(a.root()).len(), 0);
    c2.cleanup(CleanupRequest {
        snapshotter: "arbor".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_dir(a.root().join("snapshots"))
            .unwrap()
            .count(),
        0
    );
}

/// Hostile disks (#9): a metadata record arbord cannot decode and a kept TOC that is garbage
/// (with the registry gone, so it cannot be refetched) must not stop arbord from starting
/// (containerd is `RequiredBy=` it): both are logged and counted, the rest is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_metadata_record_does_not_stop_arbord() {
    let test = "corrupt_metadata_record_does_not_stop_arbord";
    if skip_unless_root(test) || skip_unless_tools(test, &["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (reg, dst, layer) = converted_image(tmp.path());
    let mut a = start();
    let mut c = client(&a).await;
    let chain = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let labels = remote_labels(a.root(), &dst, &layer, chain);
    let l: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        code(c.prepare(prepare("ns/1/extract", "", &l)).await),
        Code::AlreadyExists
    );
    c.prepare(prepare("plain", "", &[])).await.unwrap();
    drop(c);
    assert!(a.stop().unwrap().success());
    drop(reg);
    // Damage: one undecodable record, and garbage in place of the kept TOC.
    {
        let meta = arbor_snapshotter::meta::Meta::open(&a.root().join("metadata.redb")).unwrap();
        meta.put_raw("garbage", b"\xff{ not a record").unwrap();
    }
    for e in std::fs::read_dir(a.root().join("tocs")).unwrap() {
        std::fs::write(e.unwrap().path(), b"not a TOC").unwrap();
    }
    a.restart()
        .expect("arbord must start despite a damaged store");
    let mut c = client(&a).await;
    let names: Vec<String> = list(&mut c, &[])
        .await
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert!(names.contains(&chain.to_string()), "{names:?}");
    assert!(names.contains(&"plain".to_string()), "{names:?}");
    assert!(!names.contains(&"garbage".to_string()), "{names:?}");
    assert_eq!(
        a.metric("arbor_snapshotter_unreadable_records").unwrap(),
        1.0
    );
    // The lazy layer could not be restored (kept TOC bad, registry gone): reported, and
    // containerd can still remove it.
    let mut failed = 0.0;
    for _ in 0..300 {
        failed = a
            .metric("arbor_snapshotter_restore_failures_total")
            .unwrap();
        if failed >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(failed, 1.0);
    c.remove(keyed!(RemoveSnapshotRequest, chain))
        .await
        .unwrap();
    c.remove(keyed!(RemoveSnapshotRequest, "plain"))
        .await
        .unwrap();
}
