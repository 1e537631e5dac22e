//! Hostile images against a node: each test pushes one image crafted to hurt `arbord` (built by
//! `arbor convert`, then tampered with by `arbor_testkit::hostile`), pulls it the ways a node
//! does (`arbor pull`, and `ctr image pull` which forwards the image's own annotations), and
//! then checks what must hold whatever the image does: arbord is still running, an honest image
//! still pulls and runs with the right bytes, and the reason the hostile layer was refused is
//! named in arbord's log or the pull's error.
//!
//! They need root, a private containerd, runc, docker-registry and skopeo (CI has them); without
//! them each test says why it skipped (and fails under CI).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arbor_testkit::hostile::{self, Layout, edits};
use arbor_testkit::{
    Arbord, ArbordOptions, Containerd, ContainerdOptions, Registry, skip_unless_root,
    skip_unless_tools,
};
use serde_json::{Value, json};

mod cri;

const TOOLS: &[&str] = &["docker-registry", "skopeo", "containerd", "ctr", "runc"];
const HONEST: &str = "honest bytes\n";

fn arbor_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_arbord")).with_file_name("arbor")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A registry, arbord and a containerd using it, plus a scratch directory.
struct Scene {
    reg: Registry,
    arbord: Arbord,
    ctd: Containerd,
    tmp: tempfile::TempDir,
    /// Containers started by [`Scene::run_with_busybox_in`] (for unique ids).
    runs: std::cell::Cell<u32>,
}

impl Scene {
    fn start() -> Scene {
        Scene::start_with(false)
    }

    /// With `cri`, containerd also runs its CRI plugin as Kubernetes nodes do (the shipped
    /// snippet's `snapshotter = "arbor"`, `disable_snapshot_annotations = false`; plain HTTP to
    /// this scene's registry), for [`cri::cri_pull`].
    fn start_with(cri: bool) -> Scene {
        Scene::start_configured(cri, None)
    }

    /// [`Scene::start_with`], arbord reading `config` (TOML).
    fn start_configured(cri: bool, config: Option<&str>) -> Scene {
        let tmp = tempfile::tempdir().expect("temp dir");
        let reg = Registry::start().expect("starting docker-registry");
        let arbord = Arbord::start(&ArbordOptions {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
            config: config.map(str::to_string),
            ..Default::default()
        })
        .expect("starting arbord");
        let mut extra_config = arbord.containerd_config();
        if cri {
            let certs = reg.write_cri_hosts(tmp.path()).expect("writing hosts.toml");
            extra_config.push_str(&format!(
                "\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"arbor\"\n  disable_snapshot_annotations = false\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
                certs.display()
            ));
        }
        let ctd = Containerd::start_with(&ContainerdOptions { extra_config, cri })
            .expect("starting containerd");
        Scene {
            reg,
            arbord,
            ctd,
            tmp,
            runs: Default::default(),
        }
    }

    /// [`hostile::converted_image`] on this scene's registry.
    fn converted(&self, repo: &str, hello: &str) -> PathBuf {
        hostile::converted_image(&self.reg, &arbor_bin(), self.tmp.path(), repo, hello)
            .expect("building and converting an image")
    }

    /// Pushes the layout's `tag` to `repo:tag`; returns the reference.
    fn push(&self, layout: &Path, tag: &str, repo: &str) -> String {
        hostile::push(&self.reg, layout, tag, repo).expect("pushing")
    }

    /// `arbor pull` through this node's containerd.
    fn arbor_pull(&self, reference: &str) -> Output {
        self.arbor_pull_in(self.ctd.namespace(), reference)
    }

    /// `arbor pull` into containerd namespace `namespace`.
    fn arbor_pull_in(&self, namespace: &str, reference: &str) -> Output {
        let sock = self.ctd.socket().display().to_string();
        Command::new(arbor_bin())
            .args(["pull", "--plain-http", "--address", &sock, "--namespace"])
            .args([namespace, reference])
            .env("ARBORD_ROOT", self.arbord.root())
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .output()
            .expect("running arbor pull")
    }

    fn run(&self, reference: &str, cmd: &[&str]) -> anyhow::Result<String> {
        self.ctd.run(reference, &["--snapshotter", "arbor"], cmd)
    }

    /// What must hold after any hostile image: arbord runs, answers containerd, and an honest
    /// converted image pulls lazily and reads right.
    fn assert_node_healthy(&mut self) {
        assert!(
            self.arbord.is_running(),
            "arbord died; log:\n{}",
            self.arbord.log_tail(40)
        );
        self.ctd
            .ctr(&["snapshot", "--snapshotter", "arbor", "ls"])
            .expect("containerd lists arbor's snapshots");
        let honest = self.converted("honest", HONEST);
        let reference = self.push(&honest, "arbor", "honest");
        let out = self.arbor_pull(&reference);
        assert!(out.status.success(), "honest pull: {}", text(&out));
        assert!(
            text(&out).contains("mounted lazily"),
            "the honest image was not mounted lazily: {}",
            text(&out)
        );
        let got = self
            .run(&reference, &["cat", "/app/hello.txt"])
            .unwrap_or_else(|e| {
                panic!(
                    "honest image: {e:#}\narbord log:\n{}",
                    self.arbord.log_tail(30)
                )
            });
        assert_eq!(got, HONEST);
        assert!(
            self.arbord.is_running(),
            "arbord died serving the honest image"
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.arbord.log_path()).unwrap_or_default()
    }
}

fn skip(test: &str) -> bool {
    skip_unless_root(test) || skip_unless_tools(test, TOOLS)
}

/// Pushes the attacker's image with its top layer's TOC rewritten by `edit`
/// ([`hostile::toc_attack`]) and pulls it with `arbor pull`; returns the scene, the pull's
/// output and the reference.
fn attack_toc(repo: &str, edit: impl FnOnce(&mut Value)) -> (Scene, Output, String) {
    let s = Scene::start();
    let reference = hostile::toc_attack(&s.reg, &arbor_bin(), s.tmp.path(), repo, edit)
        .expect("building the attacker's image");
    let out = s.arbor_pull(&reference);
    (s, out, reference)
}

#[test]
fn deep_path_toc_does_not_crash_arbord() {
    if skip("deep_path_toc_does_not_crash_arbord") {
        return;
    }
    let (mut s, out, reference) = attack_toc("deep", edits::deep_path_dir);
    s.assert_node_healthy();
    // The lazy mount was refused and named why; the layer's tar (which is honest) was
    // unpacked by containerd instead, so the image still runs.
    let log = s.log();
    assert!(
        log.contains("unsafe entry name") && log.contains("deeper than 512 components"),
        "arbord's log does not name the deep path; pull: {}\nlog tail:\n{}",
        text(&out),
        s.arbord.log_tail(30)
    );
    if out.status.success() {
        assert_eq!(
            s.run(&reference, &["cat", "/app/hello.txt"]).unwrap(),
            "attacker\n"
        );
    }
}

#[test]
fn toc_bomb_is_refused_without_exhausting_memory() {
    if skip("toc_bomb_is_refused_without_exhausting_memory") {
        return;
    }
    let mut s = Scene::start();
    let reference = hostile::toc_bomb_attack(&s.reg, &arbor_bin(), s.tmp.path(), "bomb")
        .expect("building the TOC bomb");
    let out = s.arbor_pull(&reference);
    let rss = s.arbord.peak_rss().expect("arbord's peak RSS");
    assert!(
        rss < 400 << 20,
        "arbord's peak RSS reached {} MiB decoding a TOC bomb",
        rss >> 20
    );
    s.assert_node_healthy();
    let log = s.log();
    assert!(
        log.contains("TOC")
            && ["decompresses to", "entries", "limit", "too large"]
                .iter()
                .any(|w| log.contains(w)),
        "arbord's log does not name the TOC limit; pull: {}\nlog tail:\n{}",
        text(&out),
        s.arbord.log_tail(30)
    );
}

#[test]
fn hard_link_to_directory_in_toc_is_refused() {
    if skip("hard_link_to_directory_in_toc_is_refused") {
        return;
    }
    let (mut s, out, reference) = attack_toc("dirlink", edits::dir_hard_link);
    s.assert_node_healthy();
    assert!(
        s.log().contains("hard link"),
        "arbord's log does not name the directory hard link; pull: {}\nlog tail:\n{}",
        text(&out),
        s.arbord.log_tail(30)
    );
    if out.status.success() {
        // Unpacked from its (honest) tar instead: no `app/loop` at all.
        let ls = s.run(&reference, &["ls", "/app"]).unwrap();
        assert_eq!(ls.split_whitespace().collect::<Vec<_>>(), ["hello.txt"]);
    }
}

#[test]
fn empty_and_dot_whiteouts_in_toc_are_harmless() {
    if skip("empty_and_dot_whiteouts_in_toc_are_harmless") {
        return;
    }
    let (mut s, out, reference) = attack_toc("whiteout", edits::dot_whiteouts);
    assert!(out.status.success(), "pull: {}", text(&out));
    // Whatever the tree made of them, the directory lists and reads right while mounted...
    match s.run(&reference, &["cat", "/app/hello.txt"]) {
        Ok(got) => assert_eq!(got, "attacker\n"),
        Err(e) => panic!("{e:#}\nlog:\n{}", s.arbord.log_tail(20)),
    }
    // ...and as the entries are not in the tar, the background proof takes the layer out.
    assert!(s.wait_metric(LIED, 1.0) >= 1.0, "{}", s.arbord.log_tail(20));
    s.assert_node_healthy();
}

#[test]
fn image_annotations_cannot_choose_the_fetch_source() {
    if skip("image_annotations_cannot_choose_the_fetch_source") {
        return;
    }
    let mut s = Scene::start_with(true);
    // The victim's private image, which the node can read.
    let victim = s.converted("private", "victim secret\n");
    let victim_ref = s.push(&victim, "arbor", "private");
    let vl = Layout::open(&victim, "arbor").unwrap();
    let victim_top = vl.layer(vl.layers() - 1).clone();
    // The attacker's image claims, in its own layer annotations (which containerd forwards to
    // the snapshotter), that its top layer is the victim's: the victim's TOC annotations, and
    // Arbor's source labels naming the victim's blob and repository.
    let dir = s.converted("attacker", "attacker\n");
    let mut l = Layout::open(&dir, "arbor").unwrap();
    let top = l.layers() - 1;
    let ann = l.annotations_mut(top);
    for (k, v) in victim_top["annotations"].as_object().unwrap() {
        ann.insert(k.clone(), v.clone());
    }
    ann.insert(
        hostile::SOURCE_LABELS[0].into(),
        victim_top["digest"].clone(),
    );
    ann.insert(hostile::SOURCE_LABELS[1].into(), json!(victim_ref));
    l.save("evil").unwrap();
    let reference = s.push(&dir, "evil", "attacker");
    // Through CRI, which forwards the image's own `containerd.io/snapshot/*` layer annotations
    // to the snapshotter next to its own labels (`ctr image pull` of containerd 1.6 forwards
    // none, so it could not carry this attack).
    let before = fallbacks(&s);
    cri::cri_pull(s.ctd.socket(), &reference)
        .unwrap_or_else(|e| panic!("CRI pull: {e}\ncontainerd log:\n{}", s.ctd.log_tail(30)));
    assert!(
        fallbacks(&s) > before,
        "the forged source labels did not make arbord refuse the lazy mount; log:\n{}",
        s.arbord.log_tail(30)
    );
    let got = s
        .ctd
        .run_arbor_in(
            "k8s.io",
            &reference,
            "annotations",
            &["cat", "/app/hello.txt"],
        )
        .unwrap_or_else(|e| panic!("running it: {e:#}\nlog:\n{}", s.arbord.log_tail(30)));
    assert_eq!(
        got, "attacker\n",
        "the attacker's image read another image's layer"
    );
    s.assert_node_healthy();
}

impl Scene {
    /// Waits (60 s) until the metric `sample` reaches `min`.
    fn wait_metric(&self, sample: &str, min: f64) -> f64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let v = self.arbord.metric(sample).unwrap_or(0.0);
            if v >= min || std::time::Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

const LIED: &str = r#"arbor_snapshotter_layer_verifications_total{result="lied"}"#;
const PROVED: &str = r#"arbor_snapshotter_layer_verifications_total{result="proved"}"#;

/// The attacker's image, pushed: [`Scene::converted`] with `EVIL` in `/app/hello.txt` and a
/// config claiming the victim's diff IDs, so that its top layer's chain ID is the victim's
/// (containerd reuses a committed chain ID for every later image). Returns (victim reference,
/// attacker reference); neither is pulled yet.
fn liar_and_victim(s: &Scene) -> (String, String) {
    let victim = s.converted("victim", "victim bytes\n");
    let victim_ref = s.push(&victim, "arbor", "victim");
    let victim_diff_ids = Layout::open(&victim, "arbor")
        .unwrap()
        .diff_ids_mut()
        .clone();
    let dir = s.converted("liar", "EVIL\n");
    let mut l = Layout::open(&dir, "arbor").unwrap();
    *l.diff_ids_mut() = victim_diff_ids;
    l.save("evil").unwrap();
    (victim_ref, s.push(&dir, "evil", "liar"))
}

#[test]
fn lying_diff_id_cannot_poison_another_images_layer() {
    if skip("lying_diff_id_cannot_poison_another_images_layer") {
        return;
    }
    let mut s = Scene::start();
    let (victim_ref, reference) = liar_and_victim(&s);
    let out = s.arbor_pull(&reference);
    assert!(out.status.success(), "pull: {}", text(&out));
    assert!(text(&out).contains("mounted lazily"), "{}", text(&out));
    // The victim is pulled right away, in the same namespace, long before the background proof
    // would start: containerd finds the chain ID committed, but `arbor pull` asks arbord, which
    // proves the holder first (a liar) and mounts the victim's own layer in its place.
    let out = s.arbor_pull(&victim_ref);
    assert!(out.status.success(), "victim pull: {}", text(&out));
    assert!(
        s.arbord.metric(LIED).unwrap_or(0.0) >= 1.0,
        "the victim's pull returned before the holder's proof; log:\n{}",
        s.arbord.log_tail(30)
    );
    let log = s.log();
    assert!(log.contains("lies about the layer's diff ID"), "{log}");
    assert!(log.contains("waiting for its proof"), "{log}");
    let got = s
        .run(&victim_ref, &["cat", "/app/hello.txt"])
        .unwrap_or_else(|e| panic!("victim: {e:#}\nlog:\n{}", s.arbord.log_tail(30)));
    assert_eq!(
        got, "victim bytes\n",
        "the victim read the attacker's layer"
    );
    // The attacker's image, whose config claims the victim's layer, gets the victim's layer
    // (what that diff ID names), never its own lying bytes.
    if let Ok(got) = s.run(&reference, &["cat", "/app/hello.txt"]) {
        assert_ne!(got, "EVIL\n", "the lying layer is still served");
    }
    s.assert_node_healthy();
}

#[test]
fn lying_diff_id_cannot_poison_another_namespace() {
    if skip("lying_diff_id_cannot_poison_another_namespace") {
        return;
    }
    let mut s = Scene::start();
    let (victim_ref, reference) = liar_and_victim(&s);
    let out = s.arbor_pull(&reference);
    assert!(out.status.success(), "pull: {}", text(&out));
    // Right away, another tenant's namespace pulls the victim. containerd has no record of the
    // chain ID there, so it Prepares it with the target label (as its unpacker does for CRI)
    // and arbord decides: it does not hand over the unproved layer of another blob, it proves
    // it now (a liar), removes it and mounts the victim's layer in its place.
    let out = s.arbor_pull_in("tenant-b", &victim_ref);
    assert!(out.status.success(), "victim pull: {}", text(&out));
    assert!(
        s.arbord.metric(LIED).unwrap_or(0.0) >= 1.0,
        "the victim's pull returned before the holder's proof; log:\n{}",
        s.arbord.log_tail(40)
    );
    assert!(text(&out).contains("mounted lazily"), "{}", text(&out));
    let got = s
        .ctd
        .run_arbor_in(
            "tenant-b",
            &victim_ref,
            "victim-b",
            &["cat", "/app/hello.txt"],
        )
        .unwrap_or_else(|e| panic!("victim: {e:#}\nlog:\n{}", s.arbord.log_tail(30)));
    assert_eq!(
        got, "victim bytes\n",
        "the victim read the attacker's layer"
    );
    s.assert_node_healthy();
}

#[test]
fn lying_diff_id_cannot_poison_an_image_pulled_by_cri_in_the_same_namespace() {
    if skip("lying_diff_id_cannot_poison_an_image_pulled_by_cri_in_the_same_namespace") {
        return;
    }
    // The proof would not start on its own for ten minutes: only the victim's pull can make it.
    let mut s = Scene::start_configured(true, Some("[prefetch]\nrest_delay_secs = 600\n"));
    let (victim_ref, reference) = liar_and_victim(&s);
    cri::cri_pull(s.ctd.socket(), &reference)
        .unwrap_or_else(|e| panic!("CRI pull: {e}\nlog:\n{}", s.arbord.log_tail(30)));
    assert!(
        s.log().contains("layer mounted lazily"),
        "{}",
        s.arbord.log_tail(30)
    );
    // Past the grace in which the liar's own unpacker `Stat`s its chain ID.
    std::thread::sleep(std::time::Duration::from_secs(7));
    // CRI pulls every image into `k8s.io`, where containerd finds the chain ID in its own
    // records and only `Stat`s it: arbord answers that `Stat` with the proof's verdict.
    let pulled = cri::cri_pull(s.ctd.socket(), &victim_ref);
    assert!(
        s.arbord.metric(LIED).unwrap_or(0.0) >= 1.0,
        "the victim's pull ({pulled:?}) returned before the holder's proof; log:\n{}",
        s.arbord.log_tail(40)
    );
    let log = s.log();
    assert!(log.contains("waiting for its proof"), "{log}");
    match pulled {
        // Refused, naming the liar: the chain ID is unusable in `k8s.io` until the liar's
        // image is removed there.
        Err(e) => assert!(e.message().contains("proved to lie"), "{e}"),
        // Or pulled: then it must read its own bytes.
        Ok(_) => {
            let got = s
                .ctd
                .run_arbor_in(
                    "k8s.io",
                    &victim_ref,
                    "victim-k8s",
                    &["cat", "/app/hello.txt"],
                )
                .unwrap_or_else(|e| panic!("victim: {e:#}"));
            assert_eq!(
                got, "victim bytes\n",
                "the victim read the attacker's layer"
            );
        }
    }
    s.assert_node_healthy();
}

#[test]
fn image_annotations_cannot_mark_a_layer_proved() {
    if skip("image_annotations_cannot_mark_a_layer_proved") {
        return;
    }
    let mut s = Scene::start();
    let (victim_ref, _) = liar_and_victim(&s);
    // The liar again, this time also claiming in its layer annotations (which become snapshot
    // labels) that arbord already proved the layer.
    let dir = s.tmp.path().join("liar-arbor");
    let mut l = Layout::open(&dir, "evil").unwrap();
    let top = l.layers() - 1;
    l.annotations_mut(top).insert(
        "containerd.io/snapshot/arbor.verified".into(),
        json!("true"),
    );
    l.save("evil-proved").unwrap();
    let reference = s.push(&dir, "evil-proved", "liar");
    let out = s.arbor_pull(&reference);
    assert!(out.status.success(), "pull: {}", text(&out));
    let out = s.arbor_pull(&victim_ref);
    assert!(out.status.success(), "victim pull: {}", text(&out));
    let got = s.run(&victim_ref, &["cat", "/app/hello.txt"]).unwrap();
    assert_eq!(got, "victim bytes\n", "a forged proof label was believed");
    assert!(s.log().contains("ignoring labels only arbord may set"));
    s.assert_node_healthy();
}

#[test]
fn toc_that_disagrees_with_its_tar_is_taken_out_of_service() {
    if skip("toc_that_disagrees_with_its_tar_is_taken_out_of_service") {
        return;
    }
    // The TOC (what a lazy mount serves) makes a plain file setuid root; the tar (what a stock
    // runtime unpacks, and what the diff ID covers) does not.
    let (mut s, out, reference) = attack_toc("setuid", edits::setuid_in_toc_only);
    assert!(out.status.success(), "pull: {}", text(&out));
    // A container started on it before the proof ends, which has read the file once.
    s.ctd
        .ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "arbor",
            &reference,
            "early",
            "sh",
            "-c",
            "cat /app/hello.txt; sleep 300",
        ])
        .expect("ctr run -d");
    let lied = s.wait_metric(LIED, 1.0);
    assert!(
        lied >= 1.0,
        "the lying TOC was not caught; log:\n{}",
        s.arbord.log_tail(30)
    );
    assert!(s.log().contains("TOC disagrees with its tar"));
    assert!(s.run(&reference, &["cat", "/app/hello.txt"]).is_err());
    // The running container cannot read the liar's file any more, not even what it had read.
    let again = s.ctd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "again",
        "early",
        "cat",
        "/app/hello.txt",
    ]);
    assert!(
        again.is_err(),
        "a running container still reads the lying layer: {again:?}"
    );
    let _ = s.ctd.ctr(&["task", "kill", "-s", "KILL", "early"]);
    s.assert_node_healthy();
    // The honest image's layers were proved.
    assert!(s.wait_metric(PROVED, 1.0) >= 1.0);
}

/// The committed hostile-image suite (`testdata/hostile/`, written by its `generate.sh`).
fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/hostile")
}

/// Every fallback arbord counted (converted layers it did not mount lazily), whatever the
/// reason.
fn fallbacks(s: &Scene) -> f64 {
    s.arbord
        .metrics()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("arbor_snapshotter_fallbacks_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Scene {
    /// Runs `cmd` in `reference` with the host's static busybox bind-mounted at
    /// `/.busybox/busybox` (the suite's images hold no binaries; busybox picks its applet from
    /// argv[0], so the file keeps its name).
    fn run_with_busybox(&self, reference: &str, cmd: &[&str]) -> anyhow::Result<String> {
        self.run_with_busybox_in(self.ctd.namespace(), reference, cmd)
    }

    /// [`Scene::run_with_busybox`] in containerd namespace `ns` (CRI's is `k8s.io`).
    fn run_with_busybox_in(
        &self,
        ns: &str,
        reference: &str,
        cmd: &[&str],
    ) -> anyhow::Result<String> {
        let busybox = arbor_testkit::find_in_path("busybox").expect("busybox");
        let busybox = std::fs::canonicalize(busybox).expect("busybox path");
        let mount = format!(
            "type=bind,src={},dst=/.busybox/busybox,options=rbind:ro",
            busybox.display()
        );
        self.runs.set(self.runs.get() + 1);
        let id = format!("suite-{}", self.runs.get());
        let mut args = vec!["run", "--rm", "--snapshotter", "arbor", "--mount", &mount];
        args.extend([reference, id.as_str(), "/.busybox/busybox"]);
        args.extend_from_slice(cmd);
        self.ctd.ctr_in(ns, &args).map_err(|e| {
            // A container that did not start is left behind by `--rm`, and with it a snapshot
            // on the image's chain: remove both, as an operator would.
            let _ = self.ctd.ctr_in(ns, &["container", "rm", &id]);
            let _ = self
                .ctd
                .ctr_in(ns, &["snapshot", "--snapshotter", "arbor", "rm", &id]);
            e.context(format!("running {cmd:?} in {reference}"))
        })
    }

    /// What arbord logged since `from` (a byte offset of its log).
    fn log_since(&self, from: usize) -> String {
        self.log().get(from..).unwrap_or_default().to_string()
    }

    /// arbord runs and answers containerd.
    fn assert_alive(&mut self, after: &str) {
        assert!(
            self.arbord.is_running(),
            "arbord died after {after}; log:\n{}",
            self.arbord.log_tail(40)
        );
        self.ctd
            .ctr(&["snapshot", "--snapshotter", "arbor", "ls"])
            .unwrap_or_else(|e| {
                panic!("containerd cannot list arbor's snapshots after {after}: {e:#}")
            });
    }
}

/// Every tag of the committed suite pulled into one node (one registry, arbord and
/// containerd), one after another: after each, arbord runs and answers, the pull succeeded or
/// its reason is named, and what a container reads is the tar's bytes (or nothing: a layer
/// proved a liar refuses to start). The layers that lie (`toc-disagrees`, `empty-whiteout`,
/// `lying-diff-id`) are each caught by the background proof; the victim never reads the liar's
/// bytes; the honest image at the end still pulls lazily.
#[test]
fn committed_hostile_suite_through_arbor_pull_and_containerd() {
    if skip("committed_hostile_suite_through_arbor_pull_and_containerd") {
        return;
    }
    use arbor_testkit::hostile::suite;
    let mut s = Scene::start_with(true);
    let refs: std::collections::HashMap<&str, String> = suite::tags()
        .map(|tag| (tag, s.push(&suite_dir(), tag, "hostile")))
        .collect();
    let cat = ["cat", "/app/hello.txt"];
    let mut lied = 0.0;
    // `victim` after `lying-diff-id` (which claims its chain), `honest` last.
    let order = [
        "deep-path",
        "toc-bomb",
        "setuid-and-devices",
        "toc-disagrees",
        "empty-whiteout",
        "foreign-source-labels",
        "dir-hard-link",
        "lying-diff-id",
        "victim",
        "honest",
    ];
    assert_eq!(
        order
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        suite::tags().collect(),
        "every tag of the suite is pulled"
    );
    for tag in order {
        let started = std::time::Instant::now();
        let reference = &refs[tag];
        let from = s.log().len();
        let want = suite::hello(tag);
        let out = if tag == "foreign-source-labels" {
            // Through CRI, which forwards the image's own `containerd.io/snapshot/*` layer
            // annotations to the snapshotter (as nerdctl and containerd's client libraries
            // do; `ctr image pull` of containerd 1.6 unpacks without them).
            let before = fallbacks(&s);
            cri::cri_pull(s.ctd.socket(), reference).unwrap_or_else(|e| {
                panic!("CRI pull: {e}\ncontainerd log:\n{}", s.ctd.log_tail(30))
            });
            assert!(
                fallbacks(&s) > before,
                "the forged source labels did not make arbord fall back; log:\n{}",
                s.log_since(from)
            );
            None
        } else {
            Some(s.arbor_pull(reference))
        };
        let pulled = out.as_ref().is_none_or(|o| o.status.success());
        let pull_text = out.as_ref().map(text).unwrap_or_default();
        s.assert_alive(tag);
        // The reason a layer was refused (or proved a liar), named in arbord's log.
        let named = |s: &Scene, reasons: &[&str]| {
            let log = s.log_since(from);
            assert!(
                reasons
                    .iter()
                    .any(|r| log.contains(r) || pull_text.contains(r)),
                "{tag}: none of the reasons {reasons:?} is named; pull: {pull_text}\nlog:\n{log}"
            );
        };
        // A container reads the tar's bytes, or (`may_refuse`: a layer proved a liar) does
        // not start.
        let reads_tar = |s: &Scene, reference: &str, want: &str, may_refuse: bool| match s
            .run_with_busybox(reference, &cat)
        {
            Ok(got) => assert_eq!(got, want, "{tag}: wrong bytes from {reference}"),
            Err(e) if may_refuse => eprintln!("{tag}: {reference} refused to start: {e:#}"),
            Err(e) => panic!(
                "{tag}: reading {reference}: {e:#}\nlog:\n{}",
                s.arbord.log_tail(30)
            ),
        };
        match tag {
            "deep-path" | "toc-bomb" | "dir-hard-link" => {
                // Refused lazily, named, unpacked by containerd from its honest tar.
                named(
                    &s,
                    &[match tag {
                        "deep-path" => "deeper than 512 components",
                        "toc-bomb" => "TOC decompresses to",
                        _ => "which is a directory",
                    }],
                );
                if pulled {
                    reads_tar(&s, reference, &want, false);
                }
                if tag == "toc-bomb" {
                    let rss = s.arbord.peak_rss().expect("arbord's peak RSS");
                    assert!(
                        rss < 400 << 20,
                        "arbord's peak RSS reached {} MiB decoding a TOC bomb",
                        rss >> 20
                    );
                }
                if tag == "dir-hard-link" && pulled {
                    let ls = s.run_with_busybox(reference, &["ls", "/app"]).unwrap();
                    assert_eq!(ls.split_whitespace().collect::<Vec<_>>(), ["hello.txt"]);
                }
            }
            "setuid-and-devices" => {
                assert!(pulled, "pull: {pull_text}");
                reads_tar(&s, reference, &want, false);
                let got = s
                    .run_with_busybox(reference, &["cat", "/app/suid"])
                    .unwrap();
                assert_eq!(got, suite::SUID_FILE);
            }
            "toc-disagrees" | "empty-whiteout" | "lying-diff-id" => {
                assert!(pulled, "pull: {pull_text}");
                if tag == "lying-diff-id" {
                    assert!(pull_text.contains("mounted lazily"), "{pull_text}");
                }
                reads_tar(&s, reference, &want, true);
                lied += 1.0;
                let got = s.wait_metric(LIED, lied);
                assert!(
                    got >= lied,
                    "{tag}: the lying layer was not caught; log:\n{}",
                    s.log_since(from)
                );
                named(
                    &s,
                    &[if tag == "lying-diff-id" {
                        "lies about the layer's diff ID"
                    } else {
                        "TOC disagrees with its tar"
                    }],
                );
                // Taken out of service: no container starts on it any more.
                assert!(
                    s.run_with_busybox(reference, &cat).is_err(),
                    "{tag}: a container started on a layer proved a liar"
                );
            }
            "foreign-source-labels" => {
                // Its unauthenticated Arbor labels are refused (the forged MAC), and with them
                // the victim's blob: arbord takes CRI's labels (the image's own blob), where the
                // victim's TOC annotations do not match, or none.
                named(&s, &["unauthenticated", "digest mismatch for TOC"]);
                let victim = Layout::open(&suite_dir(), "victim").unwrap();
                let victim_blob = victim.layer(victim.layers() - 1)["digest"].clone();
                let victim_blob = victim_blob.as_str().unwrap();
                assert!(
                    !s.log_since(from).contains(victim_blob),
                    "arbord went near the victim's blob {victim_blob}:\n{}",
                    s.log_since(from)
                );
                let got = s
                    .run_with_busybox_in("k8s.io", reference, &cat)
                    .unwrap_or_else(|e| panic!("{tag}: {e:#}\nlog:\n{}", s.arbord.log_tail(30)));
                assert_eq!(got, want, "the attacker's image read another image's layer");
            }
            "victim" => {
                // Pulled after `lying-diff-id` claimed its chain ID: never the liar's bytes.
                // Refusing the pull, naming the liar, is as good.
                if pulled {
                    reads_tar(&s, reference, &want, true);
                } else {
                    named(&s, &["proved to lie"]);
                }
            }
            "honest" => {
                assert!(pulled, "honest pull: {pull_text}");
                assert!(
                    pull_text.contains("mounted lazily"),
                    "the honest image was not mounted lazily: {pull_text}"
                );
                reads_tar(&s, reference, &want, false);
            }
            other => panic!("no expectation for tag {other}"),
        }
        s.assert_alive(tag);
        eprintln!(
            "{tag}: {} in {:.1?}",
            if pulled { "pulled" } else { "pull failed" },
            started.elapsed()
        );
    }
    assert!(
        s.wait_metric(PROVED, 1.0) >= 1.0,
        "no honest layer was proved"
    );
}
