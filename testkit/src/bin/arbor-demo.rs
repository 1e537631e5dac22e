//! The README's main job: starts a private registry (behind a 1 Gbit/s shaped link in its own
//! network namespace), builds a sample HTTP function image, converts it with `arbor convert`
//! and checks it, then cold-starts the function twice and prints how long each took to give
//! its first HTTP answer: through stock containerd with overlayfs (pull, then run), and
//! through a private containerd whose `arbor` snapshotter is a private `arbord` (`arbor pull`,
//! then `ctr run --snapshotter arbor`, layers mounted lazily).
//!
//! Everything lives under one directory (`ARBOR_TESTKIT_TMPDIR`, default `./.arbor-state`)
//! and is removed at the end; nothing else on the machine is touched.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arbor_testkit::netns::Namespace;
use arbor_testkit::{
    Arbord, ArbordOptions, Containerd, Entry, LayerSource, Registry, busybox_image, layer_tar,
    pseudo_random_bytes, skopeo_push, write_oci_layout,
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

/// Size of the sample function's model file, which it does not read to answer.
const MODEL_BYTES: usize = 192 << 20;
/// The link between the node and the registry.
const LINK_BITS: u64 = 1_000_000_000;

/// Runs `ctr run -d --net-host` of `reference` serving HTTP on `port` and waits for the first
/// answer; returns (seconds to the container started, seconds to the answer, the answer).
fn start_function(
    ctd: &Containerd,
    reference: &str,
    snapshotter: &str,
    id: &str,
    port: u16,
    t0: Instant,
) -> Result<(f64, f64, String)> {
    let listen = format!("127.0.0.1:{port}");
    ctd.ctr(&[
        "run",
        "-d",
        "--net-host",
        "--snapshotter",
        snapshotter,
        reference,
        id,
        "/bin/busybox",
        "httpd",
        "-f",
        "-p",
        &listen,
        "-h",
        "/app/www",
    ])
    .with_context(|| format!("starting the function from {reference}"))?;
    let created = t0.elapsed().as_secs_f64();
    loop {
        if let Ok((200, body)) = arbor_testkit::http_get(&listen, "/cgi-bin/fn", None) {
            if !body.starts_with("hello from a lazily started function\n") {
                bail!("the function answered {body:?}");
            }
            return Ok((created, t0.elapsed().as_secs_f64(), body));
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the function did not answer within 120 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stop_function(ctd: &Containerd, id: &str) {
    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    for _ in 0..50 {
        if ctd.ctr(&["task", "delete", id]).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctd.ctr(&["container", "rm", id]);
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn main() -> Result<()> {
    if !arbor_testkit::is_root() {
        bail!("the demo runs containerd, arbord and network namespaces and needs root");
    }
    if std::env::var_os("ARBOR_TESTKIT_TMPDIR").is_none() {
        let dir = std::env::current_dir()?.join(".arbor-state");
        std::fs::create_dir_all(&dir)?;
        // SAFETY: single-threaded at this point; no other thread reads the environment.
        unsafe { std::env::set_var("ARBOR_TESTKIT_TMPDIR", &dir) };
    }
    println!("== starting a private registry behind a 1 Gbit/s link (network namespace, tc tbf)");
    let ns = Namespace::new(LINK_BITS).context("creating the network namespace")?;
    let reg = Registry::start_in_netns(&ns).context("starting docker-registry")?;
    println!("   {}", reg.url());

    println!(
        "== building the sample function: busybox httpd + a CGI handler + {} MB model it does not read to answer",
        MODEL_BYTES >> 20
    );
    let mut spec = busybox_image(
        vec![
            Entry::dir("app"),
            Entry::dir("app/www"),
            Entry::dir("app/www/cgi-bin"),
            Entry::executable(
                "app/www/cgi-bin/fn",
                "#!/bin/sh\n# The function: a greeting and a digest of its config.\n\
                 printf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
                 echo \"hello from a lazily started function\"\n\
                 sha256sum /app/config/*.json | sha256sum\n",
            ),
            Entry::dir("app/config"),
            Entry::file("app/config/settings.json", "{\"greeting\": \"hello\"}\n"),
        ],
        &[
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "127.0.0.1:8080",
            "-h",
            "/app/www",
        ],
    );
    spec.layers.push(LayerSource::Tar(layer_tar(&[
        Entry::dir("app"),
        Entry::dir("app/model"),
        Entry::file(
            "app/model/weights.bin",
            pseudo_random_bytes(42, MODEL_BYTES),
        ),
    ])));
    let work = tempfile::tempdir()?;
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &spec)?;
    let src = reg.reference("demo/function:v1");
    let dst = reg.reference("demo/function:v1-arbor");
    skopeo_push(&layout, "v1", &src, None)?;
    println!("   pushed {src}");

    println!("== arbor convert (the handler is the prefetch list)");
    let list = work.path().join("prefetch.txt");
    std::fs::write(
        &list,
        "bin/busybox\napp/www/cgi-bin/fn\napp/config/settings.json\n",
    )?;
    let t = Instant::now();
    print!(
        "{}",
        arbor(&[
            "convert",
            "--plain-http",
            "--prefetch-list",
            list.to_str().unwrap_or(""),
            &src,
            &dst
        ])?
    );
    println!("   ({:.2} s)", t.elapsed().as_secs_f64());
    println!("== arbor check (same files, same metadata, every chunk verified)");
    print!("{}", arbor(&["check", "--plain-http", &src, &dst])?);
    let port = || -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };

    println!("== cold start through stock containerd + overlayfs (pull everything, then run)");
    let stock = {
        let ctd = Containerd::start().context("starting containerd")?;
        drop_caches();
        let t0 = Instant::now();
        ctd.pull(&src, &["--plain-http"])?;
        let pulled = t0.elapsed().as_secs_f64();
        let (created, ready, answer) =
            start_function(&ctd, &src, "overlayfs", "fn-stock", port()?, t0)?;
        stop_function(&ctd, "fn-stock");
        print!("{answer}");
        (pulled, created, ready)
    };

    println!("== cold start through arbord (containerd's arbor snapshotter, lazy layers)");
    let arbord_bin = arbor_bin()?.with_file_name("arbord");
    let arbord = Arbord::start(&ArbordOptions {
        bin: arbord_bin,
        extra_args: vec!["--plain-http-host".into(), ns.ns_addr().to_string()],
        ..Default::default()
    })
    .context("starting arbord")?;
    let ctd = Containerd::start_with_config(&arbord.containerd_config())
        .context("starting containerd")?;
    drop_caches();
    let t0 = Instant::now();
    arbor(&[
        "pull",
        "--plain-http",
        "--address",
        ctd.socket().to_str().unwrap_or(""),
        "--namespace",
        ctd.namespace(),
        &dst,
    ])?;
    let pulled = t0.elapsed().as_secs_f64();
    let (created, ready, answer) = start_function(&ctd, &dst, "arbor", "fn-arbor", port()?, t0)?;
    let fetched = arbord.metric("arbor_fetch_bytes_total{source=\"registry\"}")?;
    stop_function(&ctd, "fn-arbor");
    print!("{answer}");
    drop(ctd);
    drop(arbord);

    let image_mb = (MODEL_BYTES as f64 + 1.2e6) / 1e6;
    println!();
    println!(
        "cold start of a {image_mb:.0} MB function image over a 1 Gbit/s link (seconds from the start of the pull):"
    );
    println!(
        "  {:<22} {:>8} {:>9} {:>15}",
        "", "pulled", "started", "first answer"
    );
    println!(
        "  {:<22} {:>8.2} {:>9.2} {:>15.2}",
        "containerd + overlayfs", stock.0, stock.1, stock.2
    );
    println!(
        "  {:<22} {:>8.2} {:>9.2} {:>15.2}",
        "arbor (lazy)", pulled, created, ready
    );
    println!(
        "  arbor answered {:.1}x sooner and had fetched {:.1} MB from the registry by then (background prefetch continues)",
        stock.2 / ready.max(1e-9),
        fetched / 1e6
    );
    println!("== done; the registry, containerd, arbord, mounts and their state are removed");
    drop(reg);
    drop(ns);
    Ok(())
}
