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

pub fn bench(only: Option<&str>) -> anyhow::Result<()> {
    // Release builds: the agent's speed is what is measured.
    let args: Vec<String> = only.map(|o| vec![o.to_owned()]).unwrap_or_default();
    exec_harness_bin(true, "trellis-bench", &args)
}

pub fn demo(seconds: Option<u64>) -> anyhow::Result<()> {
    let args = seconds
        .map(|s| vec!["--seconds".to_owned(), s.to_string()])
        .unwrap_or_default();
    exec_harness_bin(false, "trellis-demo", &args)
}

/// Sets up, builds the agent and the harness's binaries, then replaces this
/// process with `bin` (so Ctrl-C reaches it alone and it cleans up), its
/// agents running the `trellis` of the same build.
fn exec_harness_bin(release: bool, bin: &str, args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    let profile = if release { "release" } else { "debug" };
    let mut build = cargo();
    build.args([
        "build",
        "--package",
        "trellis-agent",
        "--package",
        "trellis-tests",
        "--bins",
    ]);
    if release {
        build.arg("--release");
    }
    step(&format!("build ({profile})"), &mut build)?;
    let target = workspace_root().join("target").join(profile);
    let mut cmd = Command::new(target.join(bin));
    cmd.args(args).env("TRELLIS_BIN", target.join("trellis"));
    Err(cmd.exec()).with_context(|| format!("running {bin}"))
}
