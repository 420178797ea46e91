//! Handing start-up memory back. Start-up parses configuration, the kernel's
//! BTF and the eBPF object, runs the Kubernetes client's set-up and the
//! first state build: megabytes of heap freed since, and code (with the
//! kernel's fault-around, 64 KiB of the binary per first touch) that the
//! proxies never run again. Both stay resident until given back.

use std::{io, path::Path};

/// Returns the heap's free pages to the system instead of keeping them in
/// malloc's free lists.
#[expect(unsafe_code, reason = "malloc_trim")]
pub fn release_free_heap() {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
}

/// Unmaps the resident pages of this binary's read-only mappings that hold
/// only clean file pages, so the resident set is what the agent runs from
/// now on: a page touched again comes back from the page cache (a minor
/// fault). Mappings with any private (relocated) page are left alone, since
/// dropping those would lose what the loader wrote. Returns the bytes
/// unmapped.
pub fn release_startup_code() -> io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for vma in clean_code_mappings(&smaps, &exe) {
        if madvise_dontneed(vma.start, vma.end - vma.start).is_ok() {
            released += vma.rss;
        }
    }
    Ok(released)
}

#[derive(Debug, PartialEq)]
struct Vma {
    start: usize,
    end: usize,
    /// Resident bytes.
    rss: u64,
}

/// The mappings of `exe` that are not writable and hold no anonymous
/// (copied-on-write) page, from `/proc/self/smaps`.
fn clean_code_mappings(smaps: &str, exe: &Path) -> Vec<Vma> {
    let exe = exe.to_string_lossy();
    let mut out = Vec::new();
    // (vma, candidate so far)
    let mut current: Option<(Vma, bool)> = None;
    let finish = |current: Option<(Vma, bool)>, out: &mut Vec<Vma>| {
        if let Some((vma, true)) = current
            && vma.rss > 0
        {
            out.push(vma);
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            finish(current.take(), &mut out);
            let perms = fields.next().unwrap_or("");
            // offset, device, inode, then the path (which may hold spaces).
            let path = fields.skip(3).collect::<Vec<_>>().join(" ");
            let candidate =
                perms.starts_with('r') && perms.as_bytes().get(1) == Some(&b'-') && path == exe;
            current = Some((Vma { start, end, rss: 0 }, candidate));
            continue;
        }
        let Some((vma, candidate)) = current.as_mut() else {
            continue;
        };
        let bytes = fields
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024;
        match first {
            "Rss:" => vma.rss = bytes,
            "Anonymous:" if bytes > 0 => *candidate = false,
            _ => {}
        }
    }
    finish(current.take(), &mut out);
    out
}

#[expect(unsafe_code, reason = "madvise")]
fn madvise_dontneed(start: usize, len: usize) -> io::Result<()> {
    // SAFETY: the range is a whole mapping of this binary that is not
    // writable and holds only clean file pages: discarding them changes no
    // content, the next access maps the same file pages again.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0200000 r--p 00000000 08:01 1234 /usr/bin/trellis agent
Rss:                1024 kB
Anonymous:             0 kB
55d0a0200000-55d0a1200000 r-xp 00200000 08:01 1234 /usr/bin/trellis agent
Size:              16384 kB
Rss:                9000 kB
Anonymous:             0 kB
55d0a1200000-55d0a1300000 r--p 01200000 08:01 1234 /usr/bin/trellis agent
Rss:                 400 kB
Anonymous:           400 kB
55d0a1300000-55d0a1310000 rw-p 01300000 08:01 1234 /usr/bin/trellis agent
Rss:                  64 kB
Anonymous:            12 kB
55d0a1310000-55d0a1320000 r-xp 00000000 08:01 99 /usr/lib/libc.so.6
Rss:                  64 kB
Anonymous:             0 kB
7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0 [vdso]
Rss:                   4 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_binary() {
        let vmas = clean_code_mappings(SMAPS, Path::new("/usr/bin/trellis agent"));
        assert_eq!(
            vmas,
            vec![
                Vma {
                    start: 0x55d0a0000000,
                    end: 0x55d0a0200000,
                    rss: 1024 * 1024
                },
                Vma {
                    start: 0x55d0a0200000,
                    end: 0x55d0a1200000,
                    rss: 9000 * 1024
                },
            ]
        );
    }

    #[test]
    fn the_running_binary_keeps_working_after_its_code_is_unmapped() {
        let released = release_startup_code().unwrap();
        assert!(released > 0, "nothing of the test binary was resident?");
        // Code and read-only data come back from the page cache.
        let text: String = ["still", "running"].join(" ");
        assert_eq!(text, "still running");
        assert!(format!("{:?}", std::time::Duration::from_millis(1500)).contains("1.5"));
    }
}
