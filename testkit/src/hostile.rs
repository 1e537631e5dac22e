//! Hostile images: what a tenant who wants to hurt the node pushes. Each is an ordinary image
//! converted by `arbor convert` and then tampered with the way an attacker would: a TOC that
//! lies about the tar it describes, a TOC that expands to gigabytes, paths deeper than any stack,
//! a config that lies about diff IDs, annotations that point arbord at someone else's blobs.
//!
//! The tampering is written here from the bytes up (zstd frames, the zstd:chunked footer, the
//! OCI layout's JSON), not with Arbor's own format code: an attacker does not use our library,
//! and a bug in it must not hide a hole from its own tests.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The annotations that locate and authenticate a TOC (containers/storage's and Arbor's).
const POSITION_KEYS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "containerd.io/snapshot/arbor.toc-position",
];
const CHECKSUM_KEYS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "containerd.io/snapshot/arbor.toc-digest",
];
const BLOB_SIZE_KEY: &str = "containerd.io/snapshot/arbor.blob-size";
/// Arbor's labels that name a layer's source (what `arbor pull` sets).
pub const SOURCE_LABELS: [&str; 2] = [
    "containerd.io/snapshot/arbor.layer-digest",
    "containerd.io/snapshot/arbor.image-ref",
];

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// One image in an OCI layout directory, opened for tampering.
pub struct Layout {
    dir: PathBuf,
    pub manifest: Value,
    pub config: Value,
}

impl Layout {
    /// Opens the image tagged `tag` in the OCI layout at `dir`.
    pub fn open(dir: &Path, tag: &str) -> Result<Layout> {
        let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
        let desc = index["manifests"]
            .as_array()
            .and_then(|m| {
                m.iter().find(|d| {
                    d.pointer("/annotations").and_then(|a| a.get(REF_NAME)) == Some(&json!(tag))
                })
            })
            .with_context(|| format!("no manifest tagged {tag} in {}", dir.display()))?;
        let digest = desc["digest"].as_str().context("manifest digest")?;
        Layout::open_digest(dir, digest)
    }

    /// Opens the image whose manifest has digest `digest` in the OCI layout at `dir`.
    pub fn open_digest(dir: &Path, digest: &str) -> Result<Layout> {
        let manifest: Value = serde_json::from_slice(&read_blob(dir, digest)?)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .context("config digest")?;
        let config: Value = serde_json::from_slice(&read_blob(dir, config_digest)?)?;
        Ok(Layout {
            dir: dir.to_path_buf(),
            manifest,
            config,
        })
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.manifest["layers"].as_array().map_or(0, Vec::len)
    }

    /// The descriptor of layer `i` (bottom first).
    pub fn layer(&self, i: usize) -> &Value {
        &self.manifest["layers"][i]
    }

    /// The blob of layer `i`.
    pub fn layer_blob(&self, i: usize) -> Result<Vec<u8>> {
        let d = self.layer(i)["digest"].as_str().context("layer digest")?;
        read_blob(&self.dir, d)
    }

    /// The annotations of layer `i`.
    pub fn annotations_mut(&mut self, i: usize) -> &mut Map<String, Value> {
        let l = &mut self.manifest["layers"][i];
        if !l["annotations"].is_object() {
            l["annotations"] = json!({});
        }
        l["annotations"]
            .as_object_mut()
            .expect("made an object above")
    }

    /// Replaces layer `i`'s blob (digest and size follow it).
    pub fn set_layer_blob(&mut self, i: usize, blob: &[u8]) -> Result<()> {
        let digest = write_blob(&self.dir, blob)?;
        let l = &mut self.manifest["layers"][i];
        l["digest"] = json!(digest);
        l["size"] = json!(blob.len());
        Ok(())
    }

    /// The config's `rootfs.diff_ids`.
    pub fn diff_ids_mut(&mut self) -> &mut Vec<Value> {
        self.config["rootfs"]["diff_ids"]
            .as_array_mut()
            .expect("an image config has rootfs.diff_ids")
    }

    /// Rewrites the TOC of layer `i` with `edit` (which gets the TOC's JSON) and updates the
    /// layer's annotations to match, as a careful attacker would (so only a reader that checks
    /// the TOC against the tar notices).
    pub fn edit_toc(&mut self, i: usize, edit: impl FnOnce(&mut Value)) -> Result<()> {
        let blob = self.layer_blob(i)?;
        let pos = TocPos::of(self.layer(i))?;
        let toc_bytes = &blob[pos.offset as usize..(pos.offset + pos.length) as usize];
        let mut toc: Value = serde_json::from_slice(&zstd::decode_all(toc_bytes)?)?;
        edit(&mut toc);
        let json = serde_json::to_vec(&toc)?;
        let compressed = zstd::encode_all(&json[..], 3)?;
        self.replace_toc(i, &blob, pos, &compressed, json.len() as u64)
    }

    /// Replaces the TOC of layer `i` with `compressed` (zstd bytes), claiming it expands to
    /// `claimed_len` bytes.
    pub fn replace_toc(
        &mut self,
        i: usize,
        blob: &[u8],
        pos: TocPos,
        compressed: &[u8],
        claimed_len: u64,
    ) -> Result<()> {
        let frame_start = pos.offset.checked_sub(8).context("TOC offset below 8")? as usize;
        let mut out = blob[..frame_start].to_vec();
        let offset = out.len() as u64 + 8;
        out.extend_from_slice(&skippable(compressed));
        let new = TocPos {
            offset,
            length: compressed.len() as u64,
            uncompressed: claimed_len,
        };
        out.extend_from_slice(&skippable(&new.footer()));
        let checksum = sha256(compressed);
        self.set_layer_blob(i, &out)?;
        let ann = self.annotations_mut(i);
        for k in POSITION_KEYS {
            ann.insert(k.into(), json!(new.annotation()));
        }
        for k in CHECKSUM_KEYS {
            ann.insert(k.into(), json!(checksum));
        }
        ann.insert(BLOB_SIZE_KEY.into(), json!(out.len().to_string()));
        Ok(())
    }

    /// Writes the (tampered) config and manifest and tags the manifest `tag`. Returns the
    /// manifest digest.
    pub fn save(&mut self, tag: &str) -> Result<String> {
        let config = serde_json::to_vec(&self.config)?;
        let config_digest = write_blob(&self.dir, &config)?;
        self.manifest["config"]["digest"] = json!(config_digest);
        self.manifest["config"]["size"] = json!(config.len());
        let manifest = serde_json::to_vec(&self.manifest)?;
        let digest = write_blob(&self.dir, &manifest)?;
        let index_path = self.dir.join("index.json");
        let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
        let list = index["manifests"]
            .as_array_mut()
            .context("index manifests")?;
        list.retain(|m| {
            m.pointer("/annotations").and_then(|a| a.get(REF_NAME)) != Some(&json!(tag))
        });
        list.push(json!({
            "mediaType": MT_MANIFEST,
            "digest": digest,
            "size": manifest.len(),
            "annotations": {REF_NAME: tag},
        }));
        std::fs::write(&index_path, serde_json::to_vec_pretty(&index)?)?;
        Ok(digest)
    }
}

/// Where a TOC lies, as its annotation says.
#[derive(Clone, Copy, Debug)]
pub struct TocPos {
    pub offset: u64,
    pub length: u64,
    pub uncompressed: u64,
}

impl TocPos {
    /// Reads the position annotation of a layer descriptor.
    pub fn of(layer: &Value) -> Result<TocPos> {
        let v = POSITION_KEYS
            .iter()
            .find_map(|k| layer["annotations"][*k].as_str())
            .context("layer has no TOC position annotation (not converted?)")?;
        let n: Vec<u64> = v.split(':').map(str::parse).collect::<Result<_, _>>()?;
        if n.len() != 4 {
            bail!("bad TOC position {v:?}");
        }
        Ok(TocPos {
            offset: n[0],
            length: n[1],
            uncompressed: n[2],
        })
    }

    fn annotation(&self) -> String {
        format!("{}:{}:{}:1", self.offset, self.length, self.uncompressed)
    }

    /// The 64-byte zstd:chunked footer.
    fn footer(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(64);
        for v in [self.offset, self.length, self.uncompressed, 1, 0, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(b"GNUlInUx");
        f
    }
}

fn skippable(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn read_blob(dir: &Path, digest: &str) -> Result<Vec<u8>> {
    let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
    let p = dir.join("blobs/sha256").join(hex);
    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
}

fn write_blob(dir: &Path, data: &[u8]) -> Result<String> {
    let digest = sha256(data);
    let p = dir.join("blobs/sha256").join(&digest["sha256:".len()..]);
    std::fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
    Ok(digest)
}

/// A compressed TOC that expands to about `expanded` bytes of valid JSON: `entries` copies of
/// one small entry. zstd squeezes the repetition more than 1,000-fold, so well under a MB
/// becomes hundreds of MB (and millions of entries) in a reader that trusts it.
pub fn toc_bomb(expanded: u64) -> Result<(Vec<u8>, u64)> {
    let entry = br#"{"type":"dir","name":"d","mode":493},"#;
    // An ordinary window (level 3: 1 MiB or so), so that a reader's window cap does not
    // refuse it: what must stop it is counting what it expands to.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
    enc.write_all(br#"{"version":1,"entries":["#)?;
    let block: Vec<u8> = entry
        .iter()
        .copied()
        .cycle()
        .take(entry.len() * 4096)
        .collect();
    let mut written = 0u64;
    while written < expanded {
        enc.write_all(&block)?;
        written += block.len() as u64;
    }
    enc.write_all(br#"{"type":"dir","name":"e","mode":493}]}"#)?;
    Ok((enc.finish()?, written))
}

/// A path `depth` components deep (`a/a/.../a`).
pub fn deep_path(depth: usize) -> String {
    vec!["a"; depth].join("/")
}

/// A TOC entry (zstd:chunked JSON) for a directory named `name`.
pub fn toc_dir(name: &str) -> Value {
    json!({"type": "dir", "name": name, "mode": 0o755, "modtime": "2023-11-14T22:13:20Z"})
}

/// The TOC's entries array.
pub fn toc_entries(toc: &mut Value) -> &mut Vec<Value> {
    toc["entries"]
        .as_array_mut()
        .expect("a zstd:chunked TOC has an entries array")
}

/// Builds an image of busybox plus `/app/hello.txt` holding `hello`, pushes it to `reg` as
/// `repo:v1` and converts it with the `arbor` binary at `arbor` (`arbor convert`, as a user
/// would) into an OCI layout under `work`; returns the layout directory (tag `arbor`).
pub fn converted_image(
    reg: &crate::Registry,
    arbor: &Path,
    work: &Path,
    repo: &str,
    hello: &str,
) -> Result<PathBuf> {
    use crate::Entry;
    let src = work.join(format!("{repo}-src"));
    let spec = crate::busybox_image(
        vec![Entry::dir("app"), Entry::file("app/hello.txt", hello)],
        &["cat", "/app/hello.txt"],
    );
    crate::write_oci_layout(&src, "v1", &spec)?;
    let reference = reg.reference(&format!("{repo}:v1"));
    crate::skopeo_push(&src, "v1", &reference, None)?;
    let dst = work.join(format!("{repo}-arbor"));
    let out = std::process::Command::new(arbor)
        .args(["convert", "--plain-http", &reference])
        .arg(format!("oci:{}:arbor", dst.display()))
        .output()?;
    if !out.status.success() {
        bail!(
            "arbor convert {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dst)
}

/// Pushes `layout`'s `tag` to `repo:tag` on `reg`; returns the reference.
pub fn push(reg: &crate::Registry, layout: &Path, tag: &str, repo: &str) -> Result<String> {
    let reference = reg.reference(&format!("{repo}:{tag}"));
    crate::skopeo_push(layout, tag, &reference, None)?;
    Ok(reference)
}

/// The attacker's image: [`converted_image`] (`/app/hello.txt` holds `attacker\n`) with its
/// top layer's TOC rewritten by `edit`, pushed as `repo:evil`; returns the reference.
pub fn toc_attack(
    reg: &crate::Registry,
    arbor: &Path,
    work: &Path,
    repo: &str,
    edit: impl FnOnce(&mut Value),
) -> Result<String> {
    let dir = converted_image(reg, arbor, work, repo, "attacker\n")?;
    let mut l = Layout::open(&dir, "arbor")?;
    let top = l.layers() - 1;
    l.edit_toc(top, edit)?;
    l.save("evil")?;
    push(reg, &dir, "evil", repo)
}

/// The attacker's image with a TOC bomb: 512 MiB of JSON (about 14 M entries) in a small
/// frame, claiming to be 64 MiB (the most a reader accepts by default), pushed as `repo:evil`.
pub fn toc_bomb_attack(
    reg: &crate::Registry,
    arbor: &Path,
    work: &Path,
    repo: &str,
) -> Result<String> {
    let dir = converted_image(reg, arbor, work, repo, "attacker\n")?;
    let mut l = Layout::open(&dir, "arbor")?;
    let top = l.layers() - 1;
    let blob = l.layer_blob(top)?;
    let pos = TocPos::of(l.layer(top))?;
    let (bomb, _) = toc_bomb(512 << 20)?;
    l.replace_toc(top, &blob, pos, &bomb, 64 << 20)?;
    l.save("evil")?;
    push(reg, &dir, "evil", repo)
}

/// TOC edits, one per attack.
pub mod edits {
    use serde_json::{Value, json};

    use super::{deep_path, toc_dir, toc_entries};

    /// A directory 20,000 components deep: recursion over it overflows any thread's stack.
    pub fn deep_path_dir(toc: &mut Value) {
        toc_entries(toc).push(toc_dir(&deep_path(20_000)));
    }

    /// `app/loop`, a hard link to the directory `app`: a cycle in a tree that trusts it.
    pub fn dir_hard_link(toc: &mut Value) {
        toc_entries(toc).push(json!({
            "type": "hardlink", "name": "app/loop", "linkName": "app", "mode": 0o755,
        }));
    }

    /// Whiteouts of an empty name, `.` and `..`.
    pub fn dot_whiteouts(toc: &mut Value) {
        let e = toc_entries(toc);
        for name in ["app/.wh.", "app/.wh..", "app/.wh...", ".wh."] {
            e.push(json!({"type": "reg", "name": name, "mode": 0o644}));
        }
    }

    /// `app/hello.txt` made setuid in the TOC only (the tar keeps 0644).
    pub fn setuid_in_toc_only(toc: &mut Value) {
        for e in toc_entries(toc) {
            if e["name"] == "app/hello.txt" {
                e["mode"] = json!(0o4755);
            }
        }
    }
}

/// The committed hostile-image suite (`testdata/hostile/`): one OCI layout, one tag per attack,
/// built from small files only (no binaries), converted by the real `arbor convert` and then
/// tampered with by this module. [`suite::generate`] writes it; the same `arbor` always gives
/// byte-identical output.
pub mod suite {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::process::Command;

    use anyhow::{Context, Result, bail};
    use serde_json::{Value, json};

    use super::{Layout, REF_NAME, SOURCE_LABELS, TocPos, edits, toc_bomb};
    use crate::{Entry, ImageSpec, LayerSource, layer_tar, write_oci_layout};

    /// Every tag of the suite, in index order: (tag, the attack).
    pub const TAGS: [(&str, &str); 10] = [
        ("honest", "control: an honest converted image"),
        ("victim", "an honest image whose layer another image claims"),
        ("deep-path", "TOC entry 20,000 components deep"),
        (
            "toc-bomb",
            "TOC that expands past 64 MiB from a small frame",
        ),
        (
            "lying-diff-id",
            "config claims victim's diff IDs for its own bytes",
        ),
        (
            "toc-disagrees",
            "TOC makes app/hello.txt setuid; the tar does not",
        ),
        (
            "setuid-and-devices",
            "honest setuid-root file, char and block devices",
        ),
        (
            "foreign-source-labels",
            "victim's TOC annotations and Arbor source labels",
        ),
        (
            "dir-hard-link",
            "TOC hard link app/loop -> app (a directory)",
        ),
        ("empty-whiteout", "TOC whiteouts .wh. / .wh.. / .wh..."),
    ];

    /// The suite's tags, in index order.
    pub fn tags() -> impl Iterator<Item = &'static str> {
        TAGS.iter().map(|(t, _)| *t)
    }

    /// What `app/hello.txt` holds in the tar of image `tag`: its tag and a newline.
    pub fn hello(tag: &str) -> String {
        format!("{tag}\n")
    }

    /// Content of `app/suid` in `setuid-and-devices` (mode 04755, owner root).
    pub const SUID_FILE: &str = "#!/bin/sh\necho not a real setuid program\n";

    /// The image reference the `foreign-source-labels` image names as its source (a fixed
    /// placeholder: the suite cannot know the port of a test's registry).
    pub const FOREIGN_IMAGE_REF: &str = "127.0.0.1:5000/hostile:victim";

    /// What the TOC bomb expands to, and what its footer claims (the reader's default limit).
    pub const BOMB_EXPANDS_TO: u64 = 256 << 20;
    pub const BOMB_CLAIMS: u64 = 64 << 20;

    fn base_layer() -> Vec<u8> {
        layer_tar(&[
            Entry::dir("etc"),
            Entry::file("etc/passwd", "root:x:0:0:root:/:/.busybox/busybox\n"),
            Entry::file("etc/group", "root:x:0:\n"),
            Entry::dir("tmp").with_mode(0o1777),
        ])
    }

    fn app_layer(tag: &str) -> Vec<u8> {
        let mut app = vec![Entry::dir("app"), Entry::file("app/hello.txt", hello(tag))];
        if tag == "setuid-and-devices" {
            app.extend([
                Entry::file("app/suid", SUID_FILE).with_mode(0o4755),
                Entry::char_dev("app/null", 1, 3),
                Entry::block_dev("app/loop0", 7, 0),
            ]);
        }
        layer_tar(&app)
    }

    fn spec(tag: &str) -> ImageSpec {
        ImageSpec {
            layers: vec![
                LayerSource::Tar(base_layer()),
                LayerSource::Tar(app_layer(tag)),
            ],
            // No shell in the images: tests bind-mount a static busybox at /.busybox/busybox (busybox picks its applet from argv[0], so the file keeps its name).
            cmd: vec![
                "/.busybox/busybox".into(),
                "cat".into(),
                "/app/hello.txt".into(),
            ],
            env: vec!["PATH=/usr/bin:/bin".into()],
            ..Default::default()
        }
    }

    /// Writes the suite as a fresh OCI layout into `dir` (created; must not hold a layout),
    /// converting with the `arbor` binary at `arbor`.
    pub fn generate_into(arbor: &Path, dir: &Path) -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let src = tmp.path().join("src");
        for tag in tags() {
            write_oci_layout(&src, tag, &spec(tag))?;
        }
        for tag in tags() {
            // One job and one compression thread: the output must not depend on the machine.
            let out = Command::new(arbor)
                .args(["convert", "--jobs", "1", "--threads", "1", "--tmp-dir"])
                .arg(tmp.path())
                .arg(format!("oci:{}:{tag}", src.display()))
                .arg(format!("oci:{}:{tag}", dir.display()))
                .output()
                .with_context(|| format!("running {}", arbor.display()))?;
            if !out.status.success() {
                bail!(
                    "arbor convert {tag}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let victim = Layout::open(dir, "victim")?;
        let victim_top = victim.layer(victim.layers() - 1).clone();
        let victim_diff_ids = victim.config["rootfs"]["diff_ids"].clone();

        let tamper = |tag: &str, f: &dyn Fn(&mut Layout, usize) -> Result<()>| -> Result<()> {
            let mut l = Layout::open(dir, tag)?;
            let top = l.layers() - 1;
            f(&mut l, top)?;
            l.save(tag)?;
            Ok(())
        };
        tamper("deep-path", &|l, top| l.edit_toc(top, edits::deep_path_dir))?;
        tamper("toc-bomb", &|l, top| {
            let blob = l.layer_blob(top)?;
            let pos = TocPos::of(l.layer(top))?;
            let (bomb, _) = toc_bomb(BOMB_EXPANDS_TO)?;
            l.replace_toc(top, &blob, pos, &bomb, BOMB_CLAIMS)
        })?;
        tamper("lying-diff-id", &|l, _| {
            l.config["rootfs"]["diff_ids"] = victim_diff_ids.clone();
            Ok(())
        })?;
        tamper("toc-disagrees", &|l, top| {
            l.edit_toc(top, edits::setuid_in_toc_only)
        })?;
        tamper("foreign-source-labels", &|l, top| {
            let ann = l.annotations_mut(top);
            for (k, v) in victim_top["annotations"]
                .as_object()
                .context("annotations")?
            {
                ann.insert(k.clone(), v.clone());
            }
            ann.insert(SOURCE_LABELS[0].into(), victim_top["digest"].clone());
            ann.insert(SOURCE_LABELS[1].into(), json!(FOREIGN_IMAGE_REF));
            // A MAC the attacker cannot compute without the node's pull key.
            ann.insert(
                "containerd.io/snapshot/arbor.pull-mac".into(),
                json!("00".repeat(32)),
            );
            Ok(())
        })?;
        tamper("dir-hard-link", &|l, top| {
            l.edit_toc(top, edits::dir_hard_link)
        })?;
        tamper("empty-whiteout", &|l, top| {
            l.edit_toc(top, edits::dot_whiteouts)
        })?;
        finish(dir)
    }

    /// Puts index.json in [`TAGS`] order and removes the blobs no tag references (the
    /// untampered originals).
    fn finish(dir: &Path) -> Result<()> {
        let index_path = dir.join("index.json");
        let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
        let list = index["manifests"].as_array_mut().context("manifests")?;
        let order = |m: &Value| {
            let tag = m["annotations"][REF_NAME].as_str().unwrap_or_default();
            TAGS.iter()
                .position(|(t, _)| *t == tag)
                .unwrap_or(usize::MAX)
        };
        list.sort_by_key(order);
        let mut keep = BTreeSet::new();
        for m in list.iter() {
            let digest = m["digest"].as_str().context("digest")?;
            keep.insert(digest.to_string());
            let l = Layout::open_digest(dir, digest)?;
            keep.insert(
                l.manifest["config"]["digest"]
                    .as_str()
                    .context("config")?
                    .into(),
            );
            for i in 0..l.layers() {
                keep.insert(l.layer(i)["digest"].as_str().context("layer")?.into());
            }
        }
        let mut bytes = serde_json::to_vec_pretty(&index)?;
        bytes.push(b'\n');
        std::fs::write(&index_path, bytes)?;
        for e in std::fs::read_dir(dir.join("blobs/sha256"))? {
            let e = e?;
            let name = format!("sha256:{}", e.file_name().to_string_lossy());
            if !keep.contains(&name) {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }

    /// Regenerates the suite in `out` (a directory that may hold an older suite, a README and
    /// the script): index.json, oci-layout and blobs/ are replaced, nothing else is touched.
    pub fn generate(arbor: &Path, out: &Path) -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let fresh = tmp.path().join("suite");
        generate_into(arbor, &fresh)?;
        std::fs::create_dir_all(out)?;
        let blobs = out.join("blobs");
        if blobs.exists() {
            std::fs::remove_dir_all(&blobs)?;
        }
        std::fs::create_dir_all(blobs.join("sha256"))?;
        for e in std::fs::read_dir(fresh.join("blobs/sha256"))? {
            let e = e?;
            std::fs::copy(e.path(), blobs.join("sha256").join(e.file_name()))?;
        }
        for f in ["index.json", "oci-layout"] {
            std::fs::copy(fresh.join(f), out.join(f))?;
        }
        Ok(())
    }
}
