//! Proving lazily mounted layers in the background.
//!
//! A lazy layer is committed under the chain ID containerd computed from the image config's
//! diff IDs, and it is served from its TOC. Neither is proved by the Prepare: a config can lie
//! about a diff ID (and so claim another image's chain ID, which containerd then reuses for
//! that image), and a TOC can lie about the tar it describes (modes, owners, xattrs, devices,
//! link targets reach containers from the TOC alone). So once a layer is mounted, arbord reads
//! the whole blob once, at the lowest CPU priority, after the start-up delay of the background
//! prefetch and only while no workload reads (paced like the background prefetch), and proves it with [`arbor_convert::verify::verify_layer`]:
//!
//! - the blob hashes to the layer digest it was fetched as;
//! - its tar stream hashes to a diff ID that, over the parent's chain ID, gives the chain ID
//!   the snapshot is committed under;
//! - every tar header and every chunk of content agrees with the TOC.
//!
//! A proved layer gets the label [`VERIFIED`]` = true` (kept across restarts, so it is proved
//! once). A layer that lies is taken out of service at once: poisoned (its filesystem answers
//! EIO to every lookup, stat and read, and the kernel drops what it cached of it, so
//! containers already running on it stop reading it), unmounted, its
//! `fs` directory replaced by an empty file so that no overlay can stack it again, labelled
//! `false` so a restart does not mount it again, logged as an error and counted. Transient failures (registry gone) are
//! retried a few times, then counted and left unproved.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arbor_convert::verify::{LayerProof, chain_id, verify_layer};
use tracing::{Instrument, error, info, info_span, warn};

use super::{Snapshotter, blocking};
use crate::error::{Error, Result};
use crate::meta::RemoteLayer;

pub use crate::labels::VERIFIED;

/// Attempts at reading a layer through before giving up on proving it.
const ATTEMPTS: u32 = 3;

/// What a verification ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Outcome {
    Proved,
    Lied,
    Failed,
}

impl Outcome {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Proved => "proved",
            Outcome::Lied => "lied",
            Outcome::Failed => "failed",
        }
    }
}

/// The chain ID of the layers below a snapshot whose parent is named `parent`: committed
/// names are the chain ID itself (lazy layers, committed by arbord under containerd's target)
/// or containerd's backend key `<namespace>/<n>/<chain ID>`.
fn parent_chain(parent: &str) -> Option<&str> {
    if parent.is_empty() {
        return None;
    }
    Some(parent.rsplit('/').next().unwrap_or(parent))
}

/// Why `proof` does not prove a layer fetched as `digest` and committed as `chain` over
/// `parent`; `None` when it does.
fn lie(proof: &LayerProof, digest: &str, chain: &str, parent: &str) -> Option<String> {
    if proof.compressed_digest != digest {
        return Some(format!(
            "the blob hashes to {}, not to the layer digest {digest}",
            proof.compressed_digest
        ));
    }
    let computed = chain_id(parent_chain(parent), &proof.diff_id);
    if computed != chain {
        return Some(format!(
            "its tar has diff ID {}, so chain ID {computed}, but it was committed as {chain} \
             (the image config lies about the layer's diff ID)",
            proof.diff_id
        ));
    }
    if !proof.differences.is_empty() {
        return Some(format!(
            "its TOC disagrees with its tar: {}",
            proof.differences.join("; ")
        ));
    }
    None
}

/// A running proof of one snapshot, which Prepares of other images can wait on.
#[derive(Default)]
pub(crate) struct Proof {
    hurry: AtomicBool,
    hurried: tokio::sync::Notify,
    done: tokio::sync::watch::Sender<Option<Outcome>>,
}

impl Proof {
    /// Starts the proof now and reads at full speed: an image is waiting on it.
    pub(crate) fn hurry(&self) {
        if !self.hurry.swap(true, Ordering::AcqRel) {
            info!("an image waits to share this layer: proving it now, at full speed");
        }
        self.hurried.notify_one();
    }

    fn is_hurried(&self) -> bool {
        self.hurry.load(Ordering::Acquire)
    }

    /// Waits until the proof ends; returns how.
    pub(crate) async fn finished(&self) -> Outcome {
        let mut rx = self.done.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(o) => o.unwrap_or(Outcome::Failed),
            // The sender lives as long as `self`.
            Err(_) => Outcome::Failed,
        }
    }
}

/// A blob reader that waits, before each read, until the node's fetcher is quiet (no reads a
/// workload waits for, see [`arbor_fetch::Fetcher::is_quiet`]): the proof reads whole layers
/// and must never compete with a cold start for the link or the CPU. The registry's stream is
/// held back by TCP flow control meanwhile.
/// Once hurried (an image waits on the proof), it reads at full speed.
struct Paced<R> {
    inner: R,
    fetcher: Arc<arbor_fetch::Fetcher>,
    state: Arc<Proof>,
}

impl<R: std::io::Read> std::io::Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while !self.state.is_hurried() && !self.fetcher.is_quiet() {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.inner.read(buf)
    }
}

/// Takes a lying layer's directory out of service: whatever is mounted there is detached and
/// the directory becomes an empty file, which overlayfs refuses as a lower directory.
fn poison(fs: &Path) -> std::io::Result<()> {
    if fs.is_dir() {
        std::fs::remove_dir(fs)?;
    }
    let f = std::fs::File::create(fs)?;
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o000))
}

impl Snapshotter {
    /// Starts proving the lazy snapshot committed as `name`, unless it is proved already.
    pub(crate) async fn verify_committed(self: &Arc<Self>, name: &str) {
        let meta = Arc::clone(&self.meta);
        let n = name.to_string();
        match blocking(move || meta.get(&n)).await {
            Ok(Some(rec)) if !rec.labels.contains_key(VERIFIED) => {
                if let Some(layer) = rec.remote.clone() {
                    self.spawn_verification(name.to_string(), rec.id, rec.parent, layer);
                }
            }
            Ok(_) => {}
            Err(e) => warn!(snapshot = name, error = %e, "cannot read the record to prove"),
        }
    }

    /// Proves the lazily mounted snapshot `name` (id `id`, over `parent`) in the background,
    /// unless a proof of it is running already. The proof waits for the start-up delay and
    /// for quiet, unless [`Proof::hurry`] is called (another image waits to share the layer).
    pub(crate) fn spawn_verification(
        self: &Arc<Self>,
        name: String,
        id: u64,
        parent: String,
        layer: RemoteLayer,
    ) {
        if !self.remote.options().verify_layers {
            return;
        }
        let proof = {
            let mut running = self.proofs.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(&name) {
                return;
            }
            let proof = Arc::new(Proof::default());
            running.insert(name.clone(), Arc::clone(&proof));
            proof
        };
        let me = Arc::clone(self);
        let span = info_span!("verify", snapshot = %name, layer = %layer.digest);
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(me.remote.options().prefetch_opts.rest_delay) => {}
                    _ = proof.hurried.notified() => {}
                }
                let outcome = me.verify(&name, id, &parent, &layer, &proof).await;
                me.counters.verification(outcome);
                let mut running = me.proofs.lock().unwrap_or_else(|p| p.into_inner());
                if running.get(&name).is_some_and(|p| Arc::ptr_eq(p, &proof)) {
                    running.remove(&name);
                }
                drop(running);
                proof.done.send_replace(Some(outcome));
            }
            .instrument(span),
        );
    }

    async fn verify(
        &self,
        name: &str,
        id: u64,
        parent: &str,
        layer: &RemoteLayer,
        state: &Arc<Proof>,
    ) -> Outcome {
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self.prove(layer, state).await {
                Ok(proof) => match lie(&proof, &layer.digest, name, parent) {
                    None => {
                        let meta = Arc::clone(&self.meta);
                        let n = name.to_string();
                        let r = blocking(move || {
                            meta.update_labels(&n, |l| {
                                l.insert(VERIFIED.into(), "true".into());
                            })
                        })
                        .await;
                        if let Err(e) = r {
                            warn!(error = %e, "recording the proof failed (the snapshot is gone?)");
                        }
                        info!(
                            diff_id = %proof.diff_id,
                            entries = proof.entries,
                            bytes = proof.compressed_size,
                            "lazy layer proved: blob digest, diff ID (chain ID) and TOC agree"
                        );
                        return Outcome::Proved;
                    }
                    Some(why) => {
                        error!(
                            image = %layer.image_ref,
                            reason = %why,
                            "LAZY LAYER LIED: taking it out of service (unmounted; containers \
                             cannot start on it; remove the image)"
                        );
                        self.take_out_of_service(name, id).await;
                        return Outcome::Lied;
                    }
                },
                Err(e) => {
                    last = e.to_string();
                    warn!(attempt, error = %e, "reading the layer to prove it failed");
                    tokio::time::sleep(Duration::from_secs(5 * u64::from(attempt))).await;
                }
            }
        }
        warn!(error = %last, "the layer stays unproved: it could not be read through");
        Outcome::Failed
    }

    /// Streams the layer's blob and compares it with its TOC (on a low-priority blocking
    /// thread).
    async fn prove(&self, layer: &RemoteLayer, state: &Arc<Proof>) -> Result<LayerProof> {
        let index = self.remote.stored_index(layer).await?;
        // A layer served in a function tree is read through the tree (its blocks proved one
        // by one on the way), so the proof costs the registry nothing more than the root's copy.
        let tree = self.remote.trees().and_then(|t| t.source_of(&layer.digest));
        let reader: Box<dyn std::io::Read + Send> = match tree {
            Some(source) => Box::new(arbor_fetch::source::SourceReader::new(
                source,
                &layer.digest,
                layer.blob_size,
                4 << 20,
                tokio::runtime::Handle::current(),
            )),
            None => {
                let (store, _) = self.remote.store(&layer.image_ref)?;
                Box::new(
                    store
                        .blob_reader(&layer.digest, Some(layer.blob_size))
                        .await
                        .map_err(|e| Error::Internal(format!("reading {}: {e}", layer.digest)))?,
                )
            }
        };
        let paced = Paced {
            inner: reader,
            fetcher: Arc::clone(self.remote.fetcher()),
            state: Arc::clone(state),
        };
        tokio::task::spawn_blocking(move || {
            let _niced = arbor_fetch::nice::Niced::lower(19);
            verify_layer(paced, &index)
        })
        .await
        .map_err(|e| Error::Internal(format!("verification thread: {e}")))?
        .map_err(|e| Error::Internal(format!("reading {} through: {e}", layer.digest)))
    }

    async fn take_out_of_service(&self, name: &str, id: u64) {
        let (remote, meta, fs, n) = (
            Arc::clone(&self.remote),
            Arc::clone(&self.meta),
            Self::dir(&self.root, id).join("fs"),
            name.to_string(),
        );
        let r = blocking(move || {
            remote.poison_and_unmount(id);
            poison(&fs).map_err(Error::io(format!("replacing {}", fs.display())))?;
            meta.update_labels(&n, |l| {
                l.insert(VERIFIED.into(), "false".into());
            })?;
            Ok(())
        })
        .await;
        if let Err(e) = r {
            error!(error = %e, "taking the lying layer out of service failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const B: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    fn proof() -> LayerProof {
        LayerProof {
            compressed_digest: B.into(),
            diff_id: D.into(),
            compressed_size: 1,
            entries: 1,
            differences: Vec::new(),
        }
    }

    #[test]
    fn parent_chain_from_either_kind_of_name() {
        assert_eq!(parent_chain(""), None);
        assert_eq!(parent_chain(P), Some(P));
        assert_eq!(parent_chain(&format!("default/7/{P}")), Some(P));
    }

    #[test]
    fn an_honest_layer_over_either_kind_of_parent_is_proved() {
        let chain = chain_id(Some(P), D);
        assert_eq!(lie(&proof(), B, &chain, P), None);
        assert_eq!(lie(&proof(), B, &chain, &format!("ns/3/{P}")), None);
        assert_eq!(lie(&proof(), B, D, ""), None);
    }

    #[test]
    fn lying_diff_id_blob_or_toc_is_named() {
        let chain = chain_id(Some(P), D);
        // Committed under a chain ID its tar does not give (the config lied).
        let why = lie(&proof(), B, &chain_id(Some(P), B), P).unwrap();
        assert!(why.contains("lies about the layer's diff ID"), "{why}");
        // Bottom layer claiming another diff ID.
        assert!(lie(&proof(), B, P, "").is_some());
        // Another blob than the one named.
        let why = lie(&proof(), D, &chain, P).unwrap();
        assert!(why.contains("not to the layer digest"), "{why}");
        // A TOC that disagrees with its tar.
        let mut p = proof();
        p.differences.push("etc/conf: mode".into());
        let why = lie(&p, B, &chain, P).unwrap();
        assert!(why.contains("TOC disagrees"), "{why}");
    }

    #[test]
    fn poisoned_directory_cannot_be_a_lower_dir() {
        let t = tempfile::tempdir().unwrap();
        let fs = t.path().join("fs");
        std::fs::create_dir(&fs).unwrap();
        poison(&fs).unwrap();
        assert!(fs.is_file() && !fs.is_dir());
        poison(&fs).unwrap(); // idempotent
    }
}
