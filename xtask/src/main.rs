//! `cargo xtask`: set-up, build, test and demo tasks for Trellis.
//!
//! xtask depends on nothing of Trellis itself: `cargo xtask setup` must
//! compile on a machine where the eBPF toolchain is not installed yet.
#![forbid(unsafe_code)]

mod setup;
mod tasks;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Trellis build, setup, test and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the build and tests need (nightly rust-src, bpf-linker, Debian tools); quick when done.
    Setup,
    /// Install the kernel programs' toolchain, then build the agent's release
    /// binary (what the Dockerfile runs).
    Build,
    /// Set up, build, fmt --check, clippy, unit tests, then the privileged end-to-end tier.
    Test {
        /// Only the unprivileged tier.
        #[arg(long)]
        unit_only: bool,
        /// Passed to the test harness (a test name filter, for example).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check deploy/: helm lint, the manifests against the chart, offline
    /// Kubernetes schema validation and yamllint.
    Deploy {
        /// Re-render deploy/manifests/trellis.yaml from the chart.
        #[arg(long)]
        write: bool,
    },
    /// Measure the data path against the direct path, side by side in one run:
    /// same node (each acceleration mode) and across nodes (HBONE mTLS).
    Bench {
        /// Only one part: `same-node`, `cross-node`, `http`, `policy` or `scale`.
        #[arg(long)]
        only: Option<String>,
    },
    /// Bring an agent up on a node made of namespaces and show what it does.
    Demo {
        /// Stop by itself after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => tasks::build(),
        Task::Test { unit_only, args } => tasks::test(unit_only, &args),
        Task::Demo { seconds } => tasks::demo(seconds),
        Task::Deploy { write } => tasks::deploy(write),
        Task::Bench { only } => tasks::bench(only.as_deref()),
    }
}
