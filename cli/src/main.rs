//! `arbor`: converts, inspects and checks Arbor images (a thin shell over `arbor-convert`), and
//! pulls and runs them through containerd ([`pull`]).

mod bars;
mod mount;
mod output;
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

#[derive(Subcommand)]
enum Command {
    /// Convert an image to Arbor's lazy format and store it at TARGET.
    ///
    /// Every layer is rewritten as a zstd:chunked tar+zstd layer with a TOC, per-chunk sha256
    /// digests, a block digest table and (with --prefetch-list) the start-up files first.
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
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// Where the per-layer mount points live while mounted.
        #[arg(long, default_value = "/run/arbor", value_name = "DIR")]
        state_dir: PathBuf,
        /// FUSE worker threads per layer.
        #[arg(long, default_value_t = 2)]
        fuse_threads: usize,
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
        #[command(flatten)]
        containerd: ContainerdArgs,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Run an image with containerd through the arbor snapshotter, pulling it first if needed.
    ///
    /// `arbor pull` (when containerd does not have the image yet), then `ctr run` with the
    /// arbor snapshotter; the container's output and exit status are the command's.
    Run {
        image: String,
        /// Command and arguments (default: the image's entrypoint and cmd).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        /// Container ID (default: arbor-<pid>).
        #[arg(long)]
        name: Option<String>,
        /// Keep the container after it exits (default: removed).
        #[arg(long)]
        keep: bool,
        /// Use the host's network namespace.
        #[arg(long)]
        net_host: bool,
        /// Allocate a TTY.
        #[arg(long, short = 't')]
        tty: bool,
        /// Run in the background (the container keeps running after arbor exits).
        #[arg(long, short = 'd')]
        detach: bool,
        /// Environment variable for the container (KEY=VALUE); repeatable.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Pull even if containerd has the image.
        #[arg(long)]
        pull: bool,
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
        Command::Convert {
            source,
            target,
            chunk_size,
            block_size,
            level,
            prefetch_list,
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
            writer.validate()?;
            let opts = ConvertOptions {
                writer,
                platforms: registry.platforms.clone(),
                jobs,
                tmp_dir,
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
            no_prefetch,
            no_prefetch_rest,
            prefetch_rate,
            prefetch_rest_while_active,
            metrics_addr,
            state_dir,
            fuse_threads,
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
                prefetch: !no_prefetch,
                prefetch_rest: !no_prefetch_rest,
                prefetch_rate,
                prefetch_rest_while_active,
                metrics_addr,
                state_dir,
                fuse_threads,
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
            containerd,
            registry,
        } => {
            let client = client(&registry)?;
            let store = Store::open(&ImageLocation::parse(&image)?, &client, false)?;
            let report = pull::pull(&store, &image, &registry.platforms, &containerd.target())
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
            env,
            pull,
            containerd,
            registry,
        } => {
            let t = containerd.target();
            if pull || !pull::has_image(&t, &image).await? {
                let client = client(&registry)?;
                let store = Store::open(&ImageLocation::parse(&image)?, &client, false)?;
                let report = pull::pull(&store, &image, &registry.platforms, &t)
                    .await
                    .with_context(|| format!("pulling {image}"))?;
                if !registry.json {
                    output::print_pull(&report);
                }
            }
            let id = name.unwrap_or_else(|| format!("arbor-{}", std::process::id()));
            let mut cmd = std::process::Command::new("ctr");
            cmd.arg("--address")
                .arg(&containerd.address)
                .arg("--namespace")
                .arg(&containerd.namespace)
                .arg("run")
                .arg("--snapshotter")
                .arg(&containerd.snapshotter);
            if !keep && !detach {
                cmd.arg("--rm");
            }
            if net_host {
                cmd.arg("--net-host");
            }
            if tty {
                cmd.arg("--tty");
            }
            if detach {
                cmd.arg("--detach");
            }
            for e in &env {
                cmd.arg("--env").arg(e);
            }
            cmd.arg(&image).arg(&id).args(&command);
            let status = tokio::task::spawn_blocking(move || cmd.status())
                .await?
                .context("running ctr (from the containerd package)")?;
            Ok(match status.code() {
                Some(c) => ExitCode::from(c.clamp(0, 255) as u8),
                None => ExitCode::from(128),
            })
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
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
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
