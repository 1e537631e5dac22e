//! Shared helpers of the FUSE tests: images converted into a real registry, layer mounts
//! through the library, and models of directory trees as the kernel shows them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
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
use arbor_testkit::{ImageSpec, Registry, skopeo_push, write_oci_layout};
use sha2::Digest as _;

pub fn skip(test: &str) -> bool {
    arbor_testkit::skip_unless_root(test)
        || arbor_testkit::skip_unless_tools(test, &["docker-registry", "skopeo", "fusermount3"])
        || {
            let missing = !Path::new("/dev/fuse").exists();
            if missing {
                eprintln!("skipped: {test}: /dev/fuse is missing");
            }
            missing
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

/// What `lstat`, `readlink`, `read` and `getxattr` show of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub rdev: u64,
    pub content: Option<String>,
    pub link: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

pub fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid path, name and buffer.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), v);
        }
    }
    out
}

pub fn meta(p: &Path, with_content: bool) -> Meta {
    let m = std::fs::symlink_metadata(p).unwrap();
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        'f'
    };
    let content = (kind == 'f' && with_content).then(|| {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        hex::encode(sha2::Sha256::digest(&data))
    });
    Meta {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        size: if kind == 'd' { 0 } else { m.size() },
        rdev: m.rdev(),
        content,
        link: (kind == 'l').then(|| {
            std::fs::read_link(p)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        }),
        xattrs: xattrs(p),
    }
}

/// Every path below `root` (relative) with its [`Meta`].
pub fn walk(root: &Path, with_content: bool) -> BTreeMap<String, Meta> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = meta(&root.join(&r), with_content);
            if m.kind == 'd' {
                stack.push(r.clone());
            }
            out.insert(r.to_string_lossy().into_owned(), m);
        }
    }
    out
}

pub fn sha(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}
