//! Snapshot metadata in an embedded transactional store (redb): one record per snapshot key,
//! written in one transaction per operation, so a crash leaves every snapshot either fully
//! recorded or absent. Records are JSON (readable with any redb tool, and forward-compatible:
//! unknown fields are ignored).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use tracing::warn;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next-id";

/// The kind of a snapshot, as containerd names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// Disk usage of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// Where a lazily mounted layer's bytes come from and where its TOC is; everything needed to
/// mount it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// Image reference the layer was pulled with (registry and repository to fetch from).
    pub image_ref: String,
    /// Digest of the layer blob.
    pub digest: String,
    /// Size of the layer blob.
    pub blob_size: u64,
    /// The TOC position, in the `containerd.io/snapshot/arbor.toc-position` annotation syntax.
    pub toc_position: String,
    /// The TOC's digest, when the layer annotations gave one.
    pub toc_digest: Option<String>,
    /// The image manifest it was pulled with, when the labels named one (selects the learned
    /// start-up set to fetch first; a hint, never trusted for content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The function the layer was prepared for (`containerd.io/snapshot/arbor.function`):
    /// names the function tree the node reads and serves it in (else the manifest does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory: `<root>/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    /// Key of the parent ("" for none).
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: i64,
    pub updated: i64,
    /// Fixed at commit (computed live for active snapshots).
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Set for lazily mounted layers.
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
}

pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The metadata store.
pub struct Meta {
    db: Database,
    /// Keys whose record could not be decoded: skipped by listings (logged once each), so
    /// one bad record never stops the daemon or hides the others.
    unreadable: Mutex<BTreeSet<String>>,
}

fn encode(r: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(r).map_err(|e| Error::Internal(format!("encoding a record: {e}")))
}

/// The record of `key` in `t`, or NotFound.
fn existing(t: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Record> {
    match t.get(key)? {
        Some(v) => decode(key, v.value()),
        None => Err(Error::NotFound(key.into())),
    }
}

fn decode(key: &str, b: &[u8]) -> Result<Record> {
    serde_json::from_slice(b)
        .map_err(|e| Error::Store(format!("record of {key:?} is unreadable: {e}")))
}

impl Meta {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Meta> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Meta {
            db,
            unreadable: Mutex::new(BTreeSet::new()),
        })
    }

    /// Keys whose records could not be decoded so far.
    pub fn unreadable(&self) -> Vec<String> {
        self.unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn skip(&self, key: &str, e: &Error) {
        let new = self
            .unreadable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        if new {
            warn!(key, error = %e, "skipping an unreadable snapshot record");
        }
    }

    /// Writes raw bytes as the record of `key` (tests of damaged stores).
    #[doc(hidden)]
    pub fn put_raw(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(SNAPSHOTS)?.insert(key, bytes)?;
        tx.commit()?;
        Ok(())
    }

    /// Reserves a fresh snapshot id (ids are never reused).
    pub fn next_id(&self) -> Result<u64> {
        let tx = self.db.begin_write()?;
        let id = {
            let mut t = tx.open_table(COUNTERS)?;
            let id = t.get(NEXT_ID)?.map_or(1, |v| v.value());
            t.insert(NEXT_ID, id + 1)?;
            id
        };
        tx.commit()?;
        Ok(id)
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        match t.get(key)? {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    /// Every snapshot, by key; records that cannot be decoded are skipped (and counted in
    /// [`Meta::unreadable`]).
    pub fn list(&self) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            match decode(k.value(), v.value()) {
                Ok(r) => out.push((k.value().to_string(), r)),
                Err(e) => self.skip(k.value(), &e),
            }
        }
        Ok(out)
    }

    /// Records a new snapshot `key` with the reserved `id`. The parent must exist and be
    /// committed.
    pub fn create(&self, key: &str, rec: &Record) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key is empty".into()));
        }
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(SNAPSHOTS)?;
            if t.get(key)?.is_some() {
                return Err(Error::AlreadyExists(key.into()));
            }
            if !rec.parent.is_empty() {
                let p = t
                    .get(rec.parent.as_str())?
                    .ok_or_else(|| Error::NotFound(rec.parent.clone()))?;
                let p = decode(&rec.parent, p.value())?;
                if p.kind != Kind::Committed {
                    return Err(Error::FailedPrecondition(format!(
                        "parent {:?} is not committed",
                        rec.parent
                    )));
                }
            }
            t.insert(key, encode(rec)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Turns active snapshot `key` into committed snapshot `name`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<Record> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("commit name is empty".into()));
        }
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let mut rec = existing(&t, key)?;
            if rec.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            if t.get(name)?.is_some() {
                return Err(Error::AlreadyExists(name.into()));
            }
            t.remove(key)?;
            rec.kind = Kind::Committed;
            rec.labels = labels;
            rec.updated = now_nanos();
            rec.usage = Some(usage);
            t.insert(name, encode(&rec)?.as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Removes `key`, which must have no children.
    pub fn remove(&self, key: &str) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let rec = existing(&t, key)?;
            for item in t.iter()? {
                let (k, v) = item?;
                let child = match decode(k.value(), v.value()) {
                    Ok(c) => c,
                    Err(e) => {
                        self.skip(k.value(), &e);
                        continue;
                    }
                };
                if child.parent == key {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot remove snapshot {key:?}: {:?} is its child",
                        k.value()
                    )));
                }
            }
            t.remove(key)?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Replaces the labels of `key` with `f(labels)`.
    pub fn update_labels(
        &self,
        key: &str,
        f: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let mut rec = existing(&t, key)?;
            f(&mut rec.labels);
            rec.updated = now_nanos();
            t.insert(key, encode(&rec)?.as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// The ancestors of a snapshot whose parent is `parent`, nearest first.
    pub fn ancestors(&self, parent: &str) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out: Vec<(String, Record)> = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            if out.len() > 4096 || out.iter().any(|(k, _)| *k == next) {
                return Err(Error::Store(format!("parent chain of {parent:?} loops")));
            }
            let rec = match t.get(next.as_str())? {
                Some(v) => decode(&next, v.value())?,
                None => return Err(Error::NotFound(next)),
            };
            let p = rec.parent.clone();
            out.push((next, rec));
            next = p;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(meta: &Meta, kind: Kind, parent: &str) -> Record {
        Record {
            id: meta.next_id().unwrap(),
            kind,
            parent: parent.into(),
            labels: BTreeMap::new(),
            created: now_nanos(),
            updated: now_nanos(),
            usage: None,
            remote: None,
        }
    }

    /// One record that cannot be decoded (a bug, a downgrade, bit rot) must not make the
    /// listing (and so arbord's start-up restore) fail, nor hide the other records.
    #[test]
    fn corrupt_metadata_record_does_not_stop_arbord() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("m.redb")).unwrap();
        m.create("good", &rec(&m, Kind::Committed, "")).unwrap();
        m.put_raw("bad", b"{not json").unwrap();
        m.put_raw("worse", &[0xff, 0x00, 0x13]).unwrap();
        let all = m.list().unwrap();
        assert_eq!(
            all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["good"]
        );
        assert_eq!(m.unreadable(), ["bad", "worse"]);
        // Listing again does not count them twice; removing others still works.
        m.list().unwrap();
        assert_eq!(m.unreadable().len(), 2);
        m.remove("good").unwrap();
        assert!(matches!(m.get("bad"), Err(Error::Store(_))));
    }

    #[test]
    fn lifecycle_and_rules() {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("m.redb")).unwrap();
        let a = rec(&m, Kind::Active, "");
        m.create("a", &a).unwrap();
        assert!(matches!(m.create("a", &a), Err(Error::AlreadyExists(_))));
        // A child of an active snapshot is refused; of a missing one too.
        assert!(matches!(
            m.create("b", &rec(&m, Kind::Active, "a")),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.create("b", &rec(&m, Kind::Active, "nope")),
            Err(Error::NotFound(_))
        ));
        let c = m
            .commit("l1", "a", BTreeMap::new(), Usage::default())
            .unwrap();
        assert_eq!(c.kind, Kind::Committed);
        assert!(m.get("a").unwrap().is_none());
        assert!(matches!(
            m.commit("l1", "a", BTreeMap::new(), Usage::default()),
            Err(Error::NotFound(_))
        ));
        m.create("b", &rec(&m, Kind::Active, "l1")).unwrap();
        assert!(matches!(m.remove("l1"), Err(Error::FailedPrecondition(_))));
        assert_eq!(m.ancestors("l1").unwrap().len(), 1);
        m.remove("b").unwrap();
        m.remove("l1").unwrap();
        assert!(m.list().unwrap().is_empty());
        // Ids are never reused, even across reopen.
        let last = m.next_id().unwrap();
        drop(m);
        let m = Meta::open(&dir.path().join("m.redb")).unwrap();
        assert!(m.next_id().unwrap() > last);
    }
}
