//! Human-readable reports on stdout.

use arbor_convert::check::CheckReport;
use arbor_convert::convert::ConvertReport;
use arbor_convert::inspect::InspectReport;

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn short(d: &str) -> &str {
    let h = d.strip_prefix("sha256:").unwrap_or(d);
    &h[..h.len().min(12)]
}

pub fn print_convert(r: &ConvertReport) {
    if r.already_converted {
        println!(
            "{} is already in Arbor's format: nothing converted.",
            r.source
        );
    }
    for img in &r.images {
        if let Some(p) = &img.platform {
            println!("platform {p}");
        }
        println!(
            "  {:<14} {:>10} -> {:<14} {:>10} {:>8} {:>8} {:>7}",
            "source", "size", "target", "size", "entries", "prefetch", "seconds"
        );
        for l in &img.layers {
            println!(
                "  {:<14} {:>10} -> {:<14} {:>10} {:>8} {:>8} {:>7.2}{}",
                short(&l.source_digest),
                mb(l.source_size),
                short(&l.target_digest),
                mb(l.target_size),
                l.entries,
                l.prefetch.len(),
                l.seconds,
                if l.converted { "" } else { "  (kept)" }
            );
        }
        if let Some(i) = &img.inferred {
            println!(
                "  start-up set inferred from `{}`: {} files, {} (the prefetch column)",
                i.entrypoint.join(" "),
                i.files,
                mb(i.bytes)
            );
            for n in &i.notes {
                println!("  note: {n}");
            }
        }
        if !img.prefetch_missing.is_empty() {
            println!(
                "  warning: {} prefetch paths are in no layer: {}",
                img.prefetch_missing.len(),
                img.prefetch_missing.join(", ")
            );
        }
    }
    let secs = r.seconds.max(1e-9);
    println!(
        "{} -> {}\n  digest {}\n  {} uncompressed in {:.2} s ({:.1} MB/s), {} -> {}",
        r.source,
        r.target,
        r.target_digest,
        mb(r.uncompressed_bytes),
        r.seconds,
        r.uncompressed_bytes as f64 / 1e6 / secs,
        mb(r.source_bytes),
        mb(r.target_bytes)
    );
}

pub fn print_inspect(name: &str, r: &InspectReport) {
    println!("{name}\n  digest {}\n  type   {}", r.digest, r.media_type);
    for img in &r.images {
        println!(
            "{} {}/{}  manifest {}",
            img.platform.as_deref().unwrap_or("image"),
            img.os.as_deref().unwrap_or("?"),
            img.architecture.as_deref().unwrap_or("?"),
            short(&img.digest)
        );
        if !img.entrypoint.is_null() || !img.cmd.is_null() {
            println!("  entrypoint {}  cmd {}", img.entrypoint, img.cmd);
        }
        for (i, l) in img.layers.iter().enumerate() {
            println!(
                "  layer {i}: {} {} {}",
                short(&l.digest),
                l.format,
                mb(l.size)
            );
            if let Some(t) = &l.toc {
                println!(
                    "    TOC {} bytes ({} uncompressed): {} entries, {} files, {} dirs, {} symlinks, {} hardlinks, {} content, {} chunks ({} zero)",
                    t.toc_length,
                    t.toc_uncompressed_length,
                    t.entries,
                    t.regular_files,
                    t.directories,
                    t.symlinks,
                    t.hardlinks,
                    mb(t.content_bytes),
                    t.chunks,
                    t.zero_chunks
                );
                if let Some(blocks) = t.blocks {
                    println!(
                        "    block table {blocks} x {} KiB",
                        t.block_size.unwrap_or(0) / 1024
                    );
                }
                if let (Some(p), Some(end)) = (&t.prefetch, t.prefetch_end)
                    && !p.is_empty()
                {
                    println!("    prefetch {} files in the first {}:", p.len(), mb(end));
                    for f in p.iter().take(10) {
                        println!("      {f}");
                    }
                    if p.len() > 10 {
                        println!("      ... {} more", p.len() - 10);
                    }
                }
            }
            if let Some(e) = &l.toc_error {
                println!("    TOC unreadable: {e}");
            }
        }
    }
}

pub fn print_check(r: &CheckReport) {
    for n in &r.notes {
        println!("note: {n}");
    }
    for d in &r.differences {
        println!("DIFFERENT: {d}");
    }
    println!(
        "{} images, {} layers, {} entries compared: {}",
        r.images_compared,
        r.layers_compared,
        r.entries_compared,
        if r.differences.is_empty() {
            "identical".to_string()
        } else {
            format!("{} differences", r.differences.len())
        }
    );
}

pub fn print_pull(r: &arbor_client::PullReport) {
    print!("{}", pull_text(r));
}

/// What `print_pull` prints.
pub fn pull_text(r: &arbor_client::PullReport) -> String {
    let mut out = String::new();
    for l in &r.layers {
        let how = match l.how {
            "lazy" => "mounted lazily".to_string(),
            "unpacked" => format!("downloaded and unpacked ({})", mb(l.bytes_downloaded)),
            _ => "already present".to_string(),
        };
        out += &format!("  layer {} {how} ({:.2} s)\n", short(&l.digest), l.seconds);
    }
    if r.startup_set != "none" && !r.startup_set.is_empty() {
        out += &format!("  start-up set: {}\n", r.startup_set);
    }
    out += &format!(
        "pulled {} ({}) into containerd with snapshotter {} in {:.2} s\n",
        r.image,
        short(&r.manifest_digest),
        r.snapshotter,
        r.seconds
    );
    out
}

/// What `arbor run --wait-ready` prints when the function is ready.
pub fn ready_text(r: &arbor_client::run::Ready) -> String {
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|(n, s)| format!("{n} {s:.2} s"))
        .collect();
    let mut out = format!("ready in {:.2} s: {}\n", r.seconds, phases.join(", "));
    if r.lazy_layers > 0 {
        out += &format!("  {} lazy layers", r.lazy_layers);
        if let Some(s) = r.layers_ready_seconds {
            out += &format!(", the last mounted {s:.2} s after the start");
        }
        out.push('\n');
    }
    if !r.learning.is_empty() {
        out += &format!("  start-up set: {}\n", r.learning);
    }
    out
}
