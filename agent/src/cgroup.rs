//! cgroup v2 lookups. Hosts may be hybrid (v1 controllers on /sys/fs/cgroup,
//! v2 elsewhere), so the v2 mount is always found from mountinfo.

use std::{
    io,
    path::{Path, PathBuf},
};

/// `statfs` magic of a cgroup v2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The first cgroup2 mount point in `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&mountinfo).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 file system is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)",
        )
    })
}

/// Finds the mount point of the first `cgroup2` entry of a mountinfo text.
/// Fields: id parent major:minor root mountpoint options [optional...] - fstype source superoptions.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mount_point = pre.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Whether `path` is a folder on a cgroup v2 file system.
pub fn is_cgroup2(path: &Path) -> io::Result<bool> {
    Ok(crate::bpf::sys::fs_magic(path)? == CGROUP2_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let mountinfo = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev shared:7 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount() {
        let mountinfo = "27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(mountinfo), None);
    }

    #[test]
    fn the_running_host_has_one() {
        // Every machine this project runs on has cgroup v2 somewhere.
        let mount = cgroup2_mount().expect("cgroup2 mount");
        assert!(is_cgroup2(&mount).expect("statfs"), "{}", mount.display());
    }
}
