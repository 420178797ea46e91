//! Sidecarless capture on a real kernel: pods' connections to a Service VIP
//! are redirected by connect4 to the agent on 15001, which load-balances and
//! splices them; getpeername shows the VIP; non-meshed pods are left alone.

use std::{collections::BTreeMap, time::Duration};

use trellis_agent::bpf::maps::{Counter, counters};
use trellis_tests::{
    Agent, ChildGuard, Lab, Node, Pod,
    counters::{bytes, events},
    mesh::{self, ConfigDir},
    py,
};

const WEB_VIP: &str = "10.96.0.10";
const BULK_VIP: &str = "10.96.0.30";
const ECHO_VIP: &str = "10.96.0.40";
/// The dual-stack `web` Service: one VIP per family.
const DUAL_VIP4: &str = "10.96.0.60";
const DUAL_VIP6: &str = "fd00:96::60";

/// node a; pods a1 (client), a2 and a3 (web; a2 also bulk and echo) in the
/// meshed namespace `shop`; x1 in the unmeshed namespace `outside`.
struct Mesh {
    node: Node,
    client: Pod,
    web2: Pod,
    web3: Pod,
    outsider: Pod,
    config: ConfigDir,
    _servers: Vec<ChildGuard>,
    agent: Option<Agent>,
    // Last: dropped after the processes above.
    _lab: Lab,
}

impl Mesh {
    fn new(test: &str) -> Self {
        let mut lab = Lab::new(test).expect("lab");
        let node = lab.add_node("a").expect("node");
        let client = lab.add_pod(&node, "a1").expect("pod");
        let web2 = lab.add_pod(&node, "a2").expect("pod");
        let web3 = lab.add_pod(&node, "a3").expect("pod");
        let outsider = lab.add_pod(&node, "x1").expect("pod");
        let config = ConfigDir::new(lab.name()).expect("config dir");
        let servers = vec![
            web2.exec()
                .python(py::NAME_SERVER, &["web-a2", "8080"])
                .expect("server"),
            web2.exec()
                .python(py::BULK_SERVER, &["9000", "100"])
                .expect("server"),
            web2.exec()
                .python(py::ECHO_SERVER, &["7000"])
                .expect("server"),
            web3.exec()
                .python(py::NAME_SERVER, &["web-a3", "8080"])
                .expect("server"),
        ];
        for (pod, port) in [(&web2, 8080), (&web2, 9000), (&web2, 7000), (&web3, 8080)] {
            node.exec()
                .wait_port(&pod.ip.to_string(), port, Duration::from_secs(20))
                .expect("server up");
        }
        let mesh = Self {
            node,
            client,
            web2,
            web3,
            outsider,
            config,
            _servers: servers,
            agent: None,
            _lab: lab,
        };
        mesh.write_base();
        mesh.write_pods("app: web", "");
        mesh
    }

    fn write_base(&self) {
        let base = mesh::docs(&[
            mesh::node(&self.node),
            mesh::namespace("shop", true),
            mesh::namespace("outside", false),
            mesh::service("shop", "web", WEB_VIP, 80, "http", &[("app", "web")]),
            mesh::service("shop", "bulk", BULK_VIP, 9000, "9000", &[("role", "bulk")]),
            mesh::service("shop", "echo", ECHO_VIP, 7000, "7000", &[("role", "bulk")]),
            mesh::dual_stack_service(
                "shop",
                "web-dual",
                [DUAL_VIP4, DUAL_VIP6],
                80,
                "http",
                &[("app", "web")],
            ),
        ]);
        self.config.write("base.yaml", &base).expect("write");
    }

    /// Pods; `a3_label` is a3's `app` label line, `a3_status` extra status fields.
    fn write_pods(&self, a3_label: &str, a3_status: &str) {
        let (_, a3_app) = a3_label.split_once(": ").expect("k: v");
        let pods = mesh::docs(&[
            mesh::pod(&self.client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(
                &self.web2,
                "shop",
                &[("app", "web"), ("role", "bulk")],
                &[("http", 8080, "TCP")],
                "",
            ),
            mesh::pod(
                &self.web3,
                "shop",
                &[("app", a3_app)],
                &[("http", 8080, "TCP")],
                a3_status,
            ),
            mesh::pod(&self.outsider, "outside", &[("app", "stranger")], &[], ""),
        ]);
        self.config.write("pods.yaml", &pods).expect("write");
    }

    fn start_agent(&mut self, cgroup: Option<std::path::PathBuf>) {
        self.start_agent_with(cgroup, &[]);
    }

    fn start_agent_with(&mut self, cgroup: Option<std::path::PathBuf>, extra: &[&str]) {
        let dir = self.config.path().to_str().expect("utf8").to_owned();
        let mut args = vec!["--config-dir", &dir];
        args.extend_from_slice(extra);
        let mut agent = Agent::start_in(&self.node, cgroup, &args).expect("agent");
        agent.wait_ready(Duration::from_secs(20)).expect("ready");
        self.agent = Some(agent);
    }

    fn get(&self, from: &Pod, url: &str) -> Result<String, String> {
        let out = from
            .exec()
            .output("curl", &["-sS", "-m", "3", url], Duration::from_secs(10))
            .expect("curl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `times` GETs of `url` from the client: how often each body came back.
    fn tally(&self, url: &str, times: usize) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..times {
            let body = self
                .get(&self.client, url)
                .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
            *seen.entry(body).or_insert(0) += 1;
        }
        seen
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent started")
    }

    fn counters(&self) -> Vec<Counter> {
        counters(&self.node.bpffs).expect("counters")
    }

    fn log(&self) -> String {
        self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
    }
}

const MIB: u64 = 1 << 20;

#[test]
fn vip_is_captured_load_balanced_and_getpeername_shows_it() {
    let mut m = Mesh::new("vip_is_captured_load_balanced_and_getpeername_shows_it");
    m.start_agent(None);
    let url = format!("http://{WEB_VIP}/");
    assert_eq!(
        m.tally(&url, 6),
        BTreeMap::from([("web-a2".into(), 3), ("web-a3".into(), 3)]),
        "round robin over both"
    );

    let peer = m
        .client
        .exec()
        .python_output(py::PEER_NAME, &[WEB_VIP, "80"], Duration::from_secs(10))
        .expect("peer");
    assert_eq!(
        peer,
        format!("{WEB_VIP}:80"),
        "the app sees the VIP, not the agent"
    );

    let c = m.counters();
    assert_eq!(events(&c, "connect4", "redirect", "captured"), 7, "{c:#?}");
    assert_eq!(events(&c, "sock_ops", "pass", "indexed"), 7, "{c:#?}");
    assert!(
        events(&c, "getpeername4", "pass", "original-peer") >= 1,
        "{c:#?}"
    );
}

#[test]
fn a_pod_outside_the_mesh_is_not_redirected() {
    let mut m = Mesh::new("a_pod_outside_the_mesh_is_not_redirected");
    m.start_agent(None);
    let before = m.counters();
    // No kube-proxy and no iptables here: unredirected, the VIP leads nowhere.
    let err = m
        .get(&m.outsider, &format!("http://{WEB_VIP}/"))
        .expect_err("must not be served");
    let after = m.counters();
    assert_eq!(
        events(&after, "connect4", "redirect", "captured"),
        events(&before, "connect4", "redirect", "captured"),
        "not captured ({err})"
    );
    assert_eq!(
        events(&after, "connect4", "pass", "not-meshed"),
        events(&before, "connect4", "pass", "not-meshed") + 1,
        "seen by connect4 and let through untouched: {after:#?}"
    );
    // The same pod still reaches a pod IP directly, outside the mesh.
    assert_eq!(
        m.get(&m.outsider, &format!("http://{}:8080/", m.web2.ip))
            .as_deref(),
        Ok("web-a2")
    );
}

/// 100 MiB each way through the agent, then half-close, checked byte-exact,
/// in one data-path mode; returns the kernel counters and the agent's status.
fn bulk_through(mode: &str, extra: &[&str]) -> (Vec<Counter>, serde_json::Value) {
    let mut m = Mesh::new(&format!("bulk_transfers_{mode}"));
    m.start_agent_with(None, extra);
    let out = m
        .client
        .exec()
        .python_output(
            py::BULK_CLIENT,
            &[BULK_VIP, "9000", "100"],
            Duration::from_secs(180),
        )
        .expect("bulk client");
    assert_eq!(out, "OK", "{mode}: 100 MiB each way\n{}", m.log());
    let c = m.counters();
    assert_eq!(
        events(&c, "connect4", "redirect", "captured"),
        1,
        "{mode}: it went through the agent"
    );
    // The connection's end is reported once the agent has seen both FINs.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = m.agent().cli_json("status").expect("status");
        if status["outbound"]["completed"] == 1 || std::time::Instant::now() > deadline {
            return (c, status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bulk_transfers_are_byte_exact_both_ways_with_half_close_in_userspace() {
    let (c, status) = bulk_through("userspace", &["--sk-msg", "false"]);
    assert_eq!(events(&c, "sk_msg", "redirect", "to-peer"), 0, "{c:#?}");
    assert_eq!(
        events(&c, "sock_ops", "pass", "sockhash-added"),
        0,
        "{c:#?}"
    );
    let o = &status["outbound"];
    assert_eq!(
        (o["accelerated"].as_u64(), o["spliced"].as_u64()),
        (Some(0), Some(0)),
        "{status}"
    );
    assert_eq!(o["bytes_sent"].as_u64(), Some(100 * MIB), "{status}");
}

#[test]
fn bulk_transfers_are_byte_exact_both_ways_with_half_close_with_sk_msg() {
    let (c, status) = bulk_through("sk_msg", &["--splice", "false"]);
    // The client's and the backend's sockets, added by sock_ops.
    assert_eq!(
        events(&c, "sock_ops", "pass", "sockhash-added"),
        2,
        "{c:#?}"
    );
    // app -> agent -> backend and back: four socket-to-socket hops of 100 MiB,
    // every byte redirected or, once a reader fell 8 MiB behind its writer
    // (Python's hashing reads slower than the kernel redirects), through TCP
    // until it caught up (a_reader_that_stops_holds_its_writer_back...).
    let moved = bytes(&c, "sk_msg", "redirect", "to-peer");
    let passed =
        bytes(&c, "sk_msg", "pass", "catching-up") + bytes(&c, "sk_msg", "pass", "backlogged");
    assert!(moved >= 16 * MIB, "{} MiB by sk_msg: {c:#?}", moved / MIB);
    assert!(
        passed <= 1 || events(&c, "sk_msg", "pass", "backlogged") > 0,
        "TCP only at the start, or after a backlog: {c:#?}"
    );
    assert_eq!(bytes(&c, "sk_msg", "redirect", "spliced"), 0, "{c:#?}");
    let o = &status["outbound"];
    assert_eq!(
        (o["accelerated"].as_u64(), o["spliced"].as_u64()),
        (Some(1), Some(0)),
        "{status}"
    );
    assert_eq!(o["bytes_sent"].as_u64(), Some(100 * MIB), "{status}");
}

#[test]
fn bulk_transfers_are_byte_exact_both_ways_with_half_close_spliced() {
    let (c, status) = bulk_through("spliced", &[]);
    // App <-> backend in the kernel, the agent out of the byte path: every
    // byte of both directions went by the splice, but perhaps the greeting,
    // until a reader fell 8 MiB behind (then through the agent, on TCP).
    let spliced = bytes(&c, "sk_msg", "redirect", "spliced");
    let passed =
        bytes(&c, "sk_msg", "pass", "catching-up") + bytes(&c, "sk_msg", "pass", "backlogged");
    assert!(
        passed <= 1 || events(&c, "sk_msg", "pass", "backlogged") > 0,
        "TCP only at the start, or after a backlog: {c:#?}"
    );
    assert!(spliced >= 16 * MIB, "{} MiB spliced: {c:#?}", spliced / MIB);
    let o = &status["outbound"];
    assert_eq!(
        (o["accelerated"].as_u64(), o["spliced"].as_u64()),
        (Some(1), Some(1)),
        "{status}"
    );
    // The kernel's per-connection counts, though the agent relayed none of
    // it: the app's 100 MiB; the greeting, 64-byte digest and 100 MiB back.
    assert_eq!(o["bytes_sent"].as_u64(), Some(100 * MIB), "{status}");
    assert_eq!(
        o["bytes_received"].as_u64(),
        Some(1 + 64 + 100 * MIB),
        "{status}"
    );
}

#[test]
fn dual_stack_ipv6_and_ipv4_mapped_clients_reach_the_service() {
    let mut m = Mesh::new("dual_stack_ipv6_and_ipv4_mapped_clients_reach_the_service");
    m.start_agent(None);
    assert_eq!(
        m.tally(&format!("http://[{DUAL_VIP6}]/"), 4),
        BTreeMap::from([("web-a2".into(), 2), ("web-a3".into(), 2)]),
        "an IPv6 client reaches both IPv6 backends"
    );
    // getpeername6 shows the IPv6 VIP.
    let peer = m
        .client
        .exec()
        .python_output(py::PEER_NAME, &[DUAL_VIP6, "80"], Duration::from_secs(10))
        .expect("peer");
    assert!(peer.starts_with(&format!("{DUAL_VIP6}:80")), "{peer}");
    // An IPv6 socket dialling the IPv4 VIP as ::ffff:a.b.c.d goes through
    // connect6 to the IPv4 capture address.
    let mapped = format!("::ffff:{DUAL_VIP4}");
    let peer = m
        .client
        .exec()
        .python_output(py::PEER_NAME, &[&mapped, "80"], Duration::from_secs(10))
        .expect("peer");
    assert!(peer.starts_with(&format!("{mapped}:80")), "{peer}");
    assert_eq!(
        m.get(&m.client, &format!("http://[{mapped}]/"))
            .map(|b| b.starts_with("web-a")),
        Ok(true),
        "{}",
        m.log()
    );
    let c = m.counters();
    assert_eq!(events(&c, "connect6", "redirect", "captured"), 7, "{c:#?}");
    assert!(
        events(&c, "getpeername6", "pass", "original-peer") >= 2,
        "{c:#?}"
    );
    // The outsider's IPv6 connect is left alone, as its IPv4 one is.
    assert!(
        m.get(&m.outsider, &format!("http://[{DUAL_VIP6}]/"))
            .is_err()
    );
    let c = m.counters();
    assert_eq!(events(&c, "connect6", "redirect", "captured"), 7, "{c:#?}");
    assert!(events(&c, "connect6", "pass", "not-meshed") >= 1, "{c:#?}");
}

#[test]
fn idle_connections_close_and_spliced_busy_ones_stay() {
    let mut m = Mesh::new("idle_connections_close_and_spliced_busy_ones_stay");
    m.start_agent_with(None, &["--idle-timeout", "1s"]);
    // Two echo connections: one pings every 200 ms for 4 s (spliced, so the
    // agent itself sees none of those bytes), one goes quiet after a ping.
    let out = m
        .client
        .exec()
        .python_output(
            py::IDLE_PAIR,
            &[ECHO_VIP, "7000", "4"],
            Duration::from_secs(30),
        )
        .expect("idle pair");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        report["busy_errors"],
        serde_json::json!([]),
        "{report}\n{}",
        m.log()
    );
    assert!(report["busy_ok"].as_u64().unwrap_or(0) >= 15, "{report}");
    assert_eq!(report["quiet"], "closed", "{report}");
    let status = m.agent().cli_json("status").expect("status");
    assert_eq!(status["outbound"]["idle_timeouts"], 1, "{status}");
    assert!(m.log().contains("idle timeout"), "{}", m.log());
}

#[test]
fn status_workloads_and_maps_show_what_the_agent_sees() {
    let mut m = Mesh::new("status_workloads_and_maps_show_what_the_agent_sees");
    m.start_agent(None);
    m.get(&m.client, &format!("http://{WEB_VIP}/"))
        .expect("get");
    let agent = m.agent();

    let status = agent.cli_json("status").expect("status");
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["ready"], true);
    assert_eq!(
        status["capture"],
        serde_json::json!([
            format!("{}:15001", m.node.ip),
            format!("[{}]:15001", m.node.ip6)
        ])
    );
    assert_eq!(
        status["acceleration"],
        serde_json::json!({"sk_msg": true, "splice": true})
    );
    let programs: Vec<&str> = status["programs"]
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for p in [
        "trl_sk_msg",
        "trl_sock_ops",
        "trl_connect4",
        "trl_connect6",
        "trl_getpeer4",
        "trl_getpeer6",
    ] {
        assert!(programs.contains(&p), "{p} in {programs:?}");
    }
    let maps = status["maps"].as_array().expect("maps");
    let services = maps
        .iter()
        .find(|x| x["name"] == "services")
        .expect("services map");
    // web, bulk, echo: one VIP each; web-dual: two.
    assert_eq!(services["entries"], 5, "{services}");
    assert_eq!(services["max_entries"], 16384);

    let workloads = agent.cli_json("workloads").expect("workloads");
    let kernel = trellis_agent::bpf::maps::endpoints(&m.node.bpffs).expect("endpoints");
    let endpoints = workloads["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 4, "{workloads}");
    for pod in [&m.client, &m.web2, &m.web3, &m.outsider] {
        let e = endpoints
            .iter()
            .find(|e| e["ips"][0] == pod.ip.to_string())
            .unwrap_or_else(|| panic!("{} in {workloads}", pod.name));
        assert_eq!(e["interface"], pod.host_if.as_str(), "{e}");
        assert_eq!(e["ips"][1], pod.ip6.to_string(), "{e}");
        let cookie = e["netns_cookie"].as_u64().expect("cookie");
        assert!(
            kernel.iter().any(|k| k.netns_cookie == cookie),
            "{e} in {kernel:?}"
        );
    }
    let web = workloads["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == "web")
        .expect("web");
    assert_eq!(
        web["backends"]["80"].as_array().map(Vec::len),
        Some(4),
        "{web}"
    );

    // `trellis services`: the same services alone.
    let services = agent.cli_json("services").expect("services");
    assert_eq!(services, workloads["services"], "{services}");
    let text = agent.cli(&["services"]).expect("services text");
    assert!(
        text.starts_with("SERVICES\n") && text.contains("shop/web"),
        "{text}"
    );

    // The text forms carry the same facts.
    let text = agent.cli(&["workloads"]).expect("workloads text");
    assert!(
        text.contains("shop/a1") && text.contains(&m.client.host_if),
        "{text}"
    );
    let text = agent.cli(&["status"]).expect("status text");
    assert!(
        text.contains("acceleration:  sk_msg on, splice on"),
        "{text}"
    );

    // `trellis maps` decodes every map, the way bpftool shows them.
    let bpffs = m.node.bpffs.to_str().expect("utf8");
    let maps: serde_json::Value = serde_json::from_str(
        &agent
            .cli(&["maps", "--bpffs", bpffs, "-o", "json"])
            .expect("maps"),
    )
    .expect("json");
    // Some entry of map `table` has `field` = `want`.
    let has = |table: &str, field: &str, want: String| {
        maps[table]
            .as_array()
            .unwrap_or_else(|| panic!("{table} in {maps}"))
            .iter()
            .any(|entry| entry[field] == want)
    };
    for (table, field, want) in [
        ("services", "vip", format!("{WEB_VIP}:80")),
        ("ipcache", "prefix", format!("{}/32", m.client.ip)),
        ("ipcache", "prefix", format!("{}/128", m.client.ip6)),
        (
            "orig_by_tuple",
            "original_destination",
            format!("{WEB_VIP}:80"),
        ),
    ] {
        assert!(
            has(table, field, want.clone()),
            "{table}: no {field} {want}: {maps}"
        );
    }
    let text = agent.cli(&["maps", "--bpffs", bpffs]).expect("maps text");
    for section in [
        "MAPS",
        "COUNTERS",
        "ENDPOINTS",
        "SERVICES",
        "IPCACHE",
        "ORIGINAL DESTINATIONS",
        "SOCKETS",
    ] {
        assert!(text.contains(section), "{section} in {text}");
    }
}

#[test]
fn hot_reload_adds_a_backend_under_load_and_a_bad_file_keeps_the_old_state() {
    let mut m =
        Mesh::new("hot_reload_adds_a_backend_under_load_and_a_bad_file_keeps_the_old_state");
    m.write_pods("app: web-later", "");
    m.start_agent(None);
    assert_eq!(
        m.get(&m.client, &format!("http://{WEB_VIP}/")).as_deref(),
        Ok("web-a2")
    );

    let mut cmd = m.client.exec().command("python3").expect("cmd");
    cmd.args(["-c", py::LOAD, WEB_VIP, "80", ECHO_VIP, "7000", "5"])
        .stdout(std::process::Stdio::piped());
    let load = ChildGuard::spawn(&mut cmd).expect("load");
    std::thread::sleep(Duration::from_secs(2));
    m.write_pods("app: web", "");
    let out = load
        .wait_output(Duration::from_secs(30))
        .expect("load output");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("load JSON");
    assert_eq!(
        report["errors"],
        serde_json::json!([]),
        "no request failed: {report}"
    );
    assert_eq!(
        report["echo_errors"],
        serde_json::json!([]),
        "the long-lived connection survived: {report}"
    );
    assert!(report["echo_ok"].as_u64().unwrap_or(0) >= 20, "{report}");
    assert!(
        report["bodies"]["web-a3"].as_u64().unwrap_or(0) > 0,
        "the new backend took connections: {report}"
    );

    // A bad file: the Service it breaks keeps its last good version.
    m.config
        .write("broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 99999}]}\n")
        .expect("write");
    std::thread::sleep(Duration::from_secs(1));
    let log = m.log();
    assert!(
        log.contains("broken.yaml")
            && log.contains("spec.ports[0].port")
            && log.contains("99999 is not a port"),
        "{log}"
    );
    for _ in 0..4 {
        let body = m
            .get(&m.client, &format!("http://{WEB_VIP}/"))
            .expect("still served");
        assert!(body == "web-a2" || body == "web-a3", "{body}");
    }
}

#[test]
fn an_unready_backend_gets_no_new_connections_within_a_second() {
    let mut m = Mesh::new("an_unready_backend_gets_no_new_connections_within_a_second");
    m.start_agent(None);
    m.write_pods("app: web", ", conditions: [{type: Ready, status: 'False'}]");
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..6 {
        assert_eq!(
            m.get(&m.client, &format!("http://{WEB_VIP}/")).as_deref(),
            Ok("web-a2")
        );
    }
    // Ready again: new connections reach it again.
    m.write_pods("app: web", "");
    std::thread::sleep(Duration::from_secs(1));
    let bodies: Vec<String> = (0..4)
        .map(|_| {
            m.get(&m.client, &format!("http://{WEB_VIP}/"))
                .expect("get")
        })
        .collect();
    assert!(
        bodies.iter().any(|b| b == "web-a3"),
        "ready again: {bodies:?}"
    );
}

#[test]
fn the_agent_inside_the_cgroup_root_never_redirects_itself() {
    let mut m = Mesh::new("the_agent_inside_the_cgroup_root_never_redirects_itself");
    let cgroup = m.node.cgroup_root.join("trellis-agent");
    m.start_agent(Some(cgroup));
    for _ in 0..4 {
        let body = m
            .get(&m.client, &format!("http://{WEB_VIP}/"))
            .unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
        assert!(body == "web-a2" || body == "web-a3");
    }
    let c = m.counters();
    assert_eq!(
        events(&c, "connect4", "redirect", "captured"),
        4,
        "only the client's connects: {c:#?}"
    );
    assert!(
        c.iter().any(|x| x.hook == "connect4"
            && x.reason == "not-meshed"
            && x.endpoint_id == 0
            && x.events >= 4),
        "the agent's own upstream connects were seen and left alone: {c:#?}"
    );
}

#[test]
fn killing_the_agent_resets_its_connections_and_new_ones_fail_closed() {
    let mut m = Mesh::new("killing_the_agent_resets_its_connections_and_new_ones_fail_closed");
    m.start_agent(None);
    // A long-lived connection through the agent.
    let mut cmd = m.client.exec().command("python3").expect("cmd");
    cmd.args(["-c", py::LOAD, WEB_VIP, "80", ECHO_VIP, "7000", "4"])
        .stdout(std::process::Stdio::piped());
    let load = ChildGuard::spawn(&mut cmd).expect("load");
    std::thread::sleep(Duration::from_secs(1));
    m.agent.as_mut().expect("agent").kill().expect("kill -9");
    let out = load
        .wait_output(Duration::from_secs(30))
        .expect("load ends by itself");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let echo_errors = report["echo_errors"].to_string();
    assert!(
        echo_errors.contains("reset") || echo_errors.contains("closed"),
        "the proxied connection ended promptly, not hung: {report}"
    );
    // Fail closed: the kernel still captures, and nothing listens on 15001.
    let err = m
        .get(&m.client, &format!("http://{WEB_VIP}/"))
        .expect_err("no agent, no service");
    assert!(
        err.contains("Couldn't connect") || err.contains("refused"),
        "{err}"
    );
    // Back with a new agent, which adopts the pins.
    m.start_agent(None);
    assert!(
        m.get(&m.client, &format!("http://{WEB_VIP}/")).is_ok(),
        "{}",
        m.log()
    );
}

/// The most any one socket held in the network namespace of `exec`, by
/// `ss`: the `r` (bytes queued, unread) of each socket's `skmem`.
fn most_unread(exec: &trellis_tests::Exec) -> u64 {
    let out = exec.run("ss", &["-tmnaH"]).expect("ss");
    out.split("skmem:(r")
        .skip(1)
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// Samples `most_unread` until it stops growing (the writer is held back)
/// or 10 s pass; returns the last value.
fn settled_unread(exec: &trellis_tests::Exec) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = most_unread(exec);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = most_unread(exec);
        if (now == last && now > 0) || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// A redirect into a socket skips the TCP windows that hold a writer back,
/// so a reader that stops would let its writer queue without limit (the
/// whole transfer, until the node's TCP memory runs out and sends fail with
/// ENOMEM). Past 8 MiB unread the bytes take TCP, and the transfer, once the
/// reader resumes, is byte-exact. Both directions of a spliced connection.
/// (The readers pause themselves: a blocking read on a socket in a sockhash
/// that SIGSTOP interrupts returns EAGAIN, a kernel quirk.)
#[test]
fn a_reader_that_stops_holds_its_writer_back_and_nothing_is_lost() {
    let mut m = Mesh::new("a_reader_that_stops_holds_its_writer_back");
    m.start_agent(None);
    let scratch = std::env::temp_dir().join(format!("{}-stall", m._lab.name()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let dir = scratch.to_str().expect("utf8").to_owned();
    let _paused = m
        .web2
        .exec()
        .python(py::BULK_SERVER, &["9100", "100", &dir])
        .expect("server");
    m.node
        .exec()
        .wait_port(&m.web2.ip.to_string(), 9100, Duration::from_secs(20))
        .expect("server up");
    let server = m.web2.ip.to_string();
    let touch = |name: &str| std::fs::write(scratch.join(name), b"").expect("touch");
    let run = |mode: &str| {
        for name in ["ready", "go", "read", "done"] {
            let _ = std::fs::remove_file(scratch.join(name));
        }
        // The down run's server reads at once: it is sent nothing.
        if mode == "down" {
            touch("read");
        }
        let mut cmd = m.client.exec().command("python3").expect("python");
        cmd.arg("-c")
            .arg(py::BULK_CLIENT)
            .args([server.as_str(), "9100", "100", dir.as_str(), mode])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let client = ChildGuard::spawn(&mut cmd).expect("client");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !scratch.join("ready").exists() {
            assert!(std::time::Instant::now() < deadline, "{mode}: no greeting");
            std::thread::sleep(Duration::from_millis(50));
        }
        client
    };
    let finish = |client: ChildGuard, mode: &str| {
        touch("done");
        let out = client
            .wait_output(Duration::from_secs(120))
            .expect("client");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "OK",
            "{mode}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            m.log()
        );
    };
    // At most 8 MiB redirected, and what TCP's own window lets through.
    let bounded = |reader: &Pod, mode: &str| {
        let queued = settled_unread(&reader.exec());
        assert!(
            queued <= 20 * MIB,
            "{mode}: {} MiB queued at {}",
            queued / MIB,
            reader.name
        );
    };

    // The client does not read while the server sends it 100 MiB.
    let client = run("down");
    bounded(&m.client, "down");
    touch("go");
    finish(client, "down");

    // The server does not read while the client sends it 100 MiB.
    let client = run("up");
    touch("go");
    bounded(&m.web2, "up");
    touch("read");
    finish(client, "up");

    let c = m.counters();
    assert!(events(&c, "sk_msg", "pass", "backlogged") >= 2, "{c:#?}");
    let _ = std::fs::remove_dir_all(&scratch);
}
