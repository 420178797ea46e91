//! `cargo xtask demo`: an agent on a node made of namespaces, pods calling
//! each other, and what the kernel programs saw. Everything lives in
//! namespaces this program makes, and goes on Ctrl-C (or after --seconds).
#![expect(
    unsafe_code,
    reason = "blocking SIGINT/SIGTERM to wait for them with sigtimedwait"
)]

use std::{process::Command, time::Duration};

use anyhow::Context as _;
use trellis_tests::{
    Agent, Lab,
    mesh::{self, ConfigDir},
    py, trellis_bin,
};

/// The demo Service's virtual IP.
const VIP: &str = "10.96.0.10";

fn main() -> anyhow::Result<()> {
    let seconds = parse_seconds()?;
    let signals = block_stop_signals();

    let mut lab = Lab::new("demo")?;
    let node = lab.add_node("a")?;
    let client = lab.add_pod(&node, "a1")?;
    let web2 = lab.add_pod(&node, "a2")?;
    let web3 = lab.add_pod(&node, "a3")?;
    let _servers = [
        web2.exec()
            .python(py::NAME_SERVER, &["hello from web-a2\n", "8080"])?,
        web3.exec()
            .python(py::NAME_SERVER, &["hello from web-a3\n", "8080"])?,
    ];
    for pod in [&web2, &web3] {
        node.exec()
            .wait_port(&pod.ip.to_string(), 8080, Duration::from_secs(20))?;
    }
    let config = ConfigDir::new(lab.name())?;
    let objects = mesh::docs(&[
        mesh::node(&node),
        mesh::namespace("shop", true),
        mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
        mesh::pod(
            &web2,
            "shop",
            &[("app", "web")],
            &[("http", 8080, "TCP")],
            "",
        ),
        mesh::pod(
            &web3,
            "shop",
            &[("app", "web")],
            &[("http", 8080, "TCP")],
            "",
        ),
        mesh::service("shop", "web", VIP, 80, "http", &[("app", "web")]),
    ]);
    config.write("mesh.yaml", &objects)?;

    section("Topology (network namespaces, veth, cgroup v2; nothing in the root namespace)");
    println!(
        "node a   {}   cgroup root {}",
        node.ip,
        node.cgroup_root.display()
    );
    println!(
        "pod a1   {}   (client, namespace shop: in the mesh)",
        client.ip
    );
    println!("pod a2   {}   (web, :8080)", web2.ip);
    println!("pod a3   {}   (web, :8080)", web3.ip);
    println!("service  shop/web  {VIP}:80 -> targetPort http (no kube-proxy, no iptables)");
    section(&format!(
        "Config folder {} (watched; edit it while the demo runs)",
        config.path().display()
    ));
    print!("{objects}");

    let dir = config.path().to_str().context("utf8 path")?.to_owned();
    let mut agent = Agent::start(&node, &["--config-dir", &dir])?;
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

    section(&format!(
        "Pod a1 calls the Service VIP {VIP} four times (curl inside the pod)"
    ));
    for _ in 0..4 {
        print!(
            "{}",
            client
                .exec()
                .run("curl", &["-sS", "-m", "3", &format!("http://{VIP}/")])?
        );
    }
    println!(
        "(connect4 rewrote each connect to {}:15001; the agent picked a backend, round robin)",
        node.ip
    );
    let peer = client
        .exec()
        .python_output(py::PEER_NAME, &[VIP, "80"], Duration::from_secs(10))?;
    println!("getpeername() inside the pod says: {peer}");

    section("What the kernel counted and holds (trellis maps)");
    print!(
        "{}",
        run(Command::new(trellis_bin())
            .arg("maps")
            .arg("--bpffs")
            .arg(&node.bpffs))?
    );

    section("A pinned map through bpftool (BTF field names)");
    let map = node.bpffs.join("maps/services");
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
    drop(config);
    drop(lab);
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
