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

/// The release binary, exactly as the Dockerfile builds and copies it.
pub fn build() -> anyhow::Result<()> {
    setup::toolchain()?;
    release_build()
}

fn release_build() -> anyhow::Result<()> {
    step(
        "build (release, the Dockerfile's binary)",
        cargo().args([
            "build",
            "--release",
            "--locked",
            "--package",
            "trellis-agent",
        ]),
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
    deploy(false)?;
    release_build()?;
    // Without `--unit`, one run for both tiers, with the package set and
    // features of the build step above: `--package trellis-tests` alone
    // resolves some dependencies' features differently (zerocopy, either),
    // which built kube and the agent again: two minutes of CI.
    let mut tests = cargo();
    tests.args([
        "test",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "trellis-ebpf",
    ]);
    let name = if unit_only {
        "unit tests"
    } else {
        tests.args(["--features", "trellis-tests/privileged"]);
        "unit and privileged end-to-end tests"
    };
    // The agent the build step made, with these features: the tests' own
    // `cargo build --package trellis-agent` resolves features differently
    // and would build the agent and its dependencies a second time.
    tests.env(
        "TRELLIS_BIN",
        workspace_root()
            .join("target")
            .join("debug")
            .join("trellis"),
    );
    step(name, tests.arg("--").args(args))
}

/// The chart and the manifests rendered from it.
const CHART: &str = "deploy/helm/trellis";
const MANIFESTS: &str = "deploy/manifests/trellis.yaml";

/// Checks deploy/: `helm lint`, the committed manifests against a fresh
/// render (or, with `write`, re-renders them), offline validation against
/// the Kubernetes schemas (`kubernetes-validate --strict`, also of a render
/// with the chart's optional parts on) and `yamllint`.
pub fn deploy(write: bool) -> anyhow::Result<()> {
    setup::run()?;
    let helm = setup::helm_path();
    let root = workspace_root();
    step(
        "helm lint",
        Command::new(&helm)
            .current_dir(&root)
            .args(["lint", "--strict", CHART]),
    )?;
    let render = |extra: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&helm)
            .current_dir(&root)
            .args([
                "template",
                "trellis",
                CHART,
                "--namespace",
                "trellis-system",
                "--include-crds",
            ])
            .args(extra)
            .output()
            .context("running helm template")?;
        anyhow::ensure!(
            out.status.success(),
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(format!(
            "# Rendered from {CHART} by `helm template trellis {CHART} --namespace trellis-system --include-crds`;\n\
             # do not edit: CI fails when this file drifts from the chart (cargo xtask deploy --write renders it).\n{}",
            String::from_utf8(out.stdout)?
        ))
    };
    let rendered = render(&[])?;
    let committed_path = root.join(MANIFESTS);
    if write {
        std::fs::write(&committed_path, &rendered)?;
        eprintln!("deploy: wrote {MANIFESTS}");
    } else {
        let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
        anyhow::ensure!(
            committed == rendered,
            "{MANIFESTS} differs from what {CHART} renders: run `cargo xtask deploy --write` and commit it"
        );
        eprintln!("deploy: {MANIFESTS} matches the chart");
    }
    // The optional parts: external certificates, tracing, no namespace.
    let variant = root.join("target/tools/trellis-variant.yaml");
    std::fs::write(
        &variant,
        render(&[
            "--set",
            "externalCertsHostPath=/var/lib/trellis/certs",
            "--set",
            "tracing.otlpEndpoint=http://collector.observability:4317",
            "--set",
            "namespace.create=false",
            "--set",
            "metrics.service=false",
        ])?,
    )?;
    step(
        "kubernetes-validate --strict",
        Command::new("kubernetes-validate")
            .current_dir(&root)
            .args(["--strict", "--quiet", MANIFESTS])
            .arg(&variant),
    )?;
    step(
        "yamllint",
        Command::new("yamllint")
            .current_dir(&root)
            .args([
                "--strict",
                "-c",
                "deploy/.yamllint",
                MANIFESTS,
                "deploy/examples",
            ])
            .arg(format!("{CHART}/values.yaml"))
            .arg(format!("{CHART}/Chart.yaml"))
            .arg(format!("{CHART}/crds")),
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
