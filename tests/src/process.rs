//! Running real programs inside a node or a pod.

use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Where a process runs: a network namespace, and for pods a cgroup.
#[derive(Clone, Debug)]
pub struct Exec {
    netns: PathBuf,
    cgroup: Option<PathBuf>,
}

impl Exec {
    pub fn new(netns: impl Into<PathBuf>, cgroup: Option<PathBuf>) -> Self {
        Self {
            netns: netns.into(),
            cgroup,
        }
    }

    pub fn netns_path(&self) -> &Path {
        &self.netns
    }

    /// A command that, between fork and exec, joins the cgroup and then only
    /// the network namespace (not the mount namespace, so bpffs pins stay
    /// visible: see the test-environment note).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let netns =
            File::open(&self.netns).with_context(|| format!("opening {}", self.netns.display()))?;
        let procs = match &self.cgroup {
            Some(dir) => Some(
                OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", dir.display()))?,
            ),
            None => None,
        };
        let mut cmd = Command::new(program);
        // SAFETY: the closure only makes async-signal-safe calls (sigprocmask,
        // write, setns) on descriptors opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // A clean signal mask: the demo blocks SIGINT/SIGTERM to wait
                // for them, and the agent under test must still see them.
                let mut empty = std::mem::zeroed::<libc::sigset_t>();
                libc::sigemptyset(&mut empty);
                libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                if let Some(procs) = &procs {
                    // "0" moves the writing process itself.
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `program args...` to completion, with a time limit.
    pub fn output(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<Output> {
        let mut cmd = self.command(program)?;
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = ChildGuard::spawn(&mut cmd)?;
        child.wait_output(limit)
    }

    /// `curl -s ARGS` (bounded by its own `-m` if given, else 20 s here);
    /// its stdout, whatever curl's exit.
    pub fn curl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-s"];
        all.extend_from_slice(args);
        let out = self.output("curl", &all, Duration::from_secs(20))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `program args...` and fails unless it exits 0; returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(program, args, Duration::from_secs(30))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Exec {
    /// Starts `python3 -c SCRIPT args...` in the background.
    pub fn python(&self, script: &str, args: &[&str]) -> anyhow::Result<ChildGuard> {
        let mut cmd = self.command("python3")?;
        cmd.arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        ChildGuard::spawn(&mut cmd)
    }

    /// Runs `python3 -c SCRIPT args...` to completion; returns stdout.
    pub fn python_output(
        &self,
        script: &str,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<String> {
        let mut all = vec!["-c", script];
        all.extend_from_slice(args);
        let out = self.output("python3", &all, limit)?;
        if !out.status.success() {
            bail!(
                "python failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Waits until a TCP connect to `ip:port` from here succeeds.
    pub fn wait_port(&self, ip: &str, port: u16, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let probe = format!("exec 3<>/dev/tcp/{ip}/{port}");
        while Instant::now() < deadline {
            if self
                .output("bash", &["-c", &probe], Duration::from_secs(3))?
                .status
                .success()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{ip}:{port} did not accept connections within {limit:?}")
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self { child: Some(child) })
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present until consumed")
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child_mut().try_wait(), Ok(None))
    }

    /// Sends `signal` and waits up to `limit` for the exit.
    pub fn signal_and_wait(&mut self, signal: i32, limit: Duration) -> anyhow::Result<ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.id() as i32, signal) };
        self.wait_timeout(limit)
    }

    /// Waits up to `limit` for the exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child_mut().try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("process {} still running after {limit:?}", self.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` and collects its output (killing it past the limit).
    pub fn wait_output(mut self, limit: Duration) -> anyhow::Result<Output> {
        let mut child = self.child.take().expect("child present");
        // Drain the pipes on threads so a chatty child cannot block on a full pipe.
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out_t = read(stdout.map(|p| Box::new(p) as _));
        let err_t = read(stderr.map(|p| Box::new(p) as _));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{:?} did not finish within {limit:?}", child.id());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
