//! The input is a TOC's JSON: compress it, decode and validate it through the real reader
//! (`decode_toc` + `LayerIndex::from_toc`, with the real default `Limits`), build the tree a
//! lazy mount serves (`LayerTree::build`), then walk it checking that it is a tree: every
//! directory reached once from the root with the right parent, names single non-empty
//! components without `/`, sorted and unique, lookups agreeing with readdir, link counts
//! right (`LayerTree::check`). Nothing here may panic, hang or allocate without bound.
//!
//! The same bytes are also taken as a list of raw index entries (bypassing validation), so
//! the tree's own defences are fuzzed too, not only what validation lets through.

#![no_main]


use arbor_format::footer::TocPosition;
use arbor_format::index::{IndexEntry, LayerIndex, Limits, decode_toc};
use arbor_format::tarstream::EntryKind;
use arbor_format::tree::LayerTree;
use libfuzzer_sys::fuzz_target;

/// Data region the TOC's chunks may point into (they are never read here).
const DATA_END: u64 = 1 << 30;

fn check(index: &LayerIndex) {
    let tree = LayerTree::build(index);
    if let Err(e) = tree.check() {
        panic!("the tree of a layer index is not a tree: {e}");
    }
    // Every entry name the index holds resolves (or was replaced by a later entry): walking
    // it never goes through a non-directory.
    for e in &index.entries {
        let mut cur = arbor_format::tree::ROOT;
        if e.name == "." {
            continue;
        }
        for comp in e.name.split('/') {
            let Some(n) = tree.get(cur) else {
                panic!("inode {cur} missing");
            };
            if !n.children.is_empty() || n.kind == arbor_format::tree::NodeKind::Dir {
                match tree.lookup(cur, comp) {
                    Some(next) => cur = next,
                    None => break,
                }
            } else {
                break;
            }
        }
    }
}

fn raw_entries(data: &[u8]) -> Vec<IndexEntry> {
    // Lines of `KIND NAME [LINK]`, KIND one of d f h s c.
    let text = String::from_utf8_lossy(data);
    text.lines()
        .take(4096)
        .filter_map(|line| {
            let mut it = line.splitn(3, ' ');
            let kind = match it.next()? {
                "d" => EntryKind::Dir,
                "f" => EntryKind::Regular,
                "h" => EntryKind::HardLink,
                "s" => EntryKind::Symlink,
                "c" => EntryKind::Char,
                _ => return None,
            };
            let name = it.next()?.to_string();
            let link_name = it.next().unwrap_or("").to_string();
            Some(IndexEntry {
                size: (line.len() % 7) as u64,
                ..IndexEntry::bare(kind, &name, &link_name)
            })
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    // Through the real reader.
    if let Ok(compressed) = zstd::bulk::compress(data, 1) {
        let position = TocPosition {
            offset: DATA_END + 8,
            length: compressed.len() as u64,
            uncompressed_length: data.len() as u64,
            toc_type: 1,
            ..Default::default()
        };
        if let Ok(toc) = decode_toc(&compressed, &position, None, &Limits::default())
            && let Ok(index) = LayerIndex::from_toc(toc, DATA_END)
        {
            check(&index);
        }
    }
    // Straight into the builder.
    let index = LayerIndex {
        entries: raw_entries(data),
        data_end: 0,
        arbor: None,
    };
    check(&index);
});
