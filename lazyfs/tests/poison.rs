//! A layer proved to lie is poisoned (`Mounted::poison`, what arbord does when its background
//! proof catches a liar): from then on its mount answers EIO to every lookup, stat and read,
//! and the kernel drops what it had cached of it, so containers already running on it stop
//! reading its bytes rather than carrying on until they exit. Needs root, FUSE, docker-registry and skopeo.

mod common;

use arbor_testkit::{Entry, Registry};
use common::*;

#[test]
fn poisoned_layer_answers_eio_to_everything_cached_or_not() {
    if skip("poisoned_layer_answers_eio_to_everything_cached_or_not") {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let spec = tar_spec(&[
        Entry::dir("app"),
        Entry::file("app/read-before.txt", "served while trusted\n"),
        Entry::file("app/read-after.txt", "never served once poisoned\n"),
        Entry::dir("app/sub"),
        Entry::file("app/sub/deeper.txt", "nor this\n"),
    ]);
    let layer = one_layer(&rt, &reg, &spec, "poison/layer");
    let (h, f, dir) = (layer.handle.clone(), layer.fetcher.clone(), &layer.dir);
    let mounted = mount(&rt, h.clone(), &f, dir.path());

    let before = dir.path().join("app/read-before.txt");
    assert_eq!(
        std::fs::read_to_string(&before).unwrap(),
        "served while trusted\n"
    );

    // Opened (looked up) while trusted, read only after: the read itself is refused.
    let mut opened = std::fs::File::open(dir.path().join("app/read-after.txt")).unwrap();
    // Read and so cached by the kernel while trusted: poisoning drops the cached pages too.
    let mut cached = std::fs::File::open(&before).unwrap();

    mounted.poison();
    assert!(h.is_poisoned());
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
        {
            use std::io::Read;
            let mut buf = Vec::new();
            cached.read_to_end(&mut buf).map(drop)
        },
        "reading again a file the kernel had cached",
    );
    eio(
        std::fs::metadata(&before).map(drop),
        "stat of a file whose attributes the kernel had cached",
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
    drop((opened, cached));
    drop(mounted);
}
