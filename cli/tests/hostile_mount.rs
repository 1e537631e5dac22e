//! The hostile images of `arbord/tests/hostile.rs` (`arbor_testkit::hostile`), this time through
//! `arbor mount`: each either is refused with its reason named, or mounts and serves the tar's
//! bytes without granting anything (nosuid, nodev); `arbor mount` never dies of it and leaves
//! nothing mounted. Needs root, docker-registry, skopeo and FUSE (CI has them).
//!
//! The committed suite in `testdata/hostile/` (one OCI layout, one tag per attack) goes through
//! the same checks, and is checked against what its generator writes today.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arbor_testkit::hostile::{self, edits, suite};
use arbor_testkit::{Registry, skip_unless_root, skip_unless_tools};
use serde_json::Value;

fn skip(test: &str) -> bool {
    skip_unless_root(test)
        || skip_unless_tools(test, &["docker-registry", "skopeo", "fusermount3"])
        || (!Path::new("/dev/fuse").exists() && arbor_testkit::skip(test, "/dev/fuse is missing"))
}

fn arbor() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_arbor"))
}

/// What `arbor mount` made of an image.
enum Outcome {
    /// It mounted: the child still runs, serving `dir`.
    Mounted(Child),
    /// It exited (without mounting) with this stderr.
    Refused(String),
}

/// Runs `arbor mount REF DIR` until it mounts or exits (60 s).
fn mount(reference: &str, dir: &Path, work: &Path) -> Outcome {
    std::fs::create_dir_all(dir).unwrap();
    let mut child = Command::new(arbor())
        .args(["mount", "--plain-http", "--cache-dir"])
        .arg(work.join("cache"))
        .arg("--state-dir")
        .arg(work.join("state"))
        .arg(reference)
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if arbor_testkit::is_mounted(dir) {
            return Outcome::Mounted(child);
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(
                status.code().is_some(),
                "arbor mount died of a signal ({status}): {err}"
            );
            assert!(!status.success(), "arbor mount exited 0 without mounting");
            return Outcome::Refused(err);
        }
        assert!(t.elapsed() < Duration::from_secs(60), "arbor mount hung");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `umount DIR`, then `arbor mount` must exit 0 and leave nothing mounted below `work`.
fn unmount(mut child: Child, dir: &Path, work: &Path) {
    assert!(Command::new("umount").arg(dir).status().unwrap().success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "arbor mount did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "arbor mount exited with {status}");
    assert!(arbor_testkit::mounts_below(work).is_empty());
}

/// The options of the mount at `dir` (per-mount and superblock).
fn mount_options(dir: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_str().unwrap();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want))
        .unwrap_or_else(|| panic!("{want} is not mounted"))
        .to_string()
}

/// Builds the attack on a fresh registry and mounts it.
fn attack(
    repo: &str,
    build: impl FnOnce(&Registry, &Path) -> anyhow::Result<String>,
) -> (Registry, tempfile::TempDir, PathBuf, Outcome) {
    let reg = Registry::start().expect("starting docker-registry");
    let work = tempfile::tempdir().unwrap();
    let reference = build(&reg, work.path()).expect("building the hostile image");
    let dir = work.path().join(format!("{repo}-mnt"));
    let outcome = mount(&reference, &dir, work.path());
    (reg, work, dir, outcome)
}

fn toc_attack(repo: &str, edit: fn(&mut Value)) -> (Registry, tempfile::TempDir, PathBuf, Outcome) {
    attack(repo, |reg, work| {
        hostile::toc_attack(reg, &arbor(), work, repo, edit)
    })
}

fn refused_with(outcome: Outcome, dir: &Path, work: &Path, reason: &str) {
    match outcome {
        Outcome::Refused(err) => assert!(
            err.contains(reason),
            "refused, but not for {reason:?}: {err}"
        ),
        Outcome::Mounted(child) => {
            unmount(child, dir, work);
            panic!("arbor mount mounted an image whose TOC it must refuse ({reason})");
        }
    }
}

#[test]
fn arbor_mount_refuses_a_deep_path_toc() {
    if skip("arbor_mount_refuses_a_deep_path_toc") {
        return;
    }
    let (_reg, work, dir, outcome) = toc_attack("deep", edits::deep_path_dir);
    refused_with(outcome, &dir, work.path(), "deeper than 512 components");
}

#[test]
fn arbor_mount_refuses_a_toc_bomb() {
    if skip("arbor_mount_refuses_a_toc_bomb") {
        return;
    }
    let (_reg, work, dir, outcome) = attack("bomb", |reg, work| {
        hostile::toc_bomb_attack(reg, &arbor(), work, "bomb")
    });
    refused_with(outcome, &dir, work.path(), "TOC decompresses to");
}

#[test]
fn arbor_mount_refuses_a_directory_hard_link() {
    if skip("arbor_mount_refuses_a_directory_hard_link") {
        return;
    }
    let (_reg, work, dir, outcome) = toc_attack("dirlink", edits::dir_hard_link);
    refused_with(outcome, &dir, work.path(), "hard link");
}

#[test]
fn arbor_mount_of_dot_whiteouts_serves_a_sane_tree() {
    if skip("arbor_mount_of_dot_whiteouts_serves_a_sane_tree") {
        return;
    }
    let (_reg, work, dir, outcome) = toc_attack("whiteout", edits::dot_whiteouts);
    let Outcome::Mounted(child) = outcome else {
        panic!("whiteouts of dot names should be dropped, not refuse the image");
    };
    let app: Vec<String> = std::fs::read_dir(dir.join("app"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(app, ["hello.txt"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("app/hello.txt")).unwrap(),
        "attacker\n"
    );
    unmount(child, &dir, work.path());
}

#[test]
fn arbor_mount_of_a_toc_lying_about_setuid_grants_nothing() {
    if skip("arbor_mount_of_a_toc_lying_about_setuid_grants_nothing") {
        return;
    }
    let (_reg, work, dir, outcome) = toc_attack("setuid", edits::setuid_in_toc_only);
    let Outcome::Mounted(child) = outcome else {
        panic!("the TOC is well-formed; it should mount");
    };
    // The bytes are the tar's (every chunk is verified against the TOC, whose chunk digests
    // were not touched); the setuid bit the TOC claims grants nothing on a nosuid mount.
    assert_eq!(
        std::fs::read_to_string(dir.join("app/hello.txt")).unwrap(),
        "attacker\n"
    );
    let opts = mount_options(&dir);
    assert!(
        opts.contains("nosuid") && opts.contains("nodev"),
        "mounted without nosuid,nodev: {opts}"
    );
    unmount(child, &dir, work.path());
}

/// The committed hostile-image suite.
fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/hostile")
}

fn blob_names(layout: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap_or_else(|e| panic!("{}: {e}", layout.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `testdata/hostile/` is exactly what `testdata/hostile/generate.sh` writes with today's
/// `arbor convert` and `arbor_testkit::hostile`: same index.json, same blobs, byte for byte.
#[test]
fn committed_hostile_suite_is_what_the_generator_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("suite");
    suite::generate_into(&arbor(), &fresh).expect("generating the suite");
    let committed = suite_dir();
    let regenerate = "the committed suite is stale: run testdata/hostile/generate.sh and commit";
    for f in ["index.json", "oci-layout"] {
        assert!(
            std::fs::read(committed.join(f)).unwrap() == std::fs::read(fresh.join(f)).unwrap(),
            "{f} differs; {regenerate}"
        );
    }
    assert_eq!(blob_names(&committed), blob_names(&fresh), "{regenerate}");
    for name in blob_names(&fresh) {
        let p = Path::new("blobs/sha256").join(&name);
        assert!(
            std::fs::read(committed.join(&p)).unwrap() == std::fs::read(fresh.join(&p)).unwrap(),
            "blob {name} differs; {regenerate}"
        );
    }
}

/// Every tag of the committed suite through `arbor mount`: refused with its reason named, or
/// mounted `nosuid,nodev` serving the tar's bytes; never a signal, nothing left mounted.
#[test]
fn arbor_mount_of_the_committed_hostile_suite() {
    if skip("arbor_mount_of_the_committed_hostile_suite") {
        return;
    }
    let reg = Registry::start().expect("starting docker-registry");
    let work = tempfile::tempdir().unwrap();
    for tag in suite::tags() {
        let reference = hostile::push(&reg, &suite_dir(), tag, "hostile").expect("pushing");
        let dir = work.path().join(format!("{tag}-mnt"));
        let outcome = mount(&reference, &dir, work.path());
        let refused_for = match tag {
            "deep-path" => Some("deeper than 512 components"),
            "toc-bomb" => Some("TOC decompresses to"),
            "dir-hard-link" => Some("which is a directory"),
            // The victim's TOC annotations do not describe the attacker's blob; `arbor mount`
            // reads the image it is given, whatever source labels the image carries.
            "foreign-source-labels" => Some("digest mismatch for TOC"),
            _ => None,
        };
        if let Some(reason) = refused_for {
            refused_with(outcome, &dir, work.path(), reason);
            eprintln!("{tag}: refused ({reason})");
            continue;
        }
        let child = match outcome {
            Outcome::Mounted(child) => child,
            Outcome::Refused(err) => panic!("{tag}: refused: {err}"),
        };
        let opts = mount_options(&dir);
        assert!(
            opts.contains("nosuid") && opts.contains("nodev"),
            "{tag}: mounted without nosuid,nodev: {opts}"
        );
        // The tar's bytes (every chunk is verified against the TOC, whatever else it says).
        assert_eq!(
            std::fs::read_to_string(dir.join("app/hello.txt")).unwrap(),
            suite::hello(tag),
            "{tag}: wrong bytes"
        );
        let mut app: Vec<String> = std::fs::read_dir(dir.join("app"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        app.sort();
        match tag {
            "setuid-and-devices" => {
                assert_eq!(app, ["hello.txt", "loop0", "null", "suid"]);
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                let suid = dir.join("app/suid");
                // Served as the tar says, bytes and bits; the mount is nosuid, so the bit
                // elevates nothing.
                assert_eq!(std::fs::read_to_string(&suid).unwrap(), suite::SUID_FILE);
                assert_eq!(
                    std::fs::metadata(&suid).unwrap().permissions().mode() & 0o7777,
                    0o4755
                );
                // The device nodes exist, and cannot be opened on a nodev mount.
                let null = dir.join("app/null");
                assert!(
                    std::fs::metadata(&null)
                        .unwrap()
                        .file_type()
                        .is_char_device()
                );
                for dev in ["app/null", "app/loop0"] {
                    let err = std::fs::File::open(dir.join(dev))
                        .expect_err("opened a device node on an arbor mount");
                    assert_eq!(
                        err.raw_os_error(),
                        Some(libc::EACCES),
                        "{tag}: opening {dev}: {err}"
                    );
                }
            }
            // Whiteouts of empty and dot names are dropped.
            _ => assert_eq!(app, ["hello.txt"], "{tag}: app/ holds {app:?}"),
        }
        // `toc-disagrees`: the mount shows the TOC's metadata, so app/hello.txt appears
        // setuid (the tar says 0644); on a nosuid mount (checked above) that grants nothing.
        unmount(child, &dir, work.path());
        eprintln!("{tag}: mounted nosuid,nodev, served the tar's bytes");
    }
    assert!(arbor_testkit::mounts_below(work.path()).is_empty());
}
