//! `bench-many-layers`: what N lazily mounted layers cost a process — threads, open fds and
//! resident memory — and whether reads slow down with N.
//!
//! One image of one layer (`--files` files of `--file-size` bytes) is pushed to a private
//! `docker-registry` on loopback and converted with `arbor convert`; its layer is then mounted
//! N times (`--layers`, default 500) through `arbor_lazyfs` in this process, each mount its
//! own FUSE connection with its own inode tree, as arbord mounts one per layer. Measured from
//! `/proc/self`: threads, fds and RSS before the first mount, after all N, and after reading
//! one file through every mount (each checked against its checksum); and the time to read a
//! file through the first mount alone and then through all N (the per-mount latency).
//! Before Arbor had its own FUSE layer (commit 146a157), every mount was a `fuser` session
//! with `fuse.threads` (2) threads and a cloned `/dev/fuse` fd per thread: by construction
//! 2N threads and 2N + 1 fds for N layers (not re-measured here).
//!
//! Prints a table and writes JSON (`--json`). Needs root, FUSE, docker-registry and skopeo.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use arbor_benches::common::{self, MB, target_dir};
use arbor_benches::harness;
use arbor_fetch::fetcher::FetcherOptions;
use arbor_fetch::source::{Limits, StoreSource};
use arbor_fetch::{BlobSource, ChunkCache, Fetcher, LayerHandle, Metrics};
use arbor_lazyfs::{MountOptions, mount_layer};
use arbor_oci::{ImageLocation, Store};
use arbor_testkit::{
    Entry, ImageSpec, LayerSource, Registry, layer_tar, pseudo_random_bytes, skopeo_push,
    write_oci_layout,
};
use clap::Parser;
use serde_json::json;
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(name = "bench-many-layers", about, long_about = None)]
struct Args {
    /// Layers mounted.
    #[arg(long, default_value_t = 500)]
    layers: usize,
    /// Files in the layer.
    #[arg(long, default_value_t = 200)]
    files: usize,
    /// Bytes per file.
    #[arg(long, default_value_t = 16 << 10)]
    file_size: usize,
    /// FUSE worker threads of the process (shared by every mount).
    #[arg(long, default_value_t = 2)]
    fuse_threads: usize,
    /// The `arbor` CLI [default: target/release/arbor].
    #[arg(long)]
    arbor: Option<PathBuf>,
    /// JSON report.
    #[arg(long, default_value = "target/bench-many-layers.json")]
    json: PathBuf,
}

/// (threads, fds, RSS bytes) of this process.
fn usage() -> (u64, u64, u64) {
    harness::proc_usage("self").unwrap_or_default()
}

fn main() {
    harness::main_with(run)
}

fn run() -> Result<bool> {
    let a = Args::parse();
    let arbor = a
        .arbor
        .clone()
        .unwrap_or_else(|| target_dir().join("release/arbor"));
    common::preflight(
        &arbor,
        &["docker-registry", "skopeo"],
        "mounts FUSE filesystems",
    )?;
    let work = tempfile::Builder::new().prefix("bench-many-").tempdir()?;
    let reg = Registry::start()?;
    let mut entries = vec![Entry::dir("d")];
    let mut sums = Vec::new();
    for i in 0..a.files {
        let data = pseudo_random_bytes(i as u64 + 7, a.file_size);
        sums.push(hex::encode(Sha256::digest(&data)));
        entries.push(Entry::file(format!("d/f{i:04}"), data));
    }
    let spec = ImageSpec {
        layers: vec![LayerSource::Tar(layer_tar(&entries))],
        ..Default::default()
    };
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &spec)?;
    let src = reg.reference("many/layers:v1");
    skopeo_push(&layout, "v1", &src, None)?;
    let dst = reg.reference("many/layers:arbor");
    let out = Command::new(&arbor)
        .args(["convert", "--plain-http", &src, &dst])
        .output()
        .with_context(|| format!("running {}", arbor.display()))?;
    ensure!(
        out.status.success(),
        "arbor convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = common::plain_http_client()?;
    let store = Store::open(&ImageLocation::parse(&dst)?, &client, false)?;
    let (desc, index) = rt.block_on(async {
        let r = arbor_convert::image::resolve(&store, &[]).await?;
        let l = r.images[0].manifest.layers[0].clone();
        let (idx, _) = arbor_fetch::toc::read_layer_toc(&store, &l).await?;
        anyhow::Ok((l, idx))
    })?;
    let cache = Arc::new(ChunkCache::open(&work.path().join("cache"), 1 << 30)?);
    let fetcher = Fetcher::new(
        cache,
        Arc::new(Metrics::default()),
        FetcherOptions::default(),
    );
    let source: Arc<dyn BlobSource> = Arc::new(StoreSource::new(store.clone(), &Limits::new(8)));
    let index = Arc::new(index);

    let before = usage();
    let opts = MountOptions {
        threads: a.fuse_threads,
        allow_other: false,
    };
    let t = Instant::now();
    let mut mounts = Vec::new();
    for i in 0..a.layers {
        harness::check_interrupted()?;
        let dir = work.path().join(format!("m{i}"));
        std::fs::create_dir_all(&dir)?;
        let h = Arc::new(LayerHandle::new(
            &desc.digest,
            desc.size,
            Arc::clone(&index),
            vec![Arc::clone(&source)],
            1 << 20,
        ));
        mounts.push(mount_layer(
            h,
            Arc::clone(&fetcher),
            rt.handle().clone(),
            &dir,
            &opts,
        )?);
    }
    let mount_secs = t.elapsed().as_secs_f64();
    let mounted = usage();

    let read = |m: &arbor_lazyfs::Mounted, i: usize| -> Result<f64> {
        let f = i % a.files;
        let t = Instant::now();
        let data = std::fs::read(m.dir().join(format!("d/f{f:04}")))?;
        let secs = t.elapsed().as_secs_f64();
        ensure!(
            hex::encode(Sha256::digest(&data)) == sums[f],
            "wrong bytes through mount {i}"
        );
        Ok(secs)
    };
    // Warm the chunk cache through the first mount, then time one read per mount.
    for f in 0..a.files {
        read(&mounts[0], f)?;
    }
    harness::drop_caches();
    let one = read(&mounts[0], 1)?;
    let t = Instant::now();
    let mut worst: f64 = 0.0;
    for (i, m) in mounts.iter().enumerate() {
        worst = worst.max(read(m, i)?);
    }
    let all_secs = t.elapsed().as_secs_f64();
    let after = usage();

    let n = a.layers as f64;
    println!(
        "bench-many-layers: {} mounts of one {}-file layer, {} FUSE worker threads",
        a.layers, a.files, a.fuse_threads
    );
    println!("| when | threads | fds | RSS |");
    println!("|---|---|---|---|");
    for (what, u) in [
        ("before mounting", before),
        ("all mounted", mounted),
        ("after a read through each", after),
    ] {
        println!("| {what} | {} | {} | {:.1} MB |", u.0, u.1, u.2 as f64 / MB);
    }
    println!(
        "per mount: {:.3} threads, {:.2} fds, {:.1} KB RSS; mounting took {:.2} s ({:.1} ms each)",
        (mounted.0 as f64 - before.0 as f64) / n,
        (mounted.1 as f64 - before.1 as f64) / n,
        (after.2 as f64 - before.2 as f64) / n / 1e3,
        mount_secs,
        mount_secs / n * 1e3
    );
    println!(
        "read of one cached file: {:.2} ms through one mount alone, {:.2} ms mean and {:.2} ms worst through each of {} mounts",
        one * 1e3,
        all_secs / n * 1e3,
        worst * 1e3,
        a.layers
    );
    let report = harness::report(
        "many_layers",
        common::machine_info(&arbor),
        json!({
            "layers": a.layers,
            "files": a.files,
            "fuse_threads": a.fuse_threads,
            "before": {"threads": before.0, "fds": before.1, "rss": before.2},
            "mounted": {"threads": mounted.0, "fds": mounted.1, "rss": mounted.2},
            "after_reads": {"threads": after.0, "fds": after.1, "rss": after.2},
            "mount_seconds": mount_secs,
            "read_one_mount_seconds": one,
            "read_each_mount_mean_seconds": all_secs / n,
            "read_each_mount_worst_seconds": worst,
        }),
    );
    harness::write_json(&a.json, &report)?;
    for m in mounts {
        m.unmount()?;
    }
    Ok(true)
}
