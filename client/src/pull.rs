//! `arbor pull`: puts an image into containerd through its API, with the remote-snapshot
//! labels `ctr image pull` does not pass, so the `arbor` snapshotter mounts converted layers
//! lazily instead of containerd downloading them.
//!
//! Like containerd's own pull, under a lease: the config and manifest go into the content
//! store with their garbage-collection labels, each layer is prepared with
//! `containerd.io/snapshot.ref` (its chain ID) and the layer's `containerd.io/snapshot/*`
//! annotations plus Arbor's layer-digest and image-ref labels, and the image record is created
//! last. A layer the snapshotter does not mount lazily (not converted, or its lazy mount
//! failed) is downloaded into the content store, verified, applied by containerd's diff
//! service and committed, exactly as containerd's unpacker would: the digest of what was
//! applied must be the config's diff ID, or the pull fails and the snapshot is removed (a
//! config that lies about diff IDs would otherwise poison the chain ID for every image).
//!
//! The layer-digest and image-ref labels name what arbord fetches with the node's
//! credentials, so arbord trusts them only with `containerd.io/snapshot/arbor.pull-mac`, an
//! HMAC under arbord's key `<root>/pull.key` (root only; the root is `$ARBORD_ROOT`, else
//! the `root` the snapshotter's proxy plugin exports, else `/var/lib/arbor`). Without the
//! key, layers are unpacked by containerd instead.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Context as _, Error, Result, Rpc as _};
use arbor_convert::image;
use arbor_oci::Store;
use arbor_oci::manifest::Descriptor;
use arbor_proto::containerd::services::content::v1::content_client::ContentClient;
use arbor_proto::containerd::services::content::v1::{
    Info as ContentInfo, InfoRequest, UpdateRequest as ContentUpdate, WriteAction,
    WriteContentRequest,
};
use arbor_proto::containerd::services::diff::v1::ApplyRequest;
use arbor_proto::containerd::services::diff::v1::diff_client::DiffClient;
use arbor_proto::containerd::services::images::v1::images_client::ImagesClient;
use arbor_proto::containerd::services::images::v1::{
    CreateImageRequest, GetImageRequest, Image, UpdateImageRequest,
};
use arbor_proto::containerd::services::leases::v1::leases_client::LeasesClient;
use arbor_proto::containerd::services::leases::v1::{
    CreateRequest as LeaseCreate, DeleteRequest as LeaseDelete,
};
use arbor_proto::snapshots::snapshots_client::SnapshotsClient;
use arbor_proto::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use arbor_proto::types::Descriptor as CtdDescriptor;
use arbor_snapshotter::labels as snaplabels;
pub use arbor_snapshotter::labels::is_function_name;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Request};
use tracing::{Instrument, info, info_span};

/// Where containerd is and how to pull into it.
#[derive(Debug, Clone)]
pub struct Target {
    pub address: std::path::PathBuf,
    pub namespace: String,
    pub snapshotter: String,
}

/// What happened to one layer.
#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub digest: String,
    pub chain_id: String,
    /// `lazy` (mounted by the snapshotter), `unpacked` (downloaded and applied) or `present`.
    pub how: &'static str,
    pub bytes_downloaded: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct PullReport {
    pub image: String,
    pub manifest_digest: String,
    pub snapshotter: String,
    pub layers: Vec<LayerReport>,
    /// Where arbord's start-up set for this image came from: `node` (learned or received
    /// before), `registry <artifact digest>`, `none`, or why one was not used.
    pub startup_set: String,
    pub seconds: f64,
}

/// A gRPC request in containerd's namespace (and lease).
pub(crate) fn req<T>(t: &Target, lease: Option<&str>, m: T) -> Result<Request<T>> {
    let mut r = Request::new(m);
    r.metadata_mut().insert(
        "containerd-namespace",
        t.namespace.parse().map_err(|_| {
            Error::Invalid(format!(
                "namespace {:?} is not a valid header value",
                t.namespace
            ))
        })?,
    );
    if let Some(l) = lease {
        r.metadata_mut()
            .insert("containerd-lease", l.parse().ctx("lease id")?);
    }
    Ok(r)
}

pub async fn connect(t: &Target) -> Result<Channel> {
    arbor_proto::connect(&t.address)
        .await
        .map_err(|cause| Error::Connect {
            address: t.address.display().to_string(),
            cause,
        })
}

/// Chain IDs of a layer stack, from its diff IDs (OCI image spec).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

fn ctd_desc(d: &Descriptor) -> CtdDescriptor {
    CtdDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size as i64,
        annotations: d
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Writes `data` into the content store under `digest` (no-op if present).
async fn write_content(
    ch: &Channel,
    t: &Target,
    lease: &str,
    digest: &str,
    data: Vec<u8>,
    labels: HashMap<String, String>,
) -> Result<()> {
    let total = data.len() as i64;
    let labels2 = labels.clone();
    let r#ref = format!("arbor-pull-{digest}");
    let msgs = vec![
        WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: r#ref.clone(),
            total,
            expected: digest.into(),
            ..Default::default()
        },
        WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref,
            total,
            expected: digest.into(),
            offset: 0,
            data,
            labels,
        },
    ];
    drain_write(ch, t, lease, tokio_stream::iter(msgs)).await?;
    // The blob may have been there already (an image sharing it, an earlier pull), without
    // these labels: set them, as containerd's own pull does.
    let mut c = ContentClient::new(ch.clone());
    c.update(req(
        t,
        Some(lease),
        ContentUpdate {
            update_mask: Some(prost_types::FieldMask {
                paths: labels2.keys().map(|k| format!("labels.{k}")).collect(),
            }),
            info: Some(ContentInfo {
                digest: digest.to_string(),
                labels: labels2,
                ..Default::default()
            }),
        },
    )?)
    .await
    .rpc(format!("labelling {digest}"))?;
    Ok(())
}

async fn drain_write(
    ch: &Channel,
    t: &Target,
    lease: &str,
    msgs: impl tokio_stream::Stream<Item = WriteContentRequest> + Send + 'static,
) -> Result<()> {
    let mut c = ContentClient::new(ch.clone());
    match c.write(req(t, Some(lease), msgs)?).await {
        Ok(resp) => {
            let mut s = resp.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(e) if e.code() == Code::AlreadyExists => return Ok(()),
                    Err(e) => return Err(e).rpc("writing content"),
                }
            }
        }
        Err(e) if e.code() == Code::AlreadyExists => Ok(()),
        Err(e) => Err(e).rpc("writing content"),
    }
}

/// Streams a layer blob from the store into containerd's content store (digest-verified on
/// both sides). Returns the bytes written.
async fn fetch_blob_into_content(
    ch: &Channel,
    t: &Target,
    lease: &str,
    store: &Store,
    d: &Descriptor,
) -> Result<u64> {
    let mut cc = ContentClient::new(ch.clone());
    if cc
        .info(req(
            t,
            Some(lease),
            InfoRequest {
                digest: d.digest.clone(),
            },
        )?)
        .await
        .is_ok()
    {
        return Ok(0);
    }
    let mut reader = store
        .blob_reader(&d.digest, Some(d.size))
        .await
        .ctx(format!("downloading layer {}", d.digest))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
    let (digest, size) = (d.digest.clone(), d.size as i64);
    let r#ref = format!("arbor-pull-{}", d.digest);
    let producer = tokio::task::spawn_blocking(move || -> Result<u64> {
        use std::io::Read;
        let stat = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: r#ref.clone(),
            total: size,
            expected: digest.clone(),
            ..Default::default()
        };
        tx.blocking_send(stat).ok();
        let mut off = 0i64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).ctx("reading the layer blob")?;
            if n == 0 {
                break;
            }
            let m = WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: r#ref.clone(),
                total: size,
                expected: digest.clone(),
                offset: off,
                data: buf[..n].to_vec(),
                ..Default::default()
            };
            off += n as i64;
            if tx.blocking_send(m).is_err() {
                return Err(Error::Invalid("containerd closed the content write".into()));
            }
        }
        // The reader verified the digest before reporting end-of-file.
        let commit = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref,
            total: size,
            expected: digest,
            offset: off,
            ..Default::default()
        };
        tx.blocking_send(commit).ok();
        Ok(off as u64)
    });
    let written = drain_write(
        ch,
        t,
        lease,
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )
    .await;
    let n = producer.await.ctx("download thread")??;
    written?;
    Ok(n)
}

/// Whether containerd has an image record named `name`.
pub async fn has_image(t: &Target, name: &str) -> Result<bool> {
    let ch = connect(t).await?;
    let mut ic = ImagesClient::new(ch);
    match ic
        .get(req(t, None, GetImageRequest { name: name.into() })?)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Code::NotFound => Ok(false),
        Err(e) => Err(e).rpc("asking containerd for the image"),
    }
}

/// The pull key of the arbord behind `t.snapshotter`, from its root: `$ARBORD_ROOT`, else
/// what containerd's introspection service says of the snapshotter's proxy plugin — the
/// `root` it exports (containerd 1.7+ with Arbor's snippets), or the root of the arbord
/// listening on the `address` it exports (1.6) — else `/var/lib/arbor`. `None` (with a
/// note) when the key cannot be read: arbord then unpacks converted layers instead of
/// mounting them.
async fn pull_key(ch: &Channel, t: &Target) -> Option<Vec<u8>> {
    let root = match std::env::var_os("ARBORD_ROOT") {
        Some(r) => std::path::PathBuf::from(r),
        None => {
            let exports = arbor_snapshotter::introspect::snapshotter_exports(
                ch,
                &t.namespace,
                &t.snapshotter,
            )
            .await
            .inspect_err(|e| tracing::debug!(error = %e, "containerd's introspection service"))
            .unwrap_or_default();
            let by_root = exports
                .get("root")
                .filter(|r| !r.is_empty())
                .map(std::path::PathBuf::from);
            let by_socket = || {
                exports.get("address").and_then(|a| {
                    arbor_snapshotter::introspect::root_of_socket(std::path::Path::new(a))
                })
            };
            by_root
                .or_else(by_socket)
                .unwrap_or_else(|| "/var/lib/arbor".into())
        }
    };
    match snaplabels::read_pull_key(&root) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(
                root = %root.display(),
                error = %e,
                "cannot read arbord's pull key (run as root on arbord's node, or set ARBORD_ROOT to arbord's root): converted layers will be downloaded, not mounted lazily"
            );
            None
        }
    }
}

/// The labels a layer is prepared with: the image's own snapshot annotations (the TOC
/// location), but never labels that name where to fetch from, which are ours (with the MAC
/// when arbord's key is readable) or CRI's.
fn layer_labels(
    l: &Descriptor,
    name: &str,
    manifest: &str,
    chain: &str,
    function: Option<&str>,
    pull_key: Option<&[u8]>,
) -> HashMap<String, String> {
    let mut labels: HashMap<String, String> = l
        .annotations
        .iter()
        .filter(|(k, _)| {
            k.starts_with(arbor_format::SNAPSHOT_LABEL_PREFIX)
                && !k.starts_with("containerd.io/snapshot/cri.")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(snaplabels::TARGET.into(), chain.to_string());
    labels.insert(snaplabels::ARBOR_LAYER_DIGEST.into(), l.digest.clone());
    labels.insert(snaplabels::ARBOR_IMAGE_REF.into(), name.to_string());
    labels.insert(snaplabels::ARBOR_MANIFEST.into(), manifest.to_string());
    // The function is the puller's to name, never the image's.
    labels.remove(snaplabels::ARBOR_FUNCTION);
    if let Some(f) = function {
        labels.insert(snaplabels::ARBOR_FUNCTION.into(), f.to_string());
    }
    labels.remove(snaplabels::PULL_MAC);
    if let Some(k) = pull_key {
        labels.insert(
            snaplabels::PULL_MAC.into(),
            snaplabels::pull_mac(k, &l.digest, name, chain),
        );
    }
    labels
}

/// A connection to the arbord behind `t.snapshotter` (the `address` its proxy plugin
/// exports): for Arbor's own service on it (`arbor.v1.Starts`).
pub async fn arbord(t: &Target) -> Result<Channel> {
    let ch = connect(t).await?;
    arbord_direct(&ch, t).await.ok_or_else(|| {
        Error::Invalid(format!(
            "containerd's snapshotter {:?} exports no reachable arbord address (is it arbord, and is this root?)",
            t.snapshotter
        ))
    })
}

/// The start-up set (JSON) the arbord behind `t.snapshotter` holds for image manifest
/// `manifest`, if any.
pub async fn arbord_startup_set(t: &Target, manifest: &str) -> Result<Option<Vec<u8>>> {
    let ch = arbord(t).await?;
    let r = arbor_proto::arbor::starts_client::StartsClient::new(ch)
        .get_startup_set(arbor_proto::arbor::GetStartupSetRequest {
            manifest: manifest.to_string(),
        })
        .await
        .rpc("asking arbord for the start-up set")?
        .into_inner();
    Ok((!r.set.is_empty()).then_some(r.set))
}

/// A connection to the arbord behind `t.snapshotter` itself (the `address` its proxy plugin
/// exports), for what containerd cannot be asked: its metadata store merges a namespace's own
/// labels (which an image's annotations can set) over arbord's. `None` when not reachable.
async fn arbord_direct(ch: &Channel, t: &Target) -> Option<Channel> {
    let exports =
        arbor_snapshotter::introspect::snapshotter_exports(ch, &t.namespace, &t.snapshotter)
            .await
            .ok()?;
    let address = exports.get("address").filter(|a| !a.is_empty())?;
    match arbor_proto::connect(address).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::debug!(address, error = %e, "cannot reach arbord directly");
            None
        }
    }
}

/// Before this image reuses a chain ID its namespace already has: containerd answers that
/// from its own records, without asking arbord whether the snapshot there is a lazy layer of
/// *another* blob that is not proved yet (which would make this image run that blob's files).
/// So a layer arbord mounted lazily (committed under the chain ID itself) is prepared again
/// against arbord directly, which applies its sharing rule (`arbor_snapshotter` `share`):
/// `AlreadyExists` at once for the same blob or a proved layer; for another blob, once the
/// holder is proved; a liar is replaced by this layer; an error when there is no verdict.
async fn check_shared(
    direct: &Channel,
    chain: &str,
    l: &Descriptor,
    labels: HashMap<String, String>,
) -> Result<()> {
    let mut sc = SnapshotsClient::new(direct.clone());
    let mut stat = tonic::Request::new(StatSnapshotRequest {
        snapshotter: String::new(),
        key: chain.to_string(),
    });
    // The record as it is (its parent, in arbord's names): the Prepare below is what waits
    // for a proof and replaces a liar.
    stat.metadata_mut().insert(
        arbor_snapshotter::service::RAW_STAT_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    let info = match sc.stat(stat).await {
        Ok(r) => r.into_inner().info.unwrap_or_default(),
        // Not a layer arbord mounted lazily: containerd unpacked it and checked its diff ID.
        Err(e) if e.code() == Code::NotFound => return Ok(()),
        Err(e) => return Err(e).rpc("asking arbord about the snapshot"),
    };
    tracing::debug!(chain, layer = %l.digest, "asking arbord whether this image may share the chain ID");
    let key = format!("arbor-pull-check-{}-{}", std::process::id(), now_nanos());
    let prepared = sc
        .prepare(PrepareSnapshotRequest {
            snapshotter: String::new(),
            key: key.clone(),
            parent: info.parent.clone(),
            labels,
        })
        .await;
    match prepared {
        Err(e) if e.code() == Code::AlreadyExists => Ok(()),
        Err(e) => Err(Error::Refused(e.message().to_string())),
        Ok(_) => {
            // An ordinary snapshot: the holder was removed as a liar and this layer could not
            // be mounted lazily in its place. Undo it; the chain ID is free for a new pull.
            let _ = sc
                .remove(RemoveSnapshotRequest {
                    snapshotter: String::new(),
                    key,
                })
                .await;
            Err(Error::Refused(
                "the layer under this chain ID was proved to lie and removed; pull again".into(),
            ))
        }
    }
}

/// Longest `arbor pull` looks for a start-up set in the registry: it is a hint, and the
/// pull goes on without it.
pub const SET_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes sure arbord holds the start-up set of `manifest` before its layers are mounted:
/// the one it learned or received before, else the newest one attached to the image in its
/// registry (an OCI artifact, see `arbor_oci::referrers`), which arbord checks and keeps.
/// Never fails the pull: returns what happened, for the report.
async fn startup_set(store: &Store, manifest: &str, direct: &Channel) -> String {
    use arbor_format::startup::{ARTIFACT_TYPE, MAX_DOCUMENT, MEDIA_TYPE};
    use arbor_proto::arbor::starts_client::StartsClient;
    let mut sc = StartsClient::new(direct.clone());
    match sc
        .get_startup_set(arbor_proto::arbor::GetStartupSetRequest {
            manifest: manifest.to_string(),
        })
        .await
    {
        Ok(r) if !r.get_ref().set.is_empty() => return "node".into(),
        Ok(_) => {}
        // An arbord without the Starts service (older): nothing to give it.
        Err(e) => return format!("none (arbord: {})", e.message()),
    }
    let found = tokio::time::timeout(
        SET_LOOKUP_TIMEOUT,
        arbor_oci::referrers::newest_artifact_blob(
            store,
            manifest,
            ARTIFACT_TYPE,
            MEDIA_TYPE,
            MAX_DOCUMENT as u64,
        ),
    )
    .await;
    let (artifact, set) = match found {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return "none".into(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "looking for a start-up set in the registry");
            return format!("none (registry: {e})");
        }
        Err(_) => return "none (registry lookup timed out)".into(),
    };
    match sc
        .put_startup_set(arbor_proto::arbor::PutStartupSetRequest {
            set: set.to_vec(),
            source: format!("registry artifact {artifact}"),
        })
        .await
    {
        Ok(r) if r.get_ref().manifest == manifest => format!("registry {artifact}"),
        Ok(r) => {
            // arbord keeps it under the manifest it names, where this image never looks.
            format!(
                "ignored (learned on another image, {})",
                r.get_ref().manifest
            )
        }
        Err(e) => {
            tracing::warn!(artifact, reason = %e.message(), "the registry's start-up set was refused");
            format!("ignored ({})", e.message())
        }
    }
}

fn now_nanos() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// This machine's architecture in OCI's terms (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `linux/<this machine's architecture>`: the platform pulled when none is named.
pub fn default_platform() -> String {
    format!("linux/{}", host_arch())
}

/// Pulls `name` (read from `store`) into containerd.
pub async fn pull(
    store: &Store,
    name: &str,
    platforms: &[String],
    t: &Target,
) -> Result<PullReport> {
    pull_with(store, name, platforms, t, &PullOptions::default()).await
}

/// How [`pull_with`] pulls.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Give arbord the image's start-up set (its own, or the registry's) so that its layers
    /// fetch it first (`arbor pull --no-startup-set` turns it off).
    pub startup_set: bool,
    /// The function the image is pulled for (`arbor pull --function`): arbord reads and serves
    /// its lazy layers in that function's tree (`containerd.io/snapshot/arbor.function`).
    /// `None`: the image's own tree (its manifest).
    pub function: Option<String>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            startup_set: true,
            function: None,
        }
    }
}

/// [`pull`] with options.
pub async fn pull_with(
    store: &Store,
    name: &str,
    platforms: &[String],
    t: &Target,
    opts: &PullOptions,
) -> Result<PullReport> {
    let started = Instant::now();
    let platforms = if platforms.is_empty() {
        vec![default_platform()]
    } else {
        platforms.to_vec()
    };
    let resolved = image::resolve(store, &platforms)
        .await
        .ctx(format!("resolving {name}"))?;
    let Some(img) = resolved.images.first() else {
        return Err(Error::NoPlatform {
            image: name.to_string(),
            platforms: platforms.join(", "),
        });
    };
    let m = &img.manifest;
    let config = store
        .blob_bytes(
            &m.config.digest,
            arbor_oci::manifest::MAX_CONFIG_OR_MANIFEST,
        )
        .await
        .ctx("reading the image config")?;
    let config_json: serde_json::Value =
        serde_json::from_slice(&config).ctx("parsing the image config")?;
    let diff_ids = image::diff_ids(&config_json).ctx("reading the config's diff IDs")?;
    if diff_ids.len() != m.layers.len() {
        return Err(Error::Invalid(format!(
            "the config lists {} diff_ids for {} layers",
            diff_ids.len(),
            m.layers.len()
        )));
    }
    let chains = chain_ids(&diff_ids);

    let ch = connect(t).await?;
    let lease_id = format!(
        "arbor-pull-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let expire = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let mut lc = LeasesClient::new(ch.clone());
    lc.create(req(
        t,
        None,
        LeaseCreate {
            id: lease_id.clone(),
            labels: [(
                "containerd.io/gc.expire".to_string(),
                expire
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            )]
            .into(),
        },
    )?)
    .await
    .rpc("creating a lease")?;

    // The start-up set is looked up beside the pull, not before it: a set that arrives after
    // a layer was mounted is applied to the mounted layer at once (arbord's `apply_set`).
    let set_lookup = async {
        if !opts.startup_set {
            return "none (not asked for)".to_string();
        }
        match arbord_direct(&ch, t).await {
            Some(direct) => startup_set(store, &img.digest, &direct).await,
            None => "none (arbord not reachable directly)".to_string(),
        }
    };
    let layers = pull_under_lease(
        store,
        name,
        img,
        &config,
        &diff_ids,
        &chains,
        t,
        &ch,
        &lease_id,
        opts.function.as_deref(),
    )
    .instrument(info_span!("pull", image = name));
    let (startup_set, result) = tokio::join!(set_lookup, layers);
    let _ = lc
        .delete(req(
            t,
            None,
            LeaseDelete {
                id: lease_id,
                sync: false,
            },
        )?)
        .await;
    let layers = result?;
    Ok(PullReport {
        image: name.to_string(),
        manifest_digest: img.digest.clone(),
        snapshotter: t.snapshotter.clone(),
        layers,
        startup_set,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn pull_under_lease(
    store: &Store,
    name: &str,
    img: &image::PlatformImage,
    config: &[u8],
    diff_ids: &[String],
    chains: &[String],
    t: &Target,
    ch: &Channel,
    lease: &str,
    function: Option<&str>,
) -> Result<Vec<LayerReport>> {
    let m = &img.manifest;
    let pull_key = pull_key(ch, t).await;
    let arbord = arbord_direct(ch, t).await;
    let top = chains.last().cloned().unwrap_or_default();
    // The config keeps the unpacked snapshots alive; the manifest keeps config and layers.
    write_content(
        ch,
        t,
        lease,
        &m.config.digest,
        config.to_vec(),
        [(
            format!("containerd.io/gc.ref.snapshot.{}", t.snapshotter),
            top,
        )]
        .into(),
    )
    .await
    .ctx("storing the config")?;
    let mut labels: HashMap<String, String> = [(
        "containerd.io/gc.ref.content.config".to_string(),
        m.config.digest.clone(),
    )]
    .into();
    for (i, l) in m.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.clone(),
        );
    }
    write_content(ch, t, lease, &img.digest, img.bytes.to_vec(), labels)
        .await
        .ctx("storing the manifest")?;

    let mut sc = SnapshotsClient::new(ch.clone());
    let mut reports = Vec::new();
    for (i, l) in m.layers.iter().enumerate() {
        let t0 = Instant::now();
        let chain = &chains[i];
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let stat = sc
            .stat(req(
                t,
                Some(lease),
                StatSnapshotRequest {
                    snapshotter: t.snapshotter.clone(),
                    key: chain.clone(),
                },
            )?)
            .await;
        if stat.is_ok() {
            if let Some(direct) = &arbord {
                let labels =
                    layer_labels(l, name, &img.digest, chain, function, pull_key.as_deref());
                check_shared(direct, chain, l, labels)
                    .await
                    .map_err(|e| e.in_layer(i, &l.digest))?;
            }
            reports.push(LayerReport {
                digest: l.digest.clone(),
                chain_id: chain.clone(),
                how: "present",
                bytes_downloaded: 0,
                seconds: t0.elapsed().as_secs_f64(),
            });
            continue;
        }
        let labels = layer_labels(l, name, &img.digest, chain, function, pull_key.as_deref());
        let key = format!("extract-{}-{} {chain}", std::process::id(), now_nanos());
        let prepared = sc
            .prepare(req(
                t,
                Some(lease),
                PrepareSnapshotRequest {
                    snapshotter: t.snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels,
                },
            )?)
            .await;
        let mounts = match prepared {
            Err(e) if e.code() == Code::AlreadyExists => {
                info!(layer = %l.digest, chain = %chain, "mounted lazily");
                reports.push(LayerReport {
                    digest: l.digest.clone(),
                    chain_id: chain.clone(),
                    how: "lazy",
                    bytes_downloaded: 0,
                    seconds: t0.elapsed().as_secs_f64(),
                });
                continue;
            }
            Err(e) => {
                return Err(e)
                    .rpc("preparing the snapshot")
                    .map_err(|e| e.in_layer(i, &l.digest));
            }
            Ok(r) => r.into_inner().mounts,
        };
        // Not mounted lazily: download, apply, commit, like containerd's unpacker.
        let unpacked = async {
            let n = fetch_blob_into_content(ch, t, lease, store, l).await?;
            let mut dc = DiffClient::new(ch.clone());
            let applied = dc
                .apply(req(
                    t,
                    Some(lease),
                    ApplyRequest {
                        diff: Some(ctd_desc(l)),
                        mounts,
                        ..Default::default()
                    },
                )?)
                .await
                .rpc("applying the layer")?
                .into_inner()
                .applied;
            // As containerd's unpacker: what was extracted must hash to the config's diff
            // ID, or the chain ID (which later images reuse) would name other content.
            let got = applied.map(|d| d.digest).unwrap_or_default();
            if got != diff_ids[i] {
                return Err(Error::WrongDiffId {
                    index: i,
                    digest: l.digest.clone(),
                    want: diff_ids[i].clone(),
                    got: if got.is_empty() {
                        "unreported".into()
                    } else {
                        got
                    },
                });
            }
            sc.clone()
                .commit(req(
                    t,
                    Some(lease),
                    CommitSnapshotRequest {
                        snapshotter: t.snapshotter.clone(),
                        name: chain.clone(),
                        key: key.clone(),
                        ..Default::default()
                    },
                )?)
                .await
                .rpc("committing the snapshot")?;
            Ok::<u64, Error>(n)
        }
        .await;
        match unpacked {
            Ok(n) => {
                info!(layer = %l.digest, chain = %chain, bytes = n, "unpacked");
                reports.push(LayerReport {
                    digest: l.digest.clone(),
                    chain_id: chain.clone(),
                    how: "unpacked",
                    bytes_downloaded: n,
                    seconds: t0.elapsed().as_secs_f64(),
                });
            }
            Err(e) => {
                let _ = sc
                    .remove(req(
                        t,
                        Some(lease),
                        RemoveSnapshotRequest {
                            snapshotter: t.snapshotter.clone(),
                            key,
                        },
                    )?)
                    .await;
                return Err(e.in_layer(i, &l.digest));
            }
        }
    }

    let record = Image {
        name: name.to_string(),
        labels: HashMap::new(),
        target: Some(CtdDescriptor {
            media_type: img.media_type.clone(),
            digest: img.digest.clone(),
            size: img.bytes.len() as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let mut ic = ImagesClient::new(ch.clone());
    let created = ic
        .create(req(
            t,
            Some(lease),
            CreateImageRequest {
                image: Some(record.clone()),
                source_date_epoch: None,
            },
        )?)
        .await;
    match created {
        Ok(_) => {}
        Err(e) if e.code() == Code::AlreadyExists => {
            ic.update(req(
                t,
                Some(lease),
                UpdateImageRequest {
                    image: Some(record),
                    update_mask: None,
                    source_date_epoch: None,
                },
            )?)
            .await
            .rpc("updating the image record")?;
        }
        Err(e) => return Err(e).rpc("creating the image record"),
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want = hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()));
        assert_eq!(c[1], format!("sha256:{want}"));
        assert!(chain_ids(&[]).is_empty());
    }
}
