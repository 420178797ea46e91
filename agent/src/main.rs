//! `trellis`: the node agent and the commands that inspect it.

use anyhow::Context as _;
use clap::Parser as _;
use trellis_agent::{
    bpf,
    cli::{AgentArgs, Cli, Command, MapsArgs, Output},
    config::AgentConfig,
    run, telemetry,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent(*args),
        Command::Maps(args) => maps(&args),
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
        .enable_all()
        .thread_name("trellis-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run::run(cfg, run::shutdown_signal()))?;
    Ok(())
}

fn maps(args: &MapsArgs) -> anyhow::Result<()> {
    let bpffs = &args.bpffs;
    let hint = || {
        format!(
            "reading the maps pinned under {} (is this an agent's --bpffs?)",
            bpffs.display()
        )
    };
    let counters = bpf::maps::counters(bpffs).with_context(hint)?;
    let endpoints = bpf::maps::endpoints(bpffs).with_context(hint)?;
    match args.output {
        Output::Json => {
            let doc = serde_json::json!({ "counters": counters, "endpoints": endpoints });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Output::Table => {
            println!("COUNTERS");
            println!(
                "{:<14} {:<9} {:<22} {:>8} {:>12} {:>12}",
                "HOOK", "VERDICT", "REASON", "ENDPOINT", "EVENTS", "BYTES"
            );
            for c in &counters {
                println!(
                    "{:<14} {:<9} {:<22} {:>8} {:>12} {:>12}",
                    c.hook, c.verdict, c.reason, c.endpoint_id, c.events, c.bytes
                );
            }
            println!("\nENDPOINTS");
            println!(
                "{:>8} {:>20} {:>10} {:>6} {:>8}",
                "ID", "NETNS COOKIE", "IDENTITY", "FLAGS", "IFINDEX"
            );
            for e in &endpoints {
                println!(
                    "{:>8} {:>20} {:>10} {:>#6x} {:>8}",
                    e.endpoint_id, e.netns_cookie, e.identity, e.flags, e.ifindex
                );
            }
        }
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
