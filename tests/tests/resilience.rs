//! `TrafficPolicy` with real clients and servers: retries (a backend that
//! fails the first attempts, a per-try timeout), the retry budget against a
//! storm (attempts counted at the server, with and without a budget), the
//! circuit breaker at its concurrency, outlier ejection and return, active
//! health checks taking a dead backend out before a request fails, the
//! local rate limit (429 with `retry-after`), fault injection at its
//! percentages, and session affinity by ring hash (header) and Maglev
//! (cookie set by the agent); and an `HTTPRoute` rule's own `retry`,
//! `timeouts` and `sessionPersistence` (GEP-1731, GEP-1742, GEP-1619).

use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;
use trellis_tests::{Lab, Pod, mesh, py};

/// GETs through the mesh from `client`: the JSON of [`py::HTTP_LOAD`].
fn load(client: &Pod, url: &str, threads: u32, each: u32, headers: &str, slow_ms: u32) -> Value {
    let out = client
        .exec()
        .python_output(
            py::HTTP_LOAD,
            &[
                url,
                &threads.to_string(),
                &each.to_string(),
                headers,
                &slow_ms.to_string(),
            ],
            Duration::from_secs(120),
        )
        .expect("load client");
    serde_json::from_str(&out).expect(&out)
}

fn count(v: &Value, table: &str, key: &str) -> u64 {
    v[table][key].as_u64().unwrap_or(0)
}

/// Requests server `pod` has served, asked directly.
fn served(client: &Pod, pod: &Pod) -> u64 {
    let url = format!("http://{}:8080/count", pod.ip);
    let out = client
        .exec()
        .run("curl", &["-s", "-m", "10", &url])
        .expect("count");
    out.trim().parse().expect(&out)
}

fn control(client: &Pod, pod: &Pod, what: &str) {
    let url = format!("http://{}:8080/control/{what}", pod.ip);
    client
        .exec()
        .run("curl", &["-s", "-m", "10", &url])
        .expect("control");
}

#[test]
fn traffic_policies_retry_limit_eject_and_balance() {
    let mut lab = Lab::new("resilience").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let s1 = lab.add_pod(&a, "a2").expect("pod");
    let s2 = lab.add_pod(&b, "b1").expect("pod");
    let s3 = lab.add_pod(&b, "b2").expect("pod");
    let _servers = [
        s1.serve(py::STEERED_SERVER, &["s1", "8080"], 8080)
            .expect("s1"),
        s2.serve(py::STEERED_SERVER, &["s2", "8080"], 8080)
            .expect("s2"),
    ];
    let mut s3_server = Some(
        s3.serve(py::STEERED_SERVER, &["s3", "8080"], 8080)
            .expect("s3"),
    );
    let svc = |name: &str, vip: &str, selector: &[(&str, &str)]| {
        mesh::service("shop", name, vip, 80, "8080", selector)
    };
    let one = [("role", "one")];
    let steer = [("app", "steer")];
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&s1, "shop", &[("app", "steer"), ("role", "one"), ("health", "yes")], &[], ""),
            mesh::pod(&s2, "shop", &[("app", "steer")], &[], ""),
            mesh::pod(&s3, "shop", &[("health", "yes")], &[], ""),
            svc("retry", "10.96.0.40", &one),
            svc("storm", "10.96.0.41", &one),
            svc("nobudget", "10.96.0.42", &one),
            svc("breaker", "10.96.0.43", &one),
            svc("outlier", "10.96.0.44", &steer),
            svc("health", "10.96.0.45", &[("health", "yes")]),
            svc("ratelimit", "10.96.0.46", &one),
            svc("fault", "10.96.0.47", &one),
            svc("hash", "10.96.0.48", &steer),
            svc("maglev", "10.96.0.49", &steer),
            svc("routed", "10.96.0.50", &one),
            // A rule's own retries (GEP-1731) and per-try timeout
            // (GEP-1742), winning over the Service's policy.
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: routed, namespace: shop}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: routed, port: 80}]\n  rules:\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /fail-first}}]\n\
             \x20   retry: {codes: [503], attempts: 2, backoff: 5ms}\n\
             \x20   backendRefs: [{name: routed, port: 80}]\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /fail-first/1}}]\n\
             \x20   retry: {codes: [500], attempts: 2}\n\
             \x20   backendRefs: [{name: routed, port: 80}]\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /slow-first}}]\n\
             \x20   timeouts: {request: 4s, backendRequest: 300ms}\n\
             \x20   retry: {attempts: 1, backoff: 5ms}\n\
             \x20   backendRefs: [{name: routed, port: 80}]\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /trickle}}]\n\
             \x20   timeouts: {request: 1s}\n\
             \x20   backendRefs: [{name: routed, port: 80}]\n\
             \x20 - matches: [{path: {type: PathPrefix, value: /slow}}]\n\
             \x20   timeouts: {request: 1s, backendRequest: 400ms}\n\
             \x20   retry: {attempts: 10, backoff: 5ms}\n\
             \x20   backendRefs: [{name: routed, port: 80}]\n"
                .to_owned(),
            mesh::traffic_policy("shop", "routed", "retry: {attempts: 4, retryOn: [5xx]}"),
            // Session persistence (GEP-1619) by cookie and by header.
            svc("sticky", "10.96.0.51", &steer),
            svc("sticky-header", "10.96.0.52", &steer),
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: sticky, namespace: shop}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: sticky, port: 80}]\n  rules:\n\
             \x20 - sessionPersistence: {sessionName: shop-session, absoluteTimeout: 1h}\n\
             \x20   backendRefs: [{name: sticky, port: 80}]\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: sticky-header, namespace: shop}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: sticky-header, port: 80}]\n  rules:\n\
             \x20 - sessionPersistence: {sessionName: X-Session, type: Header, idleTimeout: 1s}\n\
             \x20   backendRefs: [{name: sticky-header, port: 80}]\n"
                .to_owned(),
            mesh::traffic_policy(
                "shop",
                "retry",
                "retry: {attempts: 3, retryOn: [5xx], perTryTimeout: 300ms, backoff: {baseInterval: 5ms}}",
            ),
            mesh::traffic_policy(
                "shop",
                "storm",
                "retry: {attempts: 3, retryOn: [5xx], backoff: {baseInterval: 50ms, maxInterval: 50ms}, \
                 budget: {percent: 10, minRetryConcurrency: 1}}",
            ),
            mesh::traffic_policy(
                "shop",
                "nobudget",
                "retry: {attempts: 3, retryOn: [5xx], backoff: {baseInterval: 1ms}, \
                 budget: {percent: 100, minRetryConcurrency: 1000}}",
            ),
            mesh::traffic_policy("shop", "breaker", "circuitBreaker: {maxRequests: 5}"),
            mesh::traffic_policy(
                "shop",
                "outlier",
                "outlierDetection: {consecutive5xx: 3, baseEjectionTime: 2s, maxEjectionPercent: 50}",
            ),
            mesh::traffic_policy(
                "shop",
                "health",
                "healthCheck: {interval: 100ms, timeout: 100ms, unhealthyThreshold: 2, http: {path: /healthz}}",
            ),
            mesh::traffic_policy("shop", "ratelimit", "rateLimit: {requests: 5, per: 60s}"),
            mesh::traffic_policy(
                "shop",
                "fault",
                "fault: {abort: {httpStatus: 418, percent: 50}, delay: {fixedDelay: 150ms, percent: 20}}",
            ),
            mesh::traffic_policy(
                "shop",
                "hash",
                "loadBalancer: {type: RingHash, hash: {header: x-user}}",
            ),
            mesh::traffic_policy(
                "shop",
                "maglev",
                "loadBalancer: {type: Maglev, hash: {cookie: {name: session, ttl: 1h}}}",
            ),
        ],
    )
    .expect("mesh");

    // Retries: two 503s, then the third attempt answers.
    let out = load(&client, "http://10.96.0.40/fail-first/2/k1", 1, 1, "{}", 0);
    assert_eq!(count(&out, "body", "s1 attempt 3"), 1, "{out}");
    // Per-try timeout: the first attempt hangs for 5 s, the second answers.
    let out = load(
        &client,
        "http://10.96.0.40/slow-first/5000/k2",
        1,
        1,
        "{}",
        0,
    );
    assert_eq!(count(&out, "body", "s1 attempt 2"), 1, "{out}");

    // A route rule's retries: two 503s retried; three exhaust its 2
    // retries (3 attempts, not the policy's 5); a status it does not list
    // is answered as is, though the Service's policy would retry it.
    let out = load(&client, "http://10.96.0.50/fail-first/2/r1", 1, 1, "{}", 0);
    assert_eq!(count(&out, "body", "s1 attempt 3"), 1, "{out}");
    let before = served(&client, &s1);
    let out = load(&client, "http://10.96.0.50/fail-first/3/r2", 1, 1, "{}", 0);
    assert_eq!(count(&out, "body", "503 s1 attempt 3"), 1, "{out}");
    assert_eq!(served(&client, &s1) - before, 3, "1 + 2 attempts");
    let out = load(&client, "http://10.96.0.50/fail-first/1/r3", 1, 1, "{}", 0);
    assert_eq!(count(&out, "body", "503 s1 attempt 1"), 1, "{out}");
    // `backendRequest` limits each attempt, `request` all of them: the
    // first hangs for 5 s, the retry after 300 ms answers.
    let out = load(
        &client,
        "http://10.96.0.50/slow-first/5000/r4",
        1,
        1,
        "{}",
        0,
    );
    assert_eq!(count(&out, "body", "s1 attempt 2"), 1, "{out}");
    // Every attempt hangs: tries of 400 ms fit 3 times in the request's
    // 1 s, not 11, and the answer is the agent's 504.
    let before = served(&client, &s1);
    let out = load(&client, "http://10.96.0.50/slow/3000", 1, 1, "{}", 0);
    assert_eq!(count(&out, "reason", "timeout"), 1, "{out}");
    let tries = served(&client, &s1) - before;
    assert!((2..=3).contains(&tries), "{tries} attempts in 1 s");

    // `request` covers the whole answer (GEP-1742, as Envoy's route
    // timeout): a body still coming after 1 s is cut, not left to look
    // whole; one that ends in time is untouched.
    let out = load(&client, "http://10.96.0.50/trickle/3000", 1, 1, "{}", 0);
    assert_eq!(out["errors"], 1, "{out}");
    assert_eq!(out["status"], serde_json::json!({}), "{out}");
    let out = load(&client, "http://10.96.0.50/trickle/100", 1, 1, "{}", 0);
    assert_eq!(count(&out, "body", "s1-trickle"), 1, "{out}");

    // Every attempt fails: without a budget each of 100 requests makes 4
    // attempts; with 10 % of requests in flight (at least 1), far fewer.
    let before = served(&client, &s1);
    let out = load(&client, "http://10.96.0.42/status/503", 10, 10, "{}", 0);
    assert_eq!(count(&out, "status", "503"), 100, "{out}");
    let unbudgeted = served(&client, &s1) - before;
    assert_eq!(unbudgeted, 400, "1 + 3 attempts each without a budget");
    let before = served(&client, &s1);
    let out = load(&client, "http://10.96.0.41/status/503", 10, 10, "{}", 0);
    assert_eq!(count(&out, "status", "503"), 100, "{out}");
    let budgeted = served(&client, &s1) - before;
    eprintln!("retry storm: {budgeted} attempts with a budget, {unbudgeted} without");
    assert!(
        (100..200).contains(&budgeted),
        "the budget keeps attempts under 2 per request: {budgeted}"
    );

    // Circuit breaker: 10 concurrent slow requests, 5 allowed in flight.
    let out = load(&client, "http://10.96.0.43/slow/1500", 10, 1, "{}", 0);
    assert_eq!(count(&out, "status", "200"), 5, "{out}");
    assert_eq!(count(&out, "reason", "circuit-open"), 5, "{out}");

    // Outlier detection: s2 fails; after 3 consecutive 5xx it is ejected
    // and s1 takes everything; healed, it comes back once the ejection
    // (2 s) ends.
    control(&client, &s2, "bad");
    let before = served(&client, &s2);
    let out = load(&client, "http://10.96.0.44/", 1, 30, "{}", 0);
    assert_eq!(served(&client, &s2) - before, 3, "ejected after 3: {out}");
    assert_eq!(count(&out, "body", "s1"), 27, "{out}");
    control(&client, &s2, "good");
    std::thread::sleep(Duration::from_millis(2500));
    let out = load(&client, "http://10.96.0.44/", 1, 10, "{}", 0);
    assert!(count(&out, "body", "s2") >= 3, "s2 is back: {out}");
    assert_eq!(count(&out, "status", "200"), 10, "{out}");

    // Health checks: s3's server dies; the checks (every 100 ms, out after
    // 2 misses) take it out before a request is sent to it.
    let out = load(&client, "http://10.96.0.45/", 1, 10, "{}", 0);
    assert_eq!(
        count(&out, "body", "s3"),
        5,
        "both serve while healthy: {out}"
    );
    drop(s3_server.take());
    std::thread::sleep(Duration::from_secs(1));
    let out = load(&client, "http://10.96.0.45/", 1, 20, "{}", 0);
    assert_eq!(
        count(&out, "body", "s1"),
        20,
        "no request to the dead one: {out}"
    );

    // Rate limit: a bucket of 5 (refilled at 5 a minute): a burst of 12 gets
    // 5 answers and 7 429s with retry-after.
    let out = load(&client, "http://10.96.0.46/", 1, 12, "{}", 0);
    assert_eq!(count(&out, "status", "200"), 5, "{out}");
    assert_eq!(count(&out, "status", "429"), 7, "{out}");
    assert_eq!(count(&out, "reason", "rate-limited"), 7, "{out}");
    assert!(
        out["retry_after"].as_array().is_some_and(|r| r.len() == 7
            && r.iter().all(|v| v
                .as_str()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| (1..=12).contains(&s)))),
        "{out}"
    );

    // Faults: abort 50 %, delay 150 ms for 20 %, over 300 requests. Aborts
    // are Binomial(300, 0.5): sd 8.7, bound 5 sd; delays Binomial(300, 0.2):
    // sd 6.9, bound 5 sd, counted as requests taking ≥ 150 ms (a delayed
    // one cannot take less; a slow machine can only add, hence the upper
    // bound's slack).
    let out = load(&client, "http://10.96.0.47/", 1, 300, "{}", 150);
    let aborted = count(&out, "status", "418");
    assert!((107..=193).contains(&aborted), "aborts: {out}");
    assert_eq!(count(&out, "reason", "fault-injected"), aborted, "{out}");
    assert_eq!(count(&out, "status", "200") + aborted, 300, "{out}");
    let delayed = out["slow"].as_u64().unwrap_or(0);
    assert!((26..=120).contains(&delayed), "delays: {out}");

    // Ring hash on a header: each user always lands on one backend, and
    // the users spread over both.
    let mut homes = BTreeMap::new();
    for user in 0..20 {
        let out = load(
            &client,
            "http://10.96.0.48/",
            1,
            5,
            &format!("{{\"x-user\": \"user-{user}\"}}"),
            0,
        );
        let bodies = out["body"].as_object().expect("bodies");
        assert_eq!(bodies.len(), 1, "user-{user} sticks: {out}");
        homes.insert(user, bodies.keys().next().cloned().unwrap_or_default());
    }
    let used: std::collections::BTreeSet<&String> = homes.values().collect();
    assert_eq!(used.len(), 2, "{homes:?}");

    // Maglev on a cookie the agent sets: the first answer sets it, and a
    // client presenting it sticks.
    let out = load(&client, "http://10.96.0.49/", 1, 1, "{}", 0);
    let cookie = out["cookies"][0]
        .as_str()
        .expect("a session cookie")
        .to_owned();
    assert!(
        cookie.starts_with("session=") && cookie.contains("Max-Age=3600"),
        "{cookie}"
    );
    let value = cookie.split(';').next().unwrap_or_default();
    let out = load(
        &client,
        "http://10.96.0.49/",
        1,
        20,
        &format!("{{\"cookie\": \"{value}\"}}"),
        0,
    );
    assert_eq!(out["body"].as_object().map(|b| b.len()), Some(1), "{out}");
    assert!(
        out["cookies"].as_array().is_some_and(|c| c.is_empty()),
        "{out}"
    );

    // Session persistence by cookie: each request without one is balanced
    // (both backends serve) and starts a session; with the cookie every
    // request goes where the session began, and no new cookie is needed.
    let out = load(&client, "http://10.96.0.51/", 1, 10, "{}", 0);
    assert_eq!(out["body"].as_object().map(|b| b.len()), Some(2), "{out}");
    let cookies: Vec<&str> = out["cookies"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(cookies.len(), 10, "{out}");
    let cookie = cookies[0];
    assert!(
        cookie.starts_with("shop-session=")
            && cookie.ends_with("; Path=/; HttpOnly")
            && !cookie.contains("Max-Age"),
        "a session cookie: {cookie}"
    );
    let value = cookie.split(';').next().unwrap_or_default();
    for _ in 0..2 {
        let out = load(
            &client,
            "http://10.96.0.51/",
            1,
            10,
            &format!("{{\"cookie\": \"other=1; {value}\"}}"),
            0,
        );
        assert_eq!(out["body"].as_object().map(|b| b.len()), Some(1), "{out}");
        assert_eq!(out["cookies"], serde_json::json!([]), "{out}");
    }
    // A token naming no endpoint of the Service starts a new session.
    use base64::Engine as _;
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("10.1.99.99:8080|{wall}|{wall}"));
    let out = load(
        &client,
        "http://10.96.0.51/",
        1,
        1,
        &format!("{{\"cookie\": \"shop-session={forged}\"}}"),
        0,
    );
    assert_eq!(count(&out, "status", "200"), 1, "{out}");
    assert!(
        out["cookies"][0]
            .as_str()
            .is_some_and(|c| c.starts_with("shop-session=") && !c.contains(&forged)),
        "{out}"
    );
    // By header, with an idle timeout of 1 s: the answer carries the token
    // (its last use moved on each time) and the client sends it back; once
    // idle past 1 s the session is over and a new one begins.
    let get = |token: Option<&str>| -> (String, String) {
        let mut args = vec!["-s", "-m", "10", "-i"];
        let header = token.map(|t| format!("x-session: {t}"));
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        args.push("http://10.96.0.52/");
        let out = client.exec().run("curl", &args).expect("curl");
        let token = out
            .lines()
            .find_map(|l| l.strip_prefix("x-session: "))
            .map(|t| t.trim().to_owned())
            .expect(&out);
        let body = out
            .rsplit("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        (body, token)
    };
    let decode = |t: &str| -> Vec<String> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t)
            .expect("base64url");
        String::from_utf8_lossy(&raw)
            .split('|')
            .map(str::to_owned)
            .collect()
    };
    let (home, first) = get(None);
    let started = decode(&first)[1].clone();
    let mut token = first.clone();
    for _ in 0..5 {
        let (body, next) = get(Some(&token));
        assert_eq!(body, home, "held to its endpoint");
        assert_eq!(decode(&next)[1], started, "the same session");
        token = next;
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (_, after) = get(Some(&token));
    assert_ne!(decode(&after)[1], started, "idle past 1 s: a new session");

    // The agent counted what it did, and shows the endpoints' state.
    let status = cluster.agents[0].cli_json("status").expect("status");
    let http = &status["http"];
    for field in [
        "retries",
        "retry_budget_exhausted",
        "ejections",
        "circuit_open",
        "rate_limited",
        "fault_injected",
    ] {
        assert!(http[field].as_u64() > Some(0), "{field}: {http}");
    }
    let dead = format!("{}:8080", s3.ip);
    assert!(
        status["endpoints"]["shop/health"]
            .as_array()
            .is_some_and(|e| e
                .iter()
                .any(|e| e["address"] == dead.as_str() && e["healthy"] == false)),
        "{}",
        status["endpoints"]
    );
}

/// `connectionPool`: with `maxRequestsPerConnection` the L7 path's upstream
/// HTTP/1.1 connections to the Service's endpoint carry that many requests
/// each (the server counts the connections by their ports), while the
/// client keeps its one connection; without it one connection carries them
/// all. With `idleTimeout` a connection unused that long is closed (the
/// next call opens another), where the agent's own hour keeps it.
#[test]
fn upstream_connections_retire_after_max_requests() {
    let mut lab = Lab::new("pool_max").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&a, "a2").expect("pod");
    let _server = server
        .serve(py::PEER_PORT_SERVER, &["8080"], 8080)
        .expect("server");
    let _cluster = mesh::Cluster::start(
        lab.name(),
        &[&a],
        &[
            mesh::node(&a),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
            mesh::service(
                "shop",
                "capped",
                "10.96.0.80",
                80,
                "8080",
                &[("app", "web")],
            ),
            mesh::service("shop", "open", "10.96.0.81", 80, "8080", &[("app", "web")]),
            mesh::traffic_policy(
                "shop",
                "capped",
                "connectionPool: {maxRequestsPerConnection: 2}",
            ),
            mesh::traffic_policy("shop", "open", "loadBalancer: {type: RoundRobin}"),
            mesh::service("shop", "brief", "10.96.0.82", 80, "8080", &[("app", "web")]),
            mesh::traffic_policy("shop", "brief", "connectionPool: {idleTimeout: 1s}"),
        ],
    )
    .expect("mesh");
    // Six requests on one client connection; the upstream connections the
    // server saw, and the client's.
    let connections = |vip: &str| -> (usize, String) {
        let url = format!("http://{vip}/x");
        let mut args = vec!["-s", "-m", "10", "-w", "\\n%{num_connects}\\n"];
        for _ in 0..6 {
            args.push(&url);
        }
        let out = client
            .exec()
            .output("curl", &args, Duration::from_secs(60))
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let peers: std::collections::BTreeSet<u64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["peer"].as_u64())
            .collect();
        let client_connects: u32 = text
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .sum();
        assert_eq!(
            client_connects, 1,
            "the client keeps one connection: {text}"
        );
        (peers.len(), text)
    };
    let (capped, text) = connections("10.96.0.80");
    assert_eq!(capped, 3, "two requests per upstream connection: {text}");
    let (open, text) = connections("10.96.0.81");
    assert_eq!(open, 1, "one upstream connection for all: {text}");

    // Two calls 3 s apart: the upstream port each reached.
    let apart = |vip: &str| -> (u64, u64) {
        let url = format!("http://{vip}/x");
        let port = || {
            let out = client
                .exec()
                .output("curl", &["-s", "-m", "10", &url], Duration::from_secs(30))
                .expect("curl");
            let v: Value = serde_json::from_slice(&out.stdout).expect("json");
            v["peer"].as_u64().expect("peer")
        };
        let first = port();
        std::thread::sleep(Duration::from_secs(3));
        (first, port())
    };
    let (first, second) = apart("10.96.0.82");
    assert_ne!(first, second, "idle past 1s: a new upstream connection");
    let (first, second) = apart("10.96.0.81");
    assert_eq!(first, second, "the agent's idle timeout keeps it");
}
