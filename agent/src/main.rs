//! `trellis`: the node agent and the commands that inspect it.

use anyhow::Context as _;
use clap::Parser as _;
use trellis_agent::{
    bpf,
    cli::{AdminArgs, AgentArgs, CaCommand, Cli, Command, MapsArgs, Output},
    config::AgentConfig,
    inspect, run, telemetry,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent(*args),
        Command::Maps(args) => maps(&args),
        Command::Status(args) => admin_view(&args, "/status", inspect::render_status),
        Command::Workloads(args) => admin_view(&args, "/workloads", inspect::render_workloads),
        Command::Certs(args) => admin_view(&args, "/certs", inspect::render_certs),
        Command::Policy(args) => admin_view(&args, "/policies", inspect::render_policies),
        Command::Ca(CaCommand::Init { dir, trust_domain }) => ca_init(&dir, &trust_domain),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis: error: {}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn agent(args: AgentArgs) -> anyhow::Result<()> {
    telemetry::init(&args.log_level, args.log_format).map_err(anyhow::Error::msg)?;
    if args.uninstall {
        let removed = run::uninstall(&args.bpffs)?;
        eprintln!(
            "trellis: removed {removed} pins under {}",
            args.bpffs.display()
        );
        return Ok(());
    }
    let cfg = AgentConfig::from_args(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads)
        .enable_all()
        .thread_name("trellis-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run::run(cfg, run::shutdown_signal()))?;
    Ok(())
}

fn admin_view(
    args: &AdminArgs,
    path: &'static str,
    render: fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let doc = runtime.block_on(inspect::fetch(args.admin_addr, path))?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Table => print!("{}", render(&doc)),
    }
    Ok(())
}

fn ca_init(dir: &std::path::Path, trust_domain: &str) -> anyhow::Result<()> {
    let (cert, key) = trellis_agent::identity::ca::Ca::init(dir, trust_domain)?;
    println!("wrote {} and {}", cert.display(), key.display());
    Ok(())
}

fn maps(args: &MapsArgs) -> anyhow::Result<()> {
    let bpffs = &args.bpffs;
    let doc = bpf::maps::dump(bpffs).with_context(|| {
        format!(
            "reading the maps pinned under {} (is this an agent's --bpffs?)",
            bpffs.display()
        )
    })?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Table => print!("{}", inspect::render_maps(&doc)),
    }
    Ok(())
}

/// One line with the cause chain, skipping causes whose text the message
/// before already includes (aya's and our errors often print their source).
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
