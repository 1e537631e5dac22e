//! Skippable frames and the footer that locates the TOC, in both generations.
//!
//! The footer is the payload of the blob's last zstd skippable frame:
//! - 64 bytes (containers/storage >= 1.46, and Arbor): TOC offset, compressed length,
//!   uncompressed length, TOC type (1), tar-split offset, compressed and uncompressed length
//!   (zeros when there is none), then the magic `GNUlInUx`; all integers u64 little endian.
//! - 40 bytes (older writers such as skopeo 1.9): the first four fields, then the magic.

use crate::error::{Error, Result};

/// Magic of the first skippable frame variant (`0x184D2A50`), little endian.
pub const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
/// Length of a skippable frame header (magic + u32 length).
pub const SKIPPABLE_HEADER_LEN: u64 = 8;
/// The magic that ends a zstd:chunked footer.
pub const FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";
/// Length of the current footer payload.
pub const FOOTER_LEN: usize = 64;
/// Length of the old footer payload.
pub const FOOTER_LEN_OLD: usize = 40;
/// `manifestType` of a zstd:chunked TOC.
pub const TOC_TYPE_CHUNKED: u64 = 1;
/// Bytes at the blob's end a reader needs to find the footer (frame header + longest footer).
pub const TAIL_LEN: usize = SKIPPABLE_HEADER_LEN as usize + FOOTER_LEN;

/// Where the TOC (and the optional tar-split) lies in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TocPosition {
    /// Offset of the compressed TOC bytes (just after their skippable frame header).
    pub offset: u64,
    pub length: u64,
    pub uncompressed_length: u64,
    pub toc_type: u64,
    pub tar_split_offset: u64,
    pub tar_split_length: u64,
    pub tar_split_uncompressed_length: u64,
}

impl TocPosition {
    /// The `offset:length:uncompressedLength:type` annotation value.
    pub fn annotation(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.offset, self.length, self.uncompressed_length, self.toc_type
        )
    }

    /// Parses an annotation value written by [`TocPosition::annotation`] or containers/storage.
    pub fn parse_annotation(key: &str, value: &str) -> Result<TocPosition> {
        let bad = |reason| Error::Annotation {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        let parts: Vec<&str> = value.split(':').collect();
        if parts.len() != 4 {
            return Err(bad("expected offset:length:uncompressedLength:type"));
        }
        let mut nums = [0u64; 4];
        for (n, p) in nums.iter_mut().zip(&parts) {
            *n = p.parse().map_err(|_| bad("not a number"))?;
        }
        let pos = TocPosition {
            offset: nums[0],
            length: nums[1],
            uncompressed_length: nums[2],
            toc_type: nums[3],
            ..Default::default()
        };
        if pos.toc_type != TOC_TYPE_CHUNKED {
            return Err(bad("unsupported TOC type"));
        }
        Ok(pos)
    }

    /// The footer payload (64 bytes).
    pub fn encode_footer(&self) -> [u8; FOOTER_LEN] {
        let mut out = [0u8; FOOTER_LEN];
        let fields = [
            self.offset,
            self.length,
            self.uncompressed_length,
            self.toc_type,
            self.tar_split_offset,
            self.tar_split_length,
            self.tar_split_uncompressed_length,
        ];
        for (i, f) in fields.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&f.to_le_bytes());
        }
        out[56..].copy_from_slice(FOOTER_MAGIC);
        out
    }

    /// Parses the footer from the last bytes of a blob (`tail`, at least 48 bytes; pass
    /// [`TAIL_LEN`] bytes to recognize both generations), checking the TOC lies inside a blob
    /// of `blob_size` bytes before the footer.
    pub fn decode_footer(tail: &[u8], blob_size: u64) -> Result<TocPosition> {
        let fields = |payload: &[u8], n: usize| -> Vec<u64> {
            (0..n)
                .map(|i| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&payload[i * 8..i * 8 + 8]);
                    u64::from_le_bytes(b)
                })
                .collect()
        };
        let framed = |len: usize| -> Option<&[u8]> {
            let total = len + SKIPPABLE_HEADER_LEN as usize;
            if tail.len() < total {
                return None;
            }
            let frame = &tail[tail.len() - total..];
            let magic = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
            let size = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
            (magic & 0xFFFF_FFF0 == SKIPPABLE_MAGIC
                && size as usize == len
                && &frame[total - 8..] == FOOTER_MAGIC)
                .then_some(&frame[8..])
        };
        let (pos, footer_total) = if let Some(p) = framed(FOOTER_LEN) {
            let f = fields(p, 7);
            (
                TocPosition {
                    offset: f[0],
                    length: f[1],
                    uncompressed_length: f[2],
                    toc_type: f[3],
                    tar_split_offset: f[4],
                    tar_split_length: f[5],
                    tar_split_uncompressed_length: f[6],
                },
                FOOTER_LEN as u64,
            )
        } else if let Some(p) = framed(FOOTER_LEN_OLD) {
            let f = fields(p, 4);
            (
                TocPosition {
                    offset: f[0],
                    length: f[1],
                    uncompressed_length: f[2],
                    toc_type: f[3],
                    ..Default::default()
                },
                FOOTER_LEN_OLD as u64,
            )
        } else {
            return Err(Error::Footer(
                "no zstd:chunked footer (skippable frame ending in GNUlInUx) at the end of the blob"
                    .into(),
            ));
        };
        if pos.toc_type != TOC_TYPE_CHUNKED {
            return Err(Error::Footer(format!(
                "unsupported TOC type {}",
                pos.toc_type
            )));
        }
        let limit = blob_size.saturating_sub(footer_total + SKIPPABLE_HEADER_LEN);
        pos.check_within(limit)?;
        Ok(pos)
    }

    /// Errors unless the TOC and tar-split ranges end at or before `limit`.
    pub fn check_within(&self, limit: u64) -> Result<()> {
        if self.offset < SKIPPABLE_HEADER_LEN {
            return Err(Error::Footer(format!(
                "TOC offset {} leaves no room for its {SKIPPABLE_HEADER_LEN}-byte frame header",
                self.offset
            )));
        }
        let end = self.offset.checked_add(self.length);
        if self.length == 0 || end.is_none_or(|e| e > limit) {
            return Err(Error::Footer(format!(
                "TOC at {}+{} lies outside the blob's first {limit} bytes",
                self.offset, self.length
            )));
        }
        if self.tar_split_length > 0
            && self
                .tar_split_offset
                .checked_add(self.tar_split_length)
                .is_none_or(|e| e > limit)
        {
            return Err(Error::Footer("tar-split lies outside the blob".into()));
        }
        Ok(())
    }
}

/// A skippable frame holding `payload`.
pub fn skippable_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_roundtrip_both_generations() {
        let pos = TocPosition {
            offset: 1000,
            length: 200,
            uncompressed_length: 900,
            toc_type: 1,
            ..Default::default()
        };
        let mut blob = vec![0u8; 1300];
        blob.extend_from_slice(&skippable_frame(&pos.encode_footer()));
        let size = blob.len() as u64;
        let tail = &blob[blob.len() - TAIL_LEN..];
        assert_eq!(TocPosition::decode_footer(tail, size).unwrap(), pos);

        // 40-byte footer from older writers.
        let mut old = Vec::new();
        for f in [1000u64, 200, 900, 1] {
            old.extend_from_slice(&f.to_le_bytes());
        }
        old.extend_from_slice(FOOTER_MAGIC);
        let mut blob2 = vec![0u8; 1300];
        blob2.extend_from_slice(&skippable_frame(&old));
        let size2 = blob2.len() as u64;
        let tail2 = &blob2[blob2.len() - TAIL_LEN..];
        assert_eq!(TocPosition::decode_footer(tail2, size2).unwrap(), pos);
    }

    #[test]
    fn footer_rejects_lies() {
        let pos = TocPosition {
            offset: 10_000,
            length: 200,
            uncompressed_length: 900,
            toc_type: 1,
            ..Default::default()
        };
        let mut blob = vec![0u8; 100];
        blob.extend_from_slice(&skippable_frame(&pos.encode_footer()));
        let size = blob.len() as u64;
        let err = TocPosition::decode_footer(&blob[blob.len() - TAIL_LEN..], size).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        assert!(TocPosition::decode_footer(&[0u8; TAIL_LEN], 1000).is_err());
        assert!(TocPosition::decode_footer(&[], 0).is_err());
        assert!(TocPosition::parse_annotation("k", "1:2:3").is_err());
        assert!(TocPosition::parse_annotation("k", "1:2:3:2").is_err());
        assert!(TocPosition::parse_annotation("k", "a:2:3:1").is_err());
        assert_eq!(
            TocPosition::parse_annotation("k", &pos.annotation()).unwrap(),
            pos
        );
    }
}
