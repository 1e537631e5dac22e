//! A layer proved to lie is poisoned (`LayerHandle::poison`, what arbord does when its
//! background proof catches a liar): from then on its mount answers EIO to every lookup, stat
//! and read that reaches it, so containers already running on it stop reading its bytes
//! rather than carrying on until they exit. Needs root, FUSE, docker-registry and skopeo.

mod common;

use arbor_fetch::fetcher::FetcherOptions;
use arbor_testkit::{Entry, ImageSpec, LayerSource, Registry, layer_tar};
use common::*;

#[test]
fn poisoned_layer_answers_eio_to_everything_not_yet_cached() {
    if skip("poisoned_layer_answers_eio_to_everything_not_yet_cached") {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let spec = ImageSpec {
        layers: vec![LayerSource::Tar(layer_tar(&[
            Entry::dir("app"),
            Entry::file("app/read-before.txt", "served while trusted\n"),
            Entry::file("app/read-after.txt", "never served once poisoned\n"),
            Entry::dir("app/sub"),
            Entry::file("app/sub/deeper.txt", "nor this\n"),
        ]))],
        ..Default::default()
    };
    let r = converted(&rt, &reg, &spec, "poison/layer");
    let c = client(2);
    let s = store(&r, &c);
    let ls = layers(&rt, &s);
    let cache = tempfile::tempdir().unwrap();
    let (f, metrics) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let h = handle(&s, &ls[0].0, &ls[0].1, 1 << 20);
    let mounted = mount(&rt, h.clone(), &f, dir.path());

    let before = dir.path().join("app/read-before.txt");
    assert_eq!(
        std::fs::read_to_string(&before).unwrap(),
        "served while trusted\n"
    );

    // Opened (looked up) while trusted, read only after: the read itself is refused.
    let mut opened = std::fs::File::open(dir.path().join("app/read-after.txt")).unwrap();

    h.poison();
    let eio = |r: std::io::Result<()>, what: &str| match r {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
        Ok(()) => panic!("{what} succeeded on a poisoned layer"),
    };
    eio(
        {
            use std::io::Read;
            let mut buf = Vec::new();
            opened.read_to_end(&mut buf).map(drop)
        },
        "reading a file opened before, never read",
    );
    eio(
        std::fs::metadata(dir.path().join("app/sub/deeper.txt")).map(drop),
        "looking up a name never looked up",
    );
    eio(
        std::fs::read_dir(dir.path().join("app/sub")).and_then(|mut d| {
            d.next().transpose()?;
            Ok(())
        }),
        "listing a directory never listed",
    );
    assert!(
        metrics
            .read_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "the refused read is counted in arbor_read_errors_total"
    );
    drop(mounted);
}
