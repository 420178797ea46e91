//! Restarts and upgrades of the agent, on one node, with real traffic.
//!
//! - An upgrade (a new agent started beside the running one, which is then
//!   told to stop): a long L4 transfer through the mesh carries on
//!   byte-exact across it, once spliced in the kernel and once relayed in
//!   userspace; the new agent took the listeners (no connection refused)
//!   and the connection (`adopted`); no pin or attachment is doubled.
//! - `kill -9`: the kernel keeps enforcing a NetworkPolicy while no agent
//!   runs (probed in the gap); the restarted agent adopts the pins, and new
//!   connections work.
//! - `--uninstall` leaves no program, link or map of the agent's behind
//!   (bpftool before and after).

use std::{
    collections::BTreeSet,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use trellis_tests::{
    Agent, ChildGuard, Lab, Node, Pod,
    mesh::{self, ConfigDir, SharedCa},
    py, sys,
};

const ECHO_VIP: &str = "10.96.0.70";
const WEB_VIP: &str = "10.96.0.71";

/// Every pin file under an agent's bpffs folder.
fn pins(bpffs: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.insert(
                    path.strip_prefix(root)
                        .unwrap_or(&path)
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(bpffs, bpffs, &mut out);
    out
}

/// IDs of every BPF program, map and link of the machine.
fn bpf_objects() -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for kind in ["prog", "map", "link"] {
        let v = sys::bpftool_json(&[kind, "show"]).expect("bpftool");
        for o in v.as_array().into_iter().flatten() {
            ids.insert(format!(
                "{kind} {} {}",
                o["id"],
                o["name"].as_str().unwrap_or("")
            ));
        }
    }
    ids
}

fn outbound_stat(agent: &Agent, name: &str) -> u64 {
    agent
        .cli_json("status")
        .map(|s| s["outbound"][name].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

fn start(node: &Node, config: &ConfigDir, ca: &SharedCa, extra: &[&str]) -> Agent {
    let dir = config.path().to_str().expect("UTF-8").to_owned();
    let mut args = vec!["--config-dir", &dir, "--ca-dir", ca.path()];
    args.extend_from_slice(extra);
    let mut agent = Agent::start(node, &args).expect("agent");
    agent.wait_ready(Duration::from_secs(30)).expect("ready");
    agent
}

fn get(pod: &Pod, url: &str) -> String {
    pod.exec()
        .output("curl", &["-s", "-m", "3", url], Duration::from_secs(10))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One upgrade while a paced transfer runs; returns the new agent.
fn upgrade_during_a_transfer(
    node: &Node,
    client: &Pod,
    old: &mut Agent,
    start_new: impl Fn() -> Agent,
    mode: &str,
) -> Agent {
    let pins_before = pins(&node.bpffs);
    let mut cmd = client.exec().command("python3").expect("python");
    cmd.args(["-c", py::PACED_ECHO, ECHO_VIP, "7000", "6", "65536"])
        .stdout(Stdio::piped());
    let transfer = ChildGuard::spawn(&mut cmd).expect("transfer");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(outbound_stat(old, "adopted"), 0);

    let new = start_new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while outbound_stat(&new, "adopted") < 1 {
        assert!(
            Instant::now() < deadline,
            "{mode}: the new agent took no connection over:\n{}\n--- old:\n{}",
            new.log_text(),
            old.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        old.log_text().contains("handed the L4 connections"),
        "{}",
        old.log_text()
    );
    let status = old.terminate().expect("the old agent stops");
    assert!(status.success(), "{mode}: {status}");

    let out = transfer
        .wait_output(Duration::from_secs(30))
        .expect("the transfer ends by itself");
    let report: Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(report["error"], Value::Null, "{mode}: {report}");
    assert_eq!(
        report["exact"], true,
        "{mode}: byte-exact both ways: {report}"
    );
    assert!(
        report["sent"].as_u64().unwrap_or(0) > 4 << 20,
        "{mode}: a long transfer: {report}"
    );
    // New connections go to the new agent; nothing is attached or pinned twice.
    assert_eq!(get(client, &format!("http://{WEB_VIP}/")), "web", "{mode}");
    assert_eq!(pins(&node.bpffs), pins_before, "{mode}: the same pins");
    assert_eq!(
        sys::cgroup_program_names(&node.cgroup_root).expect("bpftool"),
        trellis_tests::CGROUP_PROGRAMS,
        "{mode}: attached once each"
    );
    new
}

#[test]
fn upgrades_keep_l4_flows_and_restarts_keep_enforcing() {
    let before = bpf_objects();
    let mut lab = Lab::new("upgrade").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&a, "a2").expect("pod");
    let _echo = server
        .serve(py::ECHO_SERVER, &["7000"], 7000)
        .expect("echo");
    let _web = server
        .serve(py::NAME_SERVER, &["web", "8080"], 8080)
        .expect("web");
    let docs = [
        mesh::node(&a),
        mesh::namespace("shop", true),
        mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
        mesh::pod(&server, "shop", &[("app", "server")], &[], ""),
        mesh::service("shop", "echo", ECHO_VIP, 7000, "7000", &[("app", "server")]),
        mesh::service("shop", "web", WEB_VIP, 80, "8080", &[("app", "server")]),
    ];
    let config = ConfigDir::new(lab.name()).expect("config");
    config
        .write("mesh.yaml", &mesh::docs(&docs))
        .expect("write");
    let ca = SharedCa::new(lab.name()).expect("ca");

    // Spliced in the kernel (the default), then relayed in userspace.
    let mut agent = start(&a, &config, &ca, &[]);
    let mut agent = upgrade_during_a_transfer(
        &a,
        &client,
        &mut agent,
        || start(&a, &config, &ca, &[]),
        "spliced",
    );
    assert!(
        agent
            .log_text()
            .contains("took over the predecessor agent's connections"),
        "{}",
        agent.log_text()
    );
    agent.terminate().expect("stop");
    let mut agent = start(&a, &config, &ca, &["--sk-msg", "false"]);
    let mut agent = upgrade_during_a_transfer(
        &a,
        &client,
        &mut agent,
        || start(&a, &config, &ca, &["--sk-msg", "false"]),
        "userspace",
    );

    // kill -9 with a policy in force: the kernel goes on refusing what it
    // denies while no agent runs.
    config
        .write(
            "netpol.yaml",
            &mesh::network_policy(
                "shop",
                "client-egress",
                "{podSelector: {matchLabels: {app: client}}, policyTypes: [Egress], \
                 egress: [{ports: [{port: 7000}, {port: 8080}]}]}",
            ),
        )
        .expect("policy");
    let probe = |port: &str| {
        client
            .exec()
            .python_output(
                py::NETPOL_PROBE,
                &["2", &format!("p,{},{port},TCP,web", server.ip)],
                Duration::from_secs(10),
            )
            .expect("probe")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe("81").contains("p EPERM") {
        assert!(Instant::now() < deadline, "the policy never applied");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pins_before = pins(&a.bpffs);
    agent.kill().expect("kill -9");
    assert!(
        probe("81").contains("p EPERM"),
        "denied with no agent running: the kernel enforces"
    );
    let mut agent = start(&a, &config, &ca, &[]);
    assert!(agent.log_text().contains("Adopted"), "{}", agent.log_text());
    assert_eq!(pins(&a.bpffs), pins_before, "no pin leaked or doubled");
    assert_eq!(get(&client, &format!("http://{WEB_VIP}/")), "web");
    assert!(probe("81").contains("p EPERM"), "still enforced");

    // Uninstall: nothing of the agent's is left in the kernel.
    agent.terminate().expect("stop");
    trellis_tests::uninstall(&a).expect("uninstall");
    // Program and map fds of exited processes close a moment later.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = bpf_objects().difference(&before).cloned().collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!a.bpffs.exists(), "pins removed");
}
