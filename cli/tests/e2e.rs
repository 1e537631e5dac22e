//! End-to-end tests of the `arbor` command against real tools: a `docker-registry` on
//! 127.0.0.1, a private containerd with runc, and skopeo. They need root (containerd, mknod
//! of device entries) and the packages from `scripts/setup.sh`; without them each test prints
//! why it skipped.

use std::path::Path;
use std::process::{Command, Output};

use arbor_testkit::{
    Containerd, Entry, Registry, SAMPLE_PROBE as PROBE, busybox_image, sample_image,
    skip_unless_root, skip_unless_tools, skopeo_push, write_oci_layout,
};
use serde_json::Value;

const TOOLS: &[&str] = &["docker-registry", "skopeo", "containerd", "ctr", "runc"];

fn skip(test: &str) -> bool {
    skip_unless_root(test) || skip_unless_tools(test, TOOLS)
}

fn arbor(args: &[&str]) -> Output {
    arbor_env(args, &[])
}

fn arbor_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_arbor"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running arbor")
}

/// Runs arbor, asserts success, returns stdout parsed as JSON.
fn arbor_json(args: &[&str]) -> Value {
    let out = arbor(args);
    assert!(
        out.status.success(),
        "arbor {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "arbor {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn push_sample(reg: &Registry, dir: &Path, repo_tag: &str) -> String {
    let layout = dir.join("layout");
    write_oci_layout(&layout, "v1", &sample_image()).expect("writing layout");
    let reference = reg.reference(repo_tag);
    skopeo_push(&layout, "v1", &reference, None).expect("skopeo push");
    reference
}

#[test]
fn converted_image_checks_identical_and_runs_in_stock_containerd() {
    if skip("converted_image_checks_identical_and_runs_in_stock_containerd") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let src = push_sample(&reg, tmp.path(), "fn/app:v1");
    let dst = reg.reference("fn/app:v1-arbor");

    let report = arbor_json(&["convert", "--plain-http", "--json", &src, &dst]);
    assert_eq!(report["already_converted"], false);
    let layers = report["images"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert!(layers.iter().all(|l| l["converted"] == true));

    let inspect = arbor_json(&["inspect", "--plain-http", "--json", &dst]);
    for l in inspect["images"][0]["layers"].as_array().unwrap() {
        assert_eq!(l["format"], "arbor", "{l}");
        assert_eq!(
            l["media_type"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        assert!(l["toc"]["entries"].as_u64().unwrap() > 0);
    }

    let check = arbor(&["check", "--plain-http", &src, &dst]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "check failed:\n{text}");
    assert!(text.contains("identical"), "{text}");

    // Stock containerd (overlayfs snapshotter) pulls and runs both; the container sees the
    // same files with the same contents, and the whiteouts took effect.
    let ctd = Containerd::start().unwrap();
    let original = ctd.pull_and_run(&src, PROBE).unwrap();
    let converted = ctd.pull_and_run(&dst, PROBE).unwrap();
    assert!(converted.starts_with("hello from arbor\n"), "{converted}");
    assert!(!converted.contains("REMOVED-VISIBLE"), "{converted}");
    assert!(
        converted.contains("new.txt") && !converted.contains("old.txt"),
        "{converted}"
    );
    assert_eq!(original, converted);
    let run = ctd.run(&dst, &[], &["/bin/sh", "/app/run.sh"]).unwrap();
    assert_eq!(run, "hello from arbor\n");
}

#[test]
fn conversion_is_deterministic_and_reconversion_is_a_noop() {
    if skip("conversion_is_deterministic_and_reconversion_is_a_noop") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let src = push_sample(&reg, tmp.path(), "fn/det:v1");
    let a = arbor_json(&[
        "convert",
        "--plain-http",
        "--json",
        &src,
        &reg.reference("fn/det:a"),
    ]);
    let b = arbor_json(&[
        "convert",
        "--plain-http",
        "--json",
        "--threads",
        "1",
        "--jobs",
        "1",
        &src,
        &reg.reference("fn/det:b"),
    ]);
    assert_eq!(a["target_digest"], b["target_digest"]);

    // Converting the converted image again changes nothing and says so.
    let again = arbor(&[
        "convert",
        "--plain-http",
        &reg.reference("fn/det:a"),
        &reg.reference("fn/det:a"),
    ]);
    assert!(again.status.success());
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(text.contains("already in Arbor's format"), "{text}");
    let copy = arbor_json(&[
        "convert",
        "--plain-http",
        "--json",
        &reg.reference("fn/det:a"),
        &reg.reference("other/det:c"),
    ]);
    assert_eq!(copy["already_converted"], true);
    assert_eq!(copy["target_digest"], a["target_digest"]);
    let check = arbor(&["check", "--plain-http", &src, &reg.reference("other/det:c")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn oci_layouts_multi_platform_and_platform_selection() {
    if skip("oci_layouts_multi_platform_and_platform_selection") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("multi");
    // Two platform images sharing a layer, tied together in an index.
    let spec = busybox_image(
        vec![Entry::file("p.txt", "amd64\n")],
        &["/bin/cat", "/p.txt"],
    );
    let d_amd = write_oci_layout(&layout, "amd", &spec).unwrap();
    let spec2 = busybox_image(
        vec![Entry::file("p.txt", "arm64\n")],
        &["/bin/cat", "/p.txt"],
    );
    let d_arm = write_oci_layout(&layout, "arm", &spec2).unwrap();
    let blob = |d: &str| layout.join("blobs/sha256").join(&d[7..]);
    let size = |d: &str| std::fs::metadata(blob(d)).unwrap().len();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d_amd, "size": size(&d_amd),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d_arm, "size": size(&d_arm),
             "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
        ]
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    std::fs::write(blob(&digest), &bytes).unwrap();
    let mut top: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    top["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}
    }));
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();

    let src = format!("oci:{}:multi", layout.display());
    let out = tmp.path().join("out");
    let all = arbor_json(&[
        "convert",
        "--json",
        &src,
        &format!("oci:{}:all", out.display()),
    ]);
    assert_eq!(all["media_type"], "application/vnd.oci.image.index.v1+json");
    let platforms: Vec<&str> = all["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["platform"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64/v8"]);
    let one = arbor_json(&[
        "convert",
        "--json",
        "--platform",
        "linux/arm64",
        &src,
        &format!("oci:{}:arm", out.display()),
    ]);
    assert_eq!(one["images"].as_array().unwrap().len(), 1);
    let inspect = arbor_json(&["inspect", "--json", &format!("oci:{}:all", out.display())]);
    assert_eq!(inspect["images"].as_array().unwrap().len(), 2);
    let check = arbor(&["check", &src, &format!("oci:{}:all", out.display())]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The converted index is usable by skopeo and by a registry.
    let reg = Registry::start().unwrap();
    let status = Command::new("skopeo")
        .args(["copy", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:all", out.display()))
        .arg(format!("docker://{}", reg.reference("multi/app:v1")))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn skopeo_interop_both_ways() {
    if skip("skopeo_interop_both_ways") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let src = push_sample(&reg, tmp.path(), "fn/sk:v1");
    let dst = reg.reference("fn/sk:arbor");
    arbor_json(&["convert", "--plain-http", "--json", &src, &dst]);

    // skopeo copies the converted image; the copy still checks identical.
    let copied = reg.reference("copies/sk:v1");
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{dst}"))
        .arg(format!("docker://{copied}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = arbor(&["check", "--plain-http", &src, &copied]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // Arbor reads layers skopeo wrote as zstd:chunked, through their TOCs.
    let sk_layout = tmp.path().join("skopeo-chunked");
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--dest-compress",
            "--dest-compress-format=zstd:chunked",
        ])
        .arg(format!("oci:{}:v1", tmp.path().join("layout").display()))
        .arg(format!("oci:{}:v1", sk_layout.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sk = format!("oci:{}:v1", sk_layout.display());
    let inspect = arbor_json(&["inspect", "--json", &sk]);
    let layers = inspect["images"][0]["layers"].as_array().unwrap();
    assert!(
        layers
            .iter()
            .all(|l| l["format"] == "zstd:chunked" && l["toc_error"].is_null()),
        "{inspect:#}"
    );
    let check = arbor(&[
        "check",
        &format!("oci:{}:v1", tmp.path().join("layout").display()),
        &sk,
    ]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        !text.contains("no readable TOC") && !text.contains("unreadable"),
        "{text}"
    );
    // skopeo 1.9's TOC drops xattrs whose value is empty (its tar stream keeps them): the one
    // difference `check` must find, and only through the TOC.
    for line in text.lines().filter(|l| l.starts_with("DIFFERENT")) {
        assert!(
            line.contains("corpus/xattrs/user: xattrs")
                && line.contains("user.empty=,")
                && line.ends_with("in target (through its TOC)"),
            "unexpected difference: {line}"
        );
    }
    // And converts them.
    let re = arbor_json(&[
        "convert",
        "--json",
        &sk,
        &format!("oci:{}:arbor", sk_layout.display()),
    ]);
    assert!(
        re["images"][0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["converted"] == true)
    );
}

#[test]
fn basic_auth_from_docker_config() {
    if skip("basic_auth_from_docker_config") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start_with_basic_auth("alice", "s3cret-pw").unwrap();
    let layout = tmp.path().join("layout");
    write_oci_layout(&layout, "v1", &busybox_image(vec![], &["/bin/true"])).unwrap();
    let src = reg.reference("auth/app:v1");
    skopeo_push(&layout, "v1", &src, Some(("alice", "s3cret-pw"))).unwrap();
    let dst = reg.reference("auth/app:arbor");

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let denied = arbor_env(
        &["convert", "--plain-http", &src, &dst],
        &[("DOCKER_CONFIG", &empty)],
    );
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("requires credentials"), "{err}");
    assert!(!err.contains("s3cret"));

    let cfg = tmp.path().join("docker");
    std::fs::create_dir(&cfg).unwrap();
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret-pw");
    std::fs::write(
        cfg.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr()),
    )
    .unwrap();
    let ok = arbor_env(
        &["convert", "--plain-http", &src, &dst],
        &[("DOCKER_CONFIG", &cfg)],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let check = arbor_env(
        &["check", "--plain-http", &src, &dst],
        &[("DOCKER_CONFIG", &cfg)],
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn corrupt_registry_blob_fails_clearly_and_writes_nothing() {
    if skip("corrupt_registry_blob_fails_clearly_and_writes_nothing") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let src = push_sample(&reg, tmp.path(), "fn/bad:v1");
    // Flip bytes in the middle of every stored layer blob larger than 64 KiB: the registry
    // now serves data that does not match its digest.
    let blobs = reg.storage_dir().join("docker/registry/v2/blobs/sha256");
    let mut corrupted = 0;
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let data = blob.unwrap().path().join("data");
            let mut bytes = std::fs::read(&data).unwrap();
            if bytes.len() > 64 << 10 {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0xff;
                std::fs::write(&data, bytes).unwrap();
                corrupted += 1;
            }
        }
    }
    assert!(corrupted > 0);
    let dst = reg.reference("fn/bad:arbor");
    let out = arbor(&["convert", "--plain-http", &src, &dst]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("digest mismatch")
            || err.contains("corrupt deflate")
            || err.contains("invalid"),
        "unclear error: {err}"
    );
    // Nothing was tagged at the target.
    let inspect = arbor(&["inspect", "--plain-http", &dst]);
    assert!(!inspect.status.success());
}

#[test]
fn check_names_every_difference() {
    if skip("check_names_every_difference") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let a = busybox_image(
        vec![
            Entry::file("a.txt", "one\n"),
            Entry::file("b.txt", "two\n").with_mode(0o600),
        ],
        &["/bin/true"],
    );
    let b = busybox_image(
        vec![
            Entry::file("a.txt", "ONE\n"),
            Entry::file("b.txt", "two\n").with_mode(0o644),
            Entry::file("c.txt", ""),
        ],
        &["/bin/true"],
    );
    write_oci_layout(&layout, "a", &a).unwrap();
    write_oci_layout(&layout, "b", &b).unwrap();
    let out = arbor(&[
        "check",
        &format!("oci:{}:a", layout.display()),
        &format!("oci:{}:b", layout.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "a.txt: content",
        "b.txt: mode 384 in source, 420",
        "c.txt: only in",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn prefetch_list_puts_startup_files_first() {
    if skip("prefetch_list_puts_startup_files_first") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    write_oci_layout(&layout, "v1", &sample_image()).unwrap();
    let list = tmp.path().join("startup.txt");
    std::fs::write(
        &list,
        "# start-up order\n/app/run.sh\n/bin/busybox\n/app/hello.txt\n/not/there\n",
    )
    .unwrap();
    let src = format!("oci:{}:v1", layout.display());
    let dst = format!("oci:{}:pf", layout.display());
    let report = arbor_json(&[
        "convert",
        "--json",
        "--prefetch-list",
        list.to_str().unwrap(),
        &src,
        &dst,
    ]);
    assert_eq!(
        report["images"][0]["prefetch_missing"],
        serde_json::json!(["/not/there"])
    );
    let inspect = arbor_json(&["inspect", "--json", &dst]);
    let layers = inspect["images"][0]["layers"].as_array().unwrap();
    assert_eq!(
        layers[0]["toc"]["prefetch"],
        serde_json::json!(["bin/busybox"])
    );
    assert_eq!(
        layers[1]["toc"]["prefetch"],
        serde_json::json!(["app/run.sh", "app/hello.txt"])
    );
    assert!(layers[0]["toc"]["prefetch_end"].as_u64().unwrap() > 500_000);
    let check = arbor(&["check", &src, &dst]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn bad_arguments_get_clear_errors() {
    for (args, needle) in [
        (
            vec!["convert", "UPPER/case", "x"],
            "invalid image reference",
        ),
        (
            vec!["convert", "oci:/nonexistent/dir:v1", "oci:/tmp/x:v1"],
            "not an OCI layout",
        ),
        (
            vec![
                "convert",
                "--chunk-size",
                "1KiB",
                "oci:/nonexistent:v",
                "oci:/tmp/y:v",
            ],
            "not an OCI layout",
        ),
        (
            vec!["inspect", "--plain-http", "127.0.0.1:1/none:v1"],
            "error",
        ),
    ] {
        let out = arbor(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn start_up_files_are_inferred_from_the_entrypoint_without_a_list() {
    if skip("start_up_files_are_inferred_from_the_entrypoint_without_a_list") {
        return;
    }
    use arbor_testkit::{ImageSpec, LayerSource, layer_tar};
    // A Python layout (the interpreter need not run: inference only reads the files).
    let site = "usr/local/lib/python3.11/dist-packages";
    let python = vec![
        Entry::dir("usr"),
        Entry::executable("usr/bin/python3.11", "not an ELF file"),
        Entry::symlink("usr/bin/python3", "python3.11"),
        Entry::file("usr/lib/python3.11/os.py", "import stat\n"),
        Entry::file("usr/lib/python3.11/stat.py", ""),
        Entry::file("usr/lib/python3.11/site.py", "import os\n"),
        Entry::file(
            "usr/lib/python3.11/json/__init__.py",
            "from .decoder import x\n",
        ),
        Entry::file("usr/lib/python3.11/json/decoder.py", ""),
        Entry::file("usr/lib/python3.11/unused.py", ""),
    ];
    let packages = vec![
        Entry::file(
            format!("{site}/pkg/__init__.py"),
            "from . import sub\n\ndef later():\n    import pkg.lazy\n",
        ),
        Entry::file(format!("{site}/pkg/sub.py"), "import json\n"),
        Entry::file(
            format!("{site}/pkg/__pycache__/sub.cpython-311.pyc"),
            "bytecode",
        ),
        Entry::file(format!("{site}/pkg/lazy.py"), ""),
        Entry::file("app/main.py", "import pkg\nimport not_installed\n"),
        Entry::file("app/data.txt", "data"),
    ];
    let spec = ImageSpec {
        layers: vec![
            LayerSource::Tar(layer_tar(&python)),
            LayerSource::Tar(layer_tar(&packages)),
        ],
        cmd: vec!["python3".into(), "main.py".into()],
        entrypoint: Vec::new(),
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        labels: Vec::new(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    write_oci_layout(&layout, "v1", &spec).unwrap();
    let src = format!("oci:{}:v1", layout.display());
    // WorkingDir is not set: the script is looked up from /, where it is not.
    let report = arbor_json(&[
        "convert",
        "--json",
        &src,
        &format!("oci:{}:a", layout.display()),
    ]);
    let notes = report["images"][0]["inferred"]["notes"].to_string();
    assert!(notes.contains("main.py"), "{report}");

    let spec = ImageSpec {
        cmd: vec!["python3".into(), "/app/main.py".into()],
        ..spec
    };
    write_oci_layout(&layout, "v2", &spec).unwrap();
    let src = format!("oci:{}:v2", layout.display());
    let dst = format!("oci:{}:inferred", layout.display());
    let report = arbor_json(&["convert", "--json", &src, &dst]);
    let inferred = &report["images"][0]["inferred"];
    assert_eq!(
        inferred["entrypoint"],
        serde_json::json!(["python3", "/app/main.py"])
    );
    let inspect = arbor_json(&["inspect", "--json", &dst]);
    let layers = inspect["images"][0]["layers"].as_array().unwrap();
    // In the order Python reads them; bytecode instead of a source that has it; nothing
    // imported only inside a function, nothing not imported, no data file.
    assert_eq!(
        layers[0]["toc"]["prefetch"],
        serde_json::json!([
            "usr/bin/python3.11",
            "usr/lib/python3.11/site.py",
            "usr/lib/python3.11/os.py",
            "usr/lib/python3.11/stat.py",
            "usr/lib/python3.11/json/__init__.py",
            "usr/lib/python3.11/json/decoder.py"
        ]),
        "{inspect}"
    );
    assert_eq!(
        layers[1]["toc"]["prefetch"],
        serde_json::json!([
            "app/main.py",
            format!("{site}/pkg/__init__.py"),
            format!("{site}/pkg/__pycache__/sub.cpython-311.pyc")
        ])
    );
    assert_eq!(inferred["files"], 9);
    let check = arbor(&["check", &src, &dst]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // --no-infer: every file on demand.
    let plain = format!("oci:{}:plain", layout.display());
    let report = arbor_json(&["convert", "--json", "--no-infer", &src, &plain]);
    assert!(report["images"][0]["inferred"].is_null());
    let inspect = arbor_json(&["inspect", "--json", &plain]);
    for l in inspect["images"][0]["layers"].as_array().unwrap() {
        assert!(
            l["toc"]["prefetch"].as_array().is_none_or(|p| p.is_empty()),
            "{l}"
        );
    }
}
