//! Reading a layer's TOC from wherever the blob lives, with one or two Range requests: the
//! layer annotations locate it (and give its digest), or else the footer does. The compressed
//! TOC bytes are returned too, so a daemon can keep them and mount the layer again later
//! without the registry ([`index_from_stored`]).

use arbor_format::Digest;
use arbor_format::footer::{SKIPPABLE_HEADER_LEN, TAIL_LEN, TocPosition};
use arbor_format::index::{LayerIndex, Limits, TocLocator, decode_toc, locate_toc};
use arbor_oci::Store;
use arbor_oci::manifest::Descriptor;
use bytes::Bytes;

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
    pos.check_within(l.size)?;
    let limits = Limits::default();
    if pos.length > limits.max_toc_compressed {
        return Err(arbor_format::Error::TocTooLarge {
            what: "compressed TOC",
            size: pos.length,
            limit: limits.max_toc_compressed,
        }
        .into());
    }
    let compressed = store.blob_range(&l.digest, pos.offset, pos.length).await?;
    let digest = locator.digest;
    let index = index_from_stored(compressed.clone(), pos, digest.clone()).await?;
    Ok(FetchedToc {
        index,
        position: pos,
        compressed,
        digest,
    })
}

/// Decodes and validates compressed TOC bytes kept from an earlier [`fetch_layer_toc`]
/// (on a blocking thread: decompression and hashing).
pub async fn index_from_stored(
    compressed: Bytes,
    pos: TocPosition,
    digest: Option<Digest>,
) -> Result<LayerIndex, TocError> {
    tokio::task::spawn_blocking(move || -> Result<LayerIndex, TocError> {
        let limits = Limits::default();
        let toc = decode_toc(&compressed, &pos, digest.as_ref(), &limits)?;
        Ok(LayerIndex::from_toc(
            toc,
            pos.offset - SKIPPABLE_HEADER_LEN,
        )?)
    })
    .await
    .map_err(|e| TocError::Internal(e.to_string()))?
}
