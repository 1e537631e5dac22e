//! Whether a layer one image prepares may reuse the committed snapshot another image left
//! under the same chain ID.
//!
//! containerd reuses a committed chain ID for every later image that computes the same one
//! from its config's diff IDs. For a layer containerd unpacked itself that is sound: its
//! differ checked the diff ID. A lazily mounted layer was not unpacked, so until its
//! background proof ends (see `verify`), the chain ID it sits under is only its image's
//! claim. So when a Prepare targets a chain ID that is already committed:
//!
//! - a snapshot containerd unpacked, one proved (`arbor.verified=true`), or one fetched as the
//!   very blob this Prepare names (same layer digest: the same bytes, which the same proof
//!   covers) is shared at once (`AlreadyExists`);
//! - a lazy snapshot of a *different* blob that is not proved yet is not shared until it is:
//!   the Prepare hurries its proof (now, at full speed) and waits for it, up to
//!   `fetch.proof_wait_secs`; proved, it is shared; a liar is replaced (below); no verdict in
//!   time is an `Unavailable` error, never a fallback that would commit over it;
//! - a snapshot proved to lie (`arbor.verified=false`) is removed (it is out of service
//!   already) and the layer is prepared afresh under the chain ID, unless containers still
//!   stand on it (then `FailedPrecondition`, naming the image to remove).
//!
//! This works on what reaches arbord. containerd's metadata store answers a `Stat` of a
//! chain ID from its own records when the namespace already has one, so a second image in the
//! *same* containerd namespace skips the Prepare and shares the chain during the proof window;
//! `docs/architecture.md` ("Chain IDs and what a lazy layer proves") says what closes that.

use std::sync::Arc;

use tracing::{info, warn};

use super::verify::Outcome;
use super::{Snapshotter, blocking};
use crate::error::{Error, Result};
use crate::labels::VERIFIED;
use crate::meta::{Kind, Record};

/// Verdicts before a layer is declared unprovable here (a failed proof is retried once).
const PROOF_ROUNDS: usize = 2;

/// How long after an unproved lazy snapshot is committed (or handed to an image fetching the
/// same blob) a `Stat` of it is answered at once: the unpacker that made it `Stat`s it right
/// after the `AlreadyExists`. Later `Stat`s wait for the proof (see
/// [`Snapshotter::settle_stat`]).
pub(crate) const STAT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What to do with the committed snapshot `existing` that a new Prepare's target names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sharing {
    /// Reuse it (`AlreadyExists`).
    Share,
    /// Wait for its proof, then decide again.
    AwaitProof,
    /// It lied: remove it and prepare the layer afresh.
    Replace,
    /// It lied, and this Prepare names the very blob that lied: refuse.
    Refuse,
}

/// The rule (module docs): `claim` is the layer digest the new Prepare fetches, when known;
/// `proving` whether arbord proves lazy layers at all (`fetch.verify_layers`).
pub(crate) fn sharing(existing: &Record, claim: Option<&str>, proving: bool) -> Sharing {
    let Some(layer) = &existing.remote else {
        // Unpacked by containerd, whose differ checked the diff ID.
        return Sharing::Share;
    };
    match existing.labels.get(VERIFIED).map(String::as_str) {
        Some("true") => Sharing::Share,
        Some(_) if claim == Some(layer.digest.as_str()) => Sharing::Refuse,
        Some(_) => Sharing::Replace,
        None if claim == Some(layer.digest.as_str()) || !proving => Sharing::Share,
        None => Sharing::AwaitProof,
    }
}

impl Snapshotter {
    /// Settles a Prepare whose target chain ID `target` may be committed already, for a layer
    /// fetched as `claim`: `Ok(true)` to answer `AlreadyExists` (share it), `Ok(false)` to
    /// prepare the layer (nothing there, or a liar removed).
    pub(crate) async fn settle_existing(
        self: &Arc<Self>,
        target: &str,
        claim: Option<&str>,
    ) -> Result<bool> {
        let proving = self.remote.options().verify_layers;
        for _ in 0..=PROOF_ROUNDS {
            let Some(existing) = self.record(target).await? else {
                return Ok(false);
            };
            if existing.kind != Kind::Committed {
                return Ok(false);
            }
            match sharing(&existing, claim, proving) {
                Sharing::Share => {
                    if existing.remote.is_some() && !existing.labels.contains_key(VERIFIED) {
                        // The same blob: its unpacker `Stat`s the chain ID next.
                        self.grant_stat_grace(target);
                    }
                    return Ok(true);
                }
                Sharing::Replace => {
                    self.replace_liar(target, &existing).await?;
                    return Ok(false);
                }
                Sharing::Refuse => {
                    return Err(Error::FailedPrecondition(format!(
                        "layer {} was proved to lie about its content (see arbord's log); \
                         it is not mounted again: remove the image",
                        claim.unwrap_or_default()
                    )));
                }
                Sharing::AwaitProof => self.await_proof(target, &existing, claim).await?,
            }
        }
        Err(self.unproved(
            target,
            None,
            claim,
            "no verdict: it could not be read through",
        ))
    }

    /// Lets `Stat`s of `name` through for [`STAT_GRACE`] without waiting for its proof.
    pub(crate) fn grant_stat_grace(&self, name: &str) {
        let mut g = self.graces.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        g.retain(|_, until| *until > now);
        g.insert(name.to_string(), now + STAT_GRACE);
    }

    /// What a `Stat` of `rec` (named `name`) answers. containerd answers a `Stat` of a chain
    /// ID its namespace already has from its own records and then asks arbord for that
    /// snapshot's info; in one namespace (CRI's `k8s.io`) that is all a later image's
    /// unpacker does before reusing the chain ID, no Prepare reaches arbord. So past its grace,
    /// a `Stat` of a lazy layer not proved yet hurries the proof and answers with its verdict:
    /// the info once proved, `FailedPrecondition` naming a liar, `Unavailable` without a
    /// verdict (the registry unreachable: fail closed).
    pub(crate) async fn settle_stat(self: &Arc<Self>, name: &str, rec: Record) -> Result<Record> {
        let unproved = |r: &Record| {
            r.kind == Kind::Committed && r.remote.is_some() && !r.labels.contains_key(VERIFIED)
        };
        let in_grace = || {
            self.graces
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .is_some_and(|until| *until > std::time::Instant::now())
        };
        if !unproved(&rec) || !self.remote.options().verify_layers || in_grace() {
            return Ok(rec);
        }
        let mut rec = rec;
        for round in 0..=PROOF_ROUNDS {
            match rec.labels.get(VERIFIED).map(String::as_str) {
                Some("true") => return Ok(rec),
                Some(_) => {
                    let image = rec.remote.as_ref().map(|l| l.image_ref.as_str());
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {name} is a lazily mounted layer of {} that was proved to \
                         lie about its content (see arbord's log): no image may use it; \
                         remove that image",
                        image.unwrap_or("an image")
                    )));
                }
                None if round == PROOF_ROUNDS => break,
                None => self.await_proof(name, &rec, None).await?,
            }
            rec = self
                .record(name)
                .await?
                .ok_or_else(|| Error::NotFound(name.to_string()))?;
        }
        Err(self.unproved(
            name,
            rec.remote.as_ref(),
            None,
            "no verdict: it could not be read through (registry unreachable?)",
        ))
    }

    async fn record(&self, name: &str) -> Result<Option<Record>> {
        let (meta, n) = (Arc::clone(&self.meta), name.to_string());
        blocking(move || meta.get(&n)).await
    }

    /// Hurries the proof of `target` (starting one if none runs) and waits for its verdict.
    async fn await_proof(
        self: &Arc<Self>,
        target: &str,
        existing: &Record,
        claim: Option<&str>,
    ) -> Result<()> {
        let Some(layer) = existing.remote.clone() else {
            return Ok(());
        };
        let running = || {
            self.proofs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(target)
                .cloned()
        };
        let proof = match running() {
            Some(p) => p,
            None => {
                self.spawn_verification(
                    target.to_string(),
                    existing.id,
                    existing.parent.clone(),
                    layer.clone(),
                );
                match running() {
                    Some(p) => p,
                    // Finished in between (the record says how) or not proving at all.
                    None => return Ok(()),
                }
            }
        };
        info!(
            target,
            held_by = %layer.digest,
            image = %layer.image_ref,
            claim = claim.unwrap_or("unknown"),
            "a lazy layer not proved yet is asked for past its grace (another image's Prepare or a later Stat): waiting for its proof before sharing it"
        );
        proof.hurry();
        let wait = self.remote.options().proof_wait;
        match tokio::time::timeout(wait, proof.finished()).await {
            Ok(Outcome::Proved | Outcome::Lied | Outcome::Failed) => Ok(()),
            Err(_) => Err(self.unproved(
                target,
                Some(&layer),
                claim,
                &format!("its proof did not end within {wait:?} (fetch.proof_wait_secs)"),
            )),
        }
    }

    fn unproved(
        &self,
        target: &str,
        held_by: Option<&crate::meta::RemoteLayer>,
        claim: Option<&str>,
        why: &str,
    ) -> Error {
        let holder = held_by.map_or_else(String::new, |l| {
            format!(" (layer {} of {})", l.digest, l.image_ref)
        });
        warn!(target, claim, why, "not sharing an unproved lazy layer");
        Error::Unavailable(format!(
            "chain ID {target} is held by a lazily mounted layer{holder} that is not proved \
             yet, and this request (layer {}) may be another image's: not sharing it before \
             it is proved; {why}; retry later",
            claim.unwrap_or("unknown")
        ))
    }

    /// Removes the record and directory of a snapshot proved to lie, so that the chain ID
    /// can be prepared afresh; refused while snapshots stand on it.
    async fn replace_liar(&self, target: &str, liar: &Record) -> Result<()> {
        let (meta, root, remote, n, id) = (
            Arc::clone(&self.meta),
            self.root.clone(),
            Arc::clone(&self.remote),
            target.to_string(),
            liar.id,
        );
        let image = liar
            .remote
            .as_ref()
            .map_or_else(String::new, |l| l.image_ref.clone());
        let removed = blocking(move || {
            meta.remove(&n)?;
            remote.unmount(id);
            let dir = Self::dir(&root, id);
            if let Err(e) = super::remove_snapshot_dir(&dir) {
                warn!(dir = %dir.display(), error = %e, "removing the lying layer's directory failed (Cleanup retries)");
            }
            Ok(())
        })
        .await;
        match removed {
            Ok(()) => {
                info!(target, liar = %image, "removed a layer proved to lie; preparing the chain ID afresh");
                Ok(())
            }
            Err(Error::FailedPrecondition(e)) => Err(Error::FailedPrecondition(format!(
                "chain ID {target} is held by a layer of {image} that was proved to lie, and \
                 snapshots still stand on it ({e}): remove that image's containers and the image"
            ))),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::meta::RemoteLayer;

    const HELD: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const OTHER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn rec(remote: bool, verified: Option<&str>) -> Record {
        let mut labels = BTreeMap::new();
        if let Some(v) = verified {
            labels.insert(VERIFIED.to_string(), v.to_string());
        }
        Record {
            id: 1,
            kind: Kind::Committed,
            parent: String::new(),
            labels,
            created: 0,
            updated: 0,
            usage: None,
            remote: remote.then(|| RemoteLayer {
                image_ref: "r.example/attacker:1".into(),
                digest: HELD.into(),
                blob_size: 1,
                toc_position: String::new(),
                toc_digest: None,
                manifest: None,
                function: None,
            }),
        }
    }

    #[test]
    fn an_unproved_lazy_layer_of_another_blob_is_not_shared_before_its_proof() {
        assert_eq!(
            sharing(&rec(true, None), Some(OTHER), true),
            Sharing::AwaitProof
        );
        assert_eq!(sharing(&rec(true, None), None, true), Sharing::AwaitProof);
    }

    #[test]
    fn the_same_blob_a_proved_layer_or_an_unpacked_one_is_shared() {
        assert_eq!(sharing(&rec(true, None), Some(HELD), true), Sharing::Share);
        assert_eq!(
            sharing(&rec(true, Some("true")), Some(OTHER), true),
            Sharing::Share
        );
        assert_eq!(
            sharing(&rec(false, None), Some(OTHER), true),
            Sharing::Share
        );
    }

    #[test]
    fn a_liar_is_replaced_by_another_blob_and_never_mounted_again() {
        for claim in [Some(OTHER), None] {
            assert_eq!(
                sharing(&rec(true, Some("false")), claim, true),
                Sharing::Replace
            );
        }
        assert_eq!(
            sharing(&rec(true, Some("false")), Some(HELD), true),
            Sharing::Refuse
        );
    }

    #[test]
    fn without_proofs_nothing_waits() {
        assert_eq!(
            sharing(&rec(true, None), Some(OTHER), false),
            Sharing::Share
        );
    }
}
