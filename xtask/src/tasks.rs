//! Build, test and demo.

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::setup::{self, status};

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ is in the workspace")
        .into()
}

fn step(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("\n==> {name}");
    status(cmd).with_context(|| format!("step `{name}` failed"))
}

pub fn build() -> anyhow::Result<()> {
    setup::run()?;
    step(
        "build (release)",
        cargo().args(["build", "--release", "--package", "trellis-agent"]),
    )
}

pub fn test(unit_only: bool, args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    step("fmt", cargo().args(["fmt", "--all", "--check"]))?;
    step(
        "build",
        cargo().args([
            "build",
            "--workspace",
            "--exclude",
            "trellis-ebpf",
            "--all-targets",
            "--features",
            "trellis-tests/privileged",
        ]),
    )?;
    step(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "trellis-ebpf",
            "--all-targets",
            "--features",
            "trellis-tests/privileged",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "clippy (kernel programs)",
        // The rustup proxy (not $CARGO, a toolchain's own cargo) understands +nightly.
        Command::new("cargo")
            .current_dir(workspace_root())
            .args([
                "+nightly",
                "clippy",
                "--package",
                "trellis-ebpf",
                "--release",
            ])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .args(["--target-dir", "target/bpf-clippy", "--", "-D", "warnings"]),
    )?;
    step(
        "unit tests",
        cargo()
            .args(["test", "--workspace", "--exclude", "trellis-ebpf"])
            .arg("--")
            .args(args),
    )?;
    if unit_only {
        return Ok(());
    }
    step(
        "privileged end-to-end tests",
        cargo()
            .args([
                "test",
                "--package",
                "trellis-tests",
                "--features",
                "privileged",
                "--",
            ])
            .args(args),
    )
}

pub fn bench() -> anyhow::Result<()> {
    setup::run()?;
    // Release builds: the agent's speed is what is measured.
    step(
        "build (release)",
        cargo().args([
            "build",
            "--release",
            "--package",
            "trellis-agent",
            "--package",
            "trellis-tests",
            "--bins",
        ]),
    )?;
    let bin = workspace_root().join("target/release/trellis-bench");
    let mut cmd = Command::new(&bin);
    // The harness builds `trellis` for its agents; point it at the release one.
    cmd.env(
        "TRELLIS_BIN",
        workspace_root().join("target/release/trellis"),
    );
    Err(cmd.exec()).with_context(|| format!("running {}", bin.display()))
}

pub fn demo(seconds: Option<u64>) -> anyhow::Result<()> {
    setup::run()?;
    step(
        "build",
        cargo().args([
            "build",
            "--package",
            "trellis-agent",
            "--package",
            "trellis-tests",
            "--bins",
        ]),
    )?;
    let bin = workspace_root().join("target/debug/trellis-demo");
    let mut cmd = Command::new(&bin);
    if let Some(s) = seconds {
        cmd.args(["--seconds", &s.to_string()]);
    }
    // Replace this process, so Ctrl-C reaches the demo alone and it cleans up.
    Err(cmd.exec()).with_context(|| format!("running {}", bin.display()))
}
