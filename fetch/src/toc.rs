//! Reading a layer's TOC from wherever the blob lives, with one or two Range requests: the
//! layer annotations locate it (and give its digest), or else the footer does.

use arbor_format::footer::{SKIPPABLE_HEADER_LEN, TAIL_LEN, TocPosition};
use arbor_format::index::{LayerIndex, Limits, TocLocator, decode_toc, locate_toc};
use arbor_oci::Store;
use arbor_oci::manifest::Descriptor;

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

/// Reads and validates the TOC of layer `l` stored in `store`.
pub async fn read_layer_toc(
    store: &Store,
    l: &Descriptor,
) -> Result<(LayerIndex, TocPosition), TocError> {
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
    let bytes = store.blob_range(&l.digest, pos.offset, pos.length).await?;
    let digest = locator.digest.clone();
    let index = tokio::task::spawn_blocking(move || -> Result<LayerIndex, TocError> {
        let toc = decode_toc(&bytes, &pos, digest.as_ref(), &limits)?;
        Ok(LayerIndex::from_toc(
            toc,
            pos.offset - SKIPPABLE_HEADER_LEN,
        )?)
    })
    .await
    .map_err(|e| TocError::Internal(e.to_string()))??;
    Ok((index, pos))
}
