//! OCI images in OCI layout directories, pushed to registries with skopeo.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::layer::{Entry, layer_tar};
use crate::util;

/// OCI media types used here.
pub(crate) const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const MT_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The `created` time written into configs: `DEFAULT_MTIME` as RFC 3339.
const CREATED: &str = "2023-11-14T22:13:20Z";
/// Fixed gzip level, so that layer digests are reproducible.
const GZIP_LEVEL: u32 = 6;

/// An image to write with [`write_oci_layout`]. Empty `cmd`/`entrypoint`/`env`/`labels` are left
/// out of the config.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    /// Bottom layer first.
    pub layers: Vec<LayerSource>,
    pub cmd: Vec<String>,
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
    pub labels: Vec<(String, String)>,
}

/// An uncompressed layer tar, in memory or in a file (for big layers: streamed, never loaded).
#[derive(Clone, Debug)]
pub enum LayerSource {
    Tar(Vec<u8>),
    TarFile(PathBuf),
}

/// The OCI architecture name of the host (`amd64`, `arm64`, ...).
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// Writes `data` as a blob; returns (digest, size).
fn write_blob(layout: &Path, data: &[u8]) -> Result<(String, u64)> {
    let hex = hex::encode(Sha256::digest(data));
    let path = layout.join("blobs/sha256").join(&hex);
    if !path.exists() {
        let mut tmp = tempfile::NamedTempFile::new_in(layout.join("blobs/sha256"))?;
        tmp.write_all(data)?;
        persist(tmp, &path)?;
    }
    Ok((format!("sha256:{hex}"), data.len() as u64))
}

fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A writer that hashes and counts what passes through it.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses a layer into a gzip blob, streaming. Returns (diff_id, digest, size).
fn write_layer_blob(layout: &Path, src: &LayerSource) -> Result<(String, String, u64)> {
    let dir = layout.join("blobs/sha256");
    let tmp = tempfile::NamedTempFile::new_in(&dir)?;
    let compressed = HashWriter {
        inner: BufWriter::with_capacity(1 << 20, tmp.as_file().try_clone()?),
        hasher: Sha256::new(),
        len: 0,
    };
    // GzBuilder without name/mtime: a fixed header (mtime 0).
    let gz = flate2::GzBuilder::new().write(compressed, Compression::new(GZIP_LEVEL));
    let mut plain = HashWriter {
        inner: gz,
        hasher: Sha256::new(),
        len: 0,
    };
    match src {
        LayerSource::Tar(data) => plain.write_all(data)?,
        LayerSource::TarFile(p) => {
            let f = File::open(p).with_context(|| format!("opening layer {}", p.display()))?;
            io::copy(&mut BufReader::with_capacity(1 << 20, f), &mut plain)
                .with_context(|| format!("compressing layer {}", p.display()))?;
        }
    }
    let diff_id = format!("sha256:{}", hex::encode(plain.hasher.finalize()));
    let mut compressed = plain.inner.finish()?;
    compressed.flush()?;
    let HashWriter { inner, hasher, len } = compressed;
    drop(inner);
    let hex = hex::encode(hasher.finalize());
    let size = len;
    persist(tmp, &dir.join(&hex))?;
    Ok((diff_id, format!("sha256:{hex}"), size))
}

/// Writes `spec` into the OCI layout `layout_dir` (created if needed; an existing layout is
/// extended) and tags it `tag` in `index.json` (`org.opencontainers.image.ref.name`; an existing
/// entry with the same tag is replaced). Layers are gzip-compressed at a fixed level; the config
/// has the host architecture (amd64 here), os linux, the given Entrypoint/Cmd/Env/Labels,
/// `rootfs.diff_ids` and one history entry per layer; timestamps are fixed, so the same spec
/// always gives the same manifest digest, which is returned ("sha256:...").
pub fn write_oci_layout(layout_dir: &Path, tag: &str, spec: &ImageSpec) -> Result<String> {
    write_oci_layout_with_config(layout_dir, tag, spec, &Map::new())
}

/// [`write_oci_layout`] with more keys in the config's `config` section (`WorkingDir`,
/// `User`, ...; they win over the spec's).
pub fn write_oci_layout_with_config(
    layout_dir: &Path,
    tag: &str,
    spec: &ImageSpec,
    extra_config: &Map<String, Value>,
) -> Result<String> {
    std::fs::create_dir_all(layout_dir.join("blobs/sha256"))
        .with_context(|| format!("creating {}", layout_dir.display()))?;
    let marker = layout_dir.join("oci-layout");
    if !marker.exists() {
        std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }

    let mut diff_ids = Vec::new();
    let mut layers = Vec::new();
    let mut history = Vec::new();
    for (i, l) in spec.layers.iter().enumerate() {
        let (diff_id, digest, size) = write_layer_blob(layout_dir, l)?;
        diff_ids.push(Value::String(diff_id));
        layers.push(json!({"mediaType": MT_LAYER_GZIP, "digest": digest, "size": size}));
        history.push(json!({"created": CREATED, "created_by": format!("arbor-testkit layer {i}")}));
    }

    let mut cfg = Map::new();
    if !spec.env.is_empty() {
        cfg.insert("Env".into(), json!(spec.env));
    }
    if !spec.entrypoint.is_empty() {
        cfg.insert("Entrypoint".into(), json!(spec.entrypoint));
    }
    if !spec.cmd.is_empty() {
        cfg.insert("Cmd".into(), json!(spec.cmd));
    }
    if !spec.labels.is_empty() {
        let labels: Map<String, Value> = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        cfg.insert("Labels".into(), Value::Object(labels));
    }
    for (k, v) in extra_config {
        cfg.insert(k.clone(), v.clone());
    }
    let config = json!({
        "created": CREATED,
        "architecture": host_arch(),
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let (config_digest, config_size) = write_blob(layout_dir, &serde_json::to_vec(&config)?)?;

    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    });
    let (digest, size) = write_blob(layout_dir, &serde_json::to_vec(&manifest)?)?;

    let index_path = layout_dir.join("index.json");
    let mut manifests: Vec<Value> = if index_path.exists() {
        let idx: Value = serde_json::from_slice(&std::fs::read(&index_path)?)
            .with_context(|| format!("parsing {}", index_path.display()))?;
        idx.get("manifests")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    manifests
        .retain(|m| m.pointer("/annotations").and_then(|a| a.get(REF_NAME)) != Some(&json!(tag)));
    manifests.push(json!({
        "mediaType": MT_MANIFEST,
        "digest": digest,
        "size": size,
        "annotations": {REF_NAME: tag},
    }));
    let index = json!({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests});
    let mut tmp = tempfile::NamedTempFile::new_in(layout_dir)?;
    tmp.write_all(&serde_json::to_vec_pretty(&index)?)?;
    persist(tmp, &index_path)?;
    Ok(digest)
}

/// `skopeo copy --dest-tls-verify=false oci:DIR:TAG docker://REF`, with `--dest-creds user:pass`
/// when `creds` is given and `--dest-no-creds` otherwise (so host auth files never leak in).
/// Runs with `--insecure-policy` (no dependency on /etc/containers/policy.json).
pub fn skopeo_push(
    layout_dir: &Path,
    tag: &str,
    reference: &str,
    creds: Option<(&str, &str)>,
) -> Result<()> {
    let skopeo = util::require_tool("skopeo", "skopeo")?;
    let dir = layout_dir
        .canonicalize()
        .with_context(|| format!("layout {}", layout_dir.display()))?;
    if dir.to_string_lossy().contains(':') {
        bail!(
            "skopeo cannot address an OCI layout whose path contains ':': {}",
            dir.display()
        );
    }
    let mut cmd = Command::new(skopeo);
    cmd.args(["--insecure-policy", "copy", "--dest-tls-verify=false"]);
    match creds {
        Some((u, p)) => {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        None => {
            cmd.arg("--dest-no-creds");
        }
    }
    cmd.arg(format!("oci:{}:{tag}", dir.display()))
        .arg(format!("docker://{reference}"));
    util::run_checked(&mut cmd, Duration::from_secs(600))
        .with_context(|| format!("pushing oci:{}:{tag} to {reference}", dir.display()))?;
    Ok(())
}

/// The busybox applets linked into `/bin` by [`busybox_image`].
pub const BUSYBOX_APPLETS: &[&str] = &[
    "[",
    "ash",
    "awk",
    "basename",
    "cat",
    "chmod",
    "cmp",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "diff",
    "dirname",
    "du",
    "echo",
    "env",
    "false",
    "find",
    "grep",
    "head",
    "hexdump",
    "hostname",
    "id",
    "kill",
    "ln",
    "ls",
    "md5sum",
    "nc",
    "mkdir",
    "mount",
    "mv",
    "od",
    "printf",
    "ps",
    "pwd",
    "readlink",
    "realpath",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "sh",
    "sha1sum",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "sync",
    "tail",
    "tee",
    "test",
    "timeout",
    "touch",
    "tr",
    "true",
    "umount",
    "uname",
    "uniq",
    "wc",
    "wget",
    "which",
    "xargs",
    "xxd",
];

/// A runnable tiny image. Layer 1: `/bin/busybox` (copied from the host's busybox-static) with
/// symlinks for [`BUSYBOX_APPLETS`] (`/bin/sh`, `/bin/echo`, `/bin/cat`, `/bin/ls`,
/// `/bin/sha256sum`, ...), `/etc/passwd`, `/etc/group`, `/tmp` (1777) and empty `dev`, `proc`,
/// `sys`, `root`. Layer 2: `app`. Config: `Cmd` = `cmd`, `PATH` set.
///
/// Panics if `/bin/busybox` cannot be read (install busybox-static: scripts/setup.sh).
pub fn busybox_image(app: Vec<Entry>, cmd: &[&str]) -> ImageSpec {
    let busybox = std::fs::read("/bin/busybox")
        .expect("reading /bin/busybox (install busybox-static: scripts/setup.sh)");
    let mut base = vec![Entry::dir("bin"), Entry::executable("bin/busybox", busybox)];
    for applet in BUSYBOX_APPLETS {
        base.push(Entry::symlink(format!("bin/{applet}"), "busybox"));
    }
    base.extend([
        Entry::dir("dev"),
        Entry::dir("etc"),
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        Entry::file("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        Entry::dir("proc").with_mode(0o555),
        Entry::dir("root").with_mode(0o700),
        Entry::dir("sys").with_mode(0o555),
        Entry::dir("tmp").with_mode(0o1777),
    ]);
    ImageSpec {
        layers: vec![
            LayerSource::Tar(layer_tar(&base)),
            LayerSource::Tar(layer_tar(&app)),
        ],
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        entrypoint: Vec::new(),
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        labels: Vec::new(),
    }
}

/// A three-layer runnable image for end-to-end tests: busybox, an app layer
/// (`/app/hello.txt` = "hello from arbor\n", `/app/run.sh` printing it, a file and an opaque
/// dir the next layer hides), and a layer holding the whole tar feature [`crate::corpus`]
/// plus a whiteout and an opaque directory over the app layer.
pub fn sample_image() -> ImageSpec {
    let mut spec = busybox_image(
        vec![
            Entry::dir("app"),
            Entry::file("app/hello.txt", "hello from arbor\n"),
            Entry::file(
                "app/removed.txt",
                "this file is whited out by the next layer\n",
            ),
            Entry::dir("app/opaque"),
            Entry::file("app/opaque/old.txt", "hidden by an opaque dir\n"),
            Entry::executable("app/run.sh", "#!/bin/sh\ncat /app/hello.txt\n"),
        ],
        &["/bin/sh", "/app/run.sh"],
    );
    let mut top = crate::corpus();
    top.extend([
        Entry::dir("app"),
        Entry::whiteout("app", "removed.txt"),
        Entry::dir("app/opaque"),
        Entry::opaque("app/opaque"),
        Entry::file("app/opaque/new.txt", "new\n"),
    ]);
    spec.layers.push(LayerSource::Tar(crate::layer_tar(&top)));
    spec
}

/// A command that prints what a container sees of [`sample_image`]: contents, the effect of
/// the whiteouts, and one digest over every file's digest. Equal output, equal image.
pub const SAMPLE_PROBE: &[&str] = &[
    "/bin/sh",
    "-c",
    "cat /app/hello.txt; ls /app /app/opaque; \
     test -e /app/removed.txt && echo REMOVED-VISIBLE; \
     find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f -print \
       | sort | xargs sha256sum | sha256sum",
];

/// The request handler of [`echo_function_image`]: one HTTP/1.1 request per connection
/// (busybox `nc -ll -e`), answering `hello BODY from HOSTNAME rid=REQUEST-ID` and logging
/// `served REQUEST-ID` on stderr. Body `crash` kills the server (pid 1) mid-request; body
/// `sleep N` answers after N seconds.
pub const ECHO_HANDLER: &str = r#"#!/bin/sh
read -r method path proto
# A connection that sends nothing (a port probe) gets nothing.
[ -z "$method" ] && exit 0
len=0
rid=
cr=$(printf '\r')
while IFS= read -r line; do
  line=${line%$cr}
  [ -z "$line" ] && break
  case "$line" in
    [Cc]ontent-[Ll]ength:*) len=${line#*: } ;;
    [Xx]-[Aa]rbor-[Rr]equest-[Ii]d:*) rid=${line#*: } ;;
  esac
done
body=$(head -c "$len")
case "$body" in
  crash) kill -9 1; exit 1 ;;
  sleep*) sleep "${body#sleep }" ;;
esac
echo "served $rid" >&2
out="hello ${body} from $(hostname) rid=${rid}"
printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#out}" "$out"
"#;

/// A function image in the custom-container convention: serves `POST /invoke` on port
/// 9000 with [`ECHO_HANDLER`], printing `echo function listening on 9000` first; `ballast`
/// bytes of incompressible data in `/app/ballast` (never read at start) make it as large as
/// a real image.
pub fn echo_function_image(ballast: usize) -> ImageSpec {
    let mut app = vec![
        Entry::dir("app"),
        Entry::executable("app/handler", ECHO_HANDLER),
        Entry::executable(
            "app/run.sh",
            "#!/bin/sh\necho 'echo function listening on 9000'\nexec nc -ll -p 9000 -e /app/handler\n",
        ),
    ];
    if ballast > 0 {
        app.push(Entry::file(
            "app/ballast",
            crate::pseudo_random_bytes(9000, ballast),
        ));
    }
    busybox_image(app, &["/bin/sh", "/app/run.sh"])
}
