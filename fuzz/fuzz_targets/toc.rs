//! The input is a whole layer blob: find the footer, read, decompress and validate the TOC
//! within small limits, then decode every chunk whose frame lies inside the input.
//! Nothing here may panic, hang or allocate without bound; errors are fine.
//!
//! Each chunk decodes to at most 64 MiB (`MAX_CHUNK_SIZE`), but a TOC may list many such
//! chunks backed by tiny highly compressible frames; decoding stops once the chunks tried
//! declare `DECODE_BUDGET` bytes in total, so one input cannot take minutes of legitimate work
//! and be reported as a hang.

#![no_main]

use std::io::Cursor;

use arbor_format::footer::{TAIL_LEN, TocPosition};
use arbor_format::index::{LayerIndex, Limits, decode_chunk};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_toc_compressed: 1 << 20,
    max_toc_uncompressed: 8 << 20,
    max_entries: 100_000,
    ..Limits::DEFAULT
};
const DECODE_BUDGET: u64 = 256 << 20;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;

    // The footer parser alone, on the blob's tail.
    let tail = &data[data.len().saturating_sub(TAIL_LEN)..];
    let _ = TocPosition::decode_footer(tail, size);

    let Ok((index, _position)) = LayerIndex::read_from(&mut Cursor::new(data), size, None, &LIMITS)
    else {
        return;
    };
    let mut budget = DECODE_BUDGET;
    for entry in &index.entries {
        for chunk in &entry.chunks {
            let (Ok(start), Ok(end)) = (
                usize::try_from(chunk.blob_offset),
                usize::try_from(chunk.blob_end),
            ) else {
                continue;
            };
            if start > end || end > data.len() {
                continue;
            }
            let Some(left) = budget.checked_sub(chunk.size) else {
                return;
            };
            budget = left;
            let _ = decode_chunk(&entry.name, chunk, &data[start..end]);
        }
    }
});
