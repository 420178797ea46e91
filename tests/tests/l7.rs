//! L7 routing with real clients and servers: `HTTPRoute`s attached to a
//! Service (GAMMA) pick the backend of each request on one connection: by
//! header, by path, by weight (90/10), with a consumer route in the client's
//! namespace replacing the producer route for it, and a request no rule
//! matches answered 404 by the agent with `x-trellis-reason: no-route`. One
//! backend is on the client's node, the other across nodes (HBONE).
//! An HTTP/1.1 upgrade (as WebSocket's) passes through the L7 path; bad
//! clients (malformed, slowloris) get their documented answers.

use std::time::Duration;

use trellis_tests::{Lab, Pod, mesh, py};

const VIP: &str = "10.96.0.10";

/// `curl` from `client` with `args`, its output (failures included).
fn curl(client: &Pod, args: &[&str]) -> String {
    let mut all = vec!["-s", "-m", "20"];
    all.extend_from_slice(args);
    let out = client
        .exec()
        .output("curl", &all, Duration::from_secs(60))
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn http_route(namespace: &str, name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{parentRefs: [{{group: '', kind: Service, name: web, namespace: shop, port: 80}}], rules: {rules}}}\n"
    )
}

#[test]
fn http_routes_pick_the_backend_of_each_request() {
    let mut lab = Lab::new("l7_routes").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let consumer = lab.add_pod(&a, "a2").expect("pod");
    let v1 = lab.add_pod(&a, "a3").expect("pod");
    let v2 = lab.add_pod(&b, "b1").expect("pod");
    let dev_web = lab.add_pod(&b, "b2").expect("pod");
    let upgrader = lab.add_pod(&b, "b3").expect("pod");
    let _servers = [
        upgrader
            .serve(py::UPGRADE_SERVER, &["8080"], 8080)
            .expect("server"),
        dev_web
            .serve(py::NAME_SERVER, &["web-dev", "8080"], 8080)
            .expect("server"),
        v1.serve(py::NAME_SERVER, &["web-v1", "8080"], 8080)
            .expect("server"),
        v2.serve(py::NAME_SERVER, &["web-v2", "8080"], 8080)
            .expect("server"),
    ];
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::namespace("dev", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&consumer, "dev", &[], &[], ""),
            mesh::pod(&v1, "shop", &[("app", "web"), ("version", "v1")], &[], ""),
            mesh::pod(&v2, "shop", &[("app", "web"), ("version", "v2")], &[], ""),
            mesh::pod(&dev_web, "dev", &[("app", "web-dev")], &[], ""),
            mesh::pod(&upgrader, "shop", &[("app", "echo")], &[], ""),
            // A policy puts HTTP/1.1 calls to it on the L7 path.
            mesh::service("shop", "echo", "10.96.0.14", 80, "8080", &[("app", "echo")]),
            mesh::traffic_policy("shop", "echo", "loadBalancer: {type: Random}"),
            mesh::service("dev", "web-dev", "10.96.0.13", 80, "8080", &[("app", "web-dev")]),
            mesh::service("shop", "web", VIP, 80, "8080", &[("app", "web")]),
            mesh::service("shop", "web-v1", "10.96.0.11", 80, "8080", &[("version", "v1")]),
            mesh::service("shop", "web-v2", "10.96.0.12", 80, "8080", &[("version", "v2")]),
            // The producer route: every client of web.
            http_route(
                "shop",
                "web",
                "[{matches: [{headers: [{name: x-version, value: v2}]}], \
                   filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-routed, value: by-header}]}}], \
                   backendRefs: [{name: web-v2, port: 80}]}, \
                  {matches: [{path: {type: PathPrefix, value: /canary}}], \
                   backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]}, \
                  {matches: [{path: {type: Exact, value: /only-v1}}], backendRefs: [{name: web-v1, port: 80}]}]",
            ),
            // A consumer route: clients in dev only, sent to dev's own copy.
            http_route("dev", "web-for-dev", "[{backendRefs: [{name: web-dev, port: 80}]}]"),
        ],
    )
    .expect("mesh");
    let url = |path: &str| format!("http://{VIP}{path}");

    // By header, with the response header filter.
    let out = curl(&client, &["-i", "-H", "x-version: v2", &url("/")]);
    assert!(out.ends_with("web-v2"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("x-routed: by-header"),
        "{out}"
    );
    // By exact path.
    assert_eq!(curl(&client, &[&url("/only-v1")]), "web-v1");
    // No rule matches: the agent answers.
    let out = curl(&client, &["-i", &url("/elsewhere")]);
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains("x-trellis-reason: no-route"), "{out}");

    // 90/10 over 2,000 requests on one keep-alive connection. v2's count is
    // Binomial(2000, 0.1): mean 200, sd 13.4; the bound is 5 sd either side
    // (a false failure once in ~1.7 million runs).
    let answers = |status: &serde_json::Value| {
        ["answers_while_polling", "answers_after_sleeping"]
            .map(|k| status["http"][k].as_u64().expect("counter"))
    };
    let before = answers(&cluster.agents[0].cli_json("status").expect("status"));
    let urls: Vec<String> = (0..2000).map(|_| url("/canary")).collect();
    let mut args = vec!["-w", "\\n"];
    args.extend(urls.iter().map(String::as_str));
    let out = curl(&client, &args);
    let v2_count = out.lines().filter(|l| *l == "web-v2").count();
    let v1_count = out.lines().filter(|l| *l == "web-v1").count();
    assert_eq!(
        v1_count + v2_count,
        2000,
        "every request answered: {v1_count} + {v2_count}"
    );
    assert!((133..=267).contains(&v2_count), "v2 got {v2_count} of 2000");
    // v1's answers came from this node: each was waited for by the busy
    // poller (in its window or after it); v2's, from the other node, not.
    let after = answers(&cluster.agents[0].cli_json("status").expect("status"));
    assert_eq!(
        (after[0] - before[0]) + (after[1] - before[1]),
        v1_count as u64,
        "{before:?} -> {after:?}"
    );

    // The consumer route replaces the producer route for dev's clients: no
    // 404 for them, and everything to web-dev (across nodes, through HBONE).
    assert_eq!(curl(&consumer, &[&url("/elsewhere")]), "web-dev");

    // An upgrade (as WebSocket's) on the L7 path, across nodes: 101, then
    // raw bytes both ways.
    let out = client
        .exec()
        .python_output(
            py::UPGRADE_CLIENT,
            &["10.96.0.14", "80"],
            Duration::from_secs(30),
        )
        .expect("upgrade client");
    assert_eq!(out, "HTTP/1.1 101 Switching Protocols\nechoed 50", "{out}");

    // Bad clients get their documented answers (400 for a malformed
    // request after a good one on a keep-alive connection, the connection
    // closed after 10 s of a slowloris), and the agent keeps serving.
    let out = client
        .exec()
        .python_output(py::BAD_HTTP_CLIENT, &[VIP, "80"], Duration::from_secs(60))
        .expect("bad client");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "malformed 200 400", "{out}");
    // Over 64 KiB of headers: 431, and the connection serves the next one.
    assert_eq!(lines[1], "oversized 431 200", "{out}");
    assert!(lines[2].starts_with("slowloris closed after"), "{out}");
    // Two Host headers: 400 (RFC 9112 3.2), and the connection carries on.
    assert_eq!(lines[3], "hosts 400 200", "{out}");
    // Content-Length and chunked: the chunks frame the body (RFC 9112
    // 6.3), so the request hidden behind is never served, and the
    // connection is closed after the answer.
    assert_eq!(lines[4], "smuggled 200 closed", "{out}");
    // HTTP/2 broken at the framing level: GOAWAY PROTOCOL_ERROR.
    let out = client
        .exec()
        .python_output(py::BAD_H2_CLIENT, &[VIP, "80"], Duration::from_secs(30))
        .expect("bad h2 client");
    assert_eq!(out.trim(), "goaway 1", "{out}");
    assert_eq!(curl(&client, &[&url("/only-v1")]), "web-v1");

    // The routes were accepted, and the agent counted its own answers.
    let status = cluster.agents[0].cli_json("status").expect("status");
    assert!(status["http"]["no_route"].as_u64() >= Some(1), "{status}");
    assert_eq!(status["http"]["header_too_large"], 1, "{status}");
    assert_eq!(status["http"]["bad_request"], 1, "{status}");
    let routes = &status["routes"];
    assert!(
        routes.as_array().is_some_and(|r| r.len() == 2
            && r.iter().all(|r| r["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["status"] == true))),
        "{routes}"
    );
}

/// A backend that resets: before answering, the client gets 502
/// `upstream-reset`; in the middle of a body, the client's connection is
/// cut short, since its head has gone out. A pooled connection the backend
/// closes under a request: an idempotent request without a body goes again
/// on a new connection, others get 502.
/// Nothing else is disturbed and the agent keeps serving.
#[test]
fn backend_resets_are_reported_and_contained() {
    const VIP: &str = "10.96.0.50";
    let mut lab = Lab::new("l7_resets").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let _server = server
        .serve(py::RESET_SERVER, &["8080"], 8080)
        .expect("server");
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[("app", "flaky")], &[], ""),
            mesh::service("shop", "flaky", VIP, 80, "8080", &[("app", "flaky")]),
            mesh::traffic_policy("shop", "flaky", "retry: {attempts: 0}"),
        ],
    )
    .expect("mesh");
    let run = |args: &[&str]| {
        let mut all = vec![
            "-s",
            "-m",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{exitcode}",
        ];
        all.extend_from_slice(args);
        let out = client
            .exec()
            .output("curl", &all, Duration::from_secs(30))
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let url = |p: &str| format!("http://{VIP}{p}");
    assert_eq!(run(&[&url("/ok")]), "200 0");
    assert_eq!(run(&[&url("/reset-before")]), "502 0");
    assert_eq!(
        curl(&client, &["-i", &url("/reset-before")])
            .lines()
            .find(|l| l.starts_with("x-trellis-reason"))
            .map(str::trim),
        Some("x-trellis-reason: upstream-reset")
    );
    for _ in 0..3 {
        let out = run(&[&url("/reset-mid")]);
        let (code, exit) = out.split_once(' ').unwrap_or_default();
        assert_eq!(code, "200", "the head went out: {out}");
        // 18: transfer closed with bytes remaining; 56: connection reset.
        assert!(["18", "56"].contains(&exit), "cut short: {out}");
        assert_eq!(run(&[&url("/ok")]), "200 0", "the agent keeps serving");
    }
    // Each /keep after the first takes the pooled connection, which the
    // backend closes on reading it: sent again on a new one, every time.
    let keeps: Vec<String> = (0..6).map(|_| url("/keep")).collect();
    let mut args: Vec<&str> = vec!["-w", " %{http_code}"];
    args.extend(keeps.iter().map(String::as_str));
    let out = curl(&client, &args);
    assert_eq!(out, "kept 200".repeat(6), "{out}");
    let before = cluster.agents[0].cli_json("status").expect("status")["http"]["upstream_reset"]
        .as_u64()
        .expect("counter");
    // A POST with a body is not sent twice: 502.
    assert_eq!(run(&["-d", "x", &url("/keep")]), "502 0");
    assert_eq!(run(&[&url("/ok")]), "200 0");
    let status = cluster.agents[0].cli_json("status").expect("status");
    assert_eq!(status["http"]["stale_retries"], 5, "{status}");
    assert_eq!(
        status["http"]["upstream_reset"].as_u64(),
        Some(before + 1),
        "{status}"
    );
    assert!(before >= 2, "{status}");
}

/// `RequestRedirect`, `URLRewrite`, `RequestMirror`, `CORS`,
/// `ExternalAuth` (HTTP and gRPC) and a backend reference's header filters
/// on real requests, a `GRPCRoute` routing by method (gRPC-Web too) and winning its port over an `HTTPRoute`
/// (which `trellis config` shows `Accepted=False (Conflicted)`).
#[test]
fn redirect_rewrite_mirror_and_grpc_routes() {
    const WEB: &str = "10.96.0.40";
    const GRPC: &str = "10.96.0.41";
    let mut lab = Lab::new("l7_filters").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let main = lab.add_pod(&a, "a2").expect("pod");
    let shadow = lab.add_pod(&b, "b1").expect("pod");
    let grpc_a = lab.add_pod(&a, "a3").expect("pod");
    let grpc_b = lab.add_pod(&b, "b2").expect("pod");
    let _servers = [
        main.serve(py::REQUEST_ECHO_SERVER, &["main", "8080"], 8080)
            .expect("server"),
        shadow
            .serve(py::REQUEST_ECHO_SERVER, &["shadow", "8080"], 8080)
            .expect("server"),
        shadow
            .serve(py::AUTHZ_SERVER, &["9000"], 9000)
            .expect("server"),
        shadow
            .serve(
                py::GRPC_AUTHZ_SERVER,
                &[py::ENVOY_PROTOS, "9001", "9002"],
                9001,
            )
            .expect("server"),
        grpc_a
            .serve(py::GRPC_SERVER, &["grpc-a", "50051"], 50051)
            .expect("server"),
        grpc_b
            .serve(py::GRPC_SERVER, &["grpc-b", "50051"], 50051)
            .expect("server"),
    ];
    let route = |kind: &str, name: &str, parent: &str, port: u16, rules: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\n\
             metadata: {{name: {name}, namespace: shop}}\n\
             spec: {{parentRefs: [{{group: '', kind: Service, name: {parent}, port: {port}}}], rules: {rules}}}\n"
        )
    };
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&main, "shop", &[("app", "main")], &[], ""),
            mesh::pod(&shadow, "shop", &[("app", "shadow")], &[], ""),
            mesh::pod(&grpc_a, "shop", &[("app", "grpc"), ("v", "a")], &[], ""),
            mesh::pod(&grpc_b, "shop", &[("app", "grpc"), ("v", "b")], &[], ""),
            mesh::service("shop", "web", WEB, 80, "8080", &[("app", "main")]),
            mesh::service("shop", "main", "10.96.0.42", 80, "8080", &[("app", "main")]),
            mesh::service("shop", "shadow", "10.96.0.43", 80, "8080", &[("app", "shadow")]),
            mesh::service_with_protocol("shop", "grpc", GRPC, 50051, "50051", "grpc", &[("app", "grpc")]),
            mesh::service("shop", "grpc-a", "10.96.0.44", 50051, "50051", &[("app", "grpc"), ("v", "a")]),
            mesh::service("shop", "grpc-b", "10.96.0.45", 50051, "50051", &[("app", "grpc"), ("v", "b")]),
            route(
                "HTTPRoute",
                "web",
                "web",
                80,
                "[{matches: [{path: {type: PathPrefix, value: /old}}], filters: [{type: RequestRedirect, \
                 requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]}, \
                 {matches: [{path: {type: PathPrefix, value: /api/v1}}], filters: [\
                 {type: URLRewrite, urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: ''}}}, \
                 {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}], \
                 backendRefs: [{name: main, port: 80, filters: [{type: RequestHeaderModifier, \
                 requestHeaderModifier: {set: [{name: x-tag, value: to-main}]}}]}]}, \
                 {backendRefs: [{name: main, port: 80}]}]",
            ),
            route(
                "GRPCRoute",
                "grpc-by-method",
                "grpc",
                50051,
                "[{matches: [{method: {service: trellis.test.Echo, method: Say}}], backendRefs: [{name: grpc-b, port: 50051}]}, \
                 {backendRefs: [{name: grpc-a, port: 50051}]}]",
            ),
            // A TrafficPolicy on a route: only what that route sends.
            mesh::service("shop", "paid", "10.96.0.46", 80, "8080", &[("app", "main")]),
            route("HTTPRoute", "paid", "paid", 80, "[{backendRefs: [{name: main, port: 80}]}]"),
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: paid-route, namespace: shop}\n\
             spec: {targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: paid}], \
             fault: {abort: {httpStatus: 402, percent: 100}}}\n"
                .to_owned(),
            // Half its weight names a Service that does not exist.
            mesh::service("shop", "split", "10.96.0.47", 80, "8080", &[("app", "main")]),
            route(
                "HTTPRoute",
                "split",
                "split",
                80,
                "[{backendRefs: [{name: main, port: 80}, {name: gone, port: 80}]}]",
            ),
            // A backend reference's own header filters; one it cannot
            // honour keeps its route from being accepted.
            mesh::service("shop", "tagged", "10.96.0.48", 80, "8080", &[("app", "main")]),
            route(
                "HTTPRoute",
                "tagged",
                "tagged",
                80,
                "[{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-tag, value: by-rule}]}}], \
                 backendRefs: [{name: main, port: 80, filters: [\
                 {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-tag, value: by-backend}]}}, \
                 {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-backend, value: main}]}}]}]}]",
            ),
            mesh::service("shop", "odd", "10.96.0.49", 80, "8080", &[("app", "main")]),
            route(
                "HTTPRoute",
                "odd",
                "odd",
                80,
                "[{matches: [{path: {type: Exact, value: /only}}], backendRefs: [{name: main, port: 80, filters: [\
                 {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /x}}}]}]}]",
            ),
            // CORS (GEP-1767): preflights answered by the agent, answers to
            // allowed origins marked; a redirect rule behind it.
            mesh::service("shop", "cors", "10.96.0.50", 80, "8080", &[("app", "main")]),
            route(
                "HTTPRoute",
                "cors",
                "cors",
                80,
                "[{matches: [{path: {type: PathPrefix, value: /moved}}], filters: [\
                 {type: CORS, cors: {allowOrigins: ['*']}}, \
                 {type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /}}}]}, \
                 {filters: [{type: CORS, cors: {allowOrigins: ['https://shop.example', 'http://*.example.org:8080'], \
                 allowMethods: [GET, PUT], allowHeaders: [x-token], exposeHeaders: [x-echo], \
                 allowCredentials: true, maxAge: 600}}], backendRefs: [{name: main, port: 80}]}]",
            ),
            // External authorization (GEP-1494, HTTP): the service is on
            // the other node; one route names a service that is not there.
            mesh::service("shop", "auth", "10.96.0.51", 80, "9000", &[("app", "shadow")]),
            mesh::service("shop", "guarded", "10.96.0.52", 80, "8080", &[("app", "main")]),
            mesh::service("shop", "closed", "10.96.0.53", 80, "8080", &[("app", "main")]),
            route(
                "HTTPRoute",
                "guarded",
                "guarded",
                80,
                "[{filters: [{type: CORS, cors: {allowOrigins: ['https://shop.example']}}, \
                 {type: ExternalAuth, externalAuth: {protocol: HTTP, backendRef: {name: auth, port: 80}, \
                 http: {path: /check, allowedHeaders: [x-client], allowedResponseHeaders: [x-tag, x-auth-user]}, \
                 forwardBody: {maxSize: 8}}}], \
                 backendRefs: [{name: main, port: 80}]}]",
            ),
            route(
                "HTTPRoute",
                "closed",
                "closed",
                80,
                "[{filters: [{type: ExternalAuth, externalAuth: {protocol: HTTP, backendRef: {name: nowhere, port: 80}, http: {}}}], \
                 backendRefs: [{name: main, port: 80}]}]",
            ),
            // External authorization over Envoy's gRPC check protocol,
            // the service on the other node.
            mesh::service_with_protocol("shop", "grpc-auth", "10.96.0.54", 9001, "9001", "grpc", &[("app", "shadow")]),
            mesh::service("shop", "guarded-grpc", "10.96.0.55", 80, "8080", &[("app", "main")]),
            route(
                "HTTPRoute",
                "guarded-grpc",
                "guarded-grpc",
                80,
                "[{filters: [{type: ExternalAuth, externalAuth: {protocol: GRPC, backendRef: {name: grpc-auth, port: 9001}, \
                 grpc: {allowedHeaders: [authorization, x-client]}, forwardBody: {maxSize: 8}}}], \
                 backendRefs: [{name: main, port: 80}]}]",
            ),
            // A server that speaks gRPC-Web itself, over HTTP/1.1.
            mesh::service_with_protocol("shop", "web-native", "10.96.0.56", 80, "8080", "grpc-web", &[("app", "main")]),
            route("HTTPRoute", "web-native", "web-native", 80, "[{backendRefs: [{name: main, port: 80}]}]"),
            // Loses the port to the GRPCRoute.
            route(
                "HTTPRoute",
                "grpc-http",
                "grpc",
                50051,
                "[{backendRefs: [{name: grpc-b, port: 50051}]}]",
            ),
        ],
    )
    .expect("mesh");

    // Redirect: the agent answers, the path's prefix replaced, the query kept.
    let out = curl(&client, &["-i", &format!("http://{WEB}/old/page?x=1")]);
    assert!(out.starts_with("HTTP/1.1 301"), "{out}");
    assert!(
        out.to_lowercase()
            .contains(&format!("location: http://{WEB}/new/page?x=1")),
        "{out}"
    );

    // Rewrite: the pod gets the new path (the empty prefix strips the
    // matched one) and host; the mirror a copy, body included, with the
    // host marked `-shadow`; nothing else is mirrored.
    let out = curl(&client, &[&format!("http://{WEB}/api/v1/users?id=7")]);
    let got: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(got["name"], "main", "{got}");
    assert_eq!(got["path"], "/users?id=7", "{got}");
    assert_eq!(got["host"], "api.internal", "{got}");
    assert_eq!(got["tag"], "to-main", "the backend's own filter: {got}");
    let out = curl(
        &client,
        &["-d", "hello mirror", &format!("http://{WEB}/api/v1/items")],
    );
    let got: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(
        (got["path"].as_str(), got["body"].as_u64()),
        (Some("/items"), Some(12)),
        "{got}"
    );
    let out = curl(&client, &[&format!("http://{WEB}/plain")]);
    assert!(out.contains("\"path\": \"/plain\""), "{out}");
    // The pod's hop-by-hop headers end at the agent (RFC 9110 7.6.1): its
    // `Connection: close` closes its pooled connection, not the client's,
    // which the next request reuses.
    let out = curl(
        &client,
        &[
            "-D",
            "-",
            "-w",
            "connects=%{num_connects}\\n",
            "-o",
            "/dev/null",
            &format!("http://{WEB}/hop"),
            "-o",
            "/dev/null",
            &format!("http://{WEB}/plain"),
        ],
    )
    .to_ascii_lowercase();
    let (hop, after) = out.split_once("connects=1").expect(&out);
    assert!(hop.starts_with("http/1.1 200"), "{out}");
    for header in ["connection:", "keep-alive:", "x-hop:"] {
        assert!(!hop.contains(header), "{header} passed: {out}");
    }
    assert!(after.trim_end().ends_with("connects=0"), "{out}");
    let mut log = serde_json::Value::Null;
    for _ in 0..50 {
        let out = curl(&client, &["http://10.96.0.43/__log"]);
        log = serde_json::from_str(&out).expect(&out);
        if log.as_array().is_some_and(|l| l.len() >= 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = log.as_array().cloned().unwrap_or_default();
    // The main backend's filter stays off the copies.
    assert!(log.iter().all(|r| r["tag"].is_null()), "{log:?}");
    // Copies go on their own: in any order.
    let mut seen: Vec<(String, String, u64)> = log
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap_or("").to_owned(),
                r["host"].as_str().unwrap_or("").to_owned(),
                r["body"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("/items".to_owned(), "api.internal-shadow".to_owned(), 12),
            (
                "/users?id=7".to_owned(),
                "api.internal-shadow".to_owned(),
                0
            ),
        ],
        "the mirror saw exactly the rewritten requests"
    );

    // The backend's filters apply after the rule's, to its requests.
    let out = curl(&client, &["-i", "http://10.96.0.48/t"]);
    assert!(
        out.to_ascii_lowercase().contains("x-backend: main"),
        "{out}"
    );
    let body = out.rsplit("\r\n\r\n").next().unwrap_or_default();
    let got: serde_json::Value = serde_json::from_str(body).expect(&out);
    assert_eq!(got["tag"], "by-backend", "{got}");
    // The pod gets the request id the agent gave the request.
    assert!(got["rid"].as_str().is_some_and(|r| r.len() == 36), "{got}");
    // The route with a filter it cannot honour on a backend is not
    // applied (a path its rule does not match still gets an answer).
    let out = curl(&client, &["http://10.96.0.49/other"]);
    let got: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(got["path"], "/other", "{got}");

    // CORS: a preflight from an allowed origin is answered by the agent
    // (204, no body from the pod) with the rule's lists; one from another
    // origin gets no CORS headers, so the browser stops there.
    let headers = |args: &[&str]| -> (String, String) {
        let mut all = vec!["-i"];
        all.extend_from_slice(args);
        let out = curl(&client, &all);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (head.to_ascii_lowercase(), body.to_owned())
    };
    let preflight = |origin: &str| {
        headers(&[
            "-X",
            "OPTIONS",
            "-H",
            &format!("origin: {origin}"),
            "-H",
            "access-control-request-method: PUT",
            "-H",
            "access-control-request-headers: x-token",
            "http://10.96.0.50/items",
        ])
    };
    let (head, body) = preflight("https://shop.example");
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert_eq!(body, "", "answered by the agent");
    for line in [
        "access-control-allow-origin: https://shop.example",
        "access-control-allow-credentials: true",
        "access-control-allow-methods: get, put",
        "access-control-allow-headers: x-token",
        "access-control-max-age: 600",
        "vary: origin",
    ] {
        assert!(head.contains(line), "{line}: {head}");
    }
    let (head, _) = preflight("https://evil.example");
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert!(!head.contains("access-control-"), "{head}");
    // The request itself goes to the pod; an allowed origin's answer is
    // marked, another's and one without an origin are not.
    let (head, body) = headers(&[
        "-H",
        "origin: http://a.b.example.org:8080",
        "http://10.96.0.50/items",
    ]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.contains("\"name\": \"main\""), "{body}");
    for line in [
        "access-control-allow-origin: http://a.b.example.org:8080",
        "access-control-allow-credentials: true",
        "access-control-expose-headers: x-echo",
    ] {
        assert!(head.contains(line), "{line}: {head}");
    }
    for origin in ["origin: http://example.org:8080", "x-none: 1"] {
        let (head, _) = headers(&["-H", origin, "http://10.96.0.50/items"]);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("access-control-"), "{origin}: {head}");
    }
    // A preflight is answered before a redirect; the request is redirected.
    let (head, _) = headers(&[
        "-X",
        "OPTIONS",
        "-H",
        "origin: https://any.example",
        "-H",
        "access-control-request-method: GET",
        "http://10.96.0.50/moved",
    ]);
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    let (head, _) = headers(&[
        "-H",
        "origin: https://any.example",
        "http://10.96.0.50/moved",
    ]);
    assert!(head.starts_with("http/1.1 302"), "{head}");

    // External authorization: no credentials get the service's 401 with its
    // challenge and body; another user its 403; alice goes through with the
    // service's headers in place of her own forged one, and the check
    // carried the method, the prefixed path and only the headers it may.
    let guarded = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("http://10.96.0.52/items?x=1");
        headers(&all)
    };
    let (head, body) = guarded(&[
        "-H",
        "cookie: secret=1",
        "-H",
        "origin: https://shop.example",
    ]);
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert!(head.contains("x-trellis-reason: ext-auth-denied"), "{head}");
    // The rule's CORS headers go on the refusal too, so the page can read
    // it (and send its user to log in).
    assert!(
        head.contains("access-control-allow-origin: https://shop.example"),
        "{head}"
    );
    assert_eq!(body, "who are you");
    // A browser's preflight carries no credentials: it is answered before
    // the check.
    let (head, _) = guarded(&[
        "-X",
        "OPTIONS",
        "-H",
        "origin: https://shop.example",
        "-H",
        "access-control-request-method: GET",
    ]);
    assert!(head.starts_with("http/1.1 204"), "{head}");
    let (head, body) = guarded(&["-H", "authorization: Bearer mallory"]);
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert_eq!(body, "not you");
    let (head, body) = guarded(&[
        "-H",
        "authorization: Bearer alice",
        "-H",
        "x-tag: forged",
        "-H",
        "x-client: c1",
        "-H",
        "cookie: secret=1",
    ]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let got: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(got["name"], "main", "{got}");
    assert_eq!(got["tag"], "authz-alice", "the service's header: {got}");
    let last = curl(&client, &[&format!("http://{}:9000/__last", shadow.ip)]);
    let last: serde_json::Value = serde_json::from_str(&last).expect(&last);
    assert_eq!(last["method"], "GET", "{last}");
    assert_eq!(last["path"], "/check/items?x=1", "{last}");
    let names: Vec<&str> = last["headers"]
        .as_array()
        .map(|h| h.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    for name in ["host", "authorization", "x-client"] {
        assert!(names.contains(&name), "{name}: {last}");
    }
    for name in ["cookie", "x-tag"] {
        assert!(!names.contains(&name), "{name} went to the check: {last}");
    }
    // forwardBody: the check gets the body's first 8 bytes, the pod all of
    // it.
    let (head, body) = guarded(&[
        "-H",
        "authorization: Bearer alice",
        "--data-binary",
        "hello wide world",
    ]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let got: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(
        (got["method"].as_str(), got["body"].as_u64()),
        (Some("POST"), Some(16)),
        "{got}"
    );
    let last = curl(&client, &[&format!("http://{}:9000/__last", shadow.ip)]);
    let last: serde_json::Value = serde_json::from_str(&last).expect(&last);
    assert_eq!(
        (last["method"].as_str(), last["body"].as_str()),
        (Some("POST"), Some("hello wi")),
        "{last}"
    );
    // A route whose authorization service does not resolve fails closed.
    let (head, _) = headers(&["-H", "authorization: Bearer alice", "http://10.96.0.53/x"]);
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("x-trellis-reason: ext-auth-error"), "{head}");

    // External authorization over gRPC: the service's denials come back
    // as it wrote them; alice goes through with the request changed as it
    // said (a header set, the query's token off and her user on) and its
    // header on the answer; bob with his forged header taken off; a failed
    // check is refused, fail closed. The CheckRequest, read by Envoy's own
    // generated messages, carried the request's attributes.
    let guarded = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("http://10.96.0.55/items?token=t&x=1");
        headers(&all)
    };
    let (head, body) = guarded(&[]);
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert!(head.contains("x-trellis-reason: ext-auth-denied"), "{head}");
    assert_eq!(body, "who are you");
    let (head, body) = guarded(&["-H", "authorization: Bearer mallory"]);
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("x-denied-by: grpc-authz"), "{head}");
    assert_eq!(body, "not you");
    let (head, body) = guarded(&[
        "-H",
        "authorization: Bearer alice",
        "-H",
        "x-tag: forged",
        "-H",
        "x-client: c1",
        "-H",
        "cookie: secret=1",
    ]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("x-authz: grpc"), "{head}");
    let got: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(
        (
            got["name"].as_str(),
            got["tag"].as_str(),
            got["path"].as_str()
        ),
        (
            Some("main"),
            Some("authz-alice"),
            Some("/items?x=1&user=alice")
        ),
        "{got}"
    );
    let last = curl(&client, &[&format!("http://{}:9002/", shadow.ip)]);
    let last: serde_json::Value = serde_json::from_str(&last).expect(&last);
    assert_eq!(last["method"], "GET", "{last}");
    assert_eq!(last["path"], "/items?token=t&x=1", "{last}");
    assert_eq!(last["host"], "10.96.0.55", "{last}");
    assert_eq!(last["protocol"], "HTTP/1.1", "{last}");
    assert_eq!(last["source"], client.ip.to_string(), "{last}");
    assert_eq!(last["destination"], "shop/guarded-grpc", "{last}");
    assert!(
        last["principal"]
            .as_str()
            .is_some_and(|p| p.starts_with("spiffe://cluster.local/ns/shop/sa/")),
        "{last}"
    );
    assert!(
        last["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{last}"
    );
    let mut names: Vec<&str> = last["headers"]
        .as_object()
        .map(|h| h.keys().map(String::as_str).collect())
        .unwrap_or_default();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            ":authority",
            ":method",
            ":path",
            ":scheme",
            "authorization",
            "x-client"
        ],
        "only the allowed headers: {last}"
    );
    let (head, body) = guarded(&["-H", "authorization: Bearer bob", "-H", "x-tag: forged"]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let got: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert!(got["tag"].is_null(), "taken off: {got}");
    let (head, body) = guarded(&[
        "-H",
        "authorization: Bearer alice",
        "--data-binary",
        "hello wide world",
    ]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let got: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(got["body"].as_u64(), Some(16), "{got}");
    let last = curl(&client, &[&format!("http://{}:9002/", shadow.ip)]);
    let last: serde_json::Value = serde_json::from_str(&last).expect(&last);
    assert_eq!(
        (
            last["method"].as_str(),
            last["body"].as_str(),
            last["size"].as_i64()
        ),
        (Some("POST"), Some("hello wi"), Some(16)),
        "{last}"
    );
    let (head, _) = guarded(&["-H", "authorization: Bearer crash"]);
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("x-trellis-reason: ext-auth-error"), "{head}");

    // The route's policy applies to its requests, not to its backend's
    // other callers.
    let code = |url: &str| curl(&client, &["-o", "/dev/null", "-w", "%{http_code}", url]);
    assert_eq!(code("http://10.96.0.46/x"), "402");
    assert_eq!(code("http://10.96.0.42/x"), "200");
    assert_eq!(code(&format!("http://{WEB}/x")), "200");

    // An invalid backend keeps its share of the requests, which get 500
    // (the Gateway API's words); the valid one serves the rest. Over 400
    // requests the 500s are Binomial(400, 0.5): sd 10, bound 5 sd.
    let mut args = vec!["-w", "%{http_code}\\n"];
    for _ in 0..400 {
        args.extend(["-o", "/dev/null", "http://10.96.0.47/x"]);
    }
    let out = curl(&client, &args);
    let failed = out.lines().filter(|l| *l == "500").count();
    let served = out.lines().filter(|l| *l == "200").count();
    assert_eq!(failed + served, 400, "{out}");
    assert!((150..=250).contains(&failed), "{failed} of 400 got 500");

    // GRPCRoute: Say goes to b, the rest to a (several times each, over one
    // channel per run), whatever the HTTPRoute on the same port says.
    for _ in 0..3 {
        let out = client
            .exec()
            .python_output(
                py::GRPC_WHO,
                &[&format!("{GRPC}:50051")],
                Duration::from_secs(60),
            )
            .expect("grpc");
        let out: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert_eq!(out["Say"], serde_json::json!(["OK", "grpc-b"]), "{out}");
        assert_eq!(out["Count"], serde_json::json!(["OK", "grpc-a"]), "{out}");
    }

    // gRPC-Web, as a browser sends it (HTTP/1.1; curl here): the call goes
    // on as gRPC, routed by the GRPCRoute (Say to b); the answer's trailers
    // come back as a last message flagged 0x80; the text form in base64.
    let message = |flag: u8, m: &[u8]| -> Vec<u8> {
        let mut f = vec![flag];
        f.extend_from_slice(&(m.len() as u32).to_be_bytes());
        f.extend_from_slice(m);
        f
    };
    let request_file = std::env::temp_dir().join(format!("{}-grpc-web", lab.name()));
    std::fs::write(&request_file, message(0, b"hello")).expect("request file");
    let grpc_web = |content_type: &str, data: &str| -> (String, Vec<u8>) {
        let out = client
            .exec()
            .output(
                "curl",
                &[
                    "-s",
                    "-m",
                    "20",
                    "-i",
                    "--http1.1",
                    "-H",
                    &format!("content-type: {content_type}"),
                    "-H",
                    "x-grpc-web: 1",
                    "--data-binary",
                    data,
                    &format!("http://{GRPC}:50051/trellis.test.Echo/Say"),
                ],
                Duration::from_secs(60),
            )
            .expect("curl");
        let at = out
            .stdout
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head");
        let head = String::from_utf8_lossy(&out.stdout[..at]).to_ascii_lowercase();
        (head, out.stdout[at + 4..].to_vec())
    };
    let (head, body) = grpc_web(
        "application/grpc-web+proto",
        &format!("@{}", request_file.display()),
    );
    std::fs::remove_file(&request_file).ok();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: application/grpc-web+proto"),
        "{head}"
    );
    let answer = message(0, b"grpc-b hello");
    assert_eq!(&body[..answer.len()], &answer[..], "{body:?}");
    let trailers = &body[answer.len()..];
    assert_eq!(trailers[0], 0x80, "{body:?}");
    let block = String::from_utf8_lossy(&trailers[5..]);
    assert_eq!(
        u32::from_be_bytes(trailers[1..5].try_into().unwrap()) as usize,
        block.len()
    );
    for line in ["grpc-status:0\r\n", "x-served-by:grpc-b\r\n"] {
        assert!(block.contains(line), "{line}: {block}");
    }
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (head, body) = grpc_web("application/grpc-web-text", &b64.encode(message(0, b"hi")));
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: application/grpc-web-text"),
        "{head}"
    );
    let body = b64.decode(&body).expect("base64");
    let answer = message(0, b"grpc-b hi");
    assert_eq!(&body[..answer.len()], &answer[..], "{body:?}");
    assert_eq!(body[answer.len()], 0x80, "{body:?}");
    let block = String::from_utf8_lossy(&body[answer.len() + 5..]);
    assert!(block.contains("grpc-status:0\r\n"), "{block}");
    // A call that fails before any message is trailers-only: its status in
    // the headers, as gRPC-Web has it too.
    let (head, body) = grpc_web(
        "application/grpc-web-text",
        &b64.encode(message(0, b"fail:NOT_FOUND:no such thing")),
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("grpc-status: 5"), "{head}");
    assert!(head.contains("grpc-message: no such thing"), "{head}");
    assert!(body.is_empty(), "{body:?}");

    // A port whose appProtocol is grpc-web has a server that speaks it
    // itself: the request goes to it as it is, in HTTP/1.1.
    let (head, body) = headers(&[
        "-H",
        "content-type: application/grpc-web",
        "--data-binary",
        "abc",
        "http://10.96.0.56/s/M",
    ]);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let got: serde_json::Value = serde_json::from_str(&body).expect(&body);
    assert_eq!(
        (
            got["method"].as_str(),
            got["path"].as_str(),
            got["host"].as_str(),
            got["body"].as_u64()
        ),
        (Some("POST"), Some("/s/M"), Some("10.96.0.56"), Some(3)),
        "{got}"
    );

    // The log and `trellis config` report each route's conditions.
    let log = cluster.agents[0].log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("route status: not fully applied")
                && l.contains("HTTPRoute shop/grpc-http")
                && l.contains("Accepted=False (Conflicted)")),
        "{log}"
    );
    let text = cluster.agents[0].cli(&["config"]).expect("config");
    assert!(text.contains("HTTPRoute shop/grpc-http"), "{text}");
    assert!(
        text.contains("Accepted=False (Conflicted): a GRPCRoute takes shop/grpc:50051"),
        "{text}"
    );
    assert!(
        text.contains("GRPCRoute shop/grpc-by-method\n    Accepted=True"),
        "{text}"
    );
    assert!(
        text.contains(
            "Accepted=False (UnsupportedValue): filters not supported on a backendRef: URLRewrite"
        ),
        "{text}"
    );
    let doc = cluster.agents[0].cli_json("config").expect("config json");
    let web = doc["routes"]["status"]
        .as_array()
        .and_then(|s| s.iter().find(|r| r["name"] == "web"))
        .cloned()
        .unwrap_or_default();
    assert!(
        web["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["status"] == true)),
        "{web}"
    );
    let status = cluster.agents[0].cli_json("status").expect("status");
    assert_eq!(status["http"]["redirects"], 2, "{status}");
    assert_eq!(status["http"]["cors_preflights"], 4, "{status}");
    // Two denials and one failed check over each protocol.
    assert_eq!(status["http"]["ext_auth_denied"], 4, "{status}");
    assert_eq!(status["http"]["ext_auth_error"], 2, "{status}");
    // The upstream connections to a2 (on a1's node) went into the sockhash.
    assert!(
        status["http"]["accelerated_upstreams"].as_u64() >= Some(1),
        "{status}"
    );
    assert_eq!(status["http"]["mirrored"], 2, "{status}");
    assert_eq!(
        status["http"]["backend_not_found"].as_u64(),
        Some(failed as u64),
        "{status}"
    );
}

/// Pooled upstream connections that carry no request for the agent's
/// `--idle-timeout` are let go, HTTP/1.1 and HTTP/2 alike, and the
/// backends see them close; until then they are kept for the next request.
/// The backends are on the client's node, where the agent's own sweep is
/// all that ends them (across nodes the destination's tunnel relay has the
/// same timeout).
#[test]
fn idle_upstream_connections_are_let_go() {
    const H1: &str = "10.96.0.51";
    const H2: &str = "10.96.0.52";
    let mut lab = Lab::new("l7_idle").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let h1 = lab.add_pod(&a, "a2").expect("pod");
    let h2 = lab.add_pod(&a, "a3").expect("pod");
    let _servers = [
        h1.serve(py::STEERED_SERVER, &["a2", "8080"], 8080)
            .expect("server"),
        h2.serve(py::GOAWAY_SERVER, &["8080"], 8080)
            .expect("server"),
    ];
    let cluster = mesh::Cluster::start_with(
        lab.name(),
        &[&a],
        &[
            mesh::node(&a),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&h1, "shop", &[("app", "h1")], &[], ""),
            mesh::pod(&h2, "shop", &[("app", "h2")], &[], ""),
            mesh::service("shop", "h1", H1, 80, "8080", &[("app", "h1")]),
            // A policy puts HTTP/1.1 on the L7 path.
            mesh::traffic_policy("shop", "h1", "retry: {attempts: 1}"),
            mesh::service_with_protocol("shop", "h2", H2, 80, "8080", "http2", &[("app", "h2")]),
        ],
        mesh::Certs::SharedCa,
        &["--idle-timeout", "4s"],
    )
    .expect("mesh");
    // Connections to the backend's port open in its pod.
    let open = |pod: &Pod| {
        pod.exec()
            .run("ss", &["-Htn", "state", "established", "( sport = :8080 )"])
            .expect("ss")
            .lines()
            .count()
    };
    assert_eq!(curl(&client, &[&format!("http://{H1}/")]), "a2");
    assert!(
        curl(
            &client,
            &["--http2-prior-knowledge", &format!("http://{H2}/")]
        )
        .starts_with("conn")
    );
    let pools = |agent: &trellis_tests::Agent| {
        let status = agent.cli_json("status").expect("status");
        (
            status["http_pools"]["http1_idle"].as_u64(),
            status["http_pools"]["http2"].as_u64(),
            status["http"]["pool_idle_closed"].as_u64(),
        )
    };
    // Kept for the next request while the client has gone.
    assert_eq!(pools(&cluster.agents[0]), (Some(1), Some(1), Some(0)));
    assert_eq!((open(&h1), open(&h2)), (1, 1), "pooled upstreams");

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pools(&cluster.agents[0]) != (Some(0), Some(0), Some(2)) || open(&h1) + open(&h2) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle connections let go: {:?}, open {} {}",
            pools(&cluster.agents[0]),
            open(&h1),
            open(&h2)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A new request opens a new connection.
    assert_eq!(curl(&client, &[&format!("http://{H1}/")]), "a2");
}

/// An HTTP/1.1 client's idle keep-alive connection on the L7 path stays
/// open past the 10 s the agent gives a request's headers (slowloris): the
/// agent closes a client connection only after `--idle-timeout` without a
/// request, as Envoy does, so it adds no keep-alive timeout of its own for
/// clients to race.
#[test]
fn an_idle_keep_alive_client_connection_stays_open() {
    let mut lab = Lab::new("l7_keepalive").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&a, "a2").expect("pod");
    let _server = server
        .serve(py::STEERED_SERVER, &["a2", "8080"], 8080)
        .expect("server");
    let _cluster = mesh::Cluster::start(
        lab.name(),
        &[&a],
        &[
            mesh::node(&a),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
            mesh::service("shop", "web", VIP, 80, "8080", &[("app", "web")]),
            // A policy puts HTTP/1.1 on the L7 path.
            mesh::traffic_policy("shop", "web", "retry: {attempts: 1}"),
        ],
    )
    .expect("mesh");
    let out = client
        .exec()
        .python_output(
            py::KEEPALIVE_CLIENT,
            &[VIP, "80", "12"],
            Duration::from_secs(60),
        )
        .expect("client");
    assert_eq!(out.trim(), "200 200");
}

/// A client's HTTP/2 connection on the L7 path that sends nothing for the
/// agent's `--idle-timeout` is shut gracefully (GOAWAY), as Envoy's idle
/// timeout does, while one in use is left alone.
#[test]
fn an_idle_http2_client_connection_is_shut_gracefully() {
    let mut lab = Lab::new("l7_h2_idle").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&a, "a2").expect("pod");
    let _server = server
        .serve(py::GOAWAY_SERVER, &["8080"], 8080)
        .expect("server");
    let _cluster = mesh::Cluster::start_with(
        lab.name(),
        &[&a],
        &[
            mesh::node(&a),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
            mesh::service_with_protocol("shop", "web", VIP, 80, "8080", "http2", &[("app", "web")]),
        ],
        mesh::Certs::SharedCa,
        &["--idle-timeout", "3s"],
    )
    .expect("mesh");
    let out = client
        .exec()
        .python_output(py::H2_IDLE_CLIENT, &[VIP, "80"], Duration::from_secs(60))
        .expect("client");
    assert_eq!(out.trim(), "200 200 goaway");
}
