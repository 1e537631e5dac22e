//! The hostile images of `arbord/tests/hostile.rs` (`arbor_testkit::hostile`), this time through
//! `arbor mount`: each either is refused with its reason named, or mounts and serves the tar's
//! bytes without granting anything (nosuid, nodev); `arbor mount` never dies of it and leaves
//! nothing mounted. Needs root, docker-registry, skopeo and FUSE (CI has them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arbor_testkit::hostile::{self, edits};
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
