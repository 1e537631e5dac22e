//! The input is an uncompressed tar stream: parse every entry and its content with
//! `TarReader`, then convert it with `convert_layer` (4 KiB chunks, one worker thread).
//! Nothing here may panic, hang or allocate without bound; errors are fine.
//!
//! One property is asserted as well: a layer the writer produced must be readable by the
//! reader (`LayerIndex::read_from` accepts it), since converted layers are what readers get.

#![no_main]

use std::io::Cursor;

use arbor_format::index::{LayerIndex, Limits};
use arbor_format::tarstream::TarReader;
use arbor_format::writer::{WriterOptions, convert_layer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = TarReader::new(data);
    let mut buf = vec![0u8; 64 << 10];
    'entries: loop {
        match reader.next_entry() {
            Ok(Some(_entry)) => loop {
                match reader.read_content(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => break 'entries,
                }
            },
            Ok(None) | Err(_) => break,
        }
    }

    let opts = WriterOptions {
        chunk_size: 4096,
        block_size: 4096,
        threads: 1,
        ..WriterOptions::default()
    };
    if let Ok((summary, blob)) = convert_layer(data, Vec::new(), &opts) {
        assert_eq!(summary.blob_size, blob.len() as u64);
        if let Err(e) = LayerIndex::read_from(
            &mut Cursor::new(&blob),
            blob.len() as u64,
            None,
            &Limits::default(),
        ) {
            panic!("convert_layer wrote a layer the reader rejects: {e}");
        }
    }
});
