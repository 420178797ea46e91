//! Prometheus metrics, checked for their values, not just their presence:
//! known traffic runs through a two-node mesh (HTTP over the L7 path to a
//! local and a remote backend, answers the agent makes itself, TCP through
//! HBONE, connections an egress NetworkPolicy refuses), each agent's
//! `:15020/metrics` is parsed with a strict OpenMetrics parser (Python
//! `prometheus_client`), and a real Prometheus server scraping both agents
//! is queried for the same numbers.

use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_tests::{
    ChildGuard, Lab, Pod, mesh,
    prometheus::{scrape, sum, until},
    py,
};

const WEB: &str = "10.96.0.80";
const EMPTY: &str = "10.96.0.81";
const GRPC: &str = "10.96.0.82";

fn curl_code(client: &Pod, url: &str) -> String {
    let out = client
        .exec()
        .output(
            "curl",
            &[
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            ],
            Duration::from_secs(30),
        )
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn metrics_count_what_ran() {
    let mut lab = Lab::new("metrics").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let local = lab.add_pod(&a, "a2").expect("pod");
    let remote = lab.add_pod(&b, "b1").expect("pod");
    let echo = lab.add_pod(&b, "b2").expect("pod");
    let _servers = [
        local
            .serve(py::NAME_SERVER, &["local", "8080"], 8080)
            .expect("server"),
        remote
            .serve(py::NAME_SERVER, &["remote", "8080"], 8080)
            .expect("server"),
        echo.serve(py::ECHO_SERVER, &["9000"], 9000)
            .expect("server"),
        remote
            .serve(py::GRPC_SERVER, &["remote", "50051"], 50051)
            .expect("server"),
    ];
    let cluster = mesh::Cluster::start_with(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(
                &local,
                "shop",
                &[("app", "web"), ("version", "v1")],
                &[],
                "",
            ),
            mesh::pod(
                &remote,
                "shop",
                &[("app", "web"), ("version", "v2")],
                &[],
                "",
            ),
            mesh::pod(&echo, "shop", &[("app", "echo")], &[], ""),
            mesh::service("shop", "web", WEB, 80, "8080", &[("app", "web")]),
            mesh::service("shop", "empty", EMPTY, 80, "8080", &[("app", "nothing")]),
            mesh::service_with_protocol(
                "shop",
                "grpc",
                GRPC,
                50051,
                "50051",
                "grpc",
                &[("app", "web"), ("version", "v2")],
            ),
            mesh::traffic_policy("shop", "web", "loadBalancer: {type: RoundRobin}"),
            mesh::traffic_policy("shop", "empty", "loadBalancer: {type: RoundRobin}"),
        ],
        mesh::Certs::SharedCa,
        &["--log-format", "json"],
    )
    .expect("mesh");

    for _ in 0..9 {
        assert_eq!(curl_code(&client, &format!("http://{WEB}/")), "200");
    }
    let traced = client
        .exec()
        .output(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "-H",
                "x-request-id: from-the-caller",
                &format!("http://{WEB}/"),
            ],
            Duration::from_secs(30),
        )
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&traced.stdout), "200");
    for _ in 0..2 {
        assert_eq!(curl_code(&client, &format!("http://{EMPTY}/")), "503");
    }
    let echoed = client
        .exec()
        .python_output(
            py::ECHO_CONNECTIONS,
            &[&echo.ip.to_string(), "9000", "3", "1000"],
            Duration::from_secs(30),
        )
        .expect("echo");
    assert_eq!(echoed.trim(), "3000");
    // gRPC: a unary call (1 message each way) and a server stream of 2.
    let out = client
        .exec()
        .python_output(
            py::GRPC_WHO,
            &[&format!("{GRPC}:50051")],
            Duration::from_secs(60),
        )
        .expect("grpc");
    assert!(out.contains("\"Count\": [\"OK\""), "{out}");

    // Requests, as the client's agent reports them.
    let web = [
        ("reporter", "source"),
        ("source_workload", "a1"),
        ("source_workload_namespace", "shop"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/a1"),
        ("source_app", "client"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "shop"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ];
    let tcp = [
        ("reporter", "source"),
        ("source_workload", "a1"),
        ("destination_workload", "b2"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/b2",
        ),
        ("request_protocol", "tcp"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let at_a = until(&a, |s| {
        sum(s, "istio_tcp_connections_closed_total", &tcp) >= 3.0
            && sum(s, "istio_requests_total", &web) >= 10.0
    });
    assert_eq!(sum(&at_a, "istio_requests_total", &web), 10.0);
    let local_calls = sum(
        &at_a,
        "istio_requests_total",
        &[
            ("destination_service_name", "web"),
            ("destination_workload", "a2"),
            ("destination_version", "v1"),
            ("connection_security_policy", "none"),
            ("response_code", "200"),
        ],
    );
    let remote_calls = sum(
        &at_a,
        "istio_requests_total",
        &[
            ("destination_service_name", "web"),
            ("destination_workload", "b1"),
            ("destination_version", "v2"),
            ("connection_security_policy", "mutual_tls"),
            ("response_code", "200"),
        ],
    );
    assert_eq!(
        (local_calls, remote_calls),
        (5.0, 5.0),
        "round robin over a local and a remote backend"
    );
    assert_eq!(
        sum(&at_a, "istio_request_duration_milliseconds_count", &web),
        10.0
    );
    // Bodies of 5 or 6 bytes ("local", "remote"): 55 in all.
    assert_eq!(sum(&at_a, "istio_response_bytes_sum", &web), 55.0);
    assert_eq!(
        sum(
            &at_a,
            "istio_requests_total",
            &[
                ("destination_service_name", "empty"),
                ("destination_workload", "unknown"),
                ("response_code", "503"),
                ("response_flags", "UH"),
            ]
        ),
        2.0
    );
    let grpc = [
        ("destination_service_name", "grpc"),
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("grpc_response_status", "0"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(sum(&at_a, "istio_requests_total", &grpc), 2.0);
    assert_eq!(sum(&at_a, "istio_request_messages_total", &grpc), 2.0);
    assert_eq!(sum(&at_a, "istio_response_messages_total", &grpc), 3.0);
    // TCP through HBONE, both ends.
    assert_eq!(sum(&at_a, "istio_tcp_connections_opened_total", &tcp), 3.0);
    assert_eq!(sum(&at_a, "istio_tcp_connections_closed_total", &tcp), 3.0);
    assert_eq!(sum(&at_a, "istio_tcp_received_bytes_total", &tcp), 3000.0);
    assert_eq!(sum(&at_a, "istio_tcp_sent_bytes_total", &tcp), 3000.0);
    let inbound = [
        ("reporter", "destination"),
        ("source_workload", "a1"),
        ("source_principal", "spiffe://cluster.local/ns/shop/sa/a1"),
        ("destination_workload", "b2"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let at_b = until(&b, |s| {
        sum(s, "istio_tcp_connections_closed_total", &inbound) >= 3.0
    });
    assert_eq!(
        sum(&at_b, "istio_tcp_connections_opened_total", &inbound),
        3.0
    );
    assert_eq!(
        sum(&at_b, "istio_tcp_received_bytes_total", &inbound),
        3000.0
    );
    assert_eq!(sum(&at_b, "istio_tcp_sent_bytes_total", &inbound), 3000.0);
    assert!(sum(&at_b, "trellis_build_info", &[]) == 1.0);
    assert!(
        sum(
            &at_a,
            "trellis_certificate_expiry_seconds",
            &[("identity", "spiffe://cluster.local/ns/shop/sa/a1")]
        ) > 3600.0
    );
    assert!(sum(&at_a, "trellis_map_capacity", &[]) > 0.0);
    // The config folder loaded once, nothing refused; the L7 path's two
    // endpoints of web are healthy, and `empty` has none.
    let reloads = |outcome| {
        sum(
            &at_a,
            "trellis_config_reloads_total",
            &[("source", "config"), ("outcome", outcome)],
        )
    };
    assert!(reloads("ok") >= 1.0 && reloads("failed") == 0.0);
    // The state was built and written at least once, and that took time.
    assert!(sum(&at_a, "trellis_state_rebuilds_total", &[]) >= 1.0);
    assert!(sum(&at_a, "trellis_state_rebuild_seconds_total", &[]) > 0.0);
    let status = cluster.agents[0].cli_json("status").expect("status");
    assert!(
        status["rebuilds"]["rebuilds"].as_u64() >= Some(1),
        "{}",
        status["rebuilds"]
    );
    // A pod added in a file of its own: the rebuild makes its workload and
    // takes every other workload and Service view from the build before.
    let objects = |samples: &[Value], kind, outcome| {
        sum(
            samples,
            "trellis_state_rebuild_objects_total",
            &[("kind", kind), ("outcome", outcome)],
        )
    };
    let before = scrape(&a);
    cluster
        .config()
        .write(
            "extra.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x1, namespace: other}\n\
             spec: {nodeName: node-elsewhere, containers: [{name: c, image: none}]}\n\
             status: {podIP: 10.250.0.9}\n",
        )
        .expect("extra pod");
    let after = until(&a, |s| {
        objects(s, "workload", "made") > objects(&before, "workload", "made")
    });
    let delta = |kind, outcome| objects(&after, kind, outcome) - objects(&before, kind, outcome);
    assert_eq!(
        delta("workload", "made"),
        1.0,
        "only the new pod's workload"
    );
    assert_eq!(delta("service", "made"), 0.0, "no Service sees the new pod");
    assert!(
        delta("workload", "reused") >= 4.0,
        "{}",
        delta("workload", "reused")
    );
    assert!(
        delta("service", "reused") >= 3.0,
        "{}",
        delta("service", "reused")
    );
    let status = cluster.agents[0].cli_json("status").expect("status");
    assert_eq!(status["workloads"], 5, "{status}");
    let text = cluster.agents[0].cli(&["status"]).expect("status");
    assert!(text.contains("of 5 workloads, 3 of 3 services"), "{text}");
    let endpoints = |service, state| {
        sum(
            &at_a,
            "trellis_upstream_endpoints",
            &[("service", service), ("state", state)],
        )
    };
    assert_eq!(endpoints("shop/web", "healthy"), 2.0);
    assert_eq!(endpoints("shop/web", "ejected"), 0.0);
    assert!(
        at_a.iter().any(|s| s[0] == "trellis_hbone_pool_streams"),
        "the pool's open streams are a gauge"
    );

    // Access logs: a JSON line per request and per connection, at each end.
    let access = |agent: &trellis_tests::Agent| -> Vec<Value> {
        agent
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["target"] == "access")
            .collect()
    };
    let lines = access(&cluster.agents[0]);
    let web_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["dst_service"] == "web.shop.svc.cluster.local")
        .collect();
    assert_eq!(web_lines.len(), 10, "{lines:?}");
    for l in &web_lines {
        assert_eq!(l["protocol"], "http", "{l}");
        assert_eq!(l["src_workload"], "a1", "{l}");
        assert_eq!(
            l["src_principal"], "spiffe://cluster.local/ns/shop/sa/a1",
            "{l}"
        );
        assert_eq!(l["response_code"], 200, "{l}");
        assert!(
            l["upstream"].as_str().is_some_and(|u| u.ends_with(":8080")),
            "{l}"
        );
        assert!(
            l["duration_ms"].as_f64().is_some() && l["start"].as_str().is_some(),
            "{l}"
        );
        assert!(l["bytes_out"] == 5 || l["bytes_out"] == 6, "{l}");
        // The request line and headers Envoy's default log names.
        assert_eq!(
            (
                &l["method"],
                &l["path"],
                &l["http_version"],
                &l["authority"]
            ),
            (
                &Value::from("GET"),
                &Value::from("/"),
                &Value::from("HTTP/1.1"),
                &Value::from(WEB)
            ),
            "{l}"
        );
        assert!(
            l["user_agent"]
                .as_str()
                .is_some_and(|u| u.starts_with("curl/")),
            "{l}"
        );
    }
    assert_eq!(
        web_lines
            .iter()
            .filter(|l| l["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736")
            .count(),
        1
    );
    // A request's own x-request-id is kept; the others got a new one each
    // (a version 4 UUID), as Envoy gives them.
    let ids: Vec<&str> = web_lines
        .iter()
        .filter_map(|l| l["request_id"].as_str())
        .collect();
    assert_eq!(
        ids.iter().filter(|i| **i == "from-the-caller").count(),
        1,
        "{ids:?}"
    );
    let made: std::collections::BTreeSet<&&str> = ids
        .iter()
        .filter(|i| i.len() == 36 && i.as_bytes()[14] == b'4')
        .collect();
    assert_eq!(made.len(), 9, "{ids:?}");
    let tcp_lines: Vec<Value> = access(&cluster.agents[1])
        .into_iter()
        .filter(|l| l["protocol"] == "tcp" && l["dst_workload"] == "b2")
        .collect();
    assert_eq!(tcp_lines.len(), 3, "{tcp_lines:?}");
    for l in &tcp_lines {
        assert_eq!(l["reporter"], "destination", "{l}");
        assert_eq!(
            (l["bytes_in"].as_u64(), l["bytes_out"].as_u64()),
            (Some(1000), Some(1000)),
            "{l}"
        );
        assert_eq!(l["mtls"], true, "{l}");
    }

    // Connections an egress policy refuses at connect(): the kernel's deny
    // counters rise by exactly as many.
    let denied = |s: &[Value]| sum(s, "trellis_datapath_events_total", &[("verdict", "deny")]);
    let before = denied(&scrape(&a));
    cluster
        .apply_network_policies(&[mesh::network_policy(
            "shop",
            "client-egress",
            "{podSelector: {matchLabels: {app: client}}, policyTypes: [Egress], \
             egress: [{ports: [{port: 80}, {port: 8080}, {port: 9000}]}]}",
        )])
        .expect("policy");
    let refused = client
        .exec()
        .python_output(
            "import socket, sys\nn = 0\nfor _ in range(4):\n    try:\n        socket.create_connection((sys.argv[1], 9100), timeout=5)\n    except PermissionError:\n        n += 1\nprint(n)\n",
            &[&local.ip.to_string()],
            Duration::from_secs(60),
        )
        .expect("denied connects");
    assert_eq!(refused.trim(), "4");
    let after = denied(&until(&a, |s| denied(s) >= before + 4.0));
    assert_eq!(after - before, 4.0, "one kernel denial per refused connect");

    // The service graph each node has seen, as JSON and as DOT that
    // Graphviz renders.
    let graph = cluster.agents[0].cli_json("topology").expect("topology");
    let edge = |g: &Value, from: &str, to: &str| -> Value {
        g["edges"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["from"] == from && e["to"] == to))
            .cloned()
            .unwrap_or_else(|| panic!("{from} -> {to} in {g}"))
    };
    let e = edge(&graph, "shop/a1", "web.shop.svc.cluster.local");
    assert_eq!(
        (e["protocol"].as_str(), e["requests"].as_u64()),
        (Some("http"), Some(10)),
        "{e}"
    );
    assert_eq!(
        edge(&graph, "web.shop.svc.cluster.local", "shop/a2")["requests"],
        5
    );
    let e = edge(&graph, "web.shop.svc.cluster.local", "shop/b1");
    assert_eq!(
        (e["requests"].as_u64(), e["mtls"].as_bool()),
        (Some(5), Some(true)),
        "{e}"
    );
    let e = edge(&graph, "shop/a1", "empty.shop.svc.cluster.local");
    assert_eq!(e["error_ratio"], 1.0, "{e}");
    assert!(
        edge(&graph, "shop/a1", "shop/a2")["denied"].as_u64() >= Some(4),
        "{graph}"
    );
    let graph_b = cluster.agents[1].cli_json("topology").expect("topology b");
    let e = edge(&graph_b, "shop/a1", "shop/b2");
    assert_eq!(
        (e["connections"].as_u64(), e["bytes"].as_u64()),
        (Some(3), Some(6000)),
        "{e}"
    );
    let dot = cluster.agents[0].cli(&["topology", "--dot"]).expect("dot");
    assert!(dot.starts_with("digraph trellis {"), "{dot}");
    let mut render = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("graphviz dot");
    use std::io::Write as _;
    render
        .stdin
        .take()
        .expect("stdin")
        .write_all(dot.as_bytes())
        .expect("dot input");
    let svg = render.wait_with_output().expect("dot runs");
    assert!(svg.status.success(), "{dot}");
    assert!(String::from_utf8_lossy(&svg.stdout).contains("<svg"));

    // A real Prometheus server scraping both agents sees the same numbers.
    let dir = std::env::temp_dir().join(format!("{}-prometheus", lab.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: trellis\n  static_configs:\n  - targets: ['{}:15020', '{}:15020']\n",
            a.ip, b.ip
        ),
    )
    .expect("config");
    let mut cmd = a.exec().command("prometheus").expect("prometheus");
    cmd.args([
        &format!("--config.file={}", dir.join("prometheus.yml").display()),
        &format!("--storage.tsdb.path={}", dir.join("data").display()),
        "--web.listen-address=127.0.0.1:19090",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let _prometheus = ChildGuard::spawn(&mut cmd).expect("prometheus runs");
    let query = |q: &str| -> Option<f64> {
        let out = a
            .exec()
            .output(
                "curl",
                &[
                    "-s",
                    "-m",
                    "5",
                    "--get",
                    "--data-urlencode",
                    &format!("query={q}"),
                    "http://127.0.0.1:19090/api/v1/query",
                ],
                Duration::from_secs(10),
            )
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let requests = "sum(istio_requests_total{reporter=\"source\",destination_service_name=\"web\",response_code=\"200\",source_workload=\"a1\"})";
    let inbound_bytes =
        "sum(istio_tcp_received_bytes_total{reporter=\"destination\",destination_workload=\"b2\"})";
    let denials = "sum(trellis_datapath_events_total{verdict=\"deny\"})";
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = (None, None, None);
    while Instant::now() < deadline {
        seen = (query(requests), query(inbound_bytes), query(denials));
        if seen.0.is_some() && seen.1.is_some() && seen.2.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(seen.0, Some(10.0), "Prometheus: requests {seen:?}");
    assert_eq!(seen.1, Some(3000.0), "Prometheus: bytes {seen:?}");
    assert!(
        seen.2.is_some_and(|d| d >= after),
        "Prometheus: denials {seen:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
