//! `trellis`: the node agent and the commands that inspect it.

use anyhow::Context as _;
use clap::Parser as _;
use trellis_agent::{
    bpf,
    cli::{
        AdminArgs, AgentArgs, CaCommand, Cli, Command, CrdsArgs, FlowsArgs, MapsArgs, Output,
        PolicyArgs, PolicyCommand,
    },
    config::AgentConfig,
    inspect, run, telemetry,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent(*args),
        Command::Maps(args) => maps(&args),
        Command::Status(args) => admin_view(&args, "/status", None, inspect::render_status),
        Command::Workloads(args) => {
            admin_view(&args, "/workloads", None, inspect::render_workloads)
        }
        Command::Services(args) => admin_view(
            &args,
            "/workloads",
            Some("services"),
            inspect::render_services,
        ),
        Command::Certs(args) => admin_view(&args, "/certs", None, inspect::render_certs),
        Command::Config(args) => admin_view(&args, "/config", None, inspect::render_config),
        Command::Topology(args) if args.dot => topology_dot(&args.admin),
        Command::Topology(args) => {
            admin_view(&args.admin, "/topology", None, inspect::render_topology)
        }
        Command::Policy(args) => policy(&args),
        Command::Flows(args) => flows(&args),
        Command::Ca(CaCommand::Init { dir, trust_domain }) => ca_init(&dir, &trust_domain),
        Command::Crds(args) => crds(&args),
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

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `trellis topology --dot`: the admin API's DOT, as is.
fn topology_dot(args: &AdminArgs) -> anyhow::Result<()> {
    let text =
        client_runtime()?.block_on(inspect::fetch_text(args.admin_addr, "/topology?format=dot"))?;
    print!("{text}");
    Ok(())
}

/// Prints an admin API document (or, with `part`, one of its fields) as a
/// table or as JSON.
fn admin_view(
    args: &AdminArgs,
    path: &str,
    part: Option<&str>,
    render: fn(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    let mut doc = client_runtime()?.block_on(inspect::fetch(args.admin_addr, path))?;
    // A view of one part of a document: JSON output is that part alone.
    if let (Some(part), Output::Json) = (part, &args.output) {
        doc = doc[part].take();
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Table => print!("{}", render(&doc)),
    }
    Ok(())
}

fn policy(args: &PolicyArgs) -> anyhow::Result<()> {
    use trellis_agent::query::escape;
    match (&args.explain, &args.pod) {
        (
            Some(PolicyCommand::Explain {
                src,
                dst,
                port,
                protocol,
                admin,
            }),
            _,
        ) => {
            let path = format!(
                "/policy/explain?src={}&dst={}&port={port}&protocol={}",
                escape(src),
                escape(dst),
                escape(protocol)
            );
            admin_view(admin, &path, None, inspect::render_explain)
        }
        (None, Some(pod)) => admin_view(
            &args.admin,
            &format!("/policy/pod?name={}", escape(pod)),
            None,
            inspect::render_pod_policy,
        ),
        (None, None) => admin_view(&args.admin, "/policies", None, inspect::render_policies),
    }
}

/// `trellis flows`: the flows kept, then (with --follow) new ones as they
/// come, polling with the sequence number of the last answer.
fn flows(args: &FlowsArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let filter = trellis_agent::flows::Filter {
        pod: args.pod.clone(),
        namespace: args.namespace.clone(),
        verdict: args.verdict.clone(),
    };
    let runtime = client_runtime()?;
    #[derive(serde::Deserialize)]
    struct Page {
        flows: Vec<serde_json::Value>,
        next: u64,
        missed: u64,
    }
    let fetch = |since: u64| -> anyhow::Result<Page> {
        let path = format!("/flows?{}", filter.to_query(since));
        let doc = runtime.block_on(inspect::fetch(args.admin.admin_addr, &path))?;
        serde_json::from_value(doc).context("reading /flows")
    };
    let print = |flows: &[serde_json::Value]| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        for f in flows {
            match args.admin.output {
                Output::Json => writeln!(out, "{}", serde_json::to_string(f)?)?,
                Output::Table => writeln!(out, "{}", inspect::render_flow(f))?,
            }
        }
        out.flush()?;
        Ok(())
    };
    // What the log holds now, page by page.
    let mut kept = Vec::new();
    let mut next = args.since;
    loop {
        let page = fetch(next)?;
        let more = page.flows.len() >= trellis_agent::flows::MAX_PAGE;
        next = page.next;
        kept.extend(page.flows);
        if !more {
            break;
        }
    }
    let skip = args.last.map_or(0, |n| kept.len().saturating_sub(n));
    print(&kept[skip..])?;
    if !args.follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let page = fetch(next)?;
        if page.missed > 0 {
            eprintln!(
                "trellis: {} flows were dropped from the agent's log before they could be read",
                page.missed
            );
        }
        next = page.next;
        print(&page.flows)?;
    }
}

fn ca_init(dir: &std::path::Path, trust_domain: &str) -> anyhow::Result<()> {
    let (cert, key) = trellis_agent::identity::ca::Ca::init(dir, trust_domain)?;
    println!("wrote {} and {}", cert.display(), key.display());
    Ok(())
}

fn crds(args: &CrdsArgs) -> anyhow::Result<()> {
    use trellis_agent::crds;
    match &args.dir {
        Some(dir) => {
            for name in
                crds::write_all(dir).with_context(|| format!("writing into {}", dir.display()))?
            {
                println!("wrote {}", dir.join(name).display());
            }
        }
        None => {
            for crd in crds::all() {
                print!("---\n{}", crds::render(&crd));
            }
        }
    }
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
