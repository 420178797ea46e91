//! `cargo xtask demo`: an agent on a node made of namespaces, pods calling
//! each other, and what the kernel programs saw. Everything lives in
//! namespaces this program makes, and goes on Ctrl-C (or after --seconds).
#![expect(
    unsafe_code,
    reason = "blocking SIGINT/SIGTERM to wait for them with sigtimedwait"
)]

use std::{process::Command, time::Duration};

use anyhow::Context as _;
use trellis_tests::{Agent, ChildGuard, Lab, trellis_bin};

fn main() -> anyhow::Result<()> {
    let seconds = parse_seconds()?;
    let signals = block_stop_signals();

    let mut lab = Lab::new("demo")?;
    let node = lab.add_node("a")?;
    let client = lab.add_pod(&node, "a1")?;
    let web = lab.add_pod(&node, "a2")?;
    let site = std::env::temp_dir().join(format!("{}-www", lab.name()));
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("index.html"), "hello from web (pod a2)\n")?;
    let mut server = web.exec().command("python3")?;
    server
        .args(["-m", "http.server", "8080"])
        .current_dir(&site);
    server
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _server = ChildGuard::spawn(&mut server)?;

    section("Topology (network namespaces, veth, cgroup v2; nothing in the root namespace)");
    println!(
        "node a   {}   cgroup root {}",
        node.ip,
        node.cgroup_root.display()
    );
    println!("pod a1   {}   (client)", client.ip);
    println!("pod a2   {}   (web server on :8080)", web.ip);

    let mut agent = Agent::start(&node, &[])?;
    agent.wait_ready(Duration::from_secs(20))?;
    section("Agent ready: GET /healthz/ready from the node");
    print!(
        "{}",
        node.exec().run(
            "curl",
            &["-sS", &format!("http://{}:15021/healthz/ready", node.ip)]
        )?
    );

    section("Kernel programs on the node's cgroup root (bpftool cgroup show)");
    print!(
        "{}",
        run(Command::new("bpftool")
            .arg("cgroup")
            .arg("show")
            .arg(&node.cgroup_root))?
    );

    section("Pod a1 calls pod a2 (curl inside the pod)");
    wait_for_server(&node, &web.ip.to_string())?;
    print!(
        "{}",
        client.exec().run(
            "curl",
            &["-sS", "-m", "3", &format!("http://{}:8080/", web.ip)]
        )?
    );

    section("What the kernel counted (trellis maps)");
    print!(
        "{}",
        run(Command::new(trellis_bin())
            .arg("maps")
            .arg("--bpffs")
            .arg(&node.bpffs))?
    );

    section("The same pinned map through bpftool (BTF field names)");
    let map = node.bpffs.join("maps/counters");
    print!(
        "{}",
        run(Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&map))?
    );

    match seconds {
        Some(s) => println!("\nStopping in {s} s (agent log: {})", node_log(&node)),
        None => println!(
            "\nPress Ctrl-C to stop; everything is removed. Agent log: {}",
            node_log(&node)
        ),
    }
    wait_for_stop(&signals, seconds);
    let status = agent.terminate()?;
    println!("agent exited ({status}); removing the lab");
    drop(lab);
    let _ = std::fs::remove_dir_all(&site);
    println!("done");
    Ok(())
}

fn section(title: &str) {
    println!("\n=== {title} ===");
}

fn node_log(node: &trellis_tests::Node) -> String {
    std::env::temp_dir()
        .join(format!("{}-agent.log", node.netns))
        .display()
        .to_string()
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    trellis_tests::sys::run(cmd)
}

fn wait_for_server(node: &trellis_tests::Node, ip: &str) -> anyhow::Result<()> {
    let url = format!("http://{ip}:8080/");
    for _ in 0..100 {
        let out = node.exec().output(
            "curl",
            &["-fsS", "-m", "1", "-o", "/dev/null", &url],
            Duration::from_secs(3),
        )?;
        if out.status.success() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("the web server in pod a2 did not start")
}

fn parse_seconds() -> anyhow::Result<Option<u64>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(None),
        [flag, n] if flag == "--seconds" => {
            Ok(Some(n.parse().context("--seconds takes a number")?))
        }
        _ => anyhow::bail!("usage: trellis-demo [--seconds N]"),
    }
}

/// Blocks SIGINT and SIGTERM in this process (children get a clean mask from
/// std), so the demo waits for them and cleans up instead of dying.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a local, then pthread_sigmask.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_stop(set: &libc::sigset_t, seconds: Option<u64>) {
    let timeout = libc::timespec {
        tv_sec: seconds.unwrap_or(0) as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: sigwait/sigtimedwait on the set blocked above.
    unsafe {
        if seconds.is_some() {
            libc::sigtimedwait(set, std::ptr::null_mut(), &timeout);
        } else {
            let mut sig = 0;
            libc::sigwait(set, &mut sig);
        }
    }
}
