//! Reading a layer's TOC from wherever the blob lives, with one or two Range requests: the
//! layer annotations locate it (and give its digest), or else the footer does. The compressed
//! TOC bytes are returned too, so a daemon can keep them and mount the layer again later
//! without the registry ([`index_from_stored`]).

use arbor_format::Digest;
use arbor_format::footer::{TAIL_LEN, TocPosition};
use arbor_format::index::{LayerIndex, Limits, TocLocator, data_end_of, decode_toc, locate_toc};
use arbor_oci::Store;
use arbor_oci::manifest::Descriptor;
use bytes::Bytes;
use tokio::sync::Semaphore;

/// TOC decodes running at once in this process. Each may take up to ~1 GiB at worst with the
/// default [`Limits`] (see there), so a burst of hostile layers mounted together cannot add
/// up; real TOCs decode in milliseconds, so two at a time costs a burst of mounts little.
pub const MAX_CONCURRENT_TOC_DECODES: usize = 2;

static TOC_DECODES: Semaphore = Semaphore::const_new(MAX_CONCURRENT_TOC_DECODES);

/// Why a layer's TOC could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error(transparent)]
    Oci(#[from] arbor_oci::Error),
    #[error(transparent)]
    Format(#[from] arbor_format::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A layer's TOC as read from its blob: the validated index, where the TOC sits, its
/// compressed bytes and the digest they were checked against (when the annotations gave one).
pub struct FetchedToc {
    pub index: LayerIndex,
    pub position: TocPosition,
    pub compressed: Bytes,
    pub digest: Option<Digest>,
}

/// Reads and validates the TOC of layer `l` stored in `store`.
pub async fn read_layer_toc(
    store: &Store,
    l: &Descriptor,
) -> Result<(LayerIndex, TocPosition), TocError> {
    let t = fetch_layer_toc(store, l).await?;
    Ok((t.index, t.position))
}

/// Like [`read_layer_toc`], keeping the compressed TOC bytes.
pub async fn fetch_layer_toc(store: &Store, l: &Descriptor) -> Result<FetchedToc, TocError> {
    fetch_layer_toc_with(store, l, &Limits::default()).await
}

/// Like [`fetch_layer_toc`], within `limits` instead of the defaults.
pub async fn fetch_layer_toc_with(
    store: &Store,
    l: &Descriptor,
    limits: &Limits,
) -> Result<FetchedToc, TocError> {
    let locator = match locate_toc(&l.annotations)? {
        Some(loc) => loc,
        None => {
            let tail_len = (TAIL_LEN as u64).min(l.size);
            let tail = store
                .blob_range(&l.digest, l.size - tail_len, tail_len)
                .await?;
            TocLocator {
                position: TocPosition::decode_footer(&tail, l.size)?,
                digest: None,
            }
        }
    };
    let pos = locator.position;
    check_position(&pos, l.size, limits)?;
    let compressed = store.blob_range(&l.digest, pos.offset, pos.length).await?;
    let digest = locator.digest;
    let index = index_from_stored_with(compressed.clone(), pos, digest.clone(), limits).await?;
    Ok(FetchedToc {
        index,
        position: pos,
        compressed,
        digest,
    })
}

/// Whether a TOC at `pos` may be read from a blob of `blob_size` bytes: inside the blob and
/// within `limits` (checked before any byte is asked for, from any source).
pub fn check_position(pos: &TocPosition, blob_size: u64, limits: &Limits) -> Result<(), TocError> {
    pos.check_within(blob_size)?;
    if pos.length > limits.max_toc_compressed {
        return Err(arbor_format::Error::TocTooLarge {
            what: "compressed TOC",
            size: pos.length,
            limit: limits.max_toc_compressed,
        }
        .into());
    }
    Ok(())
}

/// Decodes and validates compressed TOC bytes kept from an earlier [`fetch_layer_toc`]
/// (on a blocking thread: decompression and hashing).
pub async fn index_from_stored(
    compressed: Bytes,
    pos: TocPosition,
    digest: Option<Digest>,
) -> Result<LayerIndex, TocError> {
    index_from_stored_with(compressed, pos, digest, &Limits::default()).await
}

/// Like [`index_from_stored`], within `limits`. At most [`MAX_CONCURRENT_TOC_DECODES`] run at
/// once in the process; the others wait their turn.
pub async fn index_from_stored_with(
    compressed: Bytes,
    pos: TocPosition,
    digest: Option<Digest>,
    limits: &Limits,
) -> Result<LayerIndex, TocError> {
    // Positions kept from earlier (or given by a caller) are checked again: an offset below
    // the skippable frame header would otherwise wrap the data region's end.
    let data_end = data_end_of(&pos)?;
    let limits = *limits;
    let _permit = TOC_DECODES
        .acquire()
        .await
        .map_err(|e| TocError::Internal(e.to_string()))?;
    tokio::task::spawn_blocking(move || -> Result<LayerIndex, TocError> {
        let toc = decode_toc(&compressed, &pos, digest.as_ref(), &limits)?;
        Ok(LayerIndex::from_toc(toc, data_end)?)
    })
    .await
    .map_err(|e| TocError::Internal(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zstd frame holding `data` in one raw (stored) block (fetch does not link a zstd
    /// encoder; any decoder reads this).
    fn zstd_raw(data: &[u8]) -> Vec<u8> {
        assert!(data.len() < 128 << 10);
        let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0xA0];
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let block = 1u32 | ((data.len() as u32) << 3);
        f.extend_from_slice(&block.to_le_bytes()[..3]);
        f.extend_from_slice(data);
        f
    }

    fn position(offset: u64, compressed: &[u8], uncompressed: u64) -> TocPosition {
        TocPosition {
            offset,
            length: compressed.len() as u64,
            uncompressed_length: uncompressed,
            toc_type: 1,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn toc_offset_below_8_is_an_error() {
        let json = br#"{"version":1,"entries":[]}"#;
        let c = Bytes::from(zstd_raw(json));
        for offset in 0..8 {
            let pos = position(offset, &c, json.len() as u64);
            match index_from_stored(c.clone(), pos, None).await {
                Err(TocError::Format(e)) => {
                    assert!(e.to_string().contains("frame header"), "{e}")
                }
                Err(e) => panic!("offset {offset}: unexpected error {e}"),
                Ok(_) => panic!("offset {offset}: accepted"),
            }
        }
        let pos = position(8, &c, json.len() as u64);
        let index = index_from_stored(c, pos, None).await.unwrap();
        assert_eq!(index.data_end, 0);
    }

    #[tokio::test]
    async fn toc_decodes_are_bounded_and_limits_apply() {
        let mut json = br#"{"version":1,"entries":["#.to_vec();
        json.extend(
            vec![r#"{"type":"dir","name":"a"}"#; 20]
                .join(",")
                .as_bytes(),
        );
        json.extend_from_slice(b"]}");
        let c = Bytes::from(zstd_raw(&json));
        let pos = position(100, &c, json.len() as u64);
        let limits = Limits {
            max_entries: 10,
            ..Limits::default()
        };
        let Err(e) = index_from_stored_with(c.clone(), pos, None, &limits).await else {
            panic!("20 entries accepted with a limit of 10");
        };
        assert!(e.to_string().contains("more than 10 entries"), "{e}");
        // Many decodes at once all finish (the semaphore queues them) and give permits back.
        let tasks: Vec<_> = (0..8)
            .map(|_| tokio::spawn(index_from_stored(c.clone(), pos, None)))
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().entries.len(), 20);
        }
        // Other tests of this process decode TOCs at the same time (the semaphore is global):
        // every permit must come back, not necessarily at this instant.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while TOC_DECODES.available_permits() != MAX_CONCURRENT_TOC_DECODES {
            assert!(
                std::time::Instant::now() < deadline,
                "TOC decode permits not given back: {} of {}",
                TOC_DECODES.available_permits(),
                MAX_CONCURRENT_TOC_DECODES
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
