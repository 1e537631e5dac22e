//! `arbord`: see the library crate and `arbord --help`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use arbord::config::{Config, DEFAULT_CONFIG_TOML};
use clap::Parser;

/// The Arbor node daemon: containerd's remote snapshotter `arbor`.
///
/// Converted images (`arbor convert`) pulled with `arbor pull`, or through CRI with
/// `disable_snapshot_annotations = false`, get their layers mounted lazily through FUSE:
/// containers start at once and read only the chunks they touch, fetched from the registry,
/// verified and cached. Other images are unpacked into ordinary overlay snapshots by
/// containerd, through the same snapshotter.
///
/// containerd (1.6/1.7, config version 2) loads it with:
///
///   [proxy_plugins.arbor]
///     type = "snapshot"
///     address = "/run/arbor/snapshotter.sock"
///
/// (snippets for containerd 2.0 and 2.1+ are in packaging/containerd/). Configuration is read
/// from /etc/arbor/config.toml (see --print-default-config); flags override it.
#[derive(Parser)]
#[command(name = "arbord", version, verbatim_doc_comment)]
struct Args {
    /// Config file [default: /etc/arbor/config.toml; missing means defaults]
    #[arg(long, short = 'c', env = "ARBORD_CONFIG")]
    config: Option<PathBuf>,
    /// Root directory (overrides `root`)
    #[arg(long)]
    root: Option<PathBuf>,
    /// Snapshots API socket (overrides `address`)
    #[arg(long)]
    address: Option<PathBuf>,
    /// Metrics endpoint host:port, "" to disable (overrides `metrics.address`)
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Registry host spoken to over plain HTTP; repeat for several (adds to `registry.plain_http`)
    #[arg(long = "plain-http-host")]
    plain_http_hosts: Vec<String>,
    /// Log filter (overrides `log_level`; RUST_LOG overrides both)
    #[arg(long)]
    log_level: Option<String>,
    /// Run the function-tree manager in this arbord, on `p2p.manager` (sets `p2p.run_manager`)
    #[arg(long)]
    tree_manager: bool,
    /// Print the default config file, with every key documented, and exit
    #[arg(long)]
    print_default_config: bool,
    /// Run as the fd holder on this socket instead (arbord starts it itself with
    /// `fuse.handover`): keep duplicates of the layers' FUSE connections so that mounted
    /// layers survive arbord's restarts, upgrades and crashes
    #[arg(long, value_name = "SOCKET")]
    fd_holder: Option<PathBuf>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.print_default_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return Ok(());
    }
    if let Some(socket) = a.fd_holder {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::stderr)
            .init();
        // A holder outlives arbord: SIGTERM/SIGINT meant for arbord's terminal or process
        // group must not end it (its connections would end with it).
        // SAFETY: setting signal dispositions to SIG_IGN before any thread starts.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        return arbor_lazyfs::holder::run_holder(&socket)
            .with_context(|| format!("fd holder on {}", socket.display()));
    }
    let mut cfg = Config::load(a.config.as_deref())?;
    if let Some(r) = a.root {
        cfg.root = r;
    }
    if let Some(s) = a.address {
        cfg.address = s;
    }
    if let Some(m) = a.metrics_addr {
        cfg.metrics.address = m;
    }
    if let Some(l) = a.log_level {
        cfg.log_level = l;
    }
    cfg.registry.plain_http.extend(a.plain_http_hosts);
    cfg.p2p.run_manager |= a.tree_manager;
    cfg.validate()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("arbord")
        .build()?
        .block_on(arbord::daemon::run(cfg))
}
