//! Distributed tracing through a two-node mesh: a client pod on node a
//! calls a Service whose pod is on node b (the L7 path, then HBONE), with
//! W3C and B3 trace headers. A test OTLP collector (Python, decoding with
//! opentelemetry-proto's own types) receives the agents' spans over gRPC,
//! then over HTTP/protobuf; the test checks both agents' spans share the
//! caller's trace id, chain parent to child, and that the server pod gets
//! the destination agent's span as its parent. Sampling is 0 for new
//! traces, so every span comes from a caller's decision and the counts are
//! exact.

use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_tests::{
    ChildGuard, Lab, Node, Pod, mesh,
    prometheus::{scrape, sum, until},
    py,
};

const WEB: &str = "10.96.0.90";
const GRPC_PORT: u16 = 4317;
const HTTP_PORT: u16 = 4318;

/// Every span the collector received.
fn spans(collector_node: &Node) -> Vec<Value> {
    let out = collector_node
        .exec()
        .output(
            "curl",
            &[
                "-s",
                "-m",
                "5",
                &format!("http://127.0.0.1:{HTTP_PORT}/spans"),
            ],
            Duration::from_secs(10),
        )
        .expect("curl");
    serde_json::from_slice(&out.stdout).expect("spans as JSON")
}

/// The spans of `trace`, once there are `n` of them (or what came).
fn trace(collector_node: &Node, trace: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Vec<Value> = spans(collector_node)
            .into_iter()
            .filter(|s| s["trace_id"] == trace)
            .collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// GET `url` with `headers`: the status and the trace headers the server
/// pod received.
fn get(client: &Pod, url: &str, headers: &[&str]) -> (String, Value) {
    let mut args = vec!["-s", "-m", "10", "-o", "/dev/stderr", "-w", "%{http_code}"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = client
        .exec()
        .output("curl", &args, Duration::from_secs(20))
        .expect("curl");
    let seen = serde_json::from_slice(&out.stderr).unwrap_or(Value::Null);
    (String::from_utf8_lossy(&out.stdout).into_owned(), seen)
}

fn kind(spans: &[Value], kind: i64) -> &Value {
    spans
        .iter()
        .find(|s| s["kind"] == kind)
        .unwrap_or_else(|| panic!("no span of kind {kind} in {spans:#?}"))
}

/// Two nodes: a client pod a1 on node a, the trace-echo server b1 on node
/// b (port 8080), and the test collector on node a, both its ports up.
fn two_nodes_and_a_collector(name: &str) -> (Lab, Node, Node, Pod, Pod, [ChildGuard; 2]) {
    let mut lab = Lab::new(name).expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let serving = server
        .serve(py::TRACE_ECHO, &["8080"], 8080)
        .expect("server");
    let collector = a
        .exec()
        .python(
            py::OTLP_COLLECTOR,
            &[&GRPC_PORT.to_string(), &HTTP_PORT.to_string()],
        )
        .expect("collector");
    for port in [HTTP_PORT, GRPC_PORT] {
        a.exec()
            .wait_port("127.0.0.1", port, Duration::from_secs(20))
            .expect("collector up");
    }
    (lab, a, b, client, server, [serving, collector])
}

const SERVER: i64 = 2;
const CLIENT: i64 = 3;

#[test]
fn spans_from_both_agents_share_the_callers_trace() {
    let (lab, a, b, client, server, _running) = two_nodes_and_a_collector("tracing");

    let grpc_endpoint = format!("http://{}:{GRPC_PORT}", a.ip);
    let mut cluster = mesh::Cluster::start_with(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(
                &server,
                "shop",
                &[("app", "web"), ("version", "v2")],
                &[],
                "",
            ),
            mesh::service("shop", "web", WEB, 80, "8080", &[("app", "web")]),
        ],
        mesh::Certs::SharedCa,
        &[
            "--otlp-endpoint",
            &grpc_endpoint,
            "--otlp-protocol",
            "grpc",
            "--trace-sampling",
            "0",
        ],
    )
    .expect("mesh");
    let url = format!("http://{WEB}/hello?x=1");

    // W3C, sampled by the caller.
    let t1 = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let (code, seen) = get(
        &client,
        &url,
        &[
            &format!("traceparent: 00-{t1}-{caller_span}-01"),
            "tracestate: congo=t61rcWkgMzE",
        ],
    );
    assert_eq!(code, "200");
    let got = trace(&a, t1, 2);
    assert_eq!(got.len(), 2, "one span per agent: {got:#?}");
    let (c, s) = (kind(&got, CLIENT), kind(&got, SERVER));
    assert_eq!(c["parent"], caller_span, "the caller's span is the parent");
    assert_eq!(
        s["parent"], c["span_id"],
        "the source agent's span is the parent"
    );
    let delivered = seen["traceparent"]
        .as_str()
        .expect("traceparent reaches the pod");
    assert_eq!(
        delivered,
        format!("00-{t1}-{}-01", s["span_id"].as_str().unwrap()),
        "the pod's parent is the destination agent's span"
    );
    assert_eq!(seen["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(c["trace_state"], "congo=t61rcWkgMzE");
    // Istio's operation names: the Service and the port called (the
    // Service port on the caller's side, the pod's on the callee's).
    assert_eq!(c["name"], "web.shop.svc.cluster.local:80/*");
    assert_eq!(s["name"], "web.shop.svc.cluster.local:8080/*");
    for span in [c, s] {
        assert_eq!(span["via"], "grpc");
        assert_eq!(span["attributes"]["http.request.method"], "GET");
        assert_eq!(span["attributes"]["url.path"], "/hello");
        assert_eq!(span["attributes"]["http.response.status_code"], 200);
        assert_eq!(span["attributes"]["trellis.mtls"], true);
        assert_eq!(span["flags"], 1);
        assert_eq!(span["status"], 0, "unset: not an error");
        assert_eq!(span["scope"], "trellis");
        let (start, end) = (
            span["start"].as_u64().unwrap(),
            span["end"].as_u64().unwrap(),
        );
        assert!(start > 0 && start <= end, "{span}");
    }
    assert_eq!(c["attributes"]["trellis.reporter"], "source");
    assert_eq!(c["resource"]["service.name"], "client.shop");
    assert_eq!(c["resource"]["k8s.node.name"], format!("node-{}", a.name));
    assert_eq!(
        c["attributes"]["upstream.address"],
        format!("{}:8080", server.ip)
    );
    assert_eq!(s["attributes"]["trellis.reporter"], "destination");
    assert_eq!(s["resource"]["service.name"], "web.shop");
    assert_eq!(s["resource"]["k8s.node.name"], format!("node-{}", b.name));
    assert_eq!(
        s["attributes"]["trellis.peer.principal"],
        "spiffe://cluster.local/ns/shop/sa/a1"
    );
    assert!(
        c["start"].as_u64() <= s["start"].as_u64() && s["end"].as_u64() <= c["end"].as_u64(),
        "the server span lies within the client span: {c} {s}"
    );

    // The caller said not sampled: no spans, the decision passed on.
    let t2 = "0af7651916cd43dd8448eb211c80319c";
    let (code, seen) = get(
        &client,
        &url,
        &[&format!("traceparent: 00-{t2}-b7ad6b7169203331-00")],
    );
    assert_eq!(code, "200");
    let delivered = seen["traceparent"].as_str().expect("traceparent");
    assert!(
        delivered.starts_with(&format!("00-{t2}-")) && delivered.ends_with("-00"),
        "{delivered}"
    );
    // No headers and sampling 0: a context saying "not sampled" reaches the pod.
    let (code, seen) = get(&client, &url, &[]);
    assert_eq!(code, "200");
    assert!(
        seen["traceparent"]
            .as_str()
            .is_some_and(|t| t.ends_with("-00")),
        "{seen}"
    );

    // B3 (64-bit trace id), sampled; an error answer.
    let (code, seen) = get(
        &client,
        &format!("http://{WEB}/fail"),
        &[
            "x-b3-traceid: 463ac35c9f6413ad",
            "x-b3-spanid: a2fb4a1d1a96d312",
            "x-b3-sampled: 1",
        ],
    );
    assert_eq!(code, "503");
    let t3 = "0000000000000000463ac35c9f6413ad";
    let got = trace(&a, t3, 2);
    assert_eq!(got.len(), 2, "{got:#?}");
    let (c, s) = (kind(&got, CLIENT), kind(&got, SERVER));
    assert_eq!(c["parent"], "a2fb4a1d1a96d312");
    assert_eq!(s["parent"], c["span_id"]);
    assert_eq!(
        seen["x-b3-traceid"], "463ac35c9f6413ad",
        "the B3 form is kept"
    );
    assert_eq!(seen["x-b3-spanid"], s["span_id"]);
    assert_eq!(seen["x-b3-parentspanid"], c["span_id"]);
    assert_eq!(seen["x-b3-sampled"], "1");
    for span in [c, s] {
        assert_eq!(span["attributes"]["http.response.status_code"], 503);
        assert_eq!(span["status"], 2, "an error: {span}");
    }
    assert_eq!(spans(&a).len(), 4, "unsampled requests left no spans");

    // The destination agent served the hinted streams as HTTP: it counted
    // every request (sampled or not) as reporter=destination.
    let samples = scrape(&b);
    let requests = |code: &str| {
        sum(
            &samples,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("source_workload", "a1"),
                ("destination_workload", "b1"),
                ("destination_service_name", "web"),
                ("request_protocol", "http"),
                ("connection_security_policy", "mutual_tls"),
                ("response_code", code),
            ],
        )
    };
    assert_eq!((requests("200"), requests("503")), (3.0, 1.0));
    assert!(sum(&samples, "trellis_inbound_http_traced_total", &[]) >= 1.0);
    assert_eq!(sum(&samples, "trellis_tracing_spans_total", &[]), 2.0);
    assert_eq!(sum(&samples, "trellis_tracing_unsampled_total", &[]), 2.0);

    // HTTP/protobuf, after a restart of node b's agent.
    let http_endpoint = format!("http://{}:{HTTP_PORT}", a.ip);
    cluster
        .restart(
            1,
            &b,
            &[
                "--otlp-endpoint",
                &http_endpoint,
                "--otlp-protocol",
                "http/protobuf",
                "--trace-sampling",
                "0",
            ],
        )
        .expect("restart b");
    let t4 = "11111111111111112222222222222222";
    let (code, _) = get(
        &client,
        &url,
        &[&format!("traceparent: 00-{t4}-3333333333333333-01")],
    );
    assert_eq!(code, "200");
    let got = trace(&a, t4, 2);
    assert_eq!(kind(&got, SERVER)["via"], "http");
    assert_eq!(kind(&got, CLIENT)["via"], "grpc");

    // A collector that is not there: requests still work, spans are
    // counted as failed.
    let nowhere = format!("http://{}:4399", a.ip);
    cluster
        .restart(
            1,
            &b,
            &["--otlp-endpoint", &nowhere, "--trace-sampling", "1"],
        )
        .expect("restart b");
    for _ in 0..3 {
        let sampled = "traceparent: 00-44444444444444445555555555555555-6666666666666666-01";
        assert_eq!(get(&client, &url, &[sampled]).0, "200");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let failed = loop {
        let failed = sum(&scrape(&b), "trellis_tracing_failed_total", &[]);
        if failed >= 3.0 || Instant::now() > deadline {
            break failed;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(failed, 3.0, "spans that could not be sent are counted");
}

/// What `f` returns once it has something; fails after ten seconds.
fn settled<T>(f: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(done) = f() {
            return done;
        }
        assert!(Instant::now() < deadline, "not settled in 10 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The access log lines of `agent` (JSON logs).
fn access_lines(agent: &trellis_tests::Agent) -> Vec<Value> {
    agent
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "access")
        .collect()
}

/// Istio's Telemetry API, by mesh, namespace and workload: the mesh samples
/// every new trace and tags spans; the namespace turns off the server's
/// request count and the client's connection-opened count; the client
/// workload's access log is off. Then a live change: the client's spans
/// are not reported (its context still passed on) and its log is back.
#[test]
fn telemetry_policies_choose_what_is_traced_logged_and_counted() {
    const WEB_TCP: &str = "10.96.0.91";
    let (lab, a, b, client, server, _running) = two_nodes_and_a_collector("telemetry");

    let client_policy = |spec: &str| mesh::telemetry("shop", "client", spec);
    let mut docs = vec![
        mesh::node(&a),
        mesh::node(&b),
        mesh::namespace("shop", true),
        mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
        mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
        mesh::service("shop", "web", WEB, 80, "8080", &[("app", "web")]),
        mesh::service_with_protocol(
            "shop",
            "web-tcp",
            WEB_TCP,
            80,
            "8080",
            "tcp",
            &[("app", "web")],
        ),
        mesh::telemetry(
            "trellis-system",
            "mesh-default",
            "{tracing: [{randomSamplingPercentage: 100, customTags: {team: {literal: {value: payments}}, \
             user: {header: {name: x-user, defaultValue: anon}}}}]}",
        ),
        mesh::telemetry(
            "shop",
            "shop",
            "{metrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, disabled: true}, \
             {match: {metric: TCP_OPENED_CONNECTIONS, mode: CLIENT}, disabled: true}, \
             {match: {metric: REQUEST_DURATION, mode: CLIENT}, tagOverrides: \
             {user: {value: \"request.headers['x-user']\"}, request_protocol: {operation: REMOVE}}}]}]}",
        ),
        // The server's side logs failures and /t1 only.
        mesh::telemetry(
            "shop",
            "web",
            "{selector: {matchLabels: {app: web}}, accessLogging: [{match: {mode: SERVER}, \
             filter: {expression: \"response.code >= 400 || request.url_path == '/t1'\"}}]}",
        ),
        client_policy(
            "{selector: {matchLabels: {app: client}}, accessLogging: [{disabled: true}]}",
        ),
    ];
    let grpc_endpoint = format!("http://{}:{GRPC_PORT}", a.ip);
    let cluster = mesh::Cluster::start_with(
        lab.name(),
        &[&a, &b],
        &docs,
        mesh::Certs::SharedCa,
        &[
            "--otlp-endpoint",
            &grpc_endpoint,
            "--otlp-protocol",
            "grpc",
            "--trace-sampling",
            "0",
            "--log-format",
            "json",
        ],
    )
    .expect("mesh");
    let (agent_a, agent_b) = (&cluster.agents[0], &cluster.agents[1]);
    let traced = |path: &str, headers: &[&str]| -> Vec<Value> {
        let (code, seen) = get(&client, &format!("http://{WEB}{path}"), headers);
        assert_eq!(code, "200", "{}", agent_a.log_text());
        // The server pod got the trace's context: a new trace, sampled by
        // the mesh's 100% (the flag says 0).
        let parent = seen["traceparent"].as_str().expect("traceparent");
        assert!(parent.ends_with("-01"), "sampled: {parent}");
        let id = parent.split('-').nth(1).expect("trace id").to_owned();
        trace(&a, &id, 2)
    };

    for _ in 0..3 {
        let spans = traced("/t1", &["x-user: ada"]);
        assert_eq!(spans.len(), 2, "both agents' spans: {spans:#?}");
        for span in &spans {
            assert_eq!(span["attributes"]["team"], "payments", "{span}");
            assert_eq!(span["attributes"]["user"], "ada", "{span}");
        }
    }
    let spans = traced("/t1", &[]);
    assert_eq!(kind(&spans, SERVER)["attributes"]["user"], "anon");
    // Two more the server's filter judges: one it drops, one it keeps.
    for (path, want) in [("/t3", "200"), ("/fail", "503")] {
        assert_eq!(get(&client, &format!("http://{WEB}{path}"), &[]).0, want);
    }
    // The tunnel's streams count as connections on the server's side (the
    // HTTP requests' too): the two below are the ones after these.
    let opened_at_b = || {
        sum(
            &scrape(&b),
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_workload", "a1")],
        )
    };
    let opened_before = opened_at_b();
    for _ in 0..2 {
        assert_eq!(get(&client, &format!("http://{WEB_TCP}/tcp"), &[]).0, "200");
    }

    // Metrics: the server side counts no requests but still times them;
    // the client side counts them. Connections: the client side counts no
    // openings but counts closings; the server side counts both.
    let from_a1 = |reporter| [("reporter", reporter), ("source_workload", "a1")];
    // Recorded as each response and connection ends, which may be just
    // after the client saw it.
    let at_b = until(&b, |at_b| {
        let opened = sum(
            at_b,
            "istio_tcp_connections_opened_total",
            &from_a1("destination"),
        ) - opened_before;
        let timed = sum(
            at_b,
            "istio_request_duration_milliseconds_count",
            &from_a1("destination"),
        );
        opened >= 2.0 && timed >= 6.0
    });
    assert_eq!(
        sum(&at_b, "istio_requests_total", &from_a1("destination")),
        0.0
    );
    assert_eq!(
        sum(
            &at_b,
            "istio_request_duration_milliseconds_count",
            &from_a1("destination")
        ),
        6.0
    );
    assert_eq!(
        sum(
            &at_b,
            "istio_tcp_connections_opened_total",
            &from_a1("destination")
        ) - opened_before,
        2.0
    );
    let at_a = until(&a, |at_a| {
        let closed = sum(
            at_a,
            "istio_tcp_connections_closed_total",
            &from_a1("source"),
        );
        let requests = sum(at_a, "istio_requests_total", &from_a1("source"));
        closed >= 2.0 && requests >= 6.0
    });
    assert_eq!(sum(&at_a, "istio_requests_total", &from_a1("source")), 6.0);
    // The client side's durations by the caller's x-user header, without
    // request_protocol; its counts keep Istio's labels.
    let durations = |user: &str| {
        let mut want = from_a1("source").to_vec();
        want.push(("user", user));
        sum(&at_a, "istio_request_duration_milliseconds_count", &want)
    };
    assert_eq!((durations("ada"), durations("unknown")), (3.0, 3.0));
    for sample in at_a.iter().filter(|s| s[1]["reporter"] == "source") {
        let user = !sample[1]["user"].is_null();
        let duration = sample[0]
            .as_str()
            .is_some_and(|n| n.starts_with("istio_request_duration"));
        assert_eq!(user, duration, "{sample}");
        assert_eq!(
            sample[1]["request_protocol"].is_null(),
            duration,
            "{sample}"
        );
    }
    assert_eq!(
        sum(
            &at_a,
            "istio_tcp_connections_closed_total",
            &from_a1("source")
        ),
        2.0
    );
    assert_eq!(
        sum(
            &at_a,
            "istio_tcp_connections_opened_total",
            &from_a1("source")
        ),
        0.0
    );
    // Access logs: none from the client's agent; the server's filter kept
    // the failure and /t1, and no connection (a connection has no response
    // code, and neither side of the `||` decides).
    let count = |lines: &[Value], path: &str| lines.iter().filter(|l| l["path"] == path).count();
    let at_b_lines = settled(|| {
        let lines = access_lines(agent_b);
        (count(&lines, "/t1") >= 4 && count(&lines, "/fail") >= 1).then_some(lines)
    });
    assert_eq!(count(&at_b_lines, "/t1"), 4, "{at_b_lines:#?}");
    assert_eq!(count(&at_b_lines, "/fail"), 1, "{at_b_lines:#?}");
    assert_eq!(count(&at_b_lines, "/t3"), 0, "{at_b_lines:#?}");
    assert!(
        at_b_lines.iter().all(|l| l["protocol"] != "tcp"),
        "{at_b_lines:#?}"
    );
    assert!(
        access_lines(agent_a)
            .iter()
            .all(|l| l["src_workload"] != "a1"),
        "{:#?}",
        access_lines(agent_a)
    );

    // What the CLI shows of them.
    let workloads = agent_a.cli_json("workloads").expect("workloads");
    let a1 = workloads["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["workload"] == "shop/a1")
        .cloned()
        .expect("a1");
    assert_eq!(a1["telemetry"]["client"]["access_log"], false, "{a1:#}");
    assert_eq!(
        a1["telemetry"]["client"]["sampling_ppm"], 1_000_000,
        "{a1:#}"
    );
    assert_eq!(
        a1["telemetry"]["client"]["metrics_off"],
        serde_json::json!(["TCP_OPENED_CONNECTIONS"]),
        "{a1:#}"
    );
    assert_eq!(
        a1["telemetry"]["server"]["metrics_off"],
        serde_json::json!(["REQUEST_COUNT"])
    );
    let text = agent_a.cli(&["workloads"]).expect("workloads text");
    assert!(
        text.contains("TELEMETRY")
            && text.contains("no access log")
            && text.contains("labels changed on REQUEST_DURATION"),
        "{text}"
    );
    let text = agent_a.cli(&["policy"]).expect("policy text");
    assert!(
        text.contains("TELEMETRY") && text.contains("shop/client"),
        "{text}"
    );

    // A live change: the client's spans are not reported, its log is on.
    let last = docs.len() - 1;
    docs[last] = client_policy(
        "{selector: {matchLabels: {app: client}}, tracing: [{match: {mode: CLIENT}, disableSpanReporting: true}]}",
    );
    cluster
        .config()
        .write("mesh.yaml", &mesh::docs(&docs))
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let w = agent_a.cli_json("workloads").expect("workloads");
        let reported = w["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["workload"] == "shop/a1")
            .map(|e| e["telemetry"]["client"]["report_spans"].clone());
        if reported == Some(Value::Bool(false)) {
            break;
        }
        assert!(Instant::now() < deadline, "the change: {w:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, seen) = get(&client, &format!("http://{WEB}/t2"), &["x-user: ada"]);
    assert_eq!(code, "200");
    let parent = seen["traceparent"].as_str().expect("traceparent");
    assert!(
        parent.ends_with("-01"),
        "still sampled, and said so: {parent}"
    );
    let id = parent.split('-').nth(1).expect("trace id");
    // The server's span comes; wait as long for a client span that must not.
    let spans = trace(&a, id, 2);
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(spans[0]["kind"], SERVER);
    assert_eq!(
        sum(&scrape(&a), "trellis_tracing_unreported_total", &[]),
        1.0
    );
    let lines = settled(|| {
        let lines = access_lines(agent_a);
        (count(&lines, "/t2") >= 1).then_some(lines)
    });
    assert_eq!(count(&lines, "/t2"), 1, "{lines:#?}");
}
