//! Stacking layer mounts into one read-only root: overlayfs with only lower directories (a
//! bind mount when there is a single layer), and unmounting.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::mount::Privileges;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("path contains NUL"))
}

/// Mounts the read-only union of `lowers` (bottom layer first) at `target` with
/// `nosuid,nodev`: the union's own flags are what the kernel checks on exec and open (not the
/// layers'), so a setuid file or a device node from an untrusted image grants nothing.
pub fn mount_readonly_union(lowers: &[PathBuf], target: &Path) -> io::Result<()> {
    mount_readonly_union_with(lowers, target, Privileges::NONE)
}

/// The mount flags of a read-only mount with `privileges`.
fn ro_flags(privileges: Privileges) -> libc::c_ulong {
    let mut f = libc::MS_RDONLY;
    if !privileges.suid {
        f |= libc::MS_NOSUID;
    }
    if !privileges.dev {
        f |= libc::MS_NODEV;
    }
    f
}

/// [`mount_readonly_union`] with explicit [`Privileges`] (`arbor mount --allow-suid
/// --allow-dev`).
pub fn mount_readonly_union_with(
    lowers: &[PathBuf],
    target: &Path,
    privileges: Privileges,
) -> io::Result<()> {
    let t = cstr(target)?;
    let flags = ro_flags(privileges);
    if lowers.len() == 1 {
        let src = cstr(&lowers[0])?;
        // SAFETY: valid NUL-terminated strings; null fstype/data are allowed for bind mounts.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                t.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; remount the bind read-only with the wanted flags (a bind
        // remount sets the per-mount flags to exactly these).
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                t.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | flags,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            let _ = unmount(target);
            return Err(e);
        }
        return Ok(());
    }
    // overlayfs lists lower directories top first.
    let mut lowerdir = String::from("lowerdir=");
    for (i, l) in lowers.iter().rev().enumerate() {
        let s = l
            .to_str()
            .ok_or_else(|| io::Error::other("non-UTF-8 layer path"))?;
        if s.contains([':', ',']) {
            return Err(io::Error::other("layer path contains ':' or ','"));
        }
        if i > 0 {
            lowerdir.push(':');
        }
        lowerdir.push_str(s);
    }
    let data = CString::new(lowerdir).map_err(|_| io::Error::other("NUL in options"))?;
    let fstype = CString::new("overlay").map_err(|_| io::Error::other("NUL"))?;
    // SAFETY: valid NUL-terminated strings for every argument.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            t.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmounts `target` (lazily if it is busy).
pub fn unmount(target: &Path) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(t.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        // SAFETY: as above.
        if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        return Err(io::Error::last_os_error());
    }
    Err(err)
}

/// Whether `target` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(target: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = target.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| unescape(m) == want.as_ref())
    })
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
