//! Builds the kernel programs (`ebpf-programs/kernel`) for `bpfel-unknown-none`
//! with BTF, so the agent can embed the object.
//!
//! The kernel crate needs the nightly toolchain (`-Z build-std=core`) and
//! bpf-linker; `cargo xtask setup` installs both. The object goes to a target
//! folder of its own (`target/bpf`) that `cargo build`, `cargo clippy` and the
//! release build all share, so it is compiled once, not once per profile.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const KERNEL_CRATE: &str = "trellis-ebpf";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// Lets a machine without the eBPF toolchain still build (and unit-test) the
/// agent: the embedded object is then empty and loading it fails with a clear
/// error. Never set in CI.
const SKIP_ENV: &str = "TRELLIS_SKIP_EBPF_BUILD";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("agent/ sits in the workspace root");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("trellis-ebpf.o");

    for dir in ["ebpf-programs/kernel", "ebpf-programs/common"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed={SKIP_ENV}");

    if env::var_os(SKIP_ENV).is_some_and(|v| v == "1") {
        println!("cargo:warning={SKIP_ENV}=1: the agent embeds no kernel programs");
        std::fs::write(&out, []).expect("write empty object");
        return;
    }

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("bpf");
    build(root, &target_dir);
    let built = target_dir
        .join(BPF_TARGET)
        .join("release")
        .join(KERNEL_CRATE);
    std::fs::copy(&built, &out)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), out.display()));
}

fn build(root: &Path, target_dir: &Path) {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--package",
            KERNEL_CRATE,
        ])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        // BTF for named map fields in bpftool and for CO-RE.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    // The outer build's compiler, wrappers and flags are for the host target.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .unwrap_or_else(|e| {
            panic!("running `rustup run nightly cargo`: {e}; run `cargo xtask setup` first")
        });
    if !status.success() {
        panic!(
            "building the kernel programs failed ({status}); if the nightly toolchain, its rust-src \
             or bpf-linker is missing, run `cargo xtask setup`"
        );
    }
}
