//! The README's main job: starts a private registry (behind a 1 Gbit/s shaped link in its own
//! network namespace), builds a sample function image (an HTTP function on port 9000 and a
//! 192 MB model it does not read to answer), converts it with `arbor convert` and checks it,
//! then deploys it as a function with `arbor fn deploy` on two nodes and invokes it cold
//! (scaled to zero) and warm with `arbor fn invoke`, printing the times side by side:
//!
//! * **containerd + overlayfs**: arbord's function gateway with its instances on stock
//!   containerd's overlayfs snapshotter and runc (the image pulled whole on the cold start);
//! * **arbor**: the same gateway with the `arbor` snapshotter (layers mounted lazily, chunks
//!   fetched when read) and the `containerd-shim-arbor-v1` runtime.
//!
//! Everything lives under one directory (`ARBOR_TESTKIT_TMPDIR`, default `./.arbor-state`)
//! and is removed at the end; nothing else on the machine is touched.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arbor_testkit::functions::{FnNode, FnNodeOptions, FnSnapshotter};
use arbor_testkit::netns::Namespace;
use arbor_testkit::{Registry, echo_function_image, skopeo_push, write_oci_layout};
use serde_json::Value;

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
/// Warm invocations after the cold one (the median is shown).
const WARM: usize = 9;

/// `arbor fn ARGS` against `node`'s API.
fn arbor_fn(node: &FnNode, args: &[&str]) -> Result<String> {
    let out = Command::new(arbor_bin()?)
        .arg("fn")
        .args(args)
        .env("ARBOR_FN_API", format!("http://{}", node.api))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "arbor fn {args:?} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// One invocation with `arbor fn invoke --json`: (seconds, start kind, answer).
fn invoke(node: &FnNode, data: &str) -> Result<(f64, String, String)> {
    let t = Instant::now();
    let out = arbor_fn(node, &["invoke", "hello", data, "--json"])?;
    let secs = t.elapsed().as_secs_f64();
    let v: Value = serde_json::from_str(out.trim()).context("arbor fn invoke --json")?;
    let body = v["body"].as_str().unwrap_or_default().to_string();
    if !body.starts_with(&format!("hello {data} from ")) {
        bail!("the function answered {body:?}");
    }
    Ok((secs, v["start"].as_str().unwrap_or("").into(), body))
}

/// Deploys `image` on a fresh node of `kind` and invokes it cold, then warm: (cold seconds,
/// median warm seconds, cold-start phases, registry bytes arbord fetched).
fn run_node(
    kind: FnSnapshotter,
    image: &str,
    registry_host: &str,
) -> Result<(f64, f64, String, Option<f64>)> {
    let mut o = FnNodeOptions::new(arbor_bin()?.with_file_name("arbord"), kind);
    o.plain_http = vec![registry_host.to_string()];
    o.bridge = "arbdemo0".into();
    o.subnet = "10.203.0.0/24".into();
    o.namespace = "arbor-demo".into();
    let node = FnNode::start(&o).context("starting the node")?;
    print!(
        "{}",
        arbor_fn(&node, &["deploy", "hello", image, "--idle-timeout", "300"])?
    );
    drop_caches();
    let (cold, start, answer) = invoke(&node, "cold")?;
    if start != "cold" {
        bail!("the first invocation was not a cold start ({start})");
    }
    println!("   {answer}");
    let mut warm = Vec::new();
    for _ in 0..WARM {
        let (s, start, _) = invoke(&node, "warm")?;
        if start != "warm" {
            bail!("a later invocation was not warm ({start})");
        }
        warm.push(s);
    }
    warm.sort_by(f64::total_cmp);
    print!("{}", arbor_fn(&node, &["ls", "hello"])?);
    let phases = node.function("hello")?["instances"][0]["cold_start"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} {:.2}",
                p[0].as_str().unwrap_or(""),
                p[1].as_f64().unwrap_or(0.0)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let fetched = match kind {
        FnSnapshotter::Arbor => node
            .arbord
            .metric("arbor_fetch_bytes_total{source=\"registry\"}")
            .ok(),
        FnSnapshotter::Overlayfs => None,
    };
    arbor_fn(&node, &["rm", "hello"])?;
    Ok((cold, warm[WARM / 2], phases, fetched))
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
        "== building the sample function: POST /invoke on port 9000 (busybox nc + a shell handler) + a {} MB model it does not read to answer",
        MODEL_BYTES >> 20
    );
    let spec = echo_function_image(MODEL_BYTES);
    let work = tempfile::tempdir()?;
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &spec)?;
    let src = reg.reference("demo/function:v1");
    let dst = reg.reference("demo/function:v1-arbor");
    skopeo_push(&layout, "v1", &src, None)?;
    println!("   pushed {src}");

    println!("== arbor convert (start-up files inferred from the entrypoint)");
    let t = Instant::now();
    print!("{}", arbor(&["convert", "--plain-http", &src, &dst])?);
    println!("   ({:.2} s)", t.elapsed().as_secs_f64());
    println!("== arbor check (same files, same metadata, every chunk verified)");
    print!("{}", arbor(&["check", "--plain-http", &src, &dst])?);

    let host = ns.ns_addr().to_string();
    println!(
        "== the function on containerd + overlayfs (arbord's gateway, runc, the original image)"
    );
    let stock = run_node(FnSnapshotter::Overlayfs, &src, &host)?;
    println!("== the function on arbor (arbord's gateway, lazy snapshotter, arbor runtime)");
    let lazy = run_node(FnSnapshotter::Arbor, &dst, &host)?;

    let image_mb = (MODEL_BYTES as f64 + 1.2e6) / 1e6;
    println!();
    println!(
        "a {image_mb:.0} MB function, scaled to zero, registry behind a 1 Gbit/s link (arbor fn invoke, seconds):"
    );
    println!("  {:<24} {:>12} {:>13}", "", "cold invoke", "warm (median)");
    for (name, r) in [("containerd + overlayfs", &stock), ("arbor (lazy)", &lazy)] {
        println!("  {:<24} {:>12.2} {:>13.3}", name, r.0, r.1);
    }
    println!("  cold-start phases, overlayfs: {}", stock.2);
    println!("  cold-start phases, arbor:     {}", lazy.2);
    println!(
        "  arbor's cold invoke was {:.1}x sooner; arbord fetched {:.1} MB from the registry in all",
        stock.0 / lazy.0.max(1e-9),
        lazy.3.unwrap_or(0.0) / 1e6
    );
    println!("== done; the registry, containerd, arbord, mounts and their state are removed");
    drop(reg);
    drop(ns);
    Ok(())
}
