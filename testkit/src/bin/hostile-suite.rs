//! Writes the hostile-image suite (`testdata/hostile/`, see its README) into OUT_DIR:
//! `hostile-suite [--arbor PATH] OUT_DIR`. The images are converted by the `arbor` binary at
//! PATH (default: the `arbor` next to this binary); `testdata/hostile/generate.sh` builds both
//! and runs this. Only index.json, oci-layout and blobs/ in OUT_DIR are replaced.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let mut arbor = None;
    let mut out = None;
    while let Some(a) = args.next() {
        if a == "--arbor" {
            arbor = Some(PathBuf::from(args.next().context("--arbor needs a path")?));
        } else if out.is_none() {
            out = Some(PathBuf::from(a));
        } else {
            bail!("usage: hostile-suite [--arbor PATH] OUT_DIR");
        }
    }
    let out = out.context("usage: hostile-suite [--arbor PATH] OUT_DIR")?;
    let arbor = match arbor {
        Some(a) => a,
        None => std::env::current_exe()?.with_file_name("arbor"),
    };
    if !arbor.exists() {
        bail!(
            "{} not found: build it with `cargo build -p arbor-cli --bin arbor`",
            arbor.display()
        );
    }
    arbor_testkit::hostile::suite::generate(&arbor, &out)?;
    println!("wrote the hostile-image suite to {}", out.display());
    Ok(())
}
