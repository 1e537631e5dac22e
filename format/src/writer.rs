//! Tar stream in, chunked layer out.
//!
//! [`convert_layer`] reads an uncompressed tar stream once and writes a zstd:chunked blob:
//! - each entry's raw header records (and the padding of the entry before) go into small
//!   "metadata" frames, consecutive header-only entries sharing one frame;
//! - each regular file's content is split into `chunk_size` chunks, each its own zstd frame
//!   holding exactly the chunk's bytes;
//! - entries named in the prefetch list go to a front section written before all others;
//! - then the TOC and the footer, each in a skippable frame.
//!
//! Decompressing the blob as a whole gives a valid tar stream (the layer's diff ID is its
//! digest). Compression runs on `threads` worker threads; a single assembler thread writes
//! frames in input order, so the output is the same for the same input whatever the thread
//! count.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, Result};
use crate::footer::{SKIPPABLE_HEADER_LEN, TOC_TYPE_CHUNKED, TocPosition, skippable_frame};
use crate::path;
use crate::tarstream::{EntryKind, TarReader, Timestamp, padding_for};
use crate::toc::{ArborExtension, CHUNK_TYPE_ZEROS, Toc, TocEntry, types};

/// Default chunk size: files are split into independently compressed chunks of this size.
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;
/// Default block size of the block digest table.
pub const DEFAULT_BLOCK_SIZE: u64 = 512 << 10;
/// Largest accepted chunk size (a reader must hold a chunk in memory).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Header frames are flushed once they hold this many bytes.
const META_FLUSH: usize = 256 << 10;

/// How to write a layer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Chunk size for file contents (4 KiB ..= 64 MiB).
    pub chunk_size: u64,
    /// Block size of the block digest table (4 KiB ..= 64 MiB).
    pub block_size: u64,
    /// zstd compression level.
    pub level: i32,
    /// Compression worker threads (at least 1).
    pub threads: usize,
    /// Entry names to place first, in start-up order.
    pub prefetch: Vec<String>,
    /// Where to spool the sections when a prefetch list is given (default: the system temp dir).
    pub spool_dir: Option<PathBuf>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            block_size: DEFAULT_BLOCK_SIZE,
            level: 3,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            prefetch: Vec::new(),
            spool_dir: None,
        }
    }
}

impl WriterOptions {
    /// Errors unless every setting is in range.
    pub fn validate(&self) -> Result<()> {
        let ok = |v: u64| (4096..=MAX_CHUNK_SIZE).contains(&v);
        if !ok(self.chunk_size) {
            return Err(Error::Options(format!(
                "chunk size {} is outside 4 KiB ..= 64 MiB",
                self.chunk_size
            )));
        }
        if !ok(self.block_size) {
            return Err(Error::Options(format!(
                "block size {} is outside 4 KiB ..= 64 MiB",
                self.block_size
            )));
        }
        if !(1..=22).contains(&self.level) {
            return Err(Error::Options(format!(
                "zstd level {} is not in 1..=22",
                self.level
            )));
        }
        Ok(())
    }
}

/// What [`convert_layer`] wrote.
#[derive(Debug, Clone)]
pub struct LayerSummary {
    pub blob_digest: Digest,
    pub blob_size: u64,
    /// Digest of the uncompressed tar stream (the diff ID).
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    pub toc_position: TocPosition,
    /// Digest of the compressed TOC bytes.
    pub toc_digest: Digest,
    pub entries: usize,
    pub regular_files: usize,
    /// Prefetch names found in the layer (start-up order) and those that were not.
    pub prefetch_found: Vec<String>,
    pub prefetch_missing: Vec<String>,
}

impl LayerSummary {
    /// The layer descriptor annotations that locate and authenticate the TOC, in both the
    /// containers/storage keys and Arbor's `containerd.io/snapshot/arbor.*` copies.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let pos = self.toc_position.annotation();
        let digest = self.toc_digest.to_string();
        BTreeMap::from([
            (crate::ANN_ZSTD_CHUNKED_POSITION.to_string(), pos.clone()),
            (crate::ANN_ZSTD_CHUNKED_CHECKSUM.to_string(), digest.clone()),
            (crate::ANN_ARBOR_TOC_POSITION.to_string(), pos),
            (crate::ANN_ARBOR_TOC_DIGEST.to_string(), digest),
            (
                crate::ANN_ARBOR_VERSION.to_string(),
                crate::ARBOR_FORMAT_VERSION.to_string(),
            ),
            (
                crate::ANN_ARBOR_BLOB_SIZE.to_string(),
                self.blob_size.to_string(),
            ),
            (
                crate::ANN_ARBOR_DIFF_ID.to_string(),
                self.diff_id.to_string(),
            ),
        ])
    }
}

/// Formats a timestamp the way Go marshals `time.Time` (RFC 3339, fraction trimmed).
pub fn format_time(t: Timestamp) -> String {
    OffsetDateTime::from_unix_timestamp(t.secs)
        .ok()
        .and_then(|d| d.replace_nanosecond(t.nanos).ok())
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    Front,
    Rest,
}

enum Job {
    /// Header records and padding to compress into one frame.
    Meta(Section, Vec<u8>),
    /// A TOC entry without content, or the head of a file whose chunks follow.
    Entry(Section, Box<TocEntry>),
    /// One chunk of the last file entry of the section.
    Chunk {
        section: Section,
        chunk_offset: u64,
        data: Vec<u8>,
        /// Set on the last chunk of a multi-chunk file: the whole file's digest.
        file_digest: Option<Digest>,
        first: bool,
    },
}

enum Done {
    Meta {
        section: Section,
        frame: Vec<u8>,
        raw: Vec<u8>,
    },
    Entry(Section, Box<TocEntry>),
    Chunk {
        section: Section,
        frame: Vec<u8>,
        raw: Vec<u8>,
        chunk_offset: u64,
        digest: Digest,
        zeros: bool,
        file_digest: Option<Digest>,
        first: bool,
    },
}

/// The output blob: hashes the whole blob and each block of the data region.
struct BlobSink<W: Write> {
    out: HashingWriter<W>,
    block_size: u64,
    block: Sha256,
    block_fill: u64,
    blocks: Vec<Digest>,
}

impl<W: Write> BlobSink<W> {
    fn new(out: W, block_size: u64) -> Self {
        BlobSink {
            out: HashingWriter::new(out),
            block_size,
            block: Sha256::new(),
            block_fill: 0,
            blocks: Vec::new(),
        }
    }

    /// Writes data-region bytes, feeding the block table.
    fn write_data(&mut self, mut buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        while !buf.is_empty() {
            let take = ((self.block_size - self.block_fill) as usize).min(buf.len());
            self.block.update(&buf[..take]);
            self.block_fill += take as u64;
            buf = &buf[take..];
            if self.block_fill == self.block_size {
                let h = std::mem::take(&mut self.block);
                self.blocks.push(Digest::from_hasher(h));
                self.block_fill = 0;
            }
        }
        Ok(())
    }

    /// Closes the data region, returning its block digests.
    fn end_data(&mut self) -> Vec<Digest> {
        if self.block_fill > 0 {
            let h = std::mem::take(&mut self.block);
            self.blocks.push(Digest::from_hasher(h));
            self.block_fill = 0;
        }
        std::mem::take(&mut self.blocks)
    }

    fn position(&self) -> u64 {
        self.out.position()
    }
}

/// Where one section's frames go while the layer is being written.
enum SectionOut<'a, W: Write> {
    Direct(&'a mut BlobSink<W>),
    Spool(BufWriter<File>),
}

struct SectionState<'a, W: Write> {
    out: SectionOut<'a, W>,
    pos: u64,
    toc: Vec<TocEntry>,
}

impl<W: Write> SectionState<'_, W> {
    fn write(&mut self, frame: &[u8]) -> Result<()> {
        match &mut self.out {
            SectionOut::Direct(sink) => sink.write_data(frame)?,
            SectionOut::Spool(f) => f.write_all(frame)?,
        }
        self.pos += frame.len() as u64;
        Ok(())
    }
}

/// Converts the tar stream `input` into a chunked layer written to `out`.
pub fn convert_layer<R: Read, W: Write + Send>(
    input: R,
    out: W,
    opts: &WriterOptions,
) -> Result<(LayerSummary, W)> {
    opts.validate()?;
    let prefetch: Vec<String> = opts
        .prefetch
        .iter()
        .map(|p| path::normalize_image_path(p))
        .collect::<Result<_>>()?;
    let spooled = !prefetch.is_empty();
    let threads = opts.threads.max(1);
    let (job_tx, job_rx) = sync_channel::<(u64, Job)>(threads * 2 + 2);
    let (done_tx, done_rx) = sync_channel::<(u64, Result<Done>)>(threads * 2 + 2);
    let job_rx = Arc::new(Mutex::new(job_rx));

    let mut sink = BlobSink::new(out, opts.block_size);
    let result = std::thread::scope(|s| -> Result<_> {
        for _ in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            let level = opts.level;
            s.spawn(move || worker(rx, tx, level));
        }
        drop(job_rx);
        drop(done_tx);
        let sink_ref = &mut sink;
        let spool_dir = opts.spool_dir.clone();
        let assembler = s.spawn(move || assemble(done_rx, sink_ref, spooled, spool_dir));
        let parsed = parse(input, job_tx, opts.chunk_size, &prefetch);
        let assembled = assembler
            .join()
            .map_err(|_| Error::Io(io::Error::other("assembler thread panicked")))?;
        // A parse error closes the job channel early; report it before the assembler's.
        let parsed = parsed?;
        Ok((parsed, assembled?))
    });
    let (parsed, assembled) = result?;
    finish(sink, parsed, assembled, &prefetch, opts.chunk_size)
}

struct Parsed {
    entries: usize,
    regular_files: usize,
    front_names: HashSet<String>,
}

fn parse<R: Read>(
    input: R,
    jobs: SyncSender<(u64, Job)>,
    chunk_size: u64,
    prefetch: &[String],
) -> Result<Parsed> {
    let wanted: HashSet<&str> = prefetch.iter().map(String::as_str).collect();
    let mut reader = TarReader::new(input);
    let mut seq = 0u64;
    let mut send = |job: Job| -> Result<()> {
        jobs.send((seq, job))
            .map_err(|_| Error::Io(io::Error::other("layer writer stopped")))?;
        seq += 1;
        Ok(())
    };
    // Pending header bytes per section (index 0 = front, 1 = rest).
    let mut pending: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut routed: HashMap<String, Section> = HashMap::new();
    let mut parsed = Parsed {
        entries: 0,
        regular_files: 0,
        front_names: HashSet::new(),
    };
    let idx = |s: Section| if s == Section::Front { 0 } else { 1 };

    // Names whose latest entry is a directory (hard links to them are refused).
    let mut dirs: HashSet<String> = HashSet::new();
    while let Some(entry) = reader.next_entry()? {
        parsed.entries += 1;
        // Route to the front only what stays valid there: a hard link whose target went to the
        // rest, or a name already written to the rest, stays in the rest.
        let mut section = Section::Rest;
        if wanted.contains(entry.name.as_str())
            && routed.get(&entry.name) != Some(&Section::Rest)
            && (entry.kind != EntryKind::HardLink
                || routed.get(&entry.link_name) == Some(&Section::Front))
        {
            section = Section::Front;
            parsed.front_names.insert(entry.name.clone());
        }
        if entry.kind == EntryKind::HardLink && !routed.contains_key(&entry.link_name) {
            return Err(Error::Tar {
                offset: entry.stream_offset,
                reason: format!(
                    "hard link {:?} points to {:?}, which is not earlier in the layer",
                    entry.name, entry.link_name
                ),
            });
        }
        // A hard link to a directory would give the directory a second parent (a cycle, for
        // a link inside it); Linux refuses to create one, and so does the reader.
        if entry.kind == EntryKind::HardLink && dirs.contains(&entry.link_name) {
            return Err(Error::Tar {
                offset: entry.stream_offset,
                reason: format!(
                    "hard link {:?} points to {:?}, which is a directory",
                    entry.name, entry.link_name
                ),
            });
        }
        if entry.kind == EntryKind::Dir {
            dirs.insert(entry.name.clone());
        } else {
            dirs.remove(&entry.name);
        }
        routed.insert(entry.name.clone(), section);
        let p = &mut pending[idx(section)];
        p.extend_from_slice(&entry.raw_header);
        let toc = Box::new(toc_entry(&entry));
        if entry.kind == EntryKind::Regular {
            parsed.regular_files += 1;
        }
        if entry.size == 0 {
            send(Job::Entry(section, toc))?;
            if p.len() >= META_FLUSH {
                send(Job::Meta(section, std::mem::take(p)))?;
            }
            continue;
        }
        send(Job::Meta(section, std::mem::take(p)))?;
        send(Job::Entry(section, toc))?;
        let multi = entry.size > chunk_size;
        let mut file_hash = multi.then(Sha256::new);
        let mut off = 0u64;
        while off < entry.size {
            let n = (entry.size - off).min(chunk_size) as usize;
            let mut data = vec![0u8; n];
            reader.read_content_exact(&mut data)?;
            if let Some(h) = file_hash.as_mut() {
                h.update(&data);
            }
            let last = off + n as u64 == entry.size;
            let file_digest = if last {
                file_hash.take().map(Digest::from_hasher)
            } else {
                None
            };
            send(Job::Chunk {
                section,
                chunk_offset: off,
                data,
                file_digest,
                first: off == 0,
            })?;
            off += n as u64;
        }
        pending[idx(section)].extend(std::iter::repeat_n(0u8, padding_for(entry.size)));
    }
    // Close both sections: the rest ends with the end-of-archive blocks.
    if !pending[0].is_empty() {
        send(Job::Meta(Section::Front, std::mem::take(&mut pending[0])))?;
    }
    let mut tail = std::mem::take(&mut pending[1]);
    tail.extend_from_slice(&[0u8; 1024]);
    send(Job::Meta(Section::Rest, tail))?;
    Ok(parsed)
}

fn toc_entry(e: &crate::tarstream::Entry) -> TocEntry {
    let b64 = base64::engine::general_purpose::STANDARD;
    TocEntry {
        kind: match e.kind {
            EntryKind::Regular => types::REG,
            EntryKind::Dir => types::DIR,
            EntryKind::Symlink => types::SYMLINK,
            EntryKind::HardLink => types::HARDLINK,
            EntryKind::Char => types::CHAR,
            EntryKind::Block => types::BLOCK,
            EntryKind::Fifo => types::FIFO,
        }
        .to_string(),
        name: e.name.clone(),
        link_name: e.link_name.clone(),
        mode: e.mode as i64,
        size: e.size as i64,
        uid: e.uid as i64,
        gid: e.gid as i64,
        user_name: e.uname.clone(),
        group_name: e.gname.clone(),
        mod_time: Some(format_time(e.mtime)),
        dev_major: e.dev_major as i64,
        dev_minor: e.dev_minor as i64,
        xattrs: e
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), b64.encode(v)))
            .collect(),
        ..Default::default()
    }
}

fn worker(
    jobs: Arc<Mutex<Receiver<(u64, Job)>>>,
    done: SyncSender<(u64, Result<Done>)>,
    level: i32,
) {
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => Some(c),
        Err(e) => {
            let _ = done.send((0, Err(e.into())));
            None
        }
    };
    loop {
        let next = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, job)) = next else { return };
        let Some(c) = compressor.as_mut() else { return };
        let result = match job {
            Job::Meta(section, raw) => c.compress(&raw).map(|frame| Done::Meta {
                section,
                frame,
                raw,
            }),
            Job::Entry(section, toc) => Ok(Done::Entry(section, toc)),
            Job::Chunk {
                section,
                chunk_offset,
                data,
                file_digest,
                first,
            } => c.compress(&data).map(|frame| Done::Chunk {
                section,
                frame,
                digest: Digest::of(&data),
                zeros: data.iter().all(|&b| b == 0),
                raw: data,
                chunk_offset,
                file_digest,
                first,
            }),
        };
        if done.send((seq, result.map_err(Error::from))).is_err() {
            return;
        }
    }
}

struct Assembled {
    front: Option<(File, u64, Vec<TocEntry>)>,
    rest: (Option<File>, u64, Vec<TocEntry>),
    /// diff ID hasher and size when written directly (no prefetch section).
    direct_diff: Option<(Digest, u64)>,
}

fn assemble<W: Write>(
    done: Receiver<(u64, Result<Done>)>,
    sink: &mut BlobSink<W>,
    spooled: bool,
    spool_dir: Option<PathBuf>,
) -> Result<Assembled> {
    let spool = || -> Result<BufWriter<File>> {
        let f = match &spool_dir {
            Some(d) => tempfile::tempfile_in(d)?,
            None => tempfile::tempfile()?,
        };
        Ok(BufWriter::with_capacity(1 << 20, f))
    };
    let mut front: Option<SectionState<W>> = None;
    let mut rest = SectionState {
        out: if spooled {
            SectionOut::Spool(spool()?)
        } else {
            SectionOut::Direct(sink)
        },
        pos: 0,
        toc: Vec::new(),
    };
    if spooled {
        front = Some(SectionState {
            out: SectionOut::Spool(spool()?),
            pos: 0,
            toc: Vec::new(),
        });
    }
    let mut diff = Sha256::new();
    let mut diff_len = 0u64;
    let mut waiting: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    for (seq, result) in done.iter() {
        waiting.insert(seq, result?);
        while let Some(item) = waiting.remove(&next) {
            next += 1;
            let section = match &item {
                Done::Meta { section, .. }
                | Done::Entry(section, _)
                | Done::Chunk { section, .. } => *section,
            };
            let st = match section {
                Section::Front => front
                    .as_mut()
                    .ok_or_else(|| Error::Io(io::Error::other("front section without prefetch")))?,
                Section::Rest => &mut rest,
            };
            match item {
                Done::Meta { frame, raw, .. } => {
                    if !spooled {
                        diff.update(&raw);
                        diff_len += raw.len() as u64;
                    }
                    st.write(&frame)?;
                }
                Done::Entry(_, toc) => st.toc.push(*toc),
                Done::Chunk {
                    frame,
                    raw,
                    chunk_offset,
                    digest,
                    zeros,
                    file_digest,
                    first,
                    ..
                } => {
                    if !spooled {
                        diff.update(&raw);
                        diff_len += raw.len() as u64;
                    }
                    let start = st.pos;
                    st.write(&frame)?;
                    let end = st.pos;
                    let file_entry = st
                        .toc
                        .iter()
                        .rposition(|e| e.kind == types::REG)
                        .ok_or_else(|| Error::Io(io::Error::other("chunk without a file")))?;
                    let chunk_type = if zeros { CHUNK_TYPE_ZEROS } else { "" }.to_string();
                    if first {
                        let e = &mut st.toc[file_entry];
                        e.offset = start as i64;
                        e.end_offset = end as i64;
                        e.chunk_size = raw.len() as i64;
                        e.chunk_digest = digest.to_string();
                        e.chunk_type = chunk_type;
                        if e.size as usize == raw.len() {
                            e.digest = digest.to_string();
                        }
                    } else {
                        let head = &st.toc[file_entry];
                        let chunk = TocEntry {
                            kind: types::CHUNK.to_string(),
                            name: head.name.clone(),
                            offset: start as i64,
                            end_offset: end as i64,
                            chunk_offset: chunk_offset as i64,
                            chunk_size: raw.len() as i64,
                            chunk_digest: digest.to_string(),
                            chunk_type,
                            ..Default::default()
                        };
                        st.toc.push(chunk);
                    }
                    if let Some(fd) = file_digest {
                        st.toc[file_entry].digest = fd.to_string();
                    }
                }
            }
        }
    }
    let finish_spool = |st: SectionState<W>| -> Result<(Option<File>, u64, Vec<TocEntry>)> {
        let file = match st.out {
            SectionOut::Spool(b) => Some(b.into_inner().map_err(|e| e.into_error())?),
            SectionOut::Direct(_) => None,
        };
        Ok((file, st.pos, st.toc))
    };
    let front = match front {
        Some(f) => {
            let (file, pos, toc) = finish_spool(f)?;
            file.map(|f| (f, pos, toc))
        }
        None => None,
    };
    Ok(Assembled {
        front,
        rest: finish_spool(rest)?,
        direct_diff: (!spooled).then(|| (Digest::from_hasher(diff), diff_len)),
    })
}

fn finish<W: Write>(
    mut sink: BlobSink<W>,
    parsed: Parsed,
    assembled: Assembled,
    prefetch: &[String],
    chunk_size: u64,
) -> Result<(LayerSummary, W)> {
    let mut entries = Vec::new();
    let mut front_len = 0u64;
    let (diff_id, uncompressed_size) = match assembled.direct_diff {
        Some(d) => d,
        None => {
            // Copy the spooled sections into the blob and hash their decompressed bytes.
            let mut diff = HashingWriter::new(io::sink());
            let mut decoder = zstd::stream::write::Decoder::new(&mut diff)?;
            let mut copy = |file: &mut File| -> Result<()> {
                file.seek(SeekFrom::Start(0))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    sink.write_data(&buf[..n])?;
                    decoder.write_all(&buf[..n])?;
                }
            };
            if let Some((mut f, len, toc)) = assembled.front {
                copy(&mut f)?;
                front_len = len;
                entries.extend(toc);
            }
            if let Some(mut f) = assembled.rest.0 {
                copy(&mut f)?;
            }
            decoder.flush()?;
            drop(decoder);
            let (_, d, n) = diff.finish();
            (d, n)
        }
    };
    for mut e in assembled.rest.2 {
        if e.end_offset > 0 {
            e.offset += front_len as i64;
            e.end_offset += front_len as i64;
        }
        entries.push(e);
    }
    let data_length = sink.position();
    let blocks = sink.end_data();
    let prefetch_found: Vec<String> = prefetch
        .iter()
        .filter(|p| parsed.front_names.contains(*p))
        .cloned()
        .collect();
    let prefetch_missing: Vec<String> = prefetch
        .iter()
        .filter(|p| !parsed.front_names.contains(*p))
        .cloned()
        .collect();
    let toc = Toc {
        version: 1,
        entries,
        tar_split_digest: String::new(),
        arbor: Some(ArborExtension {
            version: crate::ARBOR_FORMAT_VERSION,
            prefetch: prefetch_found.clone(),
            prefetch_end: front_len,
            block_size: sink.block_size,
            data_length,
            blocks,
            chunk_size,
        }),
    };
    let json = serde_json::to_vec(&toc).map_err(|e| Error::toc(e.to_string()))?;
    let compressed = zstd::bulk::compress(&json, 9)?;
    let position = TocPosition {
        offset: data_length + SKIPPABLE_HEADER_LEN,
        length: compressed.len() as u64,
        uncompressed_length: json.len() as u64,
        toc_type: TOC_TYPE_CHUNKED,
        ..Default::default()
    };
    sink.out.write_all(&skippable_frame(&compressed))?;
    sink.out
        .write_all(&skippable_frame(&position.encode_footer()))?;
    sink.out.flush()?;
    let (out, blob_digest, blob_size) = sink.out.finish();
    Ok((
        LayerSummary {
            blob_digest,
            blob_size,
            diff_id,
            uncompressed_size,
            toc_position: position,
            toc_digest: Digest::of(&compressed),
            entries: parsed.entries,
            regular_files: parsed.regular_files,
            prefetch_found,
            prefetch_missing,
        },
        out,
    ))
}
