//! Background work at a lower CPU priority: disk-cache writers, a layer's background proof.

/// Lowers the calling thread's CPU priority to nice `n` until dropped (on Linux nice values
/// are per thread, so a pooled thread gets its priority back when the guard goes).
pub struct Niced(Option<i32>);

impl Niced {
    pub fn lower(n: i32) -> Niced {
        // SAFETY: getpriority/setpriority on the calling thread only (who = 0 is the calling
        // thread for PRIO_PROCESS on Linux); errno is reset first because -1 is a valid
        // priority.
        unsafe {
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, 0);
            if *libc::__errno_location() != 0 {
                return Niced(None);
            }
            libc::setpriority(libc::PRIO_PROCESS, 0, n);
            Niced(Some(old))
        }
    }
}

impl Drop for Niced {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            // SAFETY: as in `lower`. Restoring a lower nice value needs CAP_SYS_NICE (the
            // daemon runs as root); without it the thread stays at the lower priority, which
            // is harmless.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> i32 {
        // SAFETY: reads this thread's priority.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn lowers_this_thread_and_restores_it() {
        std::thread::spawn(|| {
            let before = nice();
            {
                let _n = Niced::lower(15);
                assert_eq!(nice(), 15.max(before));
            }
            // Restoring needs CAP_SYS_NICE; as root (CI) it is restored.
            // SAFETY: geteuid cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                assert_eq!(nice(), before);
            }
        })
        .join()
        .unwrap();
    }
}
