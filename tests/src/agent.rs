//! The `trellis` binary under test, running in a node.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{lab::Node, process::ChildGuard};

/// The freshly built `trellis` binary. Built once per test process (a no-op
/// when up to date), so a test never runs a stale agent. `TRELLIS_BIN` names
/// another one (the bench uses the release build).
pub fn trellis_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TRELLIS_BIN") {
            return PathBuf::from(bin);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root)
            .args([
                "build",
                "--quiet",
                "--package",
                "trellis-agent",
                "--bin",
                "trellis",
            ])
            .status()
            .expect("running cargo build for the trellis binary");
        assert!(status.success(), "building the trellis binary failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug").join("trellis")
    })
    .clone()
}

/// What a process has used, from /proc.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss: u64,
    pub peak_rss: u64,
}

/// A stopped agent, continued when dropped; see [`Agent::pause`].
pub struct Paused(i32);

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid `Agent::pause` stopped.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A running agent; killed when dropped (SIGKILL: what a crash looks like).
pub struct Agent {
    child: ChildGuard,
    log: PathBuf,
    node: Node,
}

impl Agent {
    /// Starts `trellis agent` in `node`'s network namespace with the node's
    /// cgroup root and bpffs folder, plus `extra` arguments.
    pub fn start(node: &Node, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(node, None, extra)
    }

    /// Like [`Agent::start`], with the agent's process in `cgroup` (for
    /// example a folder under the node's cgroup root, where pods live).
    pub fn start_in(node: &Node, cgroup: Option<PathBuf>, extra: &[&str]) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("{}-agent.log", node.netns));
        let log_file = std::fs::File::create(&log)?;
        let exec = match cgroup {
            Some(dir) => {
                std::fs::create_dir_all(&dir)?;
                crate::process::Exec::new(node.exec().netns_path(), Some(dir))
            }
            None => node.exec(),
        };
        let mut cmd = exec.command(trellis_bin())?;
        // Debug logs by default, for failing tests; `extra` may choose otherwise.
        if !extra.contains(&"--log-level") {
            cmd.env("TRELLIS_LOG_LEVEL", "debug");
        }
        cmd.arg("agent")
            .args(["--node", &format!("node-{}", node.name)])
            .arg("--cgroup-root")
            .arg(&node.cgroup_root)
            .arg("--bpffs")
            .arg(&node.bpffs)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = ChildGuard::spawn(&mut cmd)?;
        Ok(Self {
            child,
            log,
            node: node.clone(),
        })
    }

    /// Runs `trellis ARGS` in the node's network namespace (where the admin
    /// API listens on loopback) and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .node
            .exec()
            .output(trellis_bin(), args, Duration::from_secs(20))?;
        anyhow::ensure!(
            out.status.success(),
            "trellis {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `trellis maps -o json` of the agent's bpffs folder, parsed.
    pub fn maps_json(&self) -> anyhow::Result<serde_json::Value> {
        let bpffs = self.node.bpffs.to_str().context("bpffs path")?;
        Ok(serde_json::from_str(
            &self.cli(&["maps", "--bpffs", bpffs, "-o", "json"])?,
        )?)
    }

    /// `trellis flows -o json --since SEQ`: the flows the agent kept from
    /// `since` on, one JSON object each.
    pub fn flows_since(&self, since: u64) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = self.cli(&["flows", "-o", "json", "--since", &since.to_string()])?;
        out.lines()
            .map(|l| serde_json::from_str(l).map_err(Into::into))
            .collect()
    }

    /// `trellis <command> -o json`, parsed.
    pub fn cli_json(&self, command: &str) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli(&[command, "-o", "json"])?)?)
    }

    /// Waits until `/healthz/ready` answers 200 from the node's own namespace.
    pub fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let url = format!("http://{}:15021/healthz/ready", self.node.ip);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.child.running() {
                bail!(
                    "agent exited before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            let out = self.node.exec().output(
                "curl",
                &["-fsS", "-m", "1", &url],
                Duration::from_secs(3),
            )?;
            if out.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "agent not ready within {limit:?}; log:\n{}",
            self.log_text()
        )
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.child
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
            .with_context(|| format!("agent log:\n{}", self.log_text()))
    }

    /// Kills the agent with SIGKILL, as a crash would.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.child
            .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
    }

    /// Stops the agent (SIGSTOP) until the returned guard is dropped
    /// (SIGCONT): the kernel still completes handshakes on its listeners,
    /// but nothing it would answer is answered meanwhile.
    pub fn pause(&self) -> Paused {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Paused(pid)
    }

    /// CPU seconds (user + system) used so far, resident memory now and its
    /// peak, in bytes, from /proc.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th of the whole line.
        let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(key))
                .with_context(|| format!("{key} in /proc/{pid}/status"))?;
            Ok(line
                .split_whitespace()
                .nth(1)
                .context("a number")?
                .parse::<u64>()?
                * 1024)
        };
        Ok(Usage {
            cpu_seconds: ticks as f64 / hz,
            rss: kib("VmRSS:")?,
            peak_rss: kib("VmHWM:")?,
        })
    }

    /// CPU seconds (user + system) used so far by the agent's threads
    /// whose name starts with `prefix` (`trellis-worker`: the proxy).
    pub fn thread_cpu_seconds(&self, prefix: &str) -> anyhow::Result<f64> {
        let pid = self.child.id();
        let mut ticks = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            // A thread may end meanwhile: it is skipped.
            let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
                continue;
            };
            let (head, rest) = stat.rsplit_once(')').context("/proc/PID/task/TID/stat")?;
            let name = head.split_once('(').map_or("", |(_, n)| n);
            if !name.starts_with(prefix) {
                continue;
            }
            let fields: Vec<&str> = rest.split_whitespace().collect();
            ticks += fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        }
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Ok(ticks as f64 / hz)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `trellis agent --uninstall` for `node`'s cgroup root and bpffs folder.
pub fn uninstall(node: &Node) -> anyhow::Result<()> {
    let out = Command::new(trellis_bin())
        .args(["agent", "--uninstall", "--cgroup-root"])
        .arg(&node.cgroup_root)
        .arg("--bpffs")
        .arg(&node.bpffs)
        .output()
        .context("running trellis agent --uninstall")?;
    anyhow::ensure!(
        out.status.success(),
        "--uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
