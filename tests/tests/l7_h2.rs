//! HTTP/2 and gRPC through the L7 path, with real clients and servers:
//! grpcio's client and server (unary, server, client and bidirectional
//! streaming, trailers, a non-OK status with its message), curl with HTTP/2
//! prior knowledge, nghttp and h2load against nghttpd. Each Service has one backend
//! on the client's node and one across nodes, and requests on one client
//! connection are balanced per request, so both paths carry every kind.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use trellis_tests::{Lab, Pod, mesh, py};

const GRPC_VIP: &str = "10.96.0.30";
const H2_VIP: &str = "10.96.0.31";

/// A folder nghttpd serves, removed with the test.
struct Docroot(PathBuf);

impl Docroot {
    fn new(lab: &str, pod: &Pod) -> Self {
        let dir = std::env::temp_dir().join(format!("{lab}-{}-www", pod.name));
        std::fs::create_dir_all(&dir).expect("docroot");
        std::fs::write(dir.join("name"), &pod.name).expect("name file");
        std::fs::write(dir.join("big"), vec![b'x'; 1 << 20]).expect("big file");
        Self(dir)
    }
}

impl Drop for Docroot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn http2_and_grpc_keep_streams_trailers_and_status() {
    let mut lab = Lab::new("l7_h2").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let grpc_local = lab.add_pod(&a, "a2").expect("pod");
    let h2_local = lab.add_pod(&a, "a3").expect("pod");
    let grpc_remote = lab.add_pod(&b, "b1").expect("pod");
    let h2_remote = lab.add_pod(&b, "b2").expect("pod");
    let roots = [
        Docroot::new(lab.name(), &h2_local),
        Docroot::new(lab.name(), &h2_remote),
    ];
    let nghttpd = |pod: &Pod, root: &Docroot| {
        let guard = trellis_tests::ChildGuard::spawn(
            pod.exec()
                .command("nghttpd")
                .expect("nghttpd")
                .args(["--no-tls", "-d"])
                .arg(&root.0)
                .arg("8080"),
        )
        .expect("nghttpd starts");
        pod.exec()
            .wait_port(&pod.ip.to_string(), 8080, Duration::from_secs(20))
            .expect("nghttpd listens");
        guard
    };
    let _servers = [
        grpc_local
            .serve(py::GRPC_SERVER, &["local", "50051"], 50051)
            .expect("grpc server"),
        grpc_remote
            .serve(py::GRPC_SERVER, &["remote", "50051"], 50051)
            .expect("grpc server"),
        nghttpd(&h2_local, &roots[0]),
        nghttpd(&h2_remote, &roots[1]),
    ];
    let _cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&grpc_local, "shop", &[("app", "grpc")], &[], ""),
            mesh::pod(&grpc_remote, "shop", &[("app", "grpc")], &[], ""),
            mesh::pod(&h2_local, "shop", &[("app", "h2")], &[], ""),
            mesh::pod(&h2_remote, "shop", &[("app", "h2")], &[], ""),
            // gRPC declared, so no sniffing; the h2 Service is sniffed.
            mesh::service_with_protocol(
                "shop",
                "grpc",
                GRPC_VIP,
                50051,
                "50051",
                "grpc",
                &[("app", "grpc")],
            ),
            mesh::service("shop", "h2", H2_VIP, 80, "8080", &[("app", "h2")]),
        ],
    )
    .expect("mesh");

    // gRPC: every kind of call, four rounds on one channel.
    let out = client
        .exec()
        .python_output(
            py::GRPC_CLIENT,
            &[&format!("{GRPC_VIP}:50051"), "4"],
            Duration::from_secs(90),
        )
        .expect("grpc client");
    let out: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    for kind in ["say", "count", "sum", "chat"] {
        let calls = out[kind].as_array().expect(kind);
        assert_eq!(calls.len(), 4, "{kind}: {out}");
        assert!(
            calls.iter().all(|c| c[1] == true),
            "{kind}: every answer intact: {out}"
        );
        let servers: BTreeSet<&str> = calls.iter().filter_map(|c| c[0].as_str()).collect();
        assert_eq!(
            servers,
            BTreeSet::from(["local", "remote"]),
            "{kind}: balanced per request over both nodes: {out}"
        );
    }
    // A non-OK status keeps its code, message and trailers.
    assert_eq!(out["fail"][0], "NOT_FOUND", "{out}");
    assert_eq!(out["fail"][1], "no such thing", "{out}");
    assert!(
        out["fail"][2] == "local" || out["fail"][2] == "remote",
        "{out}"
    );

    // curl with HTTP/2 prior knowledge: HTTP/2 end to end.
    let url = format!("http://{H2_VIP}/name");
    let out = client
        .exec()
        .output(
            "curl",
            &[
                "-s",
                "-m",
                "20",
                "--http2-prior-knowledge",
                "-w",
                " %{http_version}",
                &url,
            ],
            Duration::from_secs(60),
        )
        .expect("curl");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out == "a3 2" || out == "b2 2", "{out}");

    // nghttp: six concurrent streams on one connection, balanced per
    // request over both backends (the bodies, two bytes each, concatenated).
    let urls: Vec<String> = (0..6).map(|i| format!("{url}?{i}")).collect();
    let args: Vec<&str> = urls.iter().map(String::as_str).collect();
    let out = client
        .exec()
        .output("nghttp", &args, Duration::from_secs(60))
        .expect("nghttp");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let names: Vec<&str> = (0..out.len() / 2).map(|i| &out[2 * i..2 * i + 2]).collect();
    assert_eq!(names.len(), 6, "{out}");
    assert!(names.iter().all(|n| *n == "a3" || *n == "b2"), "{out}");
    assert!(names.contains(&"a3") && names.contains(&"b2"), "{out}");

    // h2load: many streams on few connections, a 1 MiB body among them.
    let out = client
        .exec()
        .output(
            "h2load",
            &[
                "-n",
                "400",
                "-c",
                "2",
                "-m",
                "16",
                &format!("http://{H2_VIP}/name"),
                &format!("http://{H2_VIP}/big"),
            ],
            Duration::from_secs(60),
        )
        .expect("h2load");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("400 succeeded, 0 failed, 0 errored"),
        "h2load: {text}"
    );
    assert!(text.contains("status codes: 400 2xx"), "h2load: {text}");
    drop(roots);
}

/// A backend's HTTP/2 connection going away (GOAWAY, as in a rolling
/// restart or at gRPC's MaxConnectionAge) or refusing a stream
/// (REFUSED_STREAM) costs no request the backend did not process: the agent
/// sends it again on a new connection. A request sent on a connection that
/// had gone away under a stream still answering, and a refused GET, both
/// get 200 from the next connection, while the held stream finishes on the
/// old one. A refused POST whose body had gone out is not sent again
/// without a retry policy, which records bodies (503 `upstream-refused`:
/// not processed), and is with one, even a route's rule whose retries
/// leave resets alone (GEP-1731): refused is not reset. The
/// backends are across nodes, so their GOAWAYs come through the HBONE
/// tunnel; one has HTTP authorization rules, so the destination's agent
/// serves its requests and passes the refusals back as REFUSED_STREAM. Their
/// ports declare HTTP/2, so an HTTP/1.1 client's request reaches these
/// HTTP/2-only backends too.
#[test]
fn a_backend_going_away_loses_no_request() {
    const PLAIN: &str = "10.96.0.33";
    const GUARDED: &str = "10.96.0.34";
    const ROUTED: &str = "10.96.0.35";
    let mut lab = Lab::new("l7_goaway").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let plain = lab.add_pod(&b, "b1").expect("pod");
    let guarded = lab.add_pod(&b, "b2").expect("pod");
    let _servers = [&plain, &guarded].map(|pod| {
        pod.serve(py::GOAWAY_SERVER, &["8080"], 8080)
            .expect("server")
    });
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&plain, "shop", &[("app", "plain")], &[], ""),
            mesh::pod(&guarded, "shop", &[("app", "guarded")], &[], ""),
            mesh::service_with_protocol(
                "shop",
                "plain",
                PLAIN,
                80,
                "8080",
                "http2",
                &[("app", "plain")],
            ),
            mesh::service_with_protocol(
                "shop",
                "guarded",
                GUARDED,
                80,
                "8080",
                "http2",
                &[("app", "guarded")],
            ),
            mesh::authorization_policy(
                "shop",
                "guarded-paths",
                "{selector: {matchLabels: {app: guarded}}, action: ALLOW, rules: [\
                 {to: [{operation: {paths: ['/*']}}]}]}",
            ),
            mesh::service_with_protocol(
                "shop",
                "routed",
                ROUTED,
                80,
                "8080",
                "http2",
                &[("app", "plain")],
            ),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: routed, namespace: shop}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: routed, port: 80}]\n  rules:\n\
             \x20 - retry: {attempts: 1, backoff: 5ms}\n\
             \x20   backendRefs: [{name: routed, port: 80}]\n"
                .to_owned(),
            // No policy retries: only the resending under test.
            mesh::traffic_policy("shop", "plain", "retry: {attempts: 0}"),
            mesh::traffic_policy("shop", "guarded", "retry: {attempts: 0}"),
        ],
    )
    .expect("mesh");
    let curl = |args: &[&str]| {
        let mut all = vec!["--http2-prior-knowledge", "-m", "10", "-w", " %{http_code}"];
        all.extend_from_slice(args);
        client.exec().curl(&all).expect("curl")
    };
    for vip in [PLAIN, GUARDED] {
        let url = |p: &str| format!("http://{vip}{p}");
        // Connections are numbered by the server (its readiness probe took one).
        let first = curl(&[&url("/")]);
        let n: u32 = first
            .strip_prefix("conn")
            .and_then(|r| r.strip_suffix(" 200"))
            .and_then(|n| n.parse().ok())
            .expect(&first);
        let conn = |k: u32| format!("conn{} 200", n + k);

        // A stream held open on the pooled connection, which then goes away.
        let held = std::env::temp_dir().join(format!("{}-{vip}-slow", lab.name()));
        let _ = std::fs::remove_file(&held);
        let mut slow = trellis_tests::ChildGuard::spawn(
            client
                .exec()
                .command("curl")
                .expect("curl")
                .args(["-s", "-N", "--http2-prior-knowledge", "-m", "10", "-o"])
                .arg(&held)
                .arg(url("/slow")),
        )
        .expect("curl /slow");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&held).unwrap_or_default() != "slow " {
            assert!(
                std::time::Instant::now() < deadline,
                "{vip}: /slow's first chunk"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            curl(&[&url("/")]),
            conn(1),
            "{vip}: sent on a new connection"
        );
        let exit = slow
            .wait_timeout(Duration::from_secs(10))
            .expect("/slow ends");
        assert!(exit.success(), "{vip}: {exit}");
        let body = std::fs::read_to_string(&held).unwrap_or_default();
        let _ = std::fs::remove_file(&held);
        assert_eq!(
            body, "slow done",
            "{vip}: the held stream finished on the old connection"
        );

        assert_eq!(curl(&[&url("/refused")]), conn(2), "{vip}: sent again");
        assert_eq!(
            curl(&["-o", "/dev/null", "-d", "x", &url("/refused")]),
            " 503",
            "{vip}: a body not recorded is not sent again"
        );

        // The port declares HTTP/2 and the backend speaks nothing else:
        // an HTTP/1.1 client's request goes to it as HTTP/2.
        let out = client
            .exec()
            .curl(&["-m", "10", "-w", " %{http_code} %{http_version}", &url("/")])
            .expect("curl");
        assert!(
            out.starts_with("conn") && out.ends_with(" 200 1.1"),
            "{vip}: {out}"
        );
    }
    // The rule's retry sends the recorded body again, on a new connection.
    let out = curl(&["-d", "x", &format!("http://{ROUTED}/refused")]);
    assert!(
        out.starts_with("conn") && out.ends_with(" 200"),
        "a refused POST retried by the route's rule: {out}"
    );
    // A body still on its way when the backend refuses the stream: the
    // rest is read into the record and the retry sends all of it.
    let out = client
        .exec()
        .run(
            "sh",
            &[
                "-c",
                &format!(
                    "(sleep 0.3; printf late) | curl -s --http2-prior-knowledge -m 10 \
                     -w ' %{{http_code}}' -X POST -T - http://{ROUTED}/refused"
                ),
            ],
        )
        .expect("curl");
    assert!(
        out.starts_with("conn") && out.ends_with(" 200"),
        "a refused POST whose body came later, retried: {out}"
    );
    let status = cluster.agents[0].cli_json("status").expect("status");
    assert_eq!(status["http"]["refused_retries"], 4, "{status}");
    assert_eq!(status["http"]["upstream_refused"], 2, "{status}");
    assert_eq!(status["http"]["retries"], 2, "{status}");
}

/// A gRPC client's deadline (`grpc-timeout`) is held by the agent, as
/// Istio's Envoy holds it, against a server that ignores it: a call with no
/// answer gets DEADLINE_EXCEEDED from the agent, one whose answer stalls
/// midway is ended with DEADLINE_EXCEEDED trailers, the server is told the
/// time left and sees both streams reset; a call without a deadline is
/// left alone. The client is hand-written, so no library enforces the
/// deadline on its side.
#[test]
fn a_grpc_deadline_is_held_for_the_client() {
    const VIP: &str = "10.96.0.32";
    let mut lab = Lab::new("l7_dl").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let _server = server
        .serve(py::DEADLINE_SERVER, &["8080"], 8080)
        .expect("server");
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[("app", "stall")], &[], ""),
            mesh::service_with_protocol(
                "shop",
                "stall",
                VIP,
                80,
                "8080",
                "grpc",
                &[("app", "stall")],
            ),
        ],
    )
    .expect("mesh");
    let call_as = |method: &str, timeout: &str, content_type: &str| -> serde_json::Value {
        let path = format!("/trellis.test.Stall/{method}");
        let out = client
            .exec()
            .python_output(
                py::DEADLINE_CLIENT,
                &[VIP, "80", &path, timeout, content_type],
                Duration::from_secs(30),
            )
            .expect("client");
        serde_json::from_str(&out).expect(&out)
    };
    let call = |method: &str, timeout: &str| call_as(method, timeout, "application/grpc");

    // No answer in 300 ms: the agent's trailers-only DEADLINE_EXCEEDED.
    let out = call("Stall", "300m");
    assert_eq!(out["head"][":status"], "200", "{out}");
    assert_eq!(out["head"]["grpc-status"], "4", "{out}");
    assert_eq!(out["head"]["x-trellis-reason"], "timeout", "{out}");

    // An answer that stalls after its first message: what came is
    // delivered, then trailers end the call.
    let out = call("Stream", "500m");
    assert_eq!(out["head"][":status"], "200", "{out}");
    assert_eq!(out["data"], "first", "{out}");
    assert_eq!(out["trailers"]["grpc-status"], "4", "{out}");
    assert_eq!(
        out["trailers"]["grpc-message"], "deadline exceeded in the mesh",
        "{out}"
    );

    // gRPC-Web reads its status in the body, where HTTP trailers would go
    // unread: made gRPC upstream, its stalled call ends with the same
    // DEADLINE_EXCEEDED as its last message (flagged 0x80).
    let out = call_as("Stream", "300m", "application/grpc-web+proto");
    assert_eq!(
        out["head"]["content-type"], "application/grpc-web+proto",
        "{out}"
    );
    let data = out["data"].as_str().expect("data");
    assert!(data.starts_with("first"), "{out}");
    assert!(
        data.contains("grpc-status:4\r\ngrpc-message:deadline exceeded in the mesh\r\n"),
        "{out}"
    );
    assert_eq!(out["reset"], false, "{out}");
    assert_eq!(out["trailers"], serde_json::json!({}), "{out}");

    // The server was told the time left (less than the client's), and all
    // of its streams were reset when the deadline passed.
    let log = call("Log", "-");
    let seen: serde_json::Value =
        serde_json::from_str(log["data"].as_str().expect("log")).expect("the server's record");
    let timeouts: Vec<&str> = seen["timeouts"]
        .as_array()
        .expect("timeouts")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(timeouts.len(), 3, "{seen}");
    for (t, most) in timeouts.iter().zip([300_000u64, 500_000, 300_000]) {
        let micros: u64 = t
            .strip_suffix('u')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{t:?} in microseconds"));
        assert!(micros > 0 && micros <= most, "{t} of {most}u");
    }
    assert_eq!(seen["resets"], 3, "{seen}");

    let status = cluster.agents[0].cli_json("status").expect("status");
    assert_eq!(status["http"]["timeout"], 3, "{}", status["http"]);
}
