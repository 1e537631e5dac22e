//! `arbor`: converts, inspects and checks Arbor images (a thin shell over `arbor-convert`), and
//! pulls and runs them through containerd ([`pull`]).

mod bars;
mod func;
mod mount;
mod output;
mod trace;
use arbor_client::pull;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use arbor_convert::convert::{ConvertOptions, convert_image};
use arbor_convert::progress::{NoProgress, Progress};
use arbor_format::writer::WriterOptions;
use arbor_oci::auth::CredentialStore;
use arbor_oci::registry::{ClientOptions, RegistryClient};
use arbor_oci::{ImageLocation, Store};
use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
Images are named as registry references (127.0.0.1:5000/fn/app:v1, docker://python:3.11)
or OCI layout directories (oci:/path/to/layout:tag).

Examples:
  arbor convert --plain-http 127.0.0.1:5000/fn/app:v1 127.0.0.1:5000/fn/app:v1-arbor
  arbor convert --prefetch-list startup.txt oci:./app:v1 oci:./app:v1-arbor
  arbor inspect --plain-http 127.0.0.1:5000/fn/app:v1-arbor
  arbor check --plain-http 127.0.0.1:5000/fn/app:v1 127.0.0.1:5000/fn/app:v1-arbor
  arbor pull 127.0.0.1:5000/fn/app:v1-arbor        # into containerd, layers mounted lazily by arbord
  arbor run --net-host 127.0.0.1:5000/fn/app:v1-arbor

Credentials come from ~/.docker/config.json ($DOCKER_CONFIG, or --authfile), including
credential helpers. Set RUST_LOG=debug for detailed logs on stderr.";

#[derive(Parser)]
#[command(name = "arbor", version, about = "Convert, inspect, check, pull and run lazily-pullable Arbor images",
          long_about = "Arbor starts container-image functions in seconds by pulling only the chunks \
                        they read. `arbor convert` rewrites an image's layers into Arbor's format \
                        (zstd:chunked, readable by any OCI runtime); `inspect` and `check` look at \
                        the result; `pull` and `run` start it through containerd and the node \
                        daemon arbord, which mounts its layers lazily.",
          after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct RegistryArgs {
    /// Talk plain HTTP to registries (for local registries without TLS).
    #[arg(long, global = true)]
    plain_http: bool,
    /// Docker-format credentials file to use instead of ~/.docker/config.json.
    #[arg(long, global = true, value_name = "FILE", env = "REGISTRY_AUTH_FILE")]
    authfile: Option<PathBuf>,
    /// Retries of a failed registry request before giving up.
    #[arg(long, global = true, default_value_t = 4)]
    retries: u32,
    /// Print a machine-readable JSON report on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Only these platforms of a multi-platform image (os/arch[/variant]); repeatable.
    #[arg(long = "platform", global = true, value_name = "OS/ARCH")]
    platforms: Vec<String>,
}

#[derive(Args, Clone)]
struct ContainerdArgs {
    /// containerd's socket.
    #[arg(
        long,
        short = 'a',
        default_value = "/run/containerd/containerd.sock",
        env = "CONTAINERD_ADDRESS",
        value_name = "SOCKET"
    )]
    address: PathBuf,
    /// containerd namespace.
    #[arg(
        long,
        short = 'n',
        default_value = "default",
        env = "CONTAINERD_NAMESPACE"
    )]
    namespace: String,
    /// Snapshotter to prepare layers with (the name containerd's proxy plugin has for arbord).
    #[arg(long, default_value = "arbor", env = "CONTAINERD_SNAPSHOTTER")]
    snapshotter: String,
}

impl ContainerdArgs {
    fn target(&self) -> pull::Target {
        pull::Target {
            address: self.address.clone(),
            namespace: self.namespace.clone(),
            snapshotter: self.snapshotter.clone(),
        }
    }
}

// Parsed once per process: the size of the largest variant (`run`'s flags) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Convert an image to Arbor's lazy format and store it at TARGET.
    ///
    /// Every layer is rewritten as a zstd:chunked tar+zstd layer with a TOC, per-chunk sha256
    /// digests, a block digest table and the start-up files first. Without --prefetch-list or
    /// --prefetch-from, the start-up files are inferred from the image's entrypoint: the
    /// program, its ELF loader and shared libraries, and for Python, the modules it imports at
    /// import time (their cached bytecode) and their extension modules' libraries (one more
    /// read of every layer; --no-infer skips it and leaves every file to on-demand fetching).
    /// Configs get new diff_ids; everything else is kept. The same input always gives the
    /// same digests; converting an already converted image changes nothing and says so.
    Convert {
        /// The image to convert.
        source: String,
        /// Where to store the converted image (may equal SOURCE only if it is already converted).
        target: String,
        /// Split file contents into independently compressed chunks of this size
        /// (e.g. 512KiB, 1MiB).
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        chunk_size: u64,
        /// Block size of the block digest table used to verify peer transfers.
        #[arg(long, default_value = "512KiB", value_parser = parse_size)]
        block_size: u64,
        /// zstd compression level (1-22).
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// File listing paths a function reads at start-up, one per line, in order; those
        /// files are placed first in each layer and recorded for prefetching.
        #[arg(long, value_name = "FILE")]
        prefetch_list: Option<PathBuf>,
        /// Bake a learned start-up set into the converted image's prefetch sections: a JSON
        /// file (`arbor trace show IMAGE --save FILE`) or an image whose registry holds one
        /// (`arbor trace push`). Its files, in first-read order, become the prefetch list
        /// (after --prefetch-list's, if both are given).
        #[arg(long, value_name = "FILE|IMAGE")]
        prefetch_from: Option<String>,
        /// Do not infer start-up files from the entrypoint when no list is given.
        #[arg(long)]
        no_infer: bool,
        /// Layers converted at the same time.
        #[arg(long, default_value_t = 3)]
        jobs: usize,
        /// Compression threads per layer (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Directory for converted layers waiting for upload (default: $TMPDIR).
        #[arg(long, value_name = "DIR")]
        tmp_dir: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show an image's platforms, layers, formats, sizes and TOC summaries.
    Inspect {
        image: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Mount an image read-only and lazily at DIR, until DIR is unmounted or Ctrl-C.
    ///
    /// Every layer is mounted through Arbor's FUSE filesystem and the layers are stacked with
    /// overlayfs at DIR. File contents are fetched from the registry the first time they are
    /// read (in windows of --fetch-unit bytes), verified against their digests, and kept in
    /// the node-wide chunk cache. In the background the layers' prefetch sections, then the
    /// rest, are fetched ahead of demand. Needs root. For inspection, debugging and benchmarks.
    ///
    /// Images are untrusted: the mount is nosuid,nodev unless --allow-suid or --allow-dev
    /// say otherwise, and its layers are mounted without FUSE allow_other (--allow-other);
    /// the chunk cache and the per-layer mount points are in 0700 directories.
    Mount {
        image: String,
        /// An existing empty directory to mount the image at.
        dir: PathBuf,
        /// The node-wide chunk cache (shared with other mounts and restarts).
        #[arg(long, default_value = "/var/lib/arbor/cache", value_name = "DIR")]
        cache_dir: PathBuf,
        /// Largest size of the chunk cache; least recently used chunks are evicted beyond it.
        #[arg(long, default_value = "10GiB", value_parser = parse_size)]
        cache_size: u64,
        /// Bytes of the compressed blob fetched per request (whole chunks, at least one).
        /// 1 MiB read a 165 MB tree ~35% faster than 512 KiB with the same registry traffic
        /// (benches/fuse_read); smaller units fetch less around sparse reads.
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        fetch_unit: u64,
        /// Fetch units fetched ahead, at most, of a reader that moves forward through a layer
        /// (three misses in a row, each right after what was already fetched): 4 at first,
        /// doubling up to this. Speeds up reading most of an image; 0 turns it off.
        #[arg(long, default_value_t = arbor_fetch::fetcher::DEFAULT_SEQUENTIAL_READ_AHEAD as u16,
              value_parser = clap::value_parser!(u16).range(0..=1024))]
        sequential_read_ahead: u16,
        /// Bytes of the blob one request covers at most for a reader of whole layers: the
        /// sequential read-ahead and --prefetch-rest-eager send consecutive fetch units in one
        /// range request up to this size (a registry charges CPU per request, and on a small
        /// node that CPU is the reader's); demand misses and a starting program's read-ahead
        /// still fetch one unit per request.
        #[arg(long, default_value = "4MiB", value_parser = parse_size)]
        max_request: u64,
        /// Do not fetch ahead of demand at all.
        #[arg(long)]
        no_prefetch: bool,
        /// Prefetch only the layers' prefetch sections, not the rest of the layers.
        #[arg(long)]
        no_prefetch_rest: bool,
        /// Limit background fetching of the rest of the layers (e.g. 50MiB per second; 0: no limit).
        #[arg(long, default_value = "0", value_parser = parse_size)]
        prefetch_rate: u64,
        /// Fetch the rest of the layers while files are being read too (one paced window at a
        /// time). By default the rest waits until reads pause for 250 ms, so it does not take
        /// CPU from a starting program; a workload that reads most of the image may prefer this.
        #[arg(long)]
        prefetch_rest_while_active: bool,
        /// Fetch the rest of the layers right after mounting, several windows at a time, as
        /// urgently as reads (as nydusd's whole-image prefetch does): fastest for reading
        /// everything, but it competes with a starting program for CPU and link.
        #[arg(long, conflicts_with_all = ["no_prefetch", "no_prefetch_rest"])]
        prefetch_rest_eager: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// Where the per-layer mount points live while mounted.
        #[arg(long, default_value = "/run/arbor", value_name = "DIR")]
        state_dir: PathBuf,
        /// FUSE worker threads per layer.
        #[arg(long, default_value_t = 2)]
        fuse_threads: usize,
        /// When a program reads a directory's files in order (a scan, `find | xargs cat`, a
        /// copy), write the next files this node holds in memory into the kernel's page
        /// cache ahead of it, up to this many bytes past the file it asked for, so it reads
        /// them without a request to arbor; 0 turns it off. (Killed with SIGKILL while a
        /// push waits for a page another program is reading, arbor may stay until
        /// `umount -f DIR`.)
        #[arg(long, default_value = "4MiB", value_parser = parse_size)]
        push_ahead: u64,
        /// Range requests in flight to one registry at most.
        #[arg(long, default_value_t = 8)]
        registry_concurrency: usize,
        /// Honour setuid/setgid bits of the image's files. By default the mount is `nosuid`:
        /// images are untrusted, and a setuid binary in one would give any local user who can
        /// reach DIR root.
        #[arg(long)]
        allow_suid: bool,
        /// Let device nodes of the image be opened. By default the mount is `nodev`: a device
        /// node in an image could give any local user raw access to a disk or to memory.
        #[arg(long)]
        allow_dev: bool,
        /// Mount the layers with FUSE `allow_other`, so users other than root can read an
        /// image of one layer (a bind of its FUSE mount). An image of several layers is
        /// stacked with overlayfs, which reads its layers with root's credentials: who reads
        /// it is decided by DIR's permissions either way. The per-layer mounts are in a 0700
        /// directory under --state-dir.
        #[arg(long)]
        allow_other: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Pull an image into containerd so that `arbord` mounts its converted layers lazily.
    ///
    /// Stores the manifest and config in containerd, prepares every layer through the
    /// snapshotter with the remote-snapshot labels (`ctr image pull` passes none) and creates
    /// the image record. Converted layers are mounted lazily by arbord in a fraction of a
    /// second; other layers (or any whose lazy mount fails) are downloaded, verified and
    /// unpacked through containerd as usual. Then `ctr run --snapshotter arbor IMAGE ID` or
    /// `arbor run IMAGE` starts it.
    Pull {
        image: String,
        /// Do not give arbord the image's learned start-up set (the node's or the registry's
        /// artifact, see `arbor trace`): its layers are then fetched on demand only.
        #[arg(long)]
        no_startup_set: bool,
        /// The function this image is pulled for: with `[p2p]` on, arbord reads and serves
        /// the lazy layers in that function's tree (its nodes stream them to each other);
        /// without it, the image's own tree
        #[arg(long, value_name = "NAME")]
        function: Option<String>,
        #[command(flatten)]
        containerd: ContainerdArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Run an image with containerd through the arbor snapshotter, pulling it first if needed.
    ///
    /// `arbor pull` (when containerd does not have the image yet), then, through containerd's
    /// API as `ctr run` would: a snapshot of the image for the container, an OCI runtime spec
    /// from the image config (env, working directory, user, entrypoint and cmd) and the
    /// options below, the container, its task with stdio on this terminal. The container's
    /// output and exit status are the command's; SIGINT and SIGTERM are passed on to it.
    /// Afterwards the task, container and snapshot are deleted (unless --keep or --detach).
    #[command(after_help = RUN_AFTER_HELP)]
    Run {
        image: String,
        /// Command and arguments, replacing the image's Cmd (its Entrypoint stays; see
        /// --entrypoint).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        /// Container ID, also the snapshot key (default: arbor-<pid>).
        #[arg(long)]
        name: Option<String>,
        /// Keep the container and its snapshot after it exits (default: removed).
        #[arg(long)]
        keep: bool,
        /// Use the host's network namespace, /etc/hosts and /etc/resolv.conf (HOSTNAME is set
        /// to the host's name).
        #[arg(long)]
        net_host: bool,
        /// Give the container a terminal: this terminal goes into raw mode, window size changes
        /// follow, stderr comes through the terminal.
        #[arg(long, short = 't')]
        tty: bool,
        /// Start it in the background and return: the container keeps running after arbor
        /// exits (stdio: nothing, or --log-file). Stop it with `ctr task kill ID`.
        #[arg(long, short = 'd')]
        detach: bool,
        /// With --detach: append the container's stdout and stderr to this file.
        #[arg(long, value_name = "FILE", requires = "detach")]
        log_file: Option<PathBuf>,
        /// Environment variable for the container (KEY=VALUE, replacing the image's; a bare KEY
        /// removes it); repeatable.
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory inside the container (default: the image's WorkingDir, else /).
        #[arg(long, value_name = "DIR")]
        cwd: Option<String>,
        /// User to run as: UID, UID:GID, NAME or NAME:GROUP (names from the image's
        /// /etc/passwd and /etc/group; default: the image's User, else root).
        #[arg(long, short = 'u', value_name = "USER")]
        user: Option<String>,
        /// Replace the image's Entrypoint (words split at spaces) and drop its Cmd; "" clears it.
        #[arg(long, value_name = "CMD")]
        entrypoint: Option<String>,
        /// Mount into the container, as ctr: type=bind,src=/host/dir,dst=/dir,options=rbind:ro
        /// (type defaults to bind, options to rbind); repeatable.
        #[arg(long = "mount", value_name = "SPEC", value_parser = parse_mount)]
        mounts: Vec<arbor_client::run::MountSpec>,
        /// Memory limit of the container's cgroup, bytes (or 64MiB, 1GiB).
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        memory_limit: Option<u64>,
        /// CPU limit in CPUs (e.g. 0.5): a CFS quota over a 100 ms period.
        #[arg(long, value_name = "CPUS")]
        cpus: Option<f64>,
        /// Mount the container's root filesystem read-only.
        #[arg(long)]
        read_only: bool,
        /// Annotation of the runtime spec (KEY=VALUE), read by the runtime shim; repeatable.
        #[arg(long = "annotation", value_name = "KEY=VALUE", value_parser = parse_kv)]
        annotations: Vec<(String, String)>,
        /// Label of the container record (KEY=VALUE); repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Runtime (shim) to run the container with, e.g. io.containerd.arbor.v1.
        #[arg(long, default_value = arbor_client::run::DEFAULT_RUNTIME, value_name = "NAME")]
        runtime: String,
        /// cgroup to put the container's cgroup under (default: /<namespace>).
        #[arg(long, value_name = "PATH")]
        cgroup_parent: Option<String>,
        /// Pull even if containerd has the image.
        #[arg(long)]
        pull: bool,
        /// Wait until the function answers on its port (probed inside the container's network
        /// namespace), print the cold start phase by phase (pull, create, start, port; they
        /// add up to the time to ready), and report it to arbord, which learns the image's
        /// start-up set from it. With -d, arbor exits once ready (non-zero if it never is).
        #[arg(long)]
        wait_ready: bool,
        /// The function's port for --wait-ready [default: --annotation arbor.io/port, else
        /// 9000].
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
        /// Longest --wait-ready waits, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        ready_timeout: u64,
        #[command(flatten)]
        containerd: ContainerdArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Verify that TARGET holds the same files as SOURCE, layer by layer.
    ///
    /// Compares every entry's type, mode, owner, mtime, size, content digest, link target,
    /// device numbers and xattrs, reading TARGET both as a plain tar stream and through its
    /// TOC (verifying every chunk digest), and checks both configs' diff_ids. Exits 1 and
    /// names every difference if there is any.
    Check {
        source: String,
        target: String,
        /// Directory for target layers while they are checked (default: $TMPDIR).
        #[arg(long, value_name = "DIR")]
        tmp_dir: Option<PathBuf>,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Start-up sets: what a function reads to start, learned by arbord from real cold starts.
    ///
    /// When a container started with containerd-shim-arbor-v1 (or `arbor run --wait-ready`)
    /// becomes ready, arbord keeps the chunks its freshly mounted layers were first asked for
    /// until then, in first-read order, as its image's start-up set; the next cold start of
    /// that image on the node fetches them first. `trace push` attaches the set to the image in
    /// its registry (an OCI artifact with the image manifest as subject, found through the
    /// referrers API or its tag fallback), where `arbor pull` finds it on every other node.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Functions on a node: deploy, invoke (cold or warm), list, logs, remove, through
    /// arbord's function API.
    ///
    /// A function is an image serving `POST /invoke` on a port (9000 by default). arbord
    /// starts an instance when a request finds none free (a cold start, lazily through the
    /// arbor snapshotter and runtime), keeps --min instances warm, queues up to --queue-limit
    /// requests (then 429) and stops instances idle for --idle-timeout (scale to zero).
    #[command(after_help = func::AFTER_HELP)]
    Fn(func::FnArgs),
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Attach arbord's learned start-up set of IMAGE (or --file's) to IMAGE in its registry.
    Push {
        image: String,
        /// Push this set (JSON) instead of the one arbord learned.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        containerd: ContainerdArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show the start-up set of IMAGE: arbord's, else the registry's (--registry: only the
    /// registry's).
    Show {
        image: String,
        /// Look in the registry only.
        #[arg(long = "registry")]
        from_registry: bool,
        /// Also write the set (JSON) to FILE.
        #[arg(long, value_name = "FILE")]
        save: Option<PathBuf>,
        #[command(flatten)]
        containerd: ContainerdArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

const RUN_AFTER_HELP: &str = "\
Examples:
  arbor run 127.0.0.1:5000/fn/app:v1-arbor                      # the image's entrypoint and cmd
  arbor run --net-host -e PORT=8080 REGISTRY/app:v1-arbor       # serve on the host's network
  arbor run --memory-limit 256MiB --cpus 0.5 REGISTRY/app:v1-arbor
  arbor run --mount type=bind,src=/srv/data,dst=/data,options=rbind:ro REGISTRY/app:v1-arbor
  arbor run -u 1000:1000 --cwd /tmp REGISTRY/app:v1-arbor sh -c 'id; pwd'
  arbor run -d --name fn1 --log-file /var/log/fn1.log REGISTRY/app:v1-arbor
  ctr task kill fn1; ctr task rm fn1; ctr container rm fn1     # (rm also removes its snapshot)

Flags after IMAGE are the container's command: put arbor's own flags before IMAGE.
The default runtime is containerd's runc shim; --runtime io.containerd.arbor.v1 picks Arbor's.";

/// A run's pull report on stderr (stdout is the container's).
struct RunObserver {
    json: bool,
}

impl arbor_client::Observer for RunObserver {
    fn pulled(&self, report: &arbor_client::PullReport) {
        if !self.json {
            eprint!("{}", output::pull_text(report));
        }
    }

    fn ready(&self, r: &arbor_client::run::Ready) {
        if !self.json {
            eprint!("{}", output::ready_text(r));
        }
    }
}

fn parse_mount(s: &str) -> Result<arbor_client::run::MountSpec, String> {
    s.parse().map_err(|e: arbor_client::Error| e.to_string())
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Parses `123`, `64KiB`, `1MiB`, `1M`, `2GiB`.
fn parse_size(s: &str) -> Result<u64, String> {
    arbor_fetch::parse_size(s)
}

fn client(r: &RegistryArgs) -> Result<RegistryClient> {
    let creds = match &r.authfile {
        Some(p) => CredentialStore::from_file(p)?,
        None => CredentialStore::load_default()?,
    };
    Ok(RegistryClient::new(
        ClientOptions {
            plain_http: r.plain_http,
            retries: r.retries,
            ..Default::default()
        },
        creds,
    )?)
}

fn read_prefetch_list(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prefetch list {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        arbor_format::path::normalize_image_path(line)
            .with_context(|| format!("{}:{}: bad path", path.display(), i + 1))?;
        out.push(line.to_string());
    }
    Ok(out)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Fn(a) => func::run(a).await,
        Command::Convert {
            source,
            target,
            chunk_size,
            block_size,
            level,
            prefetch_list,
            prefetch_from,
            no_infer,
            jobs,
            threads,
            tmp_dir,
            registry,
        } => {
            let client = client(&registry)?;
            let src_loc = ImageLocation::parse(&source)?;
            let dst_loc = ImageLocation::parse(&target)?;
            let src = Store::open(&src_loc, &client, false)?;
            let dst = Store::open(&dst_loc, &client, true)?;
            let mut writer = WriterOptions {
                chunk_size,
                block_size,
                level,
                ..Default::default()
            };
            if let Some(t) = threads {
                writer.threads = t.max(1);
            }
            if let Some(p) = &prefetch_list {
                writer.prefetch = read_prefetch_list(p)?;
            }
            if let Some(from) = &prefetch_from {
                let set = if std::path::Path::new(from).is_file() {
                    trace::from_file(std::path::Path::new(from))?
                } else {
                    let store = Store::open(&ImageLocation::parse(from)?, &client, false)?;
                    let subject = trace::image_manifest(&store, &registry.platforms).await?;
                    trace::from_registry(&store, &subject.digest)
                        .await?
                        .with_context(|| format!("{from} has no start-up set in its registry"))?
                        .1
                };
                for p in set.paths() {
                    let p = format!("/{}", p.trim_start_matches("./").trim_start_matches('/'));
                    if arbor_format::path::normalize_image_path(&p).is_ok()
                        && !writer.prefetch.contains(&p)
                    {
                        writer.prefetch.push(p);
                    }
                }
            }
            writer.validate()?;
            let opts = ConvertOptions {
                writer,
                platforms: registry.platforms.clone(),
                jobs,
                tmp_dir,
                infer: !no_infer,
            };
            let progress: Arc<dyn Progress> = if registry.json {
                Arc::new(NoProgress)
            } else {
                Arc::new(bars::Bars::new())
            };
            let same = src_loc == dst_loc;
            let mut report = convert_image(&src, &dst, same, &opts, progress)
                .await
                .with_context(|| format!("converting {source}"))?;
            if same && !report.already_converted {
                // Converted in place: the tag now names the converted image.
                tracing::info!("converted in place");
            }
            report.source = source;
            report.target = target;
            if registry.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                output::print_convert(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { image, registry } => {
            let client = client(&registry)?;
            let store = Store::open(&ImageLocation::parse(&image)?, &client, false)?;
            let report = arbor_convert::inspect::inspect_image(&store, &registry.platforms)
                .await
                .with_context(|| format!("inspecting {image}"))?;
            if registry.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                output::print_inspect(&image, &report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Mount {
            image,
            dir,
            cache_dir,
            cache_size,
            fetch_unit,
            sequential_read_ahead,
            max_request,
            no_prefetch,
            no_prefetch_rest,
            prefetch_rate,
            prefetch_rest_while_active,
            prefetch_rest_eager,
            metrics_addr,
            state_dir,
            fuse_threads,
            push_ahead,
            registry_concurrency,
            allow_suid,
            allow_dev,
            allow_other,
            registry,
        } => {
            let client = client(&registry)?;
            let store = Store::open(&ImageLocation::parse(&image)?, &client, false)?;
            let args = mount::MountArgs {
                cache_dir,
                cache_size,
                fetch_unit,
                sequential_read_ahead: usize::from(sequential_read_ahead),
                max_request,
                prefetch: !no_prefetch,
                prefetch_rest: !no_prefetch_rest,
                prefetch_rate,
                prefetch_rest_while_active,
                prefetch_rest_eager,
                metrics_addr,
                state_dir,
                fuse_threads,
                push_ahead,
                registry_concurrency,
                allow_suid,
                allow_dev,
                allow_other,
            };
            mount::run(store, &image, &registry.platforms, &dir, args)
                .await
                .with_context(|| format!("mounting {image}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull {
            image,
            no_startup_set,
            function,
            containerd,
            registry,
        } => {
            let client = client(&registry)?;
            let store = Store::open(&ImageLocation::parse(&image)?, &client, false)?;
            if let Some(f) = &function {
                anyhow::ensure!(
                    pull::is_function_name(f),
                    "--function {f:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ - / : @"
                );
            }
            let opts = pull::PullOptions {
                startup_set: !no_startup_set,
                function,
            };
            let report = pull::pull_with(
                &store,
                &image,
                &registry.platforms,
                &containerd.target(),
                &opts,
            )
            .await
            .with_context(|| format!("pulling {image}"))?;
            if registry.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                output::print_pull(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            image,
            command,
            name,
            keep,
            net_host,
            tty,
            detach,
            log_file,
            env,
            cwd,
            user,
            entrypoint,
            mounts,
            memory_limit,
            cpus,
            read_only,
            annotations,
            labels,
            runtime,
            cgroup_parent,
            pull,
            wait_ready,
            port,
            ready_timeout,
            containerd,
            registry,
        } => {
            let ready = wait_ready.then(|| arbor_client::run::ReadyOptions {
                port: port.unwrap_or_else(|| {
                    arbor_client::ready::port_of(annotations.iter().map(|(k, v)| (k, v)))
                }),
                timeout: std::time::Duration::from_secs(ready_timeout),
                function: annotations
                    .iter()
                    .find(|(k, _)| k == arbor_client::ready::ANN_FUNCTION)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
            });
            let id = name.unwrap_or_else(|| format!("arbor-{}", std::process::id()));
            let memory_limit = memory_limit
                .map(|m| i64::try_from(m).context("--memory-limit is too large"))
                .transpose()?;
            let mut opts = arbor_client::RunOptions::new(&image, &id);
            opts.spec = arbor_client::run::SpecOptions {
                args: command,
                entrypoint: entrypoint.map(|e| e.split_whitespace().map(str::to_string).collect()),
                env,
                cwd,
                user,
                mounts,
                memory_limit,
                cpus,
                read_only,
                tty,
                net_host,
                netns: None,
                hostname: None,
                annotations: annotations.into_iter().collect(),
                cgroup_parent,
            };
            opts.labels = labels.into_iter().collect();
            opts.runtime = runtime;
            opts.keep = keep;
            opts.detach = detach;
            opts.stdio = match (detach, log_file) {
                (true, Some(f)) => arbor_client::run::Stdio::LogFile(f),
                (true, None) => arbor_client::run::Stdio::Null,
                _ => arbor_client::run::Stdio::Inherit,
            };
            opts.pull = if pull {
                arbor_client::PullPolicy::Always
            } else {
                arbor_client::PullPolicy::Missing
            };
            opts.platforms = registry.platforms.clone();
            opts.ready = ready;
            let client = client(&registry)?;
            let store = Store::open(&ImageLocation::parse(&image)?, &client, false)?;
            let observer = RunObserver {
                json: registry.json,
            };
            let outcome = arbor_client::run(&containerd.target(), Some(&store), &opts, &observer)
                .await
                .with_context(|| format!("running {image}"))?;
            if registry.json && detach {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            }
            Ok(match outcome.exit_status {
                Some(c) => ExitCode::from(c.min(255) as u8),
                None => ExitCode::SUCCESS,
            })
        }
        Command::Trace(TraceCommand::Push {
            image,
            file,
            containerd,
            registry,
        }) => {
            let client = client(&registry)?;
            let store = Store::open(&ImageLocation::parse(&image)?, &client, false)?;
            let subject = trace::image_manifest(&store, &registry.platforms).await?;
            let set = match &file {
                Some(f) => trace::from_file(f)?,
                None => trace::from_arbord(&containerd.target(), &subject.digest)
                    .await?
                    .with_context(|| {
                        format!(
                            "arbord has learned no start-up set for {image} ({}) yet: start it once \
                             with the arbor runtime (or `arbor run --wait-ready`) on this node",
                            subject.digest
                        )
                    })?,
            };
            let artifact = trace::push(&store, &subject, &set).await?;
            if registry.json {
                println!(
                    "{}",
                    serde_json::json!({"image": image, "manifest": subject.digest, "artifact": artifact,
                        "files": set.paths().len(), "chunks": set.chunk_count()})
                );
            } else {
                print!("{}", trace::describe(&set));
                println!("attached to {image} as {artifact}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Trace(TraceCommand::Show {
            image,
            from_registry,
            save,
            containerd,
            registry,
        }) => {
            let client = client(&registry)?;
            let store = Store::open(&ImageLocation::parse(&image)?, &client, false)?;
            let subject = trace::image_manifest(&store, &registry.platforms).await?;
            let local = if from_registry {
                None
            } else {
                trace::from_arbord(&containerd.target(), &subject.digest)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot ask arbord");
                        None
                    })
            };
            let (set, source) = match local {
                Some(s) => (s, "arbord".to_string()),
                None => match trace::from_registry(&store, &subject.digest).await? {
                    Some((artifact, s)) => (s, format!("registry artifact {artifact}")),
                    None => {
                        eprintln!("no start-up set for {image} ({})", subject.digest);
                        return Ok(ExitCode::from(1));
                    }
                },
            };
            if let Some(p) = &save {
                std::fs::write(p, set.to_json())
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            if registry.json {
                println!("{}", String::from_utf8_lossy(&set.to_json()));
            } else {
                print!("{}", trace::describe(&set));
                println!("from {source}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            source,
            target,
            tmp_dir,
            registry,
        } => {
            let client = client(&registry)?;
            let src = Store::open(&ImageLocation::parse(&source)?, &client, false)?;
            let dst = Store::open(&ImageLocation::parse(&target)?, &client, false)?;
            let report =
                arbor_convert::check::check_images(&src, &dst, &registry.platforms, tmp_dir)
                    .await
                    .with_context(|| format!("checking {target} against {source}"))?;
            if registry.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                output::print_check(&report);
            }
            if report.differences.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(1))
            }
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    };
    // Do not wait for blocking reads still in flight (`arbor run` copying a terminal's stdin).
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("lots").is_err());
    }
}
