//! mTLS between nodes: a pod on node a calls a Service backed by a pod on
//! node b; the agents carry it through HBONE (HTTP/2 CONNECT over mTLS to
//! the pod's IP:15008, steered into b's agent by TC). A capture on node b's
//! uplink shows TLS on 15008 only, never the payload. Connections that
//! start together share one tunnel.

use std::{process::Stdio, time::Duration};

use trellis_agent::bpf::maps::counters;
use trellis_tests::{
    ChildGuard, Lab,
    counters::{bytes, events},
    mesh, py,
};

const VIP: &str = "10.96.0.80";
/// Sent in the request and echoed back: must never appear on the wire.
const MARKER: &str = "trellis-plaintext-marker-7f3a";

#[test]
fn cross_node_calls_go_through_hbone_mtls_and_no_plaintext_crosses_the_link() {
    let mut lab = Lab::new("hbone_cross_node").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    // Another identity on node a: a pool key of its own.
    let crowd = lab.add_pod(&a, "a2").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let _echo = server
        .serve(py::ECHO_SERVER, &["7000"], 7000)
        .expect("echo server");
    let _whoami = server
        .serve(py::WHOAMI_SERVER, &["7001"], 7001)
        .expect("whoami server");

    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&crowd, "shop", &[("app", "crowd")], &[], ""),
            mesh::pod(&server, "shop", &[("app", "echo")], &[], ""),
            mesh::service("shop", "echo", VIP, 7000, "7000", &[("app", "echo")]),
        ],
    )
    .expect("agents");
    let [agent_a, agent_b] = &cluster.agents[..] else {
        unreachable!("two agents")
    };

    // Capture everything on b's uplink while the call runs.
    let pcap = std::env::temp_dir().join(format!("{}.pcap", lab.name()));
    let mut tcpdump = b.exec().command("tcpdump").expect("tcpdump");
    tcpdump
        .args(["-i", "eth0", "-U", "-s", "0", "-w"])
        .arg(&pcap)
        .arg("tcp")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let capture = ChildGuard::spawn(&mut tcpdump).expect("tcpdump");
    std::thread::sleep(Duration::from_millis(500));

    let script = format!(
        "import socket\ns = socket.create_connection(('{VIP}', 7000), timeout=10)\n\
         for i in range(20):\n    m = b'{MARKER} %d\\n' % i\n    s.sendall(m)\n    got = b''\n    \
         while len(got) < len(m):\n        got += s.recv(4096)\n    assert got == m, got\n\
         s.shutdown(socket.SHUT_WR)\nassert s.recv(10) == b''\nprint('OK')\n"
    );
    let out = client
        .exec()
        .python_output(&script, &[], Duration::from_secs(30))
        .unwrap_or_else(|e| {
            panic!(
                "echo through the mesh: {e}\n--- a\n{}\n--- b\n{}",
                agent_a.log_text(),
                agent_b.log_text()
            )
        });
    assert_eq!(out, "OK");
    std::thread::sleep(Duration::from_millis(500));
    drop(capture);

    // The echo went through HBONE: a tunnelled it, b served one stream.
    let status_a = agent_a.cli_json("status").expect("status a");
    assert_eq!(status_a["outbound"]["tunnelled"], 1, "{status_a:#}");
    let status_b = agent_b.cli_json("status").expect("status b");
    assert_eq!(status_b["inbound"]["streams"], 1, "{status_b:#}");
    let steered = counters(&b.bpffs)
        .expect("counters")
        .iter()
        .filter(|c| c.hook == "tc_ingress" && c.reason == "hbone-steered")
        .map(|c| c.events)
        .sum::<u64>();
    assert!(steered > 0, "TC steered the tunnel's packets on b");

    // On the wire: port 15008 only, and never the marker.
    let wire = std::fs::read(&pcap).expect("pcap");
    assert!(
        !wire.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the payload crossed the link in plaintext"
    );
    let ports = b
        .exec()
        .run(
            "tcpdump",
            &["-nn", "-r", pcap.to_str().expect("utf-8"), "tcp"],
        )
        .expect("reading the capture");
    assert!(ports.contains(".15008"), "tunnel on 15008: {ports}");
    assert!(
        !ports.contains(".7000"),
        "no plaintext connection to the app port: {ports}"
    );

    // The app on b sees the client pod's own address, both families, as
    // with ztunnel: b's agent connects from it and TC steers the replies.
    for (server_ip, client_ip) in [
        (server.ip.to_string(), client.ip.to_string()),
        (server.ip6.to_string(), client.ip6.to_string()),
    ] {
        let script = format!(
            "import socket\ns = socket.create_connection(('{server_ip}', 7001), timeout=10)\n\
             print(s.makefile().readline().strip())\n"
        );
        let seen = client
            .exec()
            .python_output(&script, &[], Duration::from_secs(20))
            .unwrap_or_else(|e| {
                panic!(
                    "whoami over {server_ip}: {e}\n--- b\n{}",
                    agent_b.log_text()
                )
            });
        assert_eq!(seen, client_ip, "the server saw the client pod's address");
    }
    let status_b = agent_b.cli_json("status").expect("status b");
    assert_eq!(status_b["inbound"]["source_preserved"], 3, "{status_b:#}");
    let replies = counters(&b.bpffs)
        .expect("counters")
        .iter()
        .filter(|c| c.hook == "tc_ingress" && c.reason == "reply-to-agent")
        .map(|c| c.events)
        .sum::<u64>();
    assert!(
        replies > 0,
        "the pod's replies were steered to the agent's socket"
    );

    // Each node holds a certificate for its own workload only.
    let certs_a = agent_a.cli_json("certs").expect("certs a");
    let ids = |doc: &serde_json::Value| -> Vec<String> {
        doc["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["identity"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(ids(&certs_a), ["spiffe://cluster.local/ns/shop/sa/a1"]);
    let certs_b = agent_b.cli_json("certs").expect("certs b");
    assert_eq!(ids(&certs_b), ["spiffe://cluster.local/ns/shop/sa/b1"]);

    // Connections that start together share one tunnel: the first dials,
    // the others wait for it and open their streams on it, instead of a TLS
    // handshake each. Agent b is stopped for a moment, so the dial's TLS
    // handshake is surely still waiting when the other connections come.
    let pool = |doc: &serde_json::Value, field: &str| {
        doc["hbone_pool"]["stats"][field].as_u64().unwrap_or(0)
    };
    let before = agent_a.cli_json("status").expect("status a");
    let paused = agent_b.pause();
    let out = std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            drop(paused);
        });
        crowd.exec().python_output(
            py::PARALLEL_ECHO,
            &[&server.ip.to_string(), "7000", "30"],
            Duration::from_secs(60),
        )
    })
    .unwrap_or_else(|e| panic!("parallel echo: {e}\n{}", agent_a.log_text()));
    assert_eq!(out, "30", "every connection echoed");
    let after = agent_a.cli_json("status").expect("status a");
    let opened = pool(&after, "connections_opened") - pool(&before, "connections_opened");
    assert_eq!(opened, 1, "one tunnel for 30 connections: {after:#}");
    assert_eq!(
        pool(&after, "streams_opened") - pool(&before, "streams_opened"),
        30,
        "{after:#}"
    );
    assert!(pool(&after, "dials_shared") >= 1, "{after:#}");
    let _ = std::fs::remove_file(&pcap);
}

/// 100 MiB each way a1 → b1 through the tunnel, half-close included,
/// checked byte-exact. On node b the bytes between the agent and the pod go
/// around the TCP/IP stack (sk_msg): sock_ops put b1's socket into the
/// sockhash because its peer is a meshed pod on another node (the agent's
/// source-preserving socket), and the agent added its own facing it.
#[test]
fn cross_node_bulk_is_byte_exact_and_moved_by_sk_msg_on_the_destination_node() {
    const MIB: u64 = 1 << 20;
    let mut lab = Lab::new("hbone_bulk").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let _bulk = server
        .serve(py::BULK_SERVER, &["9000", "100"], 9000)
        .expect("bulk server");
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&server, "shop", &[("app", "bulk")], &[], ""),
        ],
    )
    .expect("agents");
    let [agent_a, agent_b] = &cluster.agents[..] else {
        unreachable!("two agents")
    };
    let out = client
        .exec()
        .python_output(
            py::BULK_CLIENT,
            &[&server.ip.to_string(), "9000", "100"],
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| {
            panic!(
                "bulk through the mesh: {e}\n--- a\n{}\n--- b\n{}",
                agent_a.log_text(),
                agent_b.log_text()
            )
        });
    assert_eq!(out, "OK", "100 MiB each way\n--- b\n{}", agent_b.log_text());

    let status_b = agent_b.cli_json("status").expect("status b");
    let inbound = &status_b["inbound"];
    assert_eq!(inbound["streams"], 1, "{status_b:#}");
    assert_eq!(inbound["source_preserved"], 1, "{status_b:#}");
    assert_eq!(inbound["accelerated"], 1, "{status_b:#}");
    let c = counters(&b.bpffs).expect("counters");
    assert_eq!(
        events(&c, "sock_ops", "pass", "sockhash-added"),
        1,
        "b1's socket, added by sock_ops: {c:#?}"
    );
    // Agent b → b1 and b1 → agent b, 100 MiB each: redirected, or, while a
    // reader was 8 MiB behind its writer (Python hashes slower than the
    // kernel redirects), on TCP until it caught up.
    let moved = bytes(&c, "sk_msg", "redirect", "to-peer");
    assert!(moved >= 16 * MIB, "{} MiB by sk_msg: {c:#?}", moved / MIB);
    let passed =
        bytes(&c, "sk_msg", "pass", "catching-up") + bytes(&c, "sk_msg", "pass", "backlogged");
    assert!(
        passed <= 1 || events(&c, "sk_msg", "pass", "backlogged") > 0,
        "TCP only at the start, or after a backlog: {c:#?}"
    );
    // The stream over, both sockets' entries are gone from `sock_state`.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let maps = agent_b.maps_json().expect("maps");
        let left = maps["sockets"].as_array().map_or(0, Vec::len);
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "entries left after the stream: {:#}",
            maps["sockets"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
