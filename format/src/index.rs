//! The reader's side: find the TOC, decode it within limits, validate it into a [`LayerIndex`],
//! and decode chunks with digest verification.
//!
//! Everything a TOC says is checked before it is used: names are safe, kinds known, chunk
//! ranges lie inside the data region and do not overlap, chunks cover each file exactly, hard
//! links point to earlier entries, digests are well formed, and sizes are bounded. A chunk's
//! bytes are returned only after they hash to the chunk's digest.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};

use base64::Engine as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::footer::{SKIPPABLE_HEADER_LEN, TAIL_LEN, TocPosition};
use crate::path;
use crate::tarstream::{EntryKind, Timestamp};
use crate::toc::{ArborExtension, CHUNK_TYPE_ZEROS, Toc, TocEntry, types};
use crate::writer::MAX_CHUNK_SIZE;

/// Bounds on what a reader accepts, checked before (or while) allocating.
///
/// The defaults come from what real layers need, with a wide margin, and from what one TOC
/// decode may cost the daemon at worst:
/// - a TOC entry is 250 to 400 bytes of JSON (name, two `sha256:` digests, offsets, modtime),
///   so a 1 GB Python image (~60 000 files) has a ~20 MiB TOC, 2–4 MiB compressed. The
///   largest single layers seen in practice (ML and TeX images) hold ~300 000 files. 64 MiB of
///   JSON holds ~200 000 real entries;
/// - a deserialized entry costs ~350 bytes (`TocEntry`) and then ~200 (`IndexEntry`) on top
///   of its strings, whatever its JSON size: `{"type":"dir","name":"a"}` is 26 bytes. Entries
///   are therefore counted while deserializing and refused past `max_entries` (500 000, so a
///   decode peaks near ~0.5 GiB: 64 MiB of JSON, 500 k entries, their index; two decodes at
///   once stay well inside the 2 GiB `MemoryMax` of arbord's unit), and so are
///   xattrs (`max_xattrs`, every entry may carry a SELinux label and a capability) and
///   prefetch names (at most `max_entries`);
/// - the compressed TOC is fetched whole into memory: 32 MiB is far more than the 64 MiB of
///   JSON it may expand to ever compresses to.
///
/// zstd decoders reading untrusted frames are also capped to a 32 MiB window (the most any
/// common encoder declares by default), or the content size when that is larger, up to
/// 128 MiB (see [`window_log_max`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_toc_compressed: u64,
    pub max_toc_uncompressed: u64,
    /// Entries in the TOC's `entries` array (`chunk` entries included).
    pub max_entries: usize,
    /// Extended attributes over all entries.
    pub max_xattrs: usize,
}

impl Limits {
    /// The defaults (see the type's docs for the reasoning).
    pub const DEFAULT: Limits = Limits {
        max_toc_compressed: 32 << 20,
        max_toc_uncompressed: 64 << 20,
        max_entries: 500_000,
        max_xattrs: 2_000_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// The largest zstd window (as a power of two) a decoder accepts for a frame whose content
/// is `content_len` bytes: 32 MiB (the largest window klauspost/compress declares by default,
/// at its best level, as containers/storage and skopeo write TOCs and chunks; zstd itself
/// uses 8 MiB up to level 19), or the next power of two above the content when that is
/// larger (an encoder never needs a window larger than its input), never above 128 MiB
/// (zstd's own default cap). A frame declaring more is refused instead of making the decoder
/// allocate it.
pub fn window_log_max(content_len: u64) -> u32 {
    let need = 64 - content_len.saturating_sub(1).leading_zeros();
    need.clamp(25, 27)
}

/// Where a layer's TOC is, and the digest it must have, per the descriptor's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocLocator {
    pub position: TocPosition,
    pub digest: Option<Digest>,
}

/// Reads the TOC location from layer annotations: Arbor's keys first, then the current and
/// the older containers/storage keys. `Ok(None)` when the layer has none of them.
pub fn locate_toc<'a, I>(annotations: I) -> Result<Option<TocLocator>>
where
    I: IntoIterator<Item = (&'a String, &'a String)> + Clone,
{
    let get = |key: &str| {
        annotations
            .clone()
            .into_iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.clone())
    };
    let pairs = [
        (crate::ANN_ARBOR_TOC_POSITION, crate::ANN_ARBOR_TOC_DIGEST),
        (
            crate::ANN_ZSTD_CHUNKED_POSITION,
            crate::ANN_ZSTD_CHUNKED_CHECKSUM,
        ),
        (
            crate::ANN_ZSTD_CHUNKED_POSITION_OLD,
            crate::ANN_ZSTD_CHUNKED_CHECKSUM_OLD,
        ),
    ];
    for (pos_key, digest_key) in pairs {
        if let Some(pos) = get(pos_key) {
            let position = TocPosition::parse_annotation(pos_key, &pos)?;
            let digest = match get(digest_key) {
                Some(d) => Some(Digest::parse(&d).map_err(|_| Error::Annotation {
                    key: digest_key.to_string(),
                    value: d.clone(),
                    reason: "not a sha256 digest",
                })?),
                None => None,
            };
            return Ok(Some(TocLocator { position, digest }));
        }
    }
    Ok(None)
}

/// Decompresses and parses the TOC bytes found at `position`, checking their digest first.
pub fn decode_toc(
    compressed: &[u8],
    position: &TocPosition,
    digest: Option<&Digest>,
    limits: &Limits,
) -> Result<Toc> {
    if position.length > limits.max_toc_compressed {
        return Err(Error::TocTooLarge {
            what: "compressed TOC",
            size: position.length,
            limit: limits.max_toc_compressed,
        });
    }
    if position.uncompressed_length > limits.max_toc_uncompressed {
        return Err(Error::TocTooLarge {
            what: "uncompressed TOC",
            size: position.uncompressed_length,
            limit: limits.max_toc_uncompressed,
        });
    }
    if compressed.len() as u64 != position.length {
        return Err(Error::toc(format!(
            "expected {} TOC bytes, got {}",
            position.length,
            compressed.len()
        )));
    }
    if let Some(d) = digest {
        d.verify(|| "TOC".to_string(), compressed)?;
    }
    let mut json = Vec::with_capacity(position.uncompressed_length.min(64 << 20) as usize);
    let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed)
        .map_err(|e| Error::toc(format!("TOC is not zstd: {e}")))?;
    decoder
        .window_log_max(window_log_max(position.uncompressed_length))
        .map_err(|e| Error::toc(format!("TOC decoder: {e}")))?;
    // At most one byte more than declared (and so than the limit) is ever decompressed.
    decoder
        .take(position.uncompressed_length + 1)
        .read_to_end(&mut json)
        .map_err(|e| Error::toc(format!("TOC does not decompress: {e}")))?;
    if json.len() as u64 != position.uncompressed_length {
        return Err(Error::toc(format!(
            "TOC decompresses to {} bytes, the footer says {}",
            json.len(),
            position.uncompressed_length
        )));
    }
    let scope =
        crate::toc::budget::Scope::new(limits.max_entries, limits.max_xattrs, limits.max_entries);
    let parsed: serde_json::Result<Toc> = serde_json::from_slice(&json);
    let exceeded = scope.exceeded();
    drop(scope);
    drop(json);
    let toc = match (parsed, exceeded) {
        (Ok(toc), _) => toc,
        (Err(e), None) => return Err(Error::toc(format!("TOC JSON: {e}"))),
        (Err(_), Some(what)) => {
            use crate::toc::budget::Exceeded;
            let (what, limit) = match what {
                Exceeded::Entries => ("entries", limits.max_entries),
                Exceeded::Xattrs => ("xattrs", limits.max_xattrs),
                Exceeded::Prefetch => ("prefetch names", limits.max_entries),
            };
            return Err(Error::TocLimit {
                what,
                limit: limit as u64,
            });
        }
    };
    Ok(toc)
}

/// One piece of a regular file, stored as its own zstd frame(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk in the file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Range of the compressed frame(s) in the blob.
    pub blob_offset: u64,
    pub blob_end: u64,
    /// sha256 of the chunk's content; `None` only for zero chunks written without one.
    pub digest: Option<Digest>,
    /// All zeros: a reader may produce it without fetching.
    pub zeros: bool,
}

/// A validated TOC entry (chunk entries folded into their file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: Timestamp,
    pub size: u64,
    pub link_name: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of the whole content (regular files with content).
    pub digest: Option<Digest>,
    pub chunks: Vec<Chunk>,
}

impl IndexEntry {
    /// An entry of `kind` named `name` (pointing at `link` for links), mode 0644, owned by
    /// root, empty and undated: for tools, tests and fuzzers that build indexes by hand
    /// (bypassing the TOC reader's validation).
    pub fn bare(kind: EntryKind, name: &str, link: &str) -> IndexEntry {
        IndexEntry {
            name: name.to_string(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            size: 0,
            link_name: link.to_string(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: None,
            chunks: Vec::new(),
        }
    }
}

/// A validated table of contents of one layer.
#[derive(Debug, Clone)]
pub struct LayerIndex {
    /// Entries in TOC order; a name may repeat (the later entry wins, as in tar).
    pub entries: Vec<IndexEntry>,
    /// End of the region holding entry data (where the TOC's skippable frame starts).
    pub data_end: u64,
    pub arbor: Option<ArborExtension>,
}

fn parse_time(s: &str) -> Result<Timestamp> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| Error::toc(format!("bad modtime {s:?}: {e}")))?;
    Ok(Timestamp {
        secs: t.unix_timestamp(),
        nanos: t.nanosecond(),
    })
}

fn non_negative(v: i64, what: &str, name: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::toc(format!("negative {what} for {name:?}")))
}

/// A uid, gid or device number: 32 bits on Linux.
fn id32(v: i64, what: &str, name: &str) -> Result<u64> {
    if (0..=i64::from(u32::MAX)).contains(&v) {
        Ok(v as u64)
    } else {
        Err(Error::toc(format!(
            "{what} {v} of {name:?} is out of range"
        )))
    }
}

fn parse_kind(kind: &str, name: &str) -> Result<EntryKind> {
    Ok(match kind {
        types::REG => EntryKind::Regular,
        types::DIR => EntryKind::Dir,
        types::SYMLINK => EntryKind::Symlink,
        types::HARDLINK => EntryKind::HardLink,
        types::CHAR => EntryKind::Char,
        types::BLOCK => EntryKind::Block,
        types::FIFO => EntryKind::Fifo,
        other => {
            return Err(Error::toc(format!(
                "unknown entry type {other:?} for {name:?}"
            )));
        }
    })
}

fn chunk_of(e: &TocEntry, name: &str, file_offset: u64, data_end: u64) -> Result<Chunk> {
    let blob_offset = non_negative(e.offset, "offset", name)?;
    let blob_end = non_negative(e.end_offset, "endOffset", name)?;
    let size = non_negative(e.chunk_size, "chunkSize", name)?;
    if size == 0 || size > MAX_CHUNK_SIZE {
        return Err(Error::toc(format!("chunk of {name:?} has size {size}")));
    }
    if blob_offset >= blob_end || blob_end > data_end {
        return Err(Error::toc(format!(
            "chunk of {name:?} at {blob_offset}..{blob_end} lies outside the data region 0..{data_end}"
        )));
    }
    if blob_end - blob_offset > MAX_CHUNK_SIZE + (1 << 20) {
        return Err(Error::toc(format!("chunk frame of {name:?} is too large")));
    }
    let zeros = match e.chunk_type.as_str() {
        "" => false,
        CHUNK_TYPE_ZEROS => true,
        other => {
            return Err(Error::toc(format!(
                "unknown chunkType {other:?} for {name:?}"
            )));
        }
    };
    let digest = if e.chunk_digest.is_empty() {
        None
    } else {
        Some(Digest::parse(&e.chunk_digest)?)
    };
    if digest.is_none() && !zeros {
        return Err(Error::toc(format!("chunk of {name:?} has no digest")));
    }
    Ok(Chunk {
        file_offset,
        size,
        blob_offset,
        blob_end,
        digest,
        zeros,
    })
}

impl LayerIndex {
    /// Validates a decoded TOC whose data region ends at `data_end` (see module docs).
    pub fn from_toc(toc: Toc, data_end: u64) -> Result<LayerIndex> {
        if toc.version != 1 {
            return Err(Error::toc(format!(
                "unsupported TOC version {}",
                toc.version
            )));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut entries: Vec<IndexEntry> = Vec::new();
        // Names seen so far, and whether the latest entry of that name is a directory.
        let mut seen: HashMap<String, bool> = HashMap::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut iter = toc.entries.into_iter().peekable();
        while let Some(e) = iter.next() {
            if e.kind == types::CHUNK {
                return Err(Error::toc(format!(
                    "chunk entry for {:?} does not follow its file",
                    e.name
                )));
            }
            let name = path::normalize(&e.name)?;
            let kind = parse_kind(&e.kind, &name)?;
            let size = non_negative(e.size, "size", &name)?;
            let mode = non_negative(e.mode, "mode", &name)? as u32 & 0o7777;
            let mut link_name = e.link_name.clone();
            if kind == EntryKind::HardLink {
                link_name = path::normalize(&link_name)?;
                match seen.get(&link_name) {
                    None => {
                        return Err(Error::toc(format!(
                            "hard link {name:?} points to {link_name:?}, which is not earlier in the TOC"
                        )));
                    }
                    // A second link to a directory would make the tree a graph (a cycle, for
                    // a link inside the directory itself).
                    Some(true) => {
                        return Err(Error::toc(format!(
                            "hard link {name:?} points to {link_name:?}, which is a directory"
                        )));
                    }
                    Some(false) => {}
                }
            }
            if kind == EntryKind::Symlink && link_name.len() > path::MAX_PATH_LEN {
                return Err(Error::toc(format!(
                    "symlink {name:?} has a {}-byte target, longer than PATH_MAX (4095)",
                    link_name.len()
                )));
            }
            let mut xattrs = BTreeMap::new();
            for (k, v) in &e.xattrs {
                let value = b64
                    .decode(v)
                    .map_err(|_| Error::toc(format!("xattr {k:?} of {name:?} is not base64")))?;
                xattrs.insert(k.clone(), value);
            }
            let digest = if e.digest.is_empty() {
                None
            } else {
                Some(Digest::parse(&e.digest)?)
            };
            let mut chunks = Vec::new();
            if kind == EntryKind::Regular && size > 0 {
                if digest.is_none() {
                    return Err(Error::toc(format!("file {name:?} has no digest")));
                }
                let mut parts = vec![e.clone()];
                while iter.peek().is_some_and(|n| n.kind == types::CHUNK) {
                    let Some(ce) = iter.next() else { break };
                    if path::normalize(&ce.name)? != name {
                        return Err(Error::toc(format!(
                            "chunk entry for {:?} follows {name:?}",
                            ce.name
                        )));
                    }
                    parts.push(ce);
                }
                chunks = file_chunks(&name, &e, &mut parts, data_end)?;
                ranges.extend(chunks.iter().map(|c| (c.blob_offset, c.blob_end)));
            }
            let mtime = match &e.mod_time {
                Some(t) => parse_time(t)?,
                None => Timestamp::default(),
            };
            seen.insert(name.clone(), kind == EntryKind::Dir);
            entries.push(IndexEntry {
                name,
                kind,
                mode,
                uid: id32(e.uid, "uid", &e.name)?,
                gid: id32(e.gid, "gid", &e.name)?,
                mtime,
                size: if kind == EntryKind::Regular { size } else { 0 },
                link_name,
                dev_major: id32(e.dev_major, "devMajor", &e.name)? as u32,
                dev_minor: id32(e.dev_minor, "devMinor", &e.name)? as u32,
                xattrs,
                digest,
                chunks,
            });
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::toc(format!(
                    "chunk frames overlap: {}..{} and {}..{}",
                    w[0].0, w[0].1, w[1].0, w[1].1
                )));
            }
        }
        if let Some(a) = &toc.arbor {
            validate_arbor(a, data_end)?;
        }
        Ok(LayerIndex {
            entries,
            data_end,
            arbor: toc.arbor,
        })
    }

    /// Reads and validates the TOC of a whole blob available as a seekable reader of `size`
    /// bytes, located by `locator` (from annotations) or else by the footer.
    pub fn read_from<R: Read + Seek>(
        blob: &mut R,
        size: u64,
        locator: Option<&TocLocator>,
        limits: &Limits,
    ) -> Result<(LayerIndex, TocPosition)> {
        let (position, digest) = match locator {
            Some(l) => (l.position, l.digest.clone()),
            None => {
                let tail_len = (TAIL_LEN as u64).min(size);
                let mut tail = vec![0u8; tail_len as usize];
                blob.seek(SeekFrom::Start(size - tail_len))?;
                blob.read_exact(&mut tail)?;
                (TocPosition::decode_footer(&tail, size)?, None)
            }
        };
        position.check_within(size)?;
        if position.length > limits.max_toc_compressed {
            return Err(Error::TocTooLarge {
                what: "compressed TOC",
                size: position.length,
                limit: limits.max_toc_compressed,
            });
        }
        let mut compressed = vec![0u8; position.length as usize];
        blob.seek(SeekFrom::Start(position.offset))?;
        blob.read_exact(&mut compressed)?;
        let toc = decode_toc(&compressed, &position, digest.as_ref(), limits)?;
        let data_end = data_end_of(&position)?;
        Ok((LayerIndex::from_toc(toc, data_end)?, position))
    }
}

/// Where the data region ends for a TOC at `position`: just before the TOC's skippable frame
/// header. A position too close to the blob's start to leave room for that header is an error.
pub fn data_end_of(position: &TocPosition) -> Result<u64> {
    position
        .offset
        .checked_sub(SKIPPABLE_HEADER_LEN)
        .ok_or_else(|| {
            Error::Footer(format!(
                "TOC offset {} leaves no room for its {SKIPPABLE_HEADER_LEN}-byte frame header",
                position.offset
            ))
        })
}

/// Builds a file's chunk list from its `reg` entry and the `chunk` entries after it.
///
/// Writers differ in how they mark where a chunk's frames end. Arbor gives every chunk its own
/// `endOffset`; containers/storage 1.4x (skopeo 1.9) gives chunks only an `offset` and the
/// `reg` entry the end of the whole file. A chunk therefore ends at its own `endOffset` if
/// that is set and does not pass the next chunk's start, else where the next chunk starts,
/// and the last chunk ends at its own `endOffset` or else the file's.
fn file_chunks(
    name: &str,
    reg: &TocEntry,
    parts: &mut [TocEntry],
    data_end: u64,
) -> Result<Vec<Chunk>> {
    let size = non_negative(reg.size, "size", name)?;
    let n = parts.len();
    if parts[0].chunk_size == 0 {
        if n > 1 {
            return Err(Error::toc(format!("first chunk of {name:?} has no size")));
        }
        parts[0].chunk_size = reg.size;
    }
    if parts[0].chunk_digest.is_empty() && parts[0].chunk_size == reg.size {
        parts[0].chunk_digest = reg.digest.clone();
    }
    let starts: Vec<i64> = parts.iter().map(|p| p.offset).collect();
    let mut chunks = Vec::with_capacity(n);
    let mut covered = 0u64;
    for (j, part) in parts.iter_mut().enumerate() {
        let own_end = part.end_offset;
        part.end_offset = if j + 1 < n {
            let next = starts[j + 1];
            if own_end > part.offset && own_end <= next {
                own_end
            } else {
                next
            }
        } else if own_end > part.offset {
            own_end
        } else {
            reg.end_offset
        };
        let off = if j == 0 {
            0
        } else {
            non_negative(part.chunk_offset, "chunkOffset", name)?
        };
        if off != covered {
            return Err(Error::toc(format!(
                "chunks of {name:?} leave a gap or overlap at {covered} (next starts at {off})"
            )));
        }
        let c = chunk_of(part, name, off, data_end)?;
        covered += c.size;
        chunks.push(c);
    }
    if covered != size {
        return Err(Error::toc(format!(
            "chunks of {name:?} cover {covered} bytes, the file has {size}"
        )));
    }
    Ok(chunks)
}

fn validate_arbor(a: &ArborExtension, data_end: u64) -> Result<()> {
    if !(4096..=MAX_CHUNK_SIZE).contains(&a.block_size) {
        return Err(Error::toc(format!(
            "block size {} out of range",
            a.block_size
        )));
    }
    if a.data_length != data_end {
        return Err(Error::toc(format!(
            "block table covers {} bytes, the data region has {data_end}",
            a.data_length
        )));
    }
    if a.blocks.len() as u64 != a.data_length.div_ceil(a.block_size) {
        return Err(Error::toc(format!(
            "block table has {} digests for {} bytes of {}-byte blocks",
            a.blocks.len(),
            a.data_length,
            a.block_size
        )));
    }
    if a.prefetch_end > data_end {
        return Err(Error::toc("prefetch section ends past the data region"));
    }
    for p in &a.prefetch {
        path::normalize(p)?;
    }
    Ok(())
}

/// The window size the first zstd frame of `frame` declares (RFC 8878 §3.1.1.1), if its
/// header is there to read: `Window_Descriptor`, or the content size of a single-segment frame.
fn frame_window_size(frame: &[u8]) -> Option<u64> {
    const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    if frame.get(..4)? != MAGIC {
        return None;
    }
    let descriptor = *frame.get(4)?;
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        let w = *frame.get(5)?;
        let log = 10 + u64::from(w >> 3);
        let base = 1u64 << log;
        return Some(base + (base / 8) * u64::from(w & 7));
    }
    // Single segment: the window is the content size, which follows the dictionary ID.
    let dict_len = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let fcs_len = [1usize, 2, 4, 8][usize::from(descriptor >> 6)];
    let at = 5 + dict_len;
    let bytes = frame.get(at..at + fcs_len)?;
    let mut le = [0u8; 8];
    le[..fcs_len].copy_from_slice(bytes);
    let size = u64::from_le_bytes(le);
    Some(if fcs_len == 2 { size + 256 } else { size })
}

thread_local! {
    /// [`decode_chunk`]'s zstd context, one per thread (they run on blocking pools).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one chunk from its frame bytes (`blob[chunk.blob_offset..chunk.blob_end]`) and
/// returns its content only if it has the expected length and digest.
pub fn decode_chunk(name: &str, chunk: &Chunk, frame: &[u8]) -> Result<Vec<u8>> {
    let err = |reason: String| Error::Chunk {
        name: name.to_string(),
        offset: chunk.blob_offset,
        reason,
    };
    if frame.len() as u64 != chunk.blob_end - chunk.blob_offset {
        return Err(err(format!(
            "got {} frame bytes, expected {}",
            frame.len(),
            chunk.blob_end - chunk.blob_offset
        )));
    }
    // Decoding below needs no window buffer, but a frame asking for a window larger than its
    // chunk could need is not one an encoder of this chunk wrote: refuse it, as a streaming
    // decoder would.
    let max_window = 1u64 << window_log_max(chunk.size);
    if let Some(window) = frame_window_size(frame).filter(|&w| w > max_window) {
        return Err(err(format!(
            "its frame asks for a {window}-byte window, more than a {}-byte chunk needs",
            chunk.size
        )));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(chunk.size as usize)
        .map_err(|e| err(format!("cannot hold {} bytes: {e}", chunk.size)))?;
    // One pass straight into `out`, which is never grown: a frame that would decompress to
    // more than the chunk's size fails with "destination buffer too small", so a hostile
    // frame costs at most the chunk's size (which the TOC caps), and no window buffer is
    // allocated. The decompression context is reused per thread: creating one per chunk
    // cost more than decoding a small file's chunk.
    DECOMPRESSOR
        .with(|d| -> std::io::Result<usize> {
            let mut slot = d.borrow_mut();
            let dec = match slot.as_mut() {
                Some(dec) => dec,
                None => slot.insert(zstd::bulk::Decompressor::new()?),
            };
            // One-pass decoding does not apply a window limit: the header check above does.
            dec.decompress_to_buffer(frame, &mut out)
        })
        .map_err(|e| err(format!("does not decompress: {e}")))?;
    if out.len() as u64 != chunk.size {
        return Err(err(format!(
            "decompresses to {} bytes, the TOC says {}",
            out.len(),
            chunk.size
        )));
    }
    verify_chunk(name, chunk, &out)?;
    Ok(out)
}

/// Checks decompressed chunk content against the chunk's digest (or, for zero chunks without
/// one, that it is all zeros).
pub fn verify_chunk(name: &str, chunk: &Chunk, data: &[u8]) -> Result<()> {
    match &chunk.digest {
        Some(d) => d.verify(
            || format!("chunk of {name:?} at file offset {}", chunk.file_offset),
            data,
        ),
        None if data.iter().all(|&b| b == 0) => Ok(()),
        None => Err(Error::Chunk {
            name: name.to_string(),
            offset: chunk.blob_offset,
            reason: "zero chunk holds non-zero bytes".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_of(data: &[u8], frame: &[u8]) -> Chunk {
        Chunk {
            file_offset: 0,
            size: data.len() as u64,
            blob_offset: 0,
            blob_end: frame.len() as u64,
            digest: Some(Digest::of(data)),
            zeros: false,
        }
    }

    #[test]
    fn frame_window_sizes_are_read_from_the_header() {
        // A one-shot frame of 4 KiB is a single segment: its window is its content size.
        let data = vec![3u8; 4096];
        let one_shot = zstd::bulk::compress(&data, 3).unwrap();
        assert_eq!(frame_window_size(&one_shot), Some(4096));
        // A streamed frame without a content size declares its window.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(zstd::zstd_safe::CParameter::WindowLog(21))
            .unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        assert_eq!(frame_window_size(&enc.finish().unwrap()), Some(1 << 21));
        assert_eq!(frame_window_size(b"not zstd"), None);
        assert_eq!(frame_window_size(&one_shot[..4]), None);
    }

    #[test]
    fn decoding_reuses_the_context_and_refuses_wrong_sizes() {
        let a = vec![1u8; 5000];
        let b: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let (fa, fb) = (
            zstd::bulk::compress(&a, 3).unwrap(),
            zstd::bulk::compress(&b, 3).unwrap(),
        );
        // The same thread's context serves one chunk after another.
        for _ in 0..3 {
            assert_eq!(decode_chunk("a", &chunk_of(&a, &fa), &fa).unwrap(), a);
            assert_eq!(decode_chunk("b", &chunk_of(&b, &fb), &fb).unwrap(), b);
        }
        // A frame holding more than the TOC's size is refused without decoding past it.
        let short = Chunk {
            size: 4096,
            ..chunk_of(&a, &fa)
        };
        let e = decode_chunk("a", &short, &fa).unwrap_err().to_string();
        assert!(e.contains("window") || e.contains("decompress"), "{e}");
        // One holding less is refused too, and so is content with another digest.
        let long = Chunk {
            size: 6000,
            ..chunk_of(&a, &fa)
        };
        assert!(decode_chunk("a", &long, &fa).is_err());
        let lying = Chunk {
            digest: Some(Digest::of(&b)),
            ..chunk_of(&a, &fa)
        };
        assert!(decode_chunk("a", &lying, &fa).is_err());
    }
}
