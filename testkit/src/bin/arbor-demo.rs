//! The README's main job: starts a private registry and containerd, builds a sample function
//! image, converts it with `arbor convert`, inspects and checks the result, and runs both the
//! original and the converted image through stock containerd, printing what happened.
//!
//! Everything lives under one directory (`ARBOR_TESTKIT_TMPDIR`, default `./.arbor-state`)
//! and is removed at the end; nothing else on the machine is touched.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arbor_testkit::{
    Containerd, Entry, LayerSource, Registry, busybox_image, layer_tar, pseudo_random_bytes,
    skopeo_push, write_oci_layout,
};

fn arbor_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("arbor");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p arbor-cli`",
            bin.display()
        );
    }
    Ok(bin)
}

fn arbor(args: &[&str]) -> Result<String> {
    let out = Command::new(arbor_bin()?).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "arbor {args:?} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

fn main() -> Result<()> {
    if !arbor_testkit::is_root() {
        bail!("the demo runs containerd and needs root");
    }
    if std::env::var_os("ARBOR_TESTKIT_TMPDIR").is_none() {
        let dir = std::env::current_dir()?.join(".arbor-state");
        std::fs::create_dir_all(&dir)?;
        // SAFETY: single-threaded at this point; no other thread reads the environment.
        unsafe { std::env::set_var("ARBOR_TESTKIT_TMPDIR", &dir) };
    }
    println!("== starting a private registry");
    let reg = Registry::start().context("starting docker-registry")?;
    println!("   {}", reg.url());

    println!("== building the sample function image (busybox + handler + 2,000 data files)");
    let mut spec = busybox_image(
        vec![
            Entry::dir("app"),
            Entry::executable(
                "app/handler.sh",
                "#!/bin/sh\n# A function: answers with a greeting and a digest of some of its data.\n\
                 echo \"hello from a lazily pulled function\"\n\
                 echo \"data files: $(ls /app/data | wc -l)\"\n\
                 cat /app/data/00[0-4]* | sha256sum\n",
            ),
        ],
        &["/bin/sh", "/app/handler.sh"],
    );
    let mut data = vec![Entry::dir("app"), Entry::dir("app/data")];
    for i in 0..2000u64 {
        let len = 200 + (i * 7919 % 20_000) as usize;
        data.push(Entry::file(
            format!("app/data/{i:04}.bin"),
            pseudo_random_bytes(i, len),
        ));
    }
    spec.layers.push(LayerSource::Tar(layer_tar(&data)));
    let work = tempfile::tempdir()?;
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &spec)?;
    let src = reg.reference("demo/function:v1");
    let dst = reg.reference("demo/function:v1-arbor");
    skopeo_push(&layout, "v1", &src, None)?;
    println!("   pushed {src}");

    println!("== arbor convert");
    let t = Instant::now();
    print!("{}", arbor(&["convert", "--plain-http", &src, &dst])?);
    println!("   ({:.2} s)", t.elapsed().as_secs_f64());

    println!("== arbor inspect");
    print!("{}", arbor(&["inspect", "--plain-http", &dst])?);
    let inspect: serde_json::Value =
        serde_json::from_str(&arbor(&["inspect", "--plain-http", "--json", &dst])?)?;
    let image_bytes: u64 = inspect["images"][0]["layers"]
        .as_array()
        .map(|ls| ls.iter().filter_map(|l| l["size"].as_u64()).sum())
        .unwrap_or(0);

    println!("== arbor check (same files, same metadata, every chunk verified)");
    print!("{}", arbor(&["check", "--plain-http", &src, &dst])?);

    println!("== running both images with stock containerd (overlayfs)");
    let ctd = Containerd::start().context("starting containerd")?;
    for (name, reference) in [("original", &src), ("converted", &dst)] {
        let t = Instant::now();
        let out = ctd.pull_and_run(reference, &["/bin/sh", "/app/handler.sh"])?;
        println!(
            "-- {name} ({:.2} s pull + run):\n{out}",
            t.elapsed().as_secs_f64()
        );
    }
    drop(ctd);

    println!("== lazily: arbor mount, then run the function from the mount");
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir(&rootfs)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let t = Instant::now();
    let mut mount = Command::new(arbor_bin()?)
        .args([
            "mount",
            "--plain-http",
            "--no-prefetch",
            "--metrics-addr",
            &metrics,
        ])
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .arg("--state-dir")
        .arg(work.path().join("state"))
        .arg(&dst)
        .arg(&rootfs)
        .spawn()?;
    while !arbor_testkit::is_mounted(&rootfs) {
        if t.elapsed().as_secs() > 30 || mount.try_wait()?.is_some() {
            let _ = mount.kill();
            bail!("arbor mount did not come up");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mounted_after = t.elapsed().as_secs_f64();
    let out = Command::new("chroot")
        .arg(&rootfs)
        .args(["/bin/sh", "/app/handler.sh"])
        .output()?;
    let ran_after = t.elapsed().as_secs_f64();
    let (_, body) = arbor_testkit::http_get(&metrics, "/metrics", None)?;
    let fetched: f64 = body
        .lines()
        .find(|l| l.starts_with("arbor_fetch_bytes_total{source=\"registry\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let _ = Command::new("umount").arg(&rootfs).status();
    let _ = mount.wait();
    println!(
        "-- converted, lazily ({mounted_after:.2} s to mount, {ran_after:.2} s to the function's answer, \
         {:.1} MB fetched of a {:.1} MB image):\n{}",
        fetched / 1e6,
        image_bytes as f64 / 1e6,
        String::from_utf8_lossy(&out.stdout)
    );
    println!("== done; the registry, containerd, the mount and their state are removed");
    Ok(())
}
