//! What an ELF executable or shared library asks the dynamic loader for: its program interpreter
//! (`PT_INTERP`, the dynamic loader itself) and its dynamic section's `DT_NEEDED`, `DT_RUNPATH`
//! and `DT_RPATH` strings.
//!
//! Arbor reads these at image conversion time to infer which files a container's entrypoint
//! will read at start-up (the loader, then the shared libraries it maps), so that they can be
//! fetched before they are asked for. Only the ELF header, the program header table, the
//! `PT_INTERP` and `PT_DYNAMIC` segments and the dynamic string table are read; sections are
//! ignored (except section 0 when `e_phnum` overflows into it), since the loader ignores them too.
//!
//! The bytes come from an untrusted image, so nothing in them is trusted: every offset and size
//! is checked against the actual data with checked arithmetic, counts are capped (see the
//! `MAX_*` constants), nothing is allocated in proportion to a size the file merely claims, every
//! loop is bounded by the data or a cap, and malformed input gives an [`ElfError`], never a panic.

/// What an ELF file asks the dynamic loader for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfDeps {
    /// PT_INTERP: the program interpreter's path (`/lib64/ld-linux-x86-64.so.2`), for executables.
    pub interp: Option<String>,
    /// DT_NEEDED entries, in order (`libc.so.6`).
    pub needed: Vec<String>,
    /// DT_RUNPATH entries split on ':' (may contain `$ORIGIN` / `${ORIGIN}`, left unexpanded).
    /// Empty components (which the loader takes as the current directory) are left out.
    pub runpath: Vec<String>,
    /// DT_RPATH entries split on ':' (same).
    pub rpath: Vec<String>,
}

/// Why an ELF file's dependencies could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// Something the file points at lies (partly) past its end.
    #[error("ELF file is truncated: the {what} extends past the end of the file")]
    Truncated {
        /// What was being read.
        what: &'static str,
    },
    /// The file contradicts the ELF format.
    #[error("malformed ELF file: {0}")]
    Malformed(String),
    /// The file has more of something than Arbor accepts.
    #[error("ELF file exceeds a limit: more than {limit} {what}")]
    TooMany {
        /// What there are too many of.
        what: &'static str,
        /// The most accepted.
        limit: usize,
    },
}

/// The most program headers read (the real count is at most a few dozen).
pub const MAX_PROGRAM_HEADERS: u64 = 65_536;
/// The most dynamic entries read before `DT_NULL`.
pub const MAX_DYNAMIC_ENTRIES: u64 = 1_000_000;
/// The most `DT_NEEDED` entries accepted.
pub const MAX_NEEDED: usize = 4_096;
/// The most `DT_RUNPATH` entries accepted, and separately `DT_RPATH` entries (one is normal).
pub const MAX_SEARCH_PATH_ENTRIES: usize = 16;
/// The longest string accepted (interpreter path, library name, search path), NUL excluded.
pub const MAX_STRING: usize = 4_096;

const MAGIC: &[u8; 4] = b"\x7fELF";
const EI_NIDENT: usize = 16;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELFDATA2MSB: u8 = 2;
const PN_XNUM: u64 = 0xffff;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;

const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// Whether `head` (the first bytes of a file, at least 4 to be true) starts with the ELF magic.
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

/// The dependencies of an ELF file given its whole content; `Ok(None)` when `data` is not ELF.
pub fn parse(data: &[u8]) -> Result<Option<ElfDeps>, ElfError> {
    if !is_elf(data) {
        return Ok(None);
    }
    let elf = Elf::new(data)?;
    let phdrs = elf.program_headers()?;
    let mut deps = ElfDeps::default();

    let mut interps = phdrs.iter().filter(|ph| ph.p_type == PT_INTERP);
    if let Some(ph) = interps.next() {
        if interps.next().is_some() {
            return Err(ElfError::Malformed(
                "more than one PT_INTERP program header".into(),
            ));
        }
        deps.interp = Some(elf.interp(ph)?);
    }

    let mut dynamics = phdrs.iter().filter(|ph| ph.p_type == PT_DYNAMIC);
    if let Some(ph) = dynamics.next() {
        if dynamics.next().is_some() {
            return Err(ElfError::Malformed(
                "more than one PT_DYNAMIC program header".into(),
            ));
        }
        elf.dynamic(ph, &phdrs, &mut deps)?;
    }
    Ok(Some(deps))
}

/// The fields of a program header that are used.
#[derive(Debug, Clone, Copy)]
struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// An ELF file's bytes with its class and byte order, read with bounds checks.
struct Elf<'a> {
    data: &'a [u8],
    is64: bool,
    big_endian: bool,
}

impl<'a> Elf<'a> {
    /// Checks the identification bytes and that the whole ELF header is there.
    fn new(data: &'a [u8]) -> Result<Self, ElfError> {
        let ident = data.get(..EI_NIDENT).ok_or(ElfError::Truncated {
            what: "ELF identification",
        })?;
        let is64 = match ident[4] {
            ELFCLASS32 => false,
            ELFCLASS64 => true,
            other => {
                return Err(ElfError::Malformed(format!(
                    "unknown ELF class {other} (expected 1 for 32-bit or 2 for 64-bit)"
                )));
            }
        };
        let big_endian = match ident[5] {
            ELFDATA2LSB => false,
            ELFDATA2MSB => true,
            other => {
                return Err(ElfError::Malformed(format!(
                    "unknown ELF data encoding {other} (expected 1 for little-endian or 2 for big-endian)"
                )));
            }
        };
        let header_size = if is64 { 64 } else { 52 };
        if data.len() < header_size {
            return Err(ElfError::Truncated { what: "ELF header" });
        }
        Ok(Self {
            data,
            is64,
            big_endian,
        })
    }

    /// `len` bytes at `offset`, or `Truncated` when they are not all there.
    fn range(&self, offset: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
        let end = offset
            .checked_add(len)
            .ok_or(ElfError::Truncated { what })?;
        let start = usize::try_from(offset).map_err(|_| ElfError::Truncated { what })?;
        let end = usize::try_from(end).map_err(|_| ElfError::Truncated { what })?;
        self.data
            .get(start..end)
            .ok_or(ElfError::Truncated { what })
    }

    /// An unsigned integer of `size` bytes (at most 8) at `offset`, in the file's byte order.
    fn uint(&self, offset: u64, size: u64, what: &'static str) -> Result<u64, ElfError> {
        let bytes = self.range(offset, size, what)?;
        let fold = |acc: u64, b: &u8| (acc << 8) | u64::from(*b);
        Ok(if self.big_endian {
            bytes.iter().fold(0, fold)
        } else {
            bytes.iter().rev().fold(0, fold)
        })
    }

    fn u16(&self, offset: u64, what: &'static str) -> Result<u64, ElfError> {
        self.uint(offset, 2, what)
    }

    fn u32(&self, offset: u64, what: &'static str) -> Result<u64, ElfError> {
        self.uint(offset, 4, what)
    }

    /// The size of an address or offset: 4 or 8 bytes.
    fn word_size(&self) -> u64 {
        if self.is64 { 8 } else { 4 }
    }

    /// An address, offset or size (`Elf32_Addr`/`Elf64_Addr` and kin) at `offset`.
    fn word(&self, offset: u64, what: &'static str) -> Result<u64, ElfError> {
        self.uint(offset, self.word_size(), what)
    }

    /// The program headers (only their used fields), checked to lie inside the file.
    fn program_headers(&self) -> Result<Vec<Phdr>, ElfError> {
        const WHAT: &str = "ELF header";
        let (phoff, phentsize, phnum) = if self.is64 {
            (
                self.word(32, WHAT)?,
                self.u16(54, WHAT)?,
                self.u16(56, WHAT)?,
            )
        } else {
            (
                self.word(28, WHAT)?,
                self.u16(42, WHAT)?,
                self.u16(44, WHAT)?,
            )
        };
        let phnum = if phnum == PN_XNUM {
            self.extended_phnum()?
        } else {
            phnum
        };
        if phnum == 0 {
            return Ok(Vec::new());
        }
        if phnum > MAX_PROGRAM_HEADERS {
            return Err(ElfError::TooMany {
                what: "program headers",
                limit: MAX_PROGRAM_HEADERS as usize,
            });
        }
        let min_entsize = if self.is64 { 56 } else { 32 };
        if phentsize < min_entsize {
            return Err(ElfError::Malformed(format!(
                "program header entry size {phentsize} is smaller than {min_entsize}"
            )));
        }
        const TABLE: &str = "program header table";
        let table_len = phnum
            .checked_mul(phentsize)
            .ok_or(ElfError::Truncated { what: TABLE })?;
        // The whole table must be there before anything proportional to phnum is allocated.
        self.range(phoff, table_len, TABLE)?;

        let mut phdrs = Vec::with_capacity(phnum as usize);
        for i in 0..phnum {
            // Inside the table checked above, so no overflow; checked all the same.
            let base = i
                .checked_mul(phentsize)
                .and_then(|rel| phoff.checked_add(rel))
                .ok_or(ElfError::Truncated { what: TABLE })?;
            let at = |rel: u64| {
                base.checked_add(rel)
                    .ok_or(ElfError::Truncated { what: TABLE })
            };
            let p_type = self.u32(base, TABLE)? as u32;
            let (offset, vaddr, filesz) = if self.is64 {
                (
                    self.word(at(8)?, TABLE)?,
                    self.word(at(16)?, TABLE)?,
                    self.word(at(32)?, TABLE)?,
                )
            } else {
                (
                    self.word(at(4)?, TABLE)?,
                    self.word(at(8)?, TABLE)?,
                    self.word(at(16)?, TABLE)?,
                )
            };
            phdrs.push(Phdr {
                p_type,
                offset,
                vaddr,
                filesz,
            });
        }
        Ok(phdrs)
    }

    /// The program header count held in section 0's `sh_info` when `e_phnum` is `PN_XNUM`.
    fn extended_phnum(&self) -> Result<u64, ElfError> {
        const WHAT: &str = "ELF header";
        let (shoff, shentsize) = if self.is64 {
            (self.word(40, WHAT)?, self.u16(58, WHAT)?)
        } else {
            (self.word(32, WHAT)?, self.u16(46, WHAT)?)
        };
        if shoff == 0 {
            return Err(ElfError::Malformed(
                "e_phnum is PN_XNUM (0xffff) but there is no section header 0 to hold the real count"
                    .into(),
            ));
        }
        let min_entsize = if self.is64 { 64 } else { 40 };
        if shentsize < min_entsize {
            return Err(ElfError::Malformed(format!(
                "e_phnum is PN_XNUM (0xffff) but the section header entry size {shentsize} is smaller than {min_entsize}"
            )));
        }
        const SECTION: &str = "section header 0";
        self.range(shoff, min_entsize, SECTION)?;
        let sh_info = if self.is64 { 44 } else { 28 };
        let at = shoff
            .checked_add(sh_info)
            .ok_or(ElfError::Truncated { what: SECTION })?;
        self.u32(at, SECTION)
    }

    /// The `PT_INTERP` segment's NUL-terminated path.
    fn interp(&self, ph: &Phdr) -> Result<String, ElfError> {
        let segment = self.range(ph.offset, ph.filesz, "PT_INTERP segment")?;
        let path = c_string(segment, "PT_INTERP path")?;
        if path.is_empty() {
            return Err(ElfError::Malformed("the PT_INTERP path is empty".into()));
        }
        Ok(path)
    }

    /// Reads the `PT_DYNAMIC` segment's entries up to `DT_NULL` and their strings into `deps`.
    fn dynamic(&self, ph: &Phdr, phdrs: &[Phdr], deps: &mut ElfDeps) -> Result<(), ElfError> {
        const WHAT: &str = "PT_DYNAMIC segment";
        self.range(ph.offset, ph.filesz, WHAT)?;
        let word = self.word_size();
        let entsize = 2 * word;
        let count = ph.filesz / entsize;

        let mut needed = Vec::new();
        let mut runpath = Vec::new();
        let mut rpath = Vec::new();
        let mut strtab = None;
        let mut strsz = None;
        let mut terminated = false;
        for i in 0..count {
            if i >= MAX_DYNAMIC_ENTRIES {
                return Err(ElfError::TooMany {
                    what: "dynamic entries before DT_NULL",
                    limit: MAX_DYNAMIC_ENTRIES as usize,
                });
            }
            // Inside the segment checked above.
            let at = i
                .checked_mul(entsize)
                .and_then(|rel| ph.offset.checked_add(rel))
                .ok_or(ElfError::Truncated { what: WHAT })?;
            let tag = self.word(at, WHAT)?;
            let val_at = at
                .checked_add(word)
                .ok_or(ElfError::Truncated { what: WHAT })?;
            let val = self.word(val_at, WHAT)?;
            match tag {
                DT_NULL => {
                    terminated = true;
                    break;
                }
                DT_NEEDED => push_capped(&mut needed, val, "DT_NEEDED entries", MAX_NEEDED)?,
                DT_RUNPATH => push_capped(
                    &mut runpath,
                    val,
                    "DT_RUNPATH entries",
                    MAX_SEARCH_PATH_ENTRIES,
                )?,
                DT_RPATH => {
                    push_capped(&mut rpath, val, "DT_RPATH entries", MAX_SEARCH_PATH_ENTRIES)?
                }
                // As for the loader, a later entry overrides an earlier one.
                DT_STRTAB => strtab = Some(val),
                DT_STRSZ => strsz = Some(val),
                _ => {}
            }
        }
        if !terminated {
            return Err(ElfError::Malformed(
                "the dynamic section has no DT_NULL terminator within its PT_DYNAMIC segment"
                    .into(),
            ));
        }
        if needed.is_empty() && runpath.is_empty() && rpath.is_empty() {
            return Ok(());
        }

        let strtab = strtab.ok_or_else(|| {
            ElfError::Malformed(
                "the dynamic section names libraries or search paths but has no DT_STRTAB".into(),
            )
        })?;
        let (offset, available) = self.file_offset(strtab, phdrs)?;
        const TABLE: &str = "dynamic string table (DT_STRTAB + DT_STRSZ)";
        let table = match strsz {
            Some(size) => self.range(offset, size, TABLE)?,
            // Without DT_STRSZ, the table ends with the PT_LOAD segment's file contents.
            None => {
                let file_len = self.data.len() as u64;
                let start = offset.min(file_len);
                let end = offset.saturating_add(available).min(file_len);
                self.range(start, end.saturating_sub(start), TABLE)?
            }
        };
        for off in needed {
            deps.needed.push(table_string(table, off)?);
        }
        for off in runpath {
            deps.runpath
                .extend(split_search_path(&table_string(table, off)?));
        }
        for off in rpath {
            deps.rpath
                .extend(split_search_path(&table_string(table, off)?));
        }
        Ok(())
    }

    /// The file offset of virtual address `vaddr` through the `PT_LOAD` segments, and how many
    /// bytes of that segment's file contents follow it.
    fn file_offset(&self, vaddr: u64, phdrs: &[Phdr]) -> Result<(u64, u64), ElfError> {
        for ph in phdrs.iter().filter(|ph| ph.p_type == PT_LOAD) {
            let Some(end) = ph.vaddr.checked_add(ph.filesz) else {
                continue;
            };
            if ph.vaddr <= vaddr && vaddr < end {
                let rel = vaddr - ph.vaddr;
                let offset = ph.offset.checked_add(rel).ok_or_else(|| {
                    ElfError::Malformed(format!(
                        "DT_STRTAB address {vaddr:#x} maps past the largest file offset"
                    ))
                })?;
                return Ok((offset, ph.filesz - rel));
            }
        }
        Err(ElfError::Malformed(format!(
            "DT_STRTAB address {vaddr:#x} is not inside any PT_LOAD segment's file contents"
        )))
    }
}

/// Pushes `value` onto `list` unless it already holds `limit` values.
fn push_capped(
    list: &mut Vec<u64>,
    value: u64,
    what: &'static str,
    limit: usize,
) -> Result<(), ElfError> {
    if list.len() >= limit {
        return Err(ElfError::TooMany { what, limit });
    }
    list.push(value);
    Ok(())
}

/// The NUL-terminated string at the start of `bytes`, at most `MAX_STRING` bytes, lossy UTF-8.
fn c_string(bytes: &[u8], what: &'static str) -> Result<String, ElfError> {
    let window = &bytes[..bytes.len().min(MAX_STRING + 1)];
    match window.iter().position(|&b| b == 0) {
        Some(len) => Ok(String::from_utf8_lossy(&window[..len]).into_owned()),
        None if bytes.len() > MAX_STRING => Err(ElfError::TooMany {
            what: "bytes in a string",
            limit: MAX_STRING,
        }),
        None => Err(ElfError::Malformed(format!(
            "the {what} is not NUL-terminated"
        ))),
    }
}

/// The string at offset `off` of the dynamic string table `table`.
fn table_string(table: &[u8], off: u64) -> Result<String, ElfError> {
    let rest = usize::try_from(off)
        .ok()
        .and_then(|off| table.get(off..))
        .filter(|rest| !rest.is_empty())
        .ok_or_else(|| {
            ElfError::Malformed(format!(
                "string offset {off} is outside the {}-byte dynamic string table",
                table.len()
            ))
        })?;
    c_string(rest, "string in the dynamic string table")
}

/// A `DT_RUNPATH`/`DT_RPATH` value's directories, empty components left out.
fn split_search_path(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    // ---- a builder of minimal ELF images ----

    /// Where the built image's pieces begin.
    const BASE: u64 = 0x10000;

    #[derive(Clone)]
    struct Spec {
        is64: bool,
        big_endian: bool,
        interp: Option<String>,
        dynamic: bool,
        needed: Vec<String>,
        runpath: Option<String>,
        rpath: Option<String>,
        dt_null: bool,
    }

    impl Spec {
        fn full(is64: bool, big_endian: bool) -> Self {
            Self {
                is64,
                big_endian,
                interp: Some("/lib/ld-test.so.1".into()),
                dynamic: true,
                needed: vec!["libc.so.6".into(), "libm.so.6".into()],
                runpath: Some("$ORIGIN/../lib:/opt/x/lib".into()),
                rpath: Some("${ORIGIN}::/usr/local/lib".into()),
                dt_null: true,
            }
        }
    }

    struct Built {
        bytes: Vec<u8>,
        is64: bool,
        big_endian: bool,
        interp_off: usize,
        dyn_off: usize,
        /// Offsets of each dynamic entry's value, by tag, in order.
        dyn_vals: Vec<(u64, usize)>,
        strtab_len: usize,
    }

    impl Built {
        fn word(&self) -> usize {
            if self.is64 { 8 } else { 4 }
        }

        fn patch(&mut self, off: usize, width: usize, value: u64) {
            let bytes = to_bytes(value, width, self.big_endian);
            self.bytes[off..off + width].copy_from_slice(&bytes);
        }

        fn patch_word(&mut self, off: usize, value: u64) {
            self.patch(off, self.word(), value);
        }

        fn dyn_val(&self, tag: u64) -> usize {
            self.dyn_vals
                .iter()
                .find(|(t, _)| *t == tag)
                .map(|(_, off)| *off)
                .expect("tag present")
        }

        /// (e_phoff, e_phentsize, e_phnum, e_shoff, e_shentsize, e_shnum) offsets.
        fn header_offsets(&self) -> (usize, usize, usize, usize, usize, usize) {
            if self.is64 {
                (32, 54, 56, 40, 58, 60)
            } else {
                (28, 42, 44, 32, 46, 48)
            }
        }
    }

    fn to_bytes(value: u64, width: usize, big_endian: bool) -> Vec<u8> {
        let le = value.to_le_bytes();
        let mut bytes = le[..width].to_vec();
        if big_endian {
            bytes.reverse();
        }
        bytes
    }

    fn build(spec: &Spec) -> Built {
        let (ehsize, phentsize, word) = if spec.is64 { (64, 56, 8) } else { (52, 32, 4) };
        let dynent = 2 * word;

        let mut strtab = vec![0u8];
        let mut add = |s: &str| {
            let off = strtab.len() as u64;
            strtab.extend_from_slice(s.as_bytes());
            strtab.push(0);
            off
        };
        let mut dyns: Vec<(u64, u64)> = Vec::new();
        for name in &spec.needed {
            dyns.push((DT_NEEDED, add(name)));
        }
        if let Some(path) = &spec.runpath {
            dyns.push((DT_RUNPATH, add(path)));
        }
        if let Some(path) = &spec.rpath {
            dyns.push((DT_RPATH, add(path)));
        }
        dyns.push((12, 0x1234)); // DT_INIT: ignored
        dyns.push((DT_STRTAB, 0)); // patched below
        dyns.push((DT_STRSZ, strtab.len() as u64));
        if spec.dt_null {
            dyns.push((DT_NULL, 0));
        }

        let phnum = usize::from(spec.interp.is_some()) + 1 + usize::from(spec.dynamic);
        let phoff = ehsize;
        let interp_off = phoff + phnum * phentsize;
        let interp_len = spec.interp.as_ref().map_or(0, |s| s.len() + 1);
        let dyn_off = interp_off + interp_len;
        let dyn_len = if spec.dynamic { dyns.len() * dynent } else { 0 };
        let strtab_off = dyn_off + dyn_len;
        let strtab_len = if spec.dynamic { strtab.len() } else { 0 };
        let total = strtab_off + strtab_len;
        for d in &mut dyns {
            if d.0 == DT_STRTAB {
                d.1 = BASE + strtab_off as u64;
            }
        }

        let be = spec.big_endian;
        let mut b: Vec<u8> = Vec::with_capacity(total);
        let put = |b: &mut Vec<u8>, value: u64, width: usize| {
            b.extend_from_slice(&to_bytes(value, width, be));
        };
        // ELF header.
        b.extend_from_slice(MAGIC);
        b.push(if spec.is64 { ELFCLASS64 } else { ELFCLASS32 });
        b.push(if be { ELFDATA2MSB } else { ELFDATA2LSB });
        b.push(1);
        b.resize(EI_NIDENT, 0);
        put(&mut b, 2, 2); // e_type: ET_EXEC
        put(&mut b, if spec.is64 { 62 } else { 20 }, 2); // e_machine
        put(&mut b, 1, 4); // e_version
        put(&mut b, BASE, word); // e_entry
        put(&mut b, phoff as u64, word); // e_phoff
        put(&mut b, 0, word); // e_shoff
        put(&mut b, 0, 4); // e_flags
        put(&mut b, ehsize as u64, 2);
        put(&mut b, phentsize as u64, 2);
        put(&mut b, phnum as u64, 2);
        put(&mut b, if spec.is64 { 64 } else { 40 }, 2); // e_shentsize
        put(&mut b, 0, 2); // e_shnum
        put(&mut b, 0, 2); // e_shstrndx
        assert_eq!(b.len(), ehsize);

        let phdr = |b: &mut Vec<u8>, p_type: u32, offset: usize, filesz: usize| {
            let (offset, vaddr, filesz) = (offset as u64, BASE + offset as u64, filesz as u64);
            if spec.is64 {
                put(b, u64::from(p_type), 4);
                put(b, 4, 4); // p_flags
                put(b, offset, 8);
                put(b, vaddr, 8);
                put(b, vaddr, 8); // p_paddr
                put(b, filesz, 8);
                put(b, filesz, 8); // p_memsz
                put(b, 8, 8); // p_align
            } else {
                put(b, u64::from(p_type), 4);
                put(b, offset, 4);
                put(b, vaddr, 4);
                put(b, vaddr, 4);
                put(b, filesz, 4);
                put(b, filesz, 4);
                put(b, 4, 4);
                put(b, 4, 4);
            }
        };
        if spec.interp.is_some() {
            phdr(&mut b, PT_INTERP, interp_off, interp_len);
        }
        phdr(&mut b, PT_LOAD, 0, total);
        if spec.dynamic {
            phdr(&mut b, PT_DYNAMIC, dyn_off, dyn_len);
        }
        assert_eq!(b.len(), interp_off);
        if let Some(interp) = &spec.interp {
            b.extend_from_slice(interp.as_bytes());
            b.push(0);
        }
        let mut dyn_vals = Vec::new();
        if spec.dynamic {
            for &(tag, val) in &dyns {
                put(&mut b, tag, word);
                dyn_vals.push((tag, b.len()));
                put(&mut b, val, word);
            }
            b.extend_from_slice(&strtab);
        }
        assert_eq!(b.len(), total);
        Built {
            bytes: b,
            is64: spec.is64,
            big_endian: be,
            interp_off,
            dyn_off,
            dyn_vals,
            strtab_len,
        }
    }

    /// All four class/byte-order combinations.
    fn combos() -> [(bool, bool); 4] {
        [(false, false), (false, true), (true, false), (true, true)]
    }

    fn expected_full() -> ElfDeps {
        ElfDeps {
            interp: Some("/lib/ld-test.so.1".into()),
            needed: vec!["libc.so.6".into(), "libm.so.6".into()],
            runpath: vec!["$ORIGIN/../lib".into(), "/opt/x/lib".into()],
            rpath: vec!["${ORIGIN}".into(), "/usr/local/lib".into()],
        }
    }

    fn err(data: &[u8]) -> ElfError {
        match parse(data) {
            Err(e) => e,
            Ok(deps) => panic!("expected an error, got {deps:?}"),
        }
    }

    // ---- hand-built images ----

    #[test]
    fn elf64_little_endian_every_field() {
        let built = build(&Spec::full(true, false));
        assert_eq!(parse(&built.bytes).unwrap(), Some(expected_full()));
    }

    #[test]
    fn elf32_big_endian_every_field() {
        let built = build(&Spec::full(false, true));
        assert_eq!(built.bytes[4], ELFCLASS32);
        assert_eq!(built.bytes[5], ELFDATA2MSB);
        assert_eq!(parse(&built.bytes).unwrap(), Some(expected_full()));
    }

    #[test]
    fn all_classes_and_byte_orders() {
        for (is64, be) in combos() {
            let built = build(&Spec::full(is64, be));
            assert_eq!(
                parse(&built.bytes).unwrap(),
                Some(expected_full()),
                "is64={is64} be={be}"
            );
        }
    }

    #[test]
    fn static_executable_has_no_dependencies() {
        for (is64, be) in combos() {
            let spec = Spec {
                interp: None,
                dynamic: false,
                ..Spec::full(is64, be)
            };
            assert_eq!(
                parse(&build(&spec).bytes).unwrap(),
                Some(ElfDeps::default())
            );
        }
    }

    #[test]
    fn shared_library_without_interp() {
        let spec = Spec {
            interp: None,
            runpath: None,
            rpath: None,
            ..Spec::full(true, false)
        };
        let deps = parse(&build(&spec).bytes).unwrap().unwrap();
        assert_eq!(deps.interp, None);
        assert_eq!(deps.needed, ["libc.so.6", "libm.so.6"]);
        assert!(deps.runpath.is_empty() && deps.rpath.is_empty());
    }

    #[test]
    fn dynamic_without_strings_needs_no_strtab() {
        let spec = Spec {
            needed: vec![],
            runpath: None,
            rpath: None,
            ..Spec::full(false, false)
        };
        let mut built = build(&spec);
        let at = built.dyn_val(DT_STRTAB);
        built.patch_word(at, 0xdead_0000); // would be outside every PT_LOAD
        let deps = parse(&built.bytes).unwrap().unwrap();
        assert!(deps.needed.is_empty());
        assert_eq!(deps.interp.as_deref(), Some("/lib/ld-test.so.1"));
    }

    #[test]
    fn missing_strsz_bounds_table_by_load_segment() {
        let mut built = build(&Spec::full(true, true));
        let at = built.dyn_val(DT_STRSZ);
        // Turn DT_STRSZ into an ignored tag.
        built.patch_word(at - 8, 12);
        assert_eq!(parse(&built.bytes).unwrap(), Some(expected_full()));
    }

    #[test]
    fn pn_xnum_reads_section_zero() {
        for (is64, be) in combos() {
            let mut built = build(&Spec::full(is64, be));
            let (_, _, e_phnum, e_shoff, _, e_shnum) = built.header_offsets();
            let shoff = built.bytes.len();
            let (shentsize, sh_info) = if is64 { (64, 44) } else { (40, 28) };
            built.bytes.resize(shoff + shentsize, 0);
            built.patch(shoff + sh_info, 4, 3);
            built.patch_word(e_shoff, shoff as u64);
            built.patch(e_shnum, 2, 1);
            built.patch(e_phnum, 2, PN_XNUM);
            assert_eq!(parse(&built.bytes).unwrap(), Some(expected_full()));

            // A huge count is refused before anything is allocated for it.
            built.patch(shoff + sh_info, 4, 100_000);
            assert!(matches!(
                err(&built.bytes),
                ElfError::TooMany {
                    what: "program headers",
                    ..
                }
            ));
            // A count under the cap but past the file.
            built.patch(shoff + sh_info, 4, 60_000);
            assert!(matches!(err(&built.bytes), ElfError::Truncated { .. }));
            // Section 0 past the end of the file.
            built.patch_word(e_shoff, shoff as u64 + 1);
            assert!(matches!(err(&built.bytes), ElfError::Truncated { .. }));
            // No section header at all.
            built.patch_word(e_shoff, 0);
            let e = err(&built.bytes);
            assert!(e.to_string().contains("PN_XNUM"), "{e}");
        }
    }

    // ---- not ELF, and hostile input ----

    #[test]
    fn not_elf_is_none() {
        assert!(!is_elf(b""));
        assert!(!is_elf(b"\x7fEL"));
        assert!(is_elf(b"\x7fELF"));
        assert!(!is_elf(b"#!/bin/sh\n"));
        for data in [
            &b""[..],
            b"\x7f",
            b"\x7fEL",
            b"#!/bin/sh\necho hi\n",
            b"MZ\x90\x00",
        ] {
            assert_eq!(parse(data).unwrap(), None);
        }
    }

    #[test]
    fn truncated_header_is_error() {
        for (is64, be) in combos() {
            let built = build(&Spec::full(is64, be));
            let ehsize = if is64 { 64 } else { 52 };
            for len in 4..ehsize {
                assert!(
                    matches!(err(&built.bytes[..len]), ElfError::Truncated { .. }),
                    "len {len}"
                );
            }
        }
        let e = err(b"\x7fELF");
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn every_truncation_is_error() {
        // The image ends with the string table, so any cut loses something that is read.
        for (is64, be) in combos() {
            let built = build(&Spec::full(is64, be));
            for len in 4..built.bytes.len() {
                assert!(parse(&built.bytes[..len]).is_err(), "len {len}");
            }
        }
    }

    #[test]
    fn bad_class_or_encoding_is_error() {
        let mut built = build(&Spec::full(true, false));
        built.bytes[4] = 3;
        assert!(matches!(err(&built.bytes), ElfError::Malformed(_)));
        built.bytes[4] = ELFCLASS64;
        built.bytes[5] = 0;
        assert!(matches!(err(&built.bytes), ElfError::Malformed(_)));
    }

    #[test]
    fn program_header_table_out_of_bounds() {
        for (is64, be) in combos() {
            let base = build(&Spec::full(is64, be));
            let (e_phoff, e_phentsize, e_phnum, ..) = base.header_offsets();
            let len = base.bytes.len() as u64;
            let word_max = if is64 { u64::MAX } else { u64::from(u32::MAX) };

            for phoff in [len, len - 10, word_max, word_max - 3] {
                let mut b = build(&Spec::full(is64, be));
                b.patch_word(e_phoff, phoff);
                assert!(
                    matches!(err(&b.bytes), ElfError::Truncated { .. }),
                    "phoff {phoff}"
                );
            }
            for phnum in [1000, 0xfffe] {
                let mut b = build(&Spec::full(is64, be));
                b.patch(e_phnum, 2, phnum);
                assert!(matches!(err(&b.bytes), ElfError::Truncated { .. }));
            }
            let mut b = build(&Spec::full(is64, be));
            b.patch(e_phentsize, 2, 0xffff);
            assert!(matches!(err(&b.bytes), ElfError::Truncated { .. }));
            b.patch(e_phentsize, 2, 8);
            assert!(matches!(err(&b.bytes), ElfError::Malformed(_)));
        }
    }

    #[test]
    fn no_program_headers_means_no_dependencies() {
        let mut built = build(&Spec::full(true, false));
        let (_, _, e_phnum, ..) = built.header_offsets();
        built.patch(e_phnum, 2, 0);
        assert_eq!(parse(&built.bytes).unwrap(), Some(ElfDeps::default()));
    }

    #[test]
    fn segments_out_of_bounds() {
        for (is64, be) in combos() {
            // PT_INTERP is the first program header; PT_DYNAMIC the third.
            let phentsize = if is64 { 56 } else { 32 };
            let phoff = if is64 { 64 } else { 52 };
            let (off_field, filesz_field) = if is64 { (8, 32) } else { (4, 16) };
            for ph in [0, 2] {
                let mut b = build(&Spec::full(is64, be));
                let at = phoff + ph * phentsize;
                b.patch_word(at + filesz_field, b.bytes.len() as u64);
                assert!(matches!(err(&b.bytes), ElfError::Truncated { .. }));
                let mut b = build(&Spec::full(is64, be));
                b.patch_word(at + off_field, if is64 { u64::MAX } else { 0xffff_ffff });
                assert!(matches!(err(&b.bytes), ElfError::Truncated { .. }));
            }
        }
    }

    #[test]
    fn strtab_out_of_bounds() {
        for (is64, be) in combos() {
            let mut b = build(&Spec::full(is64, be));
            let strsz = b.dyn_val(DT_STRSZ);
            let word_max = if is64 { u64::MAX } else { u64::from(u32::MAX) };
            b.patch_word(strsz, word_max);
            assert!(matches!(err(&b.bytes), ElfError::Truncated { .. }));
            b.patch_word(strsz, b.strtab_len as u64 + 1);
            assert!(matches!(err(&b.bytes), ElfError::Truncated { .. }));

            let mut b = build(&Spec::full(is64, be));
            let strtab = b.dyn_val(DT_STRTAB);
            let len = b.bytes.len() as u64;
            // Outside every PT_LOAD.
            for vaddr in [0, BASE + len, word_max] {
                b.patch_word(strtab, vaddr);
                let e = err(&b.bytes);
                assert!(e.to_string().contains("PT_LOAD"), "{e}");
            }
            // Inside PT_LOAD, but DT_STRSZ runs past the end of the file.
            b.patch_word(strtab, BASE + len - 2);
            assert!(matches!(err(&b.bytes), ElfError::Truncated { .. }));

            // A DT_NEEDED offset past the table.
            let mut b = build(&Spec::full(is64, be));
            let needed = b.dyn_val(DT_NEEDED);
            b.patch_word(needed, b.strtab_len as u64);
            assert!(matches!(err(&b.bytes), ElfError::Malformed(_)));
            b.patch_word(needed, word_max);
            assert!(matches!(err(&b.bytes), ElfError::Malformed(_)));
        }
    }

    #[test]
    fn dynamic_without_dt_null_is_error() {
        for (is64, be) in combos() {
            let spec = Spec {
                dt_null: false,
                ..Spec::full(is64, be)
            };
            let e = err(&build(&spec).bytes);
            assert!(e.to_string().contains("DT_NULL"), "{e}");

            // The dynamic segment runs to the end of the file, with no DT_NULL (nor any zero
            // word) anywhere in it.
            let mut b = build(&spec);
            let word = b.word();
            let dyn_off = b.dyn_off;
            let len = b.bytes.len();
            for byte in &mut b.bytes[dyn_off + b.dyn_vals.len() * 2 * word..] {
                *byte = 0x41;
            }
            let phentsize = if is64 { 56 } else { 32 };
            let phoff = if is64 { 64 } else { 52 };
            let filesz_field = if is64 { 32 } else { 16 };
            b.patch_word(phoff + 2 * phentsize + filesz_field, (len - dyn_off) as u64);
            let e = err(&b.bytes);
            assert!(e.to_string().contains("DT_NULL"), "{e}");
        }
    }

    #[test]
    fn strings_without_nul_are_errors() {
        for (is64, be) in combos() {
            // The last string of the table (the rpath) loses its NUL at the end of the file.
            let mut b = build(&Spec::full(is64, be));
            let last = b.bytes.len() - 1;
            b.bytes[last] = b'x';
            let e = err(&b.bytes);
            assert!(e.to_string().contains("NUL"), "{e}");

            // DT_STRSZ cuts the last string short of its NUL.
            let mut b = build(&Spec::full(is64, be));
            let strsz = b.dyn_val(DT_STRSZ);
            b.patch_word(strsz, b.strtab_len as u64 - 1);
            assert!(matches!(err(&b.bytes), ElfError::Malformed(_)));

            // The interpreter path fills its segment with no NUL.
            let mut b = build(&Spec::full(is64, be));
            let nul = b.interp_off + "/lib/ld-test.so.1".len();
            assert_eq!(b.bytes[nul], 0);
            b.bytes[nul] = b'x';
            let e = err(&b.bytes);
            assert!(e.to_string().contains("PT_INTERP"), "{e}");

            // An empty interpreter path.
            let mut b = build(&Spec::full(is64, be));
            let at = b.interp_off;
            b.bytes[at] = 0;
            assert!(matches!(err(&b.bytes), ElfError::Malformed(_)));
        }
    }

    #[test]
    fn limits_are_enforced() {
        let spec = Spec {
            needed: vec!["a".into(); MAX_NEEDED + 1],
            ..Spec::full(true, false)
        };
        assert!(matches!(
            err(&build(&spec).bytes),
            ElfError::TooMany {
                what: "DT_NEEDED entries",
                ..
            }
        ));
        let spec = Spec {
            needed: vec!["a".into(); MAX_NEEDED],
            ..Spec::full(true, false)
        };
        assert_eq!(
            parse(&build(&spec).bytes).unwrap().unwrap().needed.len(),
            MAX_NEEDED
        );

        let long = "l".repeat(MAX_STRING + 1);
        let spec = Spec {
            needed: vec![long.clone()],
            ..Spec::full(false, true)
        };
        assert!(matches!(
            err(&build(&spec).bytes),
            ElfError::TooMany {
                limit: MAX_STRING,
                ..
            }
        ));
        let spec = Spec {
            interp: Some(long),
            ..Spec::full(false, true)
        };
        assert!(matches!(
            err(&build(&spec).bytes),
            ElfError::TooMany {
                limit: MAX_STRING,
                ..
            }
        ));
        let exact = "e".repeat(MAX_STRING);
        let spec = Spec {
            needed: vec![exact.clone()],
            ..Spec::full(false, true)
        };
        assert_eq!(parse(&build(&spec).bytes).unwrap().unwrap().needed, [exact]);
    }

    #[test]
    fn lossy_utf8_strings() {
        let mut b = build(&Spec::full(true, false));
        let at = b.interp_off + 1;
        b.bytes[at] = 0xff;
        let deps = parse(&b.bytes).unwrap().unwrap();
        assert_eq!(deps.interp.as_deref(), Some("/\u{fffd}ib/ld-test.so.1"));
    }

    // ---- random mutations never panic ----

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    /// Mutates `data`, favouring `hot` (the ranges the parser reads), and parses the result.
    fn mutate_and_parse(rng: &mut XorShift, original: &[u8], hot: &[(usize, usize)]) {
        let mut data = original.to_vec();
        for _ in 0..1 + rng.below(4) {
            if data.is_empty() {
                break;
            }
            let pos = match hot.get(rng.below(hot.len() * 2)) {
                Some(&(start, len)) if start < data.len() => {
                    (start + rng.below(len.max(1))).min(data.len() - 1)
                }
                _ => rng.below(data.len()),
            };
            match rng.below(5) {
                0 => data[pos] = rng.next() as u8,
                1 => data[pos] ^= 1 << rng.below(8),
                2 => {
                    let fill = [0x00, 0xff, 0x7f, 0x80][rng.below(4)];
                    let end = (pos + 1 + rng.below(8)).min(data.len());
                    data[pos..end].fill(fill);
                }
                3 => {
                    let value = rng.next().to_le_bytes();
                    let end = (pos + 8).min(data.len());
                    data[pos..end].copy_from_slice(&value[..end - pos]);
                }
                _ => data.truncate(rng.below(original.len() + 1)),
            }
        }
        let _ = parse(&data);
    }

    #[test]
    fn random_mutations_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let images: Vec<Vec<u8>> = combos()
            .into_iter()
            .map(|(is64, be)| build(&Spec::full(is64, be)).bytes)
            .collect();
        for i in 0..4000 {
            let image = &images[i % images.len()];
            mutate_and_parse(&mut rng, image, &[(0, image.len())]);
        }

        let Some(ls) = read_host_ls() else {
            println!("skipping /bin/ls mutations: neither /bin/ls nor /usr/bin/ls is readable");
            return;
        };
        // The parts of /bin/ls the parser reads: the headers, PT_DYNAMIC and the string table.
        let mut hot = vec![(0, 4096)];
        let elf = Elf::new(&ls).unwrap();
        let phdrs = elf.program_headers().unwrap();
        for ph in &phdrs {
            if matches!(ph.p_type, PT_DYNAMIC | PT_INTERP) {
                hot.push((ph.offset as usize, ph.filesz as usize));
            }
        }
        let mut deps = ElfDeps::default();
        let dynamic = phdrs.iter().find(|ph| ph.p_type == PT_DYNAMIC).unwrap();
        elf.dynamic(dynamic, &phdrs, &mut deps).unwrap();
        for i in 0..dynamic.filesz / 16 {
            let at = dynamic.offset + i * 16;
            if elf.word(at, "test").unwrap() == DT_STRTAB {
                let vaddr = elf.word(at + 8, "test").unwrap();
                let (off, _) = elf.file_offset(vaddr, &phdrs).unwrap();
                hot.push((off as usize, 2048));
            }
        }
        for _ in 0..1500 {
            mutate_and_parse(&mut rng, &ls, &hot);
        }
    }

    // ---- real files from the host ----

    fn read_host_ls() -> Option<Vec<u8>> {
        std::fs::read("/bin/ls")
            .or_else(|_| std::fs::read("/usr/bin/ls"))
            .ok()
    }

    #[test]
    fn host_ls() {
        let Some(ls) = read_host_ls() else {
            println!("skipping: neither /bin/ls nor /usr/bin/ls is readable");
            return;
        };
        if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            println!("skipping: not an x86_64 Linux host");
            return;
        }
        let deps = parse(&ls).unwrap().unwrap();
        assert_eq!(deps.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(deps.needed.iter().any(|n| n == "libc.so.6"), "{deps:?}");
        assert!(deps.runpath.is_empty() && deps.rpath.is_empty(), "{deps:?}");
    }

    #[test]
    fn host_libc() {
        let path = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        let Ok(libc) = std::fs::read(path) else {
            println!("skipping: {path} is not readable");
            return;
        };
        let deps = parse(&libc).unwrap().unwrap();
        // glibc's libc.so.6 is also runnable, so it names the loader as its interpreter.
        assert_eq!(deps.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert_eq!(deps.needed, ["ld-linux-x86-64.so.2"]);
        assert!(deps.runpath.is_empty() && deps.rpath.is_empty(), "{deps:?}");
    }

    #[test]
    fn host_library_with_runpath() {
        // Debian 12's LLVM ships with RUNPATH $ORIGIN/../lib.
        let path = "/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14";
        let Ok(data) = std::fs::read(path) else {
            println!("skipping: {path} is not readable");
            return;
        };
        let deps = parse(&data).unwrap().unwrap();
        assert_eq!(deps.runpath, ["$ORIGIN/../lib"]);
        assert!(deps.rpath.is_empty());
        assert_eq!(deps.interp, None);
        assert!(deps.needed.iter().any(|n| n == "libc.so.6"), "{deps:?}");
    }

    #[test]
    fn compiled_library_with_runpath_and_rpath() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("t.c");
        std::fs::write(&src, "int arbor_elf_test(void) { return 42; }\n").unwrap();
        for (dtags, is_runpath) in [("--enable-new-dtags", true), ("--disable-new-dtags", false)] {
            let out = dir.path().join(format!("lib{dtags}.so"));
            let status = Command::new("cc")
                .args(["-shared", "-fPIC", "-o"])
                .arg(&out)
                .arg(&src)
                .arg("-Wl,-rpath,$ORIGIN/../lib:${ORIGIN}/x::/opt/arbor")
                .arg(format!("-Wl,{dtags}"))
                .args(["-Wl,--no-as-needed", "-lm"])
                .status();
            match status {
                Ok(s) if s.success() => {}
                other => {
                    println!("skipping: cannot build a shared library with cc: {other:?}");
                    return;
                }
            }
            let deps = parse(&std::fs::read(&out).unwrap()).unwrap().unwrap();
            let dirs = ["$ORIGIN/../lib", "${ORIGIN}/x", "/opt/arbor"];
            if is_runpath {
                assert_eq!(deps.runpath, dirs);
                assert!(deps.rpath.is_empty());
            } else {
                assert_eq!(deps.rpath, dirs);
                assert!(deps.runpath.is_empty());
            }
            assert_eq!(deps.interp, None);
            assert!(deps.needed.iter().any(|n| n == "libm.so.6"), "{deps:?}");
            assert!(deps.needed.iter().any(|n| n == "libc.so.6"), "{deps:?}");
        }
    }

    /// What `readelf` says `path` needs.
    fn readelf(path: &Path) -> Option<ElfDeps> {
        let out = Command::new("readelf")
            .args(["-W", "-l", "-d"])
            .arg(path)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let bracketed = |line: &str| {
            let start = line.find('[')? + 1;
            let end = line.rfind(']')?;
            Some(line.get(start..end)?.to_owned())
        };
        let mut deps = ElfDeps::default();
        for line in text.lines() {
            if line.contains("[Requesting program interpreter:") {
                let value = bracketed(line)?;
                deps.interp = Some(
                    value
                        .trim_start_matches("Requesting program interpreter: ")
                        .to_owned(),
                );
            } else if line.contains("(NEEDED)") {
                deps.needed.push(bracketed(line)?);
            } else if line.contains("(RUNPATH)") {
                deps.runpath.extend(split_search_path(&bracketed(line)?));
            } else if line.contains("(RPATH)") {
                deps.rpath.extend(split_search_path(&bracketed(line)?));
            }
        }
        Some(deps)
    }

    #[test]
    fn host_files_agree_with_readelf() {
        if Command::new("readelf").arg("--version").output().is_err() {
            println!("skipping: readelf is not installed");
            return;
        }
        let mut files = vec![
            Path::new("/bin/ls").to_path_buf(),
            Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6").to_path_buf(),
        ];
        for dir in ["/usr/bin", "/usr/lib/x86_64-linux-gnu"] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut paths: Vec<_> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
            paths.sort();
            files.extend(
                paths
                    .into_iter()
                    .filter(|p| {
                        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() < 4 << 20)
                    })
                    .take(40),
            );
        }
        let mut checked = 0;
        for path in files {
            let Ok(data) = std::fs::read(&path) else {
                continue;
            };
            if !is_elf(&data) {
                assert_eq!(parse(&data).unwrap(), None);
                continue;
            }
            let Some(expected) = readelf(&path) else {
                continue;
            };
            let deps = parse(&data)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .unwrap();
            assert_eq!(deps, expected, "{}", path.display());
            checked += 1;
        }
        println!("{checked} host ELF files agree with readelf");
        assert!(checked > 0 || !Path::new("/bin/ls").exists());
    }
}
