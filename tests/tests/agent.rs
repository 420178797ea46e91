//! The `trellis agent` binary: start, readiness, SIGTERM, restart, uninstall,
//! and the errors a user sees.

use std::time::Duration;

use trellis_tests::{
    Agent, CGROUP_PROGRAMS as PROGRAMS, Lab, sys::cgroup_program_names, trellis_bin,
};

/// The sk_msg program hangs off the sockhash, through its own pinned link
/// (bpftool 7.1 names neither the sockmap link type nor its map: check the
/// program behind the link).
fn sk_msg_link_attached(bpffs: &std::path::Path) -> bool {
    let bpftool = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("bpftool");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    let link = bpffs.join("links").join("trl_sk_msg");
    let link = bpftool(&["link", "show", "pinned", link.to_str().expect("utf8")]);
    let Some(prog) = link["prog_id"].as_u64() else {
        return false;
    };
    let prog = bpftool(&["prog", "show", "id", &prog.to_string()]);
    prog["type"] == "sk_msg" && prog["name"] == "trl_sk_msg"
}

fn connect4_events(bpffs: &std::path::Path) -> u64 {
    trellis_agent::bpf::maps::counters(bpffs)
        .expect("read counters")
        .iter()
        .filter(|c| c.hook == "connect4")
        .map(|c| c.events)
        .sum()
}

#[test]
fn agent_is_ready_leaves_pins_on_sigterm_adopts_them_and_uninstalls() {
    let mut lab =
        Lab::new("agent_is_ready_leaves_pins_on_sigterm_adopts_them_and_uninstalls").expect("lab");
    let node = lab.add_node("a").expect("node");
    let pod = lab.add_pod(&node, "a1").expect("pod");
    // A connect from the pod to a closed port of its node: refused, but connect() ran.
    let poke = || {
        pod.exec()
            .output(
                "curl",
                &["-s", "-m", "2", &format!("http://{}:9/", node.ip)],
                Duration::from_secs(5),
            )
            .expect("curl")
    };

    let mut agent = Agent::start(&node, &[]).expect("start");
    agent.wait_ready(Duration::from_secs(20)).expect("ready");
    assert_eq!(
        cgroup_program_names(&node.cgroup_root).expect("bpftool"),
        PROGRAMS
    );
    assert!(sk_msg_link_attached(&node.bpffs));
    let log = agent.log_text();
    assert!(log.contains("trellis agent ready"), "{log}");

    // Once ready, start-up's code pages are handed back, and the agent
    // still runs (the connect below is counted by what it loaded).
    trellis_tests::eventually(
        "start-up pages handed back",
        Duration::from_secs(10),
        || {
            agent.log_text().lines().any(|l| {
                l.contains("start-up code pages handed back")
                    && l.split("bytes=")
                        .nth(1)
                        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                        .is_some_and(|b| b > 0)
            })
        },
    );
    poke();
    assert_eq!(connect4_events(&node.bpffs), 1);
    assert_eq!(node.readiness().0, "200");

    let status = agent.terminate().expect("exit on SIGTERM");
    assert!(
        status.success(),
        "SIGTERM is a clean exit: {status}; log:\n{}",
        agent.log_text()
    );
    assert_eq!(
        cgroup_program_names(&node.cgroup_root).expect("bpftool"),
        PROGRAMS,
        "still attached after exit"
    );
    assert!(sk_msg_link_attached(&node.bpffs), "sk_msg too");
    poke();
    assert_eq!(
        connect4_events(&node.bpffs),
        2,
        "the kernel keeps counting with no agent"
    );

    let mut second = Agent::start(&node, &[]).expect("restart");
    second
        .wait_ready(Duration::from_secs(20))
        .expect("ready again");
    assert!(
        second.log_text().contains("Adopted"),
        "{}",
        second.log_text()
    );
    assert_eq!(
        cgroup_program_names(&node.cgroup_root).expect("bpftool"),
        PROGRAMS,
        "adopted, not attached twice"
    );
    poke();
    assert_eq!(
        connect4_events(&node.bpffs),
        3,
        "the adopted map keeps its counts"
    );

    // `trellis maps` decodes the same pins.
    let out = std::process::Command::new(trellis_bin())
        .args(["maps", "-o", "json", "--bpffs"])
        .arg(&node.bpffs)
        .output()
        .expect("trellis maps");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let events: u64 = doc["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .filter(|c| c["hook"] == "connect4")
        .map(|c| c["events"].as_u64().expect("events"))
        .sum();
    assert_eq!(events, 3, "{doc}");

    second.terminate().expect("exit");
    trellis_tests::uninstall(&node).expect("uninstall");
    assert!(
        cgroup_program_names(&node.cgroup_root)
            .expect("bpftool")
            .is_empty(),
        "detached"
    );
    assert!(!node.bpffs.exists(), "pins removed");
}

#[test]
fn agent_says_what_to_fix_for_bad_paths() {
    let mut lab = Lab::new("agent_says_what_to_fix_for_bad_paths").expect("lab");
    let node = lab.add_node("a").expect("node");
    let scratch = std::env::temp_dir().join(format!("{}-scratch", lab.name()));
    std::fs::create_dir_all(&scratch).expect("scratch");

    let run = |cgroup_root: &std::path::Path, bpffs: &std::path::Path| {
        let mut cmd = node.exec().command(trellis_bin()).expect("cmd");
        cmd.args(["agent", "--node", "node-a", "--cgroup-root"])
            .arg(cgroup_root)
            .arg("--bpffs")
            .arg(bpffs);
        let out = cmd.output().expect("run");
        assert!(!out.status.success(), "must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let err = run(&scratch, &node.bpffs);
    assert!(
        err.contains("not a cgroup v2 folder") && err.contains("cgroup2 is mounted at"),
        "{err}"
    );

    let err = run(&node.cgroup_root, &scratch.join("pins"));
    assert!(
        err.contains("not on a bpf file system") && err.contains("mount -t bpf"),
        "{err}"
    );

    let err = run(&node.cgroup_root.join("missing"), &node.bpffs);
    assert!(
        err.contains("--cgroup-root") && err.contains("No such file"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn map_entries_changed_behind_the_agents_back_are_written_back() {
    use trellis_tests::mesh;

    let mut lab = Lab::new("map_resync").expect("lab");
    let node = lab.add_node("a").expect("node");
    let web = lab.add_pod(&node, "a1").expect("pod");
    let cluster = mesh::Cluster::start_with(
        lab.name(),
        &[&node],
        &[
            mesh::node(&node),
            mesh::namespace("shop", true),
            mesh::pod(&web, "shop", &[("app", "web")], &[], ""),
            mesh::service("shop", "web", "10.96.0.80", 80, "8080", &[("app", "web")]),
        ],
        mesh::Certs::SharedCa,
        &["--map-resync", "1s"],
    )
    .expect("agent");
    let agent = &cluster.agents[0];
    let map = node.bpffs.join("maps").join(trellis_common::MAP_SERVICES);
    let map = map.to_str().expect("utf8");
    // The entries as raw key bytes, the way `bpftool map delete` takes them.
    let keys = || -> Vec<Vec<String>> {
        let dump = trellis_tests::sys::bpftool_map_dump(std::path::Path::new(map))
            .expect("bpftool map dump");
        dump.as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        e["key"]
                            .as_array()
                            .unwrap_or_else(|| panic!("raw key bytes in {e}"))
                            .iter()
                            .map(|b| b.as_str().expect("hex byte").to_owned())
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let wanted = keys();
    assert_eq!(wanted.len(), 1, "one VIP:port");
    let bpftool = |args: Vec<&str>| {
        let out = std::process::Command::new("bpftool")
            .args(&args)
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool {args:?}: {out:?}");
    };

    // An operator deletes the Service's entry and adds one of their own
    // (the same address, port 81), while the agent is stopped so that its
    // resync cannot come between.
    let paused = agent.pause();
    let mut stray = wanted[0].clone();
    stray[16] = "0x51".into();
    bpftool(
        [
            &["map", "delete", "pinned", map, "key", "hex"][..],
            &strip(&wanted[0]),
        ]
        .concat(),
    );
    bpftool(
        [
            &["map", "update", "pinned", map, "key", "hex"][..],
            &strip(&stray),
            &["value", "hex", "1", "0", "0", "0", "0", "0", "0", "0"],
        ]
        .concat(),
    );
    let tampered = keys();
    assert!(
        tampered.len() == 1 && tampered != wanted,
        "the Service's entry is out, the stray one in: {tampered:?}"
    );
    drop(paused);

    // Within a resync, the agent's entry is back and the stray one gone.
    trellis_tests::eventually(
        "the services map written back",
        Duration::from_secs(15),
        || keys() == wanted,
    );
    let log = agent.log_text();
    assert!(
        log.contains("the kernel maps were changed by something other than this agent")
            && log.contains(trellis_common::MAP_SERVICES),
        "{log}"
    );
}

/// bpftool's `0x0a` bytes as `bpftool ... hex` takes them (`0a`).
fn strip(bytes: &[String]) -> Vec<&str> {
    bytes.iter().map(|b| b.trim_start_matches("0x")).collect()
}
