//! Tests of the harness itself. Those needing root or external tools print
//! "skipped: <test>: <reason>" and return when they cannot run.

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::*;

const REGISTRY_TOOLS: &[&str] = &["/usr/bin/docker-registry", "skopeo"];

fn keep() -> bool {
    crate::util::keep_dirs()
}

/// Asserts that a stopped instance left nothing behind.
fn assert_cleaned_up(what: &str, pid: u32, dir: &Path) {
    assert!(pid != 0, "{what}: no pid");
    assert!(
        !util::pid_alive(pid),
        "{what}: process {pid} still alive after drop"
    );
    assert!(
        util::mounts_below(dir).is_empty(),
        "{what}: mounts left below {}",
        dir.display()
    );
    if !keep() {
        assert!(!dir.exists(), "{what}: {} not removed", dir.display());
    }
}

/// No process is left in the namespace's cgroups and the cgroup directories are gone.
fn assert_no_cgroups(ns: &str) {
    assert!(
        util::pids_in_cgroup(ns).is_empty(),
        "processes left in cgroup {ns}"
    );
    let left = util::cgroup_dirs(ns);
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

#[test]
fn push_pull_run_busybox_image() {
    let t = "push_pull_run_busybox_image";
    if skip_unless_root(t)
        || skip_unless_tools(t, REGISTRY_TOOLS)
        || skip_unless_tools(
            t,
            &[
                "containerd",
                "ctr",
                "runc",
                "containerd-shim-runc-v2",
                "/bin/busybox",
            ],
        )
    {
        return;
    }
    let reg = Registry::start().expect("starting registry");
    let layout = tempfile::tempdir().unwrap();
    let spec = busybox_image(
        vec![Entry::file("hello.txt", b"hi\n")],
        &["/bin/cat", "/hello.txt"],
    );
    let digest = write_oci_layout(layout.path(), "v1", &spec).expect("writing layout");
    let reference = reg.reference("testkit/hello:v1");
    skopeo_push(layout.path(), "v1", &reference, None).expect("pushing");

    // The registry stored the manifest under the digest write_oci_layout returned.
    let hex = digest.strip_prefix("sha256:").unwrap();
    let rev = reg
        .storage_dir()
        .join("docker/registry/v2/repositories/testkit/hello/_manifests/revisions/sha256")
        .join(hex);
    assert!(rev.exists(), "manifest revision {} missing", rev.display());

    let ctd = Containerd::start().expect("starting containerd");
    assert!(ctd.namespace().starts_with("arbor-test-"));
    assert!(ctd.socket().starts_with(ctd.base_dir()));
    assert!(ctd.root().starts_with(ctd.base_dir()));
    let out = ctd
        .pull_and_run(&reference, &["/bin/cat", "/hello.txt"])
        .expect("pull and run");
    assert_eq!(out, "hi\n");

    // The image's default Cmd, the applet symlinks and /etc/passwd work too.
    assert_eq!(ctd.run(&reference, &[], &[]).unwrap(), "hi\n");
    let out = ctd
        .run(
            &reference,
            &[],
            &["/bin/sh", "-c", "id -un; sha256sum /hello.txt; ls -ld /tmp"],
        )
        .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "root");
    assert!(
        lines[1].starts_with(&hex::encode(Sha256::digest(b"hi\n"))),
        "{out}"
    );
    assert!(lines[2].starts_with("drwxrwxrwt"), "{out}");
    // A failing command is an error carrying ctr's exit status.
    assert!(ctd.run(&reference, &[], &["/bin/false"]).is_err());

    let images = ctd.ctr(&["image", "ls"]).unwrap();
    assert!(
        images.contains(&reference) && images.contains(&digest),
        "{images}"
    );
    // `ctr run --rm` left no containers behind.
    assert_eq!(ctd.ctr(&["container", "ls", "-q"]).unwrap().trim(), "");

    // Another instance is fully independent (own namespace, socket, root).
    let other = Containerd::start().expect("starting a second containerd");
    assert_ne!(other.namespace(), ctd.namespace());
    assert_ne!(other.socket(), ctd.socket());
    assert!(
        !other
            .ctr(&["image", "ls", "-q"])
            .unwrap()
            .contains(&reference)
    );

    // A task still running at drop time is killed and its rootfs unmounted.
    other.pull(&reference, &[]).unwrap();
    other
        .ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "overlayfs",
            &reference,
            "sleeper",
            "/bin/sleep",
            "600",
        ])
        .unwrap();
    assert!(!util::mounts_below(other.base_dir()).is_empty());
    let (opid, obase) = (other.pid(), other.base_dir().to_path_buf());
    let runc_state = Path::new("/run/containerd/runc").join(other.namespace());
    let ons = other.namespace().to_string();
    drop(other);
    assert_cleaned_up("containerd with a running task", opid, &obase);
    assert!(!runc_state.exists(), "{} left behind", runc_state.display());
    assert_no_cgroups(&ons);

    let (cpid, cbase, cns) = (
        ctd.pid(),
        ctd.base_dir().to_path_buf(),
        ctd.namespace().to_string(),
    );
    drop(ctd);
    assert_cleaned_up("containerd", cpid, &cbase);
    assert_no_cgroups(&cns);
    let (rpid, rbase) = (reg.pid(), reg.storage_dir().parent().unwrap().to_path_buf());
    drop(reg);
    assert_cleaned_up("registry", rpid, &rbase);
}

/// A one-layer image that needs nothing from the host.
fn tiny_image() -> ImageSpec {
    ImageSpec {
        layers: vec![LayerSource::Tar(layer_tar(&[
            Entry::dir("app"),
            Entry::file("app/data", pseudo_random_bytes(7, 10_000)),
        ]))],
        cmd: vec!["/app/data".into()],
        ..Default::default()
    }
}

#[test]
fn basic_auth_registry_requires_credentials() {
    let t = "basic_auth_registry_requires_credentials";
    if skip_unless_tools(t, REGISTRY_TOOLS) || skip_unless_tools(t, &["htpasswd"]) {
        return;
    }
    let (user, pass) = ("tester", "s3cret-Pw");
    let reg = Registry::start_with_basic_auth(user, pass).expect("starting registry");
    assert_eq!(reg.credentials(), Some((user, pass)));
    let addr = reg.addr();
    assert_eq!(http_get(&addr, "/v2/", None).unwrap().0, 401);
    assert_eq!(
        http_get(&addr, "/v2/", Some((user, "wrong"))).unwrap().0,
        401
    );
    assert_eq!(http_get(&addr, "/v2/", Some((user, pass))).unwrap().0, 200);

    let layout = tempfile::tempdir().unwrap();
    write_oci_layout(layout.path(), "v1", &tiny_image()).unwrap();
    let reference = reg.reference("testkit/private:v1");

    let err = skopeo_push(layout.path(), "v1", &reference, None)
        .expect_err("anonymous push must be rejected");
    let msg = format!("{err:#}").to_lowercase();
    assert!(
        msg.contains("unauthorized") || msg.contains("authentication required"),
        "unexpected error: {msg}"
    );
    skopeo_push(layout.path(), "v1", &reference, Some((user, "wrong")))
        .expect_err("push with a wrong password must be rejected");
    let tags = "/v2/testkit/private/tags/list";
    // Nothing was stored by the rejected pushes.
    let (code, _) = http_get(&addr, tags, Some((user, pass))).unwrap();
    assert_eq!(code, 404, "repository exists after rejected pushes");

    skopeo_push(layout.path(), "v1", &reference, Some((user, pass))).expect("authenticated push");
    let (code, body) = http_get(&addr, tags, Some((user, pass))).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"v1\""), "{body}");
    assert_eq!(http_get(&addr, tags, None).unwrap().0, 401);
}

/// The typeflags of the raw 512-byte header records of a tar, in order.
fn raw_typeflags(tar: &[u8]) -> Vec<u8> {
    let mut flags = Vec::new();
    let mut off = 0;
    while off + 512 <= tar.len() {
        let h = &tar[off..off + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let size_field = &h[124..136];
        let size: u64 = if size_field[0] & 0x80 != 0 {
            size_field[4..]
                .iter()
                .fold(0, |a, b| (a << 8) | u64::from(*b))
        } else {
            let s = std::str::from_utf8(size_field).unwrap();
            u64::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).unwrap()
        };
        flags.push(h[156]);
        off += 512 + (size as usize).div_ceil(512) * 512;
    }
    flags
}

fn expected_type(k: &EntryKind) -> EntryType {
    match k {
        EntryKind::File(_) => EntryType::Regular,
        EntryKind::Dir => EntryType::Directory,
        EntryKind::Symlink(_) => EntryType::Symlink,
        EntryKind::HardLink(_) => EntryType::Link,
        EntryKind::CharDev(..) => EntryType::Char,
        EntryKind::BlockDev(..) => EntryType::Block,
        EntryKind::Fifo => EntryType::Fifo,
    }
}

/// Reads `tar` with the tar crate and checks every entry against `entries`.
fn assert_roundtrip(format: &str, tar: &[u8], entries: &[Entry]) {
    let mut ar = tar::Archive::new(tar);
    let mut types = HashSet::new();
    let mut n = 0;
    for (i, got) in ar.entries().unwrap().enumerate() {
        let mut got = got.unwrap_or_else(|e| panic!("{format}: entry {i}: {e}"));
        let want = &entries[i];
        let ctx = format!("{format}: entry {i} ({})", want.path);
        let path = String::from_utf8(got.path_bytes().into_owned()).unwrap();
        assert_eq!(path, want.archive_path(), "{ctx}: path");
        let h = got.header().clone();
        assert_eq!(h.entry_type(), expected_type(&want.kind), "{ctx}: type");
        types.insert(h.entry_type().as_byte());
        assert_eq!(h.mode().unwrap(), want.mode, "{ctx}: mode");
        assert_eq!(h.uid().unwrap(), want.uid, "{ctx}: uid");
        assert_eq!(h.gid().unwrap(), want.gid, "{ctx}: gid");
        assert_eq!(h.mtime().unwrap(), want.mtime, "{ctx}: mtime");
        let link = got
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        match &want.kind {
            EntryKind::Symlink(t) | EntryKind::HardLink(t) => {
                assert_eq!(link.as_deref(), Some(t.as_str()), "{ctx}: link")
            }
            _ => assert_eq!(link, None, "{ctx}: link"),
        }
        match want.kind {
            EntryKind::CharDev(ma, mi) | EntryKind::BlockDev(ma, mi) => {
                assert_eq!(h.device_major().unwrap(), Some(ma), "{ctx}: major");
                assert_eq!(h.device_minor().unwrap(), Some(mi), "{ctx}: minor");
            }
            _ => {}
        }
        let mut xattrs = Vec::new();
        if let Some(exts) = got.pax_extensions().unwrap() {
            for ext in exts {
                let ext = ext.unwrap();
                if let Some(name) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
        assert_eq!(xattrs, want.xattrs, "{ctx}: xattrs");
        let mut data = Vec::new();
        got.read_to_end(&mut data).unwrap();
        assert!(data == want.data(), "{ctx}: content differs");
        n += 1;
    }
    assert_eq!(n, entries.len(), "{format}: entry count");
    for t in [
        EntryType::Regular,
        EntryType::Directory,
        EntryType::Symlink,
        EntryType::Link,
        EntryType::Char,
        EntryType::Block,
        EntryType::Fifo,
    ] {
        assert!(types.contains(&t.as_byte()), "{format}: no {t:?} entry");
    }
}

#[test]
fn corpus_covers_every_feature() {
    let c = corpus();
    let any = |f: &dyn Fn(&Entry) -> bool| c.iter().any(f);
    assert!(any(
        &|e| e.data().is_empty() && matches!(e.kind, EntryKind::File(_))
    ));
    assert!(any(&|e| e.data().len() == 1));
    assert!(any(&|e| e.data().len() == 4096));
    let zeros = |e: &Entry| e.data().iter().filter(|b| **b == 0).count();
    // A few MiB of incompressible data.
    assert!(any(
        &|e| e.data().len() > 2 << 20 && zeros(e) < e.data().len() / 100
    ));
    // 64 MiB, mostly zeros but with data blocks.
    assert!(any(&|e| e.data().len() == 64 << 20
        && zeros(e) > e.data().len() / 100 * 99
        && zeros(e) < e.data().len() - 4096));
    assert!(any(&|e| e.archive_path().len() > 100
        && e.archive_path().rsplit('/').next().unwrap().len() > 100));
    assert!(any(&|e| e.archive_path().len() > 255));
    assert!(any(
        &|e| matches!(&e.kind, EntryKind::Symlink(t) if t.len() > 100)
    ));
    assert!(any(
        &|e| matches!(&e.kind, EntryKind::HardLink(t) if t.len() > 100)
    ));
    assert!(any(
        &|e| matches!(&e.kind, EntryKind::Symlink(t) if t.starts_with('/'))
    ));
    assert!(any(
        &|e| matches!(&e.kind, EntryKind::Symlink(t) if t.starts_with("../"))
    ));
    assert!(any(&|e| e
        .path
        .rsplit('/')
        .next()
        .unwrap()
        .starts_with(".wh.")
        && !e.path.ends_with(".wh..wh..opq")));
    assert!(any(&|e| e.path.ends_with("/.wh..wh..opq")));
    assert!(any(&|e| e
        .xattrs
        .iter()
        .any(|(k, _)| k.starts_with("user."))));
    assert!(any(&|e| e
        .xattrs
        .iter()
        .any(|(k, v)| k == "security.capability" && v.len() == 20)));
    assert!(any(&|e| e.kind == EntryKind::Dir && !e.xattrs.is_empty()));
    assert!(any(&|e| e.mode & 0o4000 != 0));
    assert!(any(&|e| e.mode & 0o2000 != 0));
    assert!(any(&|e| e.mode & 0o1000 != 0 && e.kind == EntryKind::Dir));
    assert!(any(&|e| e.uid != 0) && any(&|e| e.gid != 0 && e.gid != e.uid));
    assert!(any(&|e| !e.path.is_ascii()));
    let mtimes: BTreeSet<u64> = c.iter().map(|e| e.mtime).collect();
    assert!(mtimes.len() >= 5 && mtimes.contains(&0), "{mtimes:?}");
    let many = c
        .iter()
        .filter(|e| e.path.starts_with("corpus/many/f"))
        .count();
    assert!(many >= 2000);
    // Hard links point at earlier entries; every parent directory precedes its children.
    let mut seen = HashSet::new();
    for e in &c {
        let p = e.archive_path();
        if let EntryKind::HardLink(t) = &e.kind {
            assert!(
                seen.contains(t.as_str()),
                "hard link {} to later/missing {t}",
                e.path
            );
        }
        if let Some((parent, _)) = p.trim_end_matches('/').rsplit_once('/') {
            assert!(
                seen.contains(&format!("{parent}/")),
                "{p}: parent not before it"
            );
        }
        assert!(seen.insert(p.clone()), "duplicate {p}");
        seen.insert(p.trim_end_matches('/').to_string());
    }
}

#[test]
fn corpus_tar_roundtrips_pax_and_gnu() {
    let c = corpus();

    let pax = layer_tar(&c);
    assert_roundtrip("pax", &pax, &c);
    let flags = raw_typeflags(&pax);
    assert!(flags.contains(&b'x'), "no PAX headers");
    assert!(
        !flags.contains(&b'L') && !flags.contains(&b'K'),
        "GNU records in the PAX tar"
    );
    assert_eq!(&pax[257..263], b"ustar\0", "not a ustar header");
    // Deterministic.
    assert_eq!(Sha256::digest(&pax), Sha256::digest(layer_tar(&corpus())));

    let gnu = layer_tar_gnu(&c);
    assert_roundtrip("gnu", &gnu, &c);
    let flags = raw_typeflags(&gnu);
    assert!(flags.contains(&b'L'), "no GNU long-name records");
    assert!(flags.contains(&b'K'), "no GNU long-link records");
    assert_eq!(&gnu[257..265], b"ustar  \0", "not a GNU header");
}

#[test]
fn tar_dir_streams_a_real_tree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("b/sub")).unwrap();
    std::fs::write(d.join("b/file"), b"content").unwrap();
    std::fs::hard_link(d.join("b/file"), d.join("c-hard")).unwrap();
    std::os::unix::fs::symlink("b/file", d.join("a-link")).unwrap();
    let long = "l".repeat(150);
    std::fs::write(d.join("b/sub").join(&long), b"long").unwrap();
    std::fs::write(d.join("big"), pseudo_random_bytes(9, 3 << 20)).unwrap();
    let fifo = std::ffi::CString::new(d.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("b/file"), std::fs::Permissions::from_mode(0o4750))
            .unwrap();
    }

    let mut out = Vec::new();
    tar_dir(d, &mut out).unwrap();
    let mut ar = tar::Archive::new(&out[..]);
    let mut got = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        got.push((
            path,
            e.header().entry_type(),
            e.header().mode().unwrap(),
            link,
            data,
        ));
    }
    let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
    let long_path = format!("b/sub/{long}");
    assert_eq!(
        names,
        [
            "a-link",
            "b/",
            "b/file",
            "b/sub/",
            long_path.as_str(),
            "big",
            "c-hard",
            "fifo"
        ]
    );
    assert_eq!(got[0].1, EntryType::Symlink);
    assert_eq!(got[0].3.as_deref(), Some("b/file"));
    assert_eq!(got[1].1, EntryType::Directory);
    assert_eq!(
        (got[2].1, got[2].2, &got[2].4[..]),
        (EntryType::Regular, 0o4750, &b"content"[..])
    );
    assert_eq!(got[4].4, b"long");
    assert_eq!(got[5].4, pseudo_random_bytes(9, 3 << 20));
    assert_eq!(
        (got[6].1, got[6].3.as_deref()),
        (EntryType::Link, Some("b/file"))
    );
    assert_eq!(got[7].1, EntryType::Fifo);
}

#[test]
fn oci_layout_is_deterministic_and_complete() {
    let big = tempfile::NamedTempFile::new().unwrap();
    let big_tar = layer_tar(&[Entry::file("big", pseudo_random_bytes(11, 5 << 20))]);
    std::fs::write(big.path(), &big_tar).unwrap();
    let mut spec = tiny_image();
    spec.layers
        .push(LayerSource::TarFile(big.path().to_path_buf()));
    spec.entrypoint = vec!["/bin/sh".into(), "-c".into()];
    spec.env = vec!["A=1".into()];
    spec.labels = vec![("org.example.k".into(), "v".into())];

    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let da = write_oci_layout(a.path(), "v1", &spec).unwrap();
    let db = write_oci_layout(b.path(), "v1", &spec).unwrap();
    assert_eq!(da, db, "same spec, different digests");
    assert!(da.starts_with("sha256:") && da.len() == 71);

    let blob = |d: &str| std::fs::read(a.path().join("blobs/sha256").join(&d[7..])).unwrap();
    let check_digest = |d: &str, data: &[u8]| {
        assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(data))), d);
    };
    let manifest_bytes = blob(&da);
    check_digest(&da, &manifest_bytes);
    let m: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let cfg_d = m["config"]["digest"].as_str().unwrap();
    let cfg_bytes = blob(cfg_d);
    check_digest(cfg_d, &cfg_bytes);
    let cfg: serde_json::Value = serde_json::from_slice(&cfg_bytes).unwrap();
    assert_eq!(cfg["architecture"], crate::image::host_arch());
    #[cfg(target_arch = "x86_64")]
    assert_eq!(cfg["architecture"], "amd64");
    assert_eq!(cfg["os"], "linux");
    assert_eq!(cfg["config"]["Cmd"], serde_json::json!(["/app/data"]));
    assert_eq!(
        cfg["config"]["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"])
    );
    assert_eq!(cfg["config"]["Env"], serde_json::json!(["A=1"]));
    assert_eq!(cfg["config"]["Labels"]["org.example.k"], "v");
    assert_eq!(cfg["history"].as_array().unwrap().len(), 2);
    let LayerSource::Tar(small_tar) = &spec.layers[0] else {
        unreachable!()
    };
    let tars = [small_tar.clone(), big_tar];
    for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let d = l["digest"].as_str().unwrap();
        let gz = blob(d);
        check_digest(d, &gz);
        assert_eq!(l["size"].as_u64().unwrap(), gz.len() as u64);
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert!(plain == tars[i], "layer {i} does not decompress to its tar");
        check_digest(cfg["rootfs"]["diff_ids"][i].as_str().unwrap(), &plain);
    }

    // Tags extend the index; re-tagging replaces.
    let idx = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap()
    };
    let d2 = write_oci_layout(a.path(), "v2", &tiny_image()).unwrap();
    assert_ne!(d2, da);
    write_oci_layout(a.path(), "v1", &tiny_image()).unwrap();
    let i = idx(a.path());
    let ms = i["manifests"].as_array().unwrap();
    assert_eq!(ms.len(), 2, "{i}");
    let tags: Vec<&str> = ms
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(tags, ["v2", "v1"]);
    assert!(ms.iter().all(|m| m["digest"] == d2.as_str()));
    assert!(a.path().join("oci-layout").exists());

    // skopeo reads the layout.
    if !skip_unless_tools(
        "oci_layout_is_deterministic_and_complete (skopeo part)",
        &["skopeo"],
    ) {
        let raw = Command::new("skopeo")
            .args(["--insecure-policy", "inspect", "--raw"])
            .arg(format!("oci:{}:v1", b.path().display()))
            .output()
            .unwrap();
        assert!(
            raw.status.success(),
            "{}",
            String::from_utf8_lossy(&raw.stderr)
        );
        check_digest(&db, &raw.stdout);
    }
}

#[test]
fn containerd_start_failure_reports_log_and_cleans_up() {
    let t = "containerd_start_failure_reports_log_and_cleans_up";
    if skip_unless_root(t) || skip_unless_tools(t, &["containerd", "ctr", "runc"]) {
        return;
    }
    let err = match Containerd::start_with_config("[plugins.\"not closed") {
        Ok(_) => panic!("containerd started with a broken config"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("log tail"), "{err}");
    // The log tail carries containerd's own complaint about the config.
    assert!(err.contains("config") || err.contains("toml"), "{err}");
    let log = err
        .split_whitespace()
        .find_map(|w| {
            w.trim_matches(|c| c == '(' || c == ')' || c == ':')
                .strip_suffix("/containerd.log")
        })
        .expect("log path in the error")
        .to_string();
    if !keep() {
        assert!(!Path::new(&log).exists(), "{log} left behind");
    }
}

/// The corpus is a valid layer for a real unpacker (containerd's applier on overlayfs).
#[test]
fn corpus_image_unpacks_in_containerd() {
    let t = "corpus_image_unpacks_in_containerd";
    if skip_unless_root(t)
        || skip_unless_tools(t, REGISTRY_TOOLS)
        || skip_unless_tools(t, &["containerd", "ctr", "runc", "/bin/busybox"])
    {
        return;
    }
    let c = corpus();
    let random = c
        .iter()
        .find(|e| e.path == "corpus/files/random-3m")
        .unwrap()
        .data()
        .to_vec();
    let reg = Registry::start().unwrap();
    let layout = tempfile::tempdir().unwrap();
    write_oci_layout(layout.path(), "c", &busybox_image(c, &["/bin/true"])).unwrap();
    let reference = reg.reference("testkit/corpus:c");
    skopeo_push(layout.path(), "c", &reference, None).unwrap();
    let ctd = Containerd::start().unwrap();
    ctd.pull(&reference, &[]).unwrap();
    let script = format!(
        "cd /corpus; \
         cat files/one; echo; \
         stat -c %a modes/setuid modes/sticky-tmp; \
         readlink links/absolute; \
         stat -c %h files/4k; \
         stat -c '%F %t %T' dev/loop0 dev/null; \
         ls many | wc -l; \
         ls -A whiteouts; ls -A whiteouts/opaque; \
         cat long/n{a199}; \
         stat -c %u:%g owners/big; \
         stat -c %Y mtimes/y2100; \
         sha256sum files/random-3m | cut -d' ' -f1",
        a199 = "a".repeat(199)
    );
    let out = ctd
        .run(&reference, &[], &["/bin/sh", "-c", &script])
        .unwrap();
    let want = format!(
        "x\n4755\n1777\n/corpus/files/4k\n2\nblock special file 7 0\ncharacter special file 1 3\n\
         2000\nopaque\nnew-file\nlong name\n1000000:1000001\n4102444800\n{}\n",
        hex::encode(Sha256::digest(&random))
    );
    assert_eq!(out, want);
}
