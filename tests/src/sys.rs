//! Host plumbing the harness needs: running commands, bpffs, cgroup2.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Runs `cmd`, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// The bpffs root, mounted if it was not.
pub fn bpffs_root() -> anyhow::Result<PathBuf> {
    let root = PathBuf::from("/sys/fs/bpf");
    if trellis_agent::bpf::sys::fs_magic(&root)? != 0xcafe_4a11 {
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&root))
            .context("mounting bpffs at /sys/fs/bpf")?;
    }
    Ok(root)
}

/// The cgroup2 mount, found from mountinfo (hybrid hosts have it elsewhere
/// than /sys/fs/cgroup).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    Ok(trellis_agent::cgroup::cgroup2_mount()?)
}

/// Removes a cgroup folder tree, deepest first, after killing what is left in it.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    for d in dirs.iter().rev() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: plain kill(2) on a pid read from the cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    for d in dirs.iter().rev() {
        // A killed process leaves its cgroup a moment later.
        for _ in 0..50 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `bpftool -j ARGS...`, parsed; `null` when it prints nothing.
pub fn bpftool_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> anyhow::Result<serde_json::Value> {
    let out = run(Command::new("bpftool").arg("-j").args(args))?;
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&out).context("bpftool JSON")
}

/// `bpftool map dump pinned MAP`: every entry, with BTF field names under
/// `formatted`.
pub fn bpftool_map_dump(map: &Path) -> anyhow::Result<serde_json::Value> {
    bpftool_json(&[
        Path::new("map"),
        Path::new("dump"),
        Path::new("pinned"),
        map,
    ])
}

/// Names of the BPF programs attached at `cgroup`, sorted, as bpftool lists them.
pub fn cgroup_program_names(cgroup: &Path) -> anyhow::Result<Vec<String>> {
    let progs = bpftool_json(&[Path::new("cgroup"), Path::new("show"), cgroup])?;
    let mut names: Vec<String> = progs
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Runs `f` on a thread of its own inside the network namespace at
/// `netns` (setns changes only the calling thread).
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    use std::os::fd::AsRawFd as _;
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a descriptor we opened; this thread ends after `f`.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in {} panicked", netns.display()))?
    })
}

/// The index of interface `name` in the network namespace at `netns`.
pub fn ifindex_in(netns: &Path, name: &str) -> anyhow::Result<u32> {
    let c_name = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    let index = in_netns(netns, || unsafe { libc::if_nametoindex(c_name.as_ptr()) })?;
    anyhow::ensure!(index != 0, "no interface {name} in {}", netns.display());
    Ok(index)
}

/// Moves the calling thread to `SCHED_IDLE`: it runs only when no other task
/// wants its CPU.
pub fn sched_idle() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid param.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}
