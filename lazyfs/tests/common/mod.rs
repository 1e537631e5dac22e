//! Shared helpers of the FUSE tests: images converted into a real registry, layer mounts
//! through the library, and models of directory trees as the kernel shows them.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use arbor_convert::convert::{ConvertOptions, convert_image};
use arbor_convert::progress::NoProgress;
use arbor_fetch::fetcher::FetcherOptions;
use arbor_fetch::source::{Limits, StoreSource};
use arbor_fetch::{BlobSource, ChunkCache, Fetcher, LayerHandle, Metrics};
use arbor_lazyfs::{MountOptions, Mounted, mount_layer};
use arbor_oci::auth::CredentialStore;
use arbor_oci::manifest::Descriptor;
use arbor_oci::registry::{ClientOptions, RegistryClient};
use arbor_oci::{ImageLocation, Store};
#[allow(unused_imports)]
pub use arbor_testkit::tree::{Meta, sha, walk};
use arbor_testkit::{
    Entry, ImageSpec, LayerSource, Registry, layer_tar, skopeo_push, write_oci_layout,
};

pub fn skip(test: &str) -> bool {
    arbor_testkit::skip_unless_root(test)
        || arbor_testkit::skip_unless_tools(test, &["docker-registry", "skopeo", "fusermount3"])
        || (!Path::new("/dev/fuse").exists() && arbor_testkit::skip(test, "/dev/fuse is missing"))
}

/// An image of one layer holding `entries`.
pub fn tar_spec(entries: &[Entry]) -> ImageSpec {
    ImageSpec {
        layers: vec![LayerSource::Tar(layer_tar(entries))],
        ..Default::default()
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

pub fn client(retries: u32) -> RegistryClient {
    RegistryClient::new(
        ClientOptions {
            plain_http: true,
            retries,
            backoff: std::time::Duration::from_millis(20),
            ..Default::default()
        },
        CredentialStore::default(),
    )
    .unwrap()
}

/// Writes `spec`, pushes it to `reg` as `repo:v1`, converts it to `repo:arbor`; returns the
/// converted reference.
pub fn converted(
    rt: &tokio::runtime::Runtime,
    reg: &Registry,
    spec: &ImageSpec,
    repo: &str,
) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_oci_layout(dir.path(), "v1", spec).unwrap();
    let src = reg.reference(&format!("{repo}:v1"));
    skopeo_push(dir.path(), "v1", &src, None).unwrap();
    let dst = reg.reference(&format!("{repo}:arbor"));
    let c = client(2);
    rt.block_on(async {
        let s = Store::open(&ImageLocation::parse(&src).unwrap(), &c, false).unwrap();
        let d = Store::open(&ImageLocation::parse(&dst).unwrap(), &c, true).unwrap();
        convert_image(
            &s,
            &d,
            false,
            &ConvertOptions::default(),
            Arc::new(NoProgress),
        )
        .await
        .unwrap();
    });
    dst
}

/// The layers of an image with their validated TOCs.
pub fn layers(
    rt: &tokio::runtime::Runtime,
    store: &Store,
) -> Vec<(Descriptor, arbor_format::index::LayerIndex)> {
    rt.block_on(async {
        let r = arbor_convert::image::resolve(store, &[]).await.unwrap();
        let mut out = Vec::new();
        for l in &r.images[0].manifest.layers {
            let (idx, _) = arbor_fetch::toc::read_layer_toc(store, l).await.unwrap();
            out.push((l.clone(), idx));
        }
        out
    })
}

pub fn store(reference: &str, c: &RegistryClient) -> Store {
    Store::open(&ImageLocation::parse(reference).unwrap(), c, false).unwrap()
}

pub fn fetcher(
    cache_dir: &Path,
    budget: u64,
    opts: FetcherOptions,
) -> (Arc<Fetcher>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let cache = Arc::new(ChunkCache::open(cache_dir, budget).unwrap());
    (Fetcher::new(cache, Arc::clone(&metrics), opts), metrics)
}

pub fn handle(
    store: &Store,
    d: &Descriptor,
    idx: &arbor_format::index::LayerIndex,
    fetch_unit: u64,
) -> Arc<LayerHandle> {
    let src: Arc<dyn BlobSource> = Arc::new(StoreSource::new(store.clone(), &Limits::new(8)));
    Arc::new(LayerHandle::new(
        &d.digest,
        d.size,
        Arc::new(idx.clone()),
        vec![src],
        fetch_unit,
    ))
}

pub fn mount(
    rt: &tokio::runtime::Runtime,
    h: Arc<LayerHandle>,
    f: &Arc<Fetcher>,
    dir: &Path,
) -> Mounted {
    mount_layer(
        h,
        Arc::clone(f),
        rt.handle().clone(),
        dir,
        &MountOptions::default(),
    )
    .unwrap()
}

/// A one-layer image converted into `reg`, its layer's handle over a fresh fetcher (1 GiB
/// cache), and an empty directory to mount it at.
pub struct OneLayer {
    pub handle: Arc<LayerHandle>,
    pub fetcher: Arc<Fetcher>,
    pub dir: tempfile::TempDir,
    _cache: tempfile::TempDir,
}

pub fn one_layer(
    rt: &tokio::runtime::Runtime,
    reg: &Registry,
    spec: &ImageSpec,
    repo: &str,
) -> OneLayer {
    let r = converted(rt, reg, spec, repo);
    let c = client(2);
    let s = store(&r, &c);
    let ls = layers(rt, &s);
    let cache = tempfile::tempdir().unwrap();
    let (fetcher, _) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
    OneLayer {
        handle: handle(&s, &ls[0].0, &ls[0].1, 1 << 20),
        fetcher,
        dir: tempfile::tempdir().unwrap(),
        _cache: cache,
    }
}
