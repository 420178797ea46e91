//! How a Service's calls pick their endpoints, with real clients across two
//! nodes: `internalTrafficPolicy: Local` keeps a node's calls on that node's
//! endpoints and refuses them where there is none, `Cluster` spreads them;
//! `trafficDistribution: PreferSameNode` prefers the node's endpoints and
//! falls back to the others.

use std::{collections::BTreeMap, time::Duration};

use trellis_tests::{Lab, Pod, mesh, py};

/// The name that answered each of `calls` calls from `client` to `url`
/// (empty for a call that failed), counted.
fn answers(client: &Pod, url: &str, calls: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..calls {
        let name = client.exec().curl(&["-m", "3", url]).expect("curl runs");
        *seen.entry(name).or_insert(0) += 1;
    }
    seen
}

/// A Service on port 80 with `spec` fields added (`key: value, `).
fn service(name: &str, vip: &str, spec: &str, selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{clusterIP: {vip}, {spec}selector: {{{selector}}}, \
         ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
    )
}

#[test]
fn internal_traffic_policy_and_traffic_distribution_pick_endpoints_by_node() {
    let mut lab = Lab::new("svc_local").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client_a = lab.add_pod(&a, "a1").expect("pod");
    let web_a = lab.add_pod(&a, "a2").expect("pod");
    let client_b = lab.add_pod(&b, "b1").expect("pod");
    let web_b = lab.add_pod(&b, "b2").expect("pod");
    let _servers = [(&web_a, "web-a"), (&web_b, "web-b")].map(|(pod, name)| {
        pod.serve(py::NAME_SERVER, &[name, "8080"], 8080)
            .expect("name server")
    });
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client_a, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&client_b, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&web_a, "shop", &[("app", "web")], &[], ""),
            mesh::pod(&web_b, "shop", &[("app", "web"), ("side", "b")], &[], ""),
            service(
                "near",
                "10.96.0.90",
                "internalTrafficPolicy: Local, ",
                "app: web",
            ),
            service(
                "any",
                "10.96.0.91",
                "internalTrafficPolicy: Cluster, ",
                "app: web",
            ),
            service(
                "only-b",
                "10.96.0.92",
                "internalTrafficPolicy: Local, ",
                "side: b",
            ),
            service(
                "close",
                "10.96.0.93",
                "trafficDistribution: PreferSameNode, ",
                "app: web",
            ),
            service(
                "close-b",
                "10.96.0.94",
                "trafficDistribution: PreferSameNode, ",
                "side: b",
            ),
        ],
    )
    .expect("agents");
    let logs = || {
        cluster
            .agents
            .iter()
            .map(|a| a.log_text())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // Local: each node's client reaches its own node's endpoint only.
    for (client, own) in [(&client_a, "web-a"), (&client_b, "web-b")] {
        let seen = answers(client, "http://10.96.0.90/", 12);
        assert_eq!(
            seen,
            BTreeMap::from([(own.to_owned(), 12)]),
            "from {}: {}",
            client.name,
            logs()
        );
    }
    // Cluster: both endpoints, from either node.
    for client in [&client_a, &client_b] {
        let seen = answers(client, "http://10.96.0.91/", 12);
        assert!(
            seen.get("web-a").is_some_and(|n| *n > 0) && seen.get("web-b").is_some_and(|n| *n > 0),
            "from {}: {seen:?}",
            client.name
        );
    }
    // Local with no endpoint on the caller's node: refused there, served on b.
    let refused = answers(&client_a, "http://10.96.0.92/", 3);
    assert_eq!(refused, BTreeMap::from([(String::new(), 3)]), "{}", logs());
    let status = cluster.agents[0].cli_json("status").expect("status");
    assert!(
        status["outbound"]["no_backend"].as_u64() >= Some(3),
        "{status:#}"
    );
    let served = answers(&client_b, "http://10.96.0.92/", 3);
    assert_eq!(served, BTreeMap::from([("web-b".to_owned(), 3)]));

    // PreferSameNode: the caller's node while it has an endpoint, else
    // another's (not refused, unlike Local).
    for (client, own) in [(&client_a, "web-a"), (&client_b, "web-b")] {
        let seen = answers(client, "http://10.96.0.93/", 8);
        assert_eq!(
            seen,
            BTreeMap::from([(own.to_owned(), 8)]),
            "from {}",
            client.name
        );
    }
    let elsewhere = answers(&client_a, "http://10.96.0.94/", 3);
    assert_eq!(
        elsewhere,
        BTreeMap::from([("web-b".to_owned(), 3)]),
        "{}",
        logs()
    );
}

/// `sessionAffinity: ClientIP`: each client's calls stay on one endpoint,
/// new connections (the L4 path) and requests on one connection (the L7
/// path, which a TrafficPolicy puts the Service on) alike, while a Service
/// without it spreads the same calls over its endpoints.
#[test]
fn session_affinity_keeps_each_client_on_one_endpoint() {
    let mut lab = Lab::new("svc_affinity").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let clients = [
        lab.add_pod(&a, "a1").expect("pod"),
        lab.add_pod(&a, "a2").expect("pod"),
    ];
    let webs = [
        (lab.add_pod(&a, "a3").expect("pod"), "web-1"),
        (lab.add_pod(&a, "a4").expect("pod"), "web-2"),
        (lab.add_pod(&b, "b1").expect("pod"), "web-3"),
    ];
    let _servers = webs.each_ref().map(|(pod, name)| {
        pod.serve(py::NAME_SERVER, &[name, "8080"], 8080)
            .expect("name server")
    });
    let sticky = "sessionAffinity: ClientIP, \
                  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}, ";
    let mut objects = vec![
        mesh::node(&a),
        mesh::node(&b),
        mesh::namespace("shop", true),
        service("sticky", "10.96.0.95", sticky, "app: web"),
        service("sticky-l7", "10.96.0.96", sticky, "app: web"),
        mesh::traffic_policy("shop", "sticky-l7", "loadBalancer: {type: RoundRobin}"),
        service("spread", "10.96.0.97", "", "app: web"),
        service("spread-l7", "10.96.0.98", "", "app: web"),
        mesh::traffic_policy("shop", "spread-l7", "loadBalancer: {type: RoundRobin}"),
    ];
    objects.extend(
        clients
            .iter()
            .map(|c| mesh::pod(c, "shop", &[("app", "client")], &[], "")),
    );
    objects.extend(
        webs.iter()
            .map(|(pod, _)| mesh::pod(pod, "shop", &[("app", "web")], &[], "")),
    );
    let cluster = mesh::Cluster::start(lab.name(), &[&a, &b], &objects).expect("agents");
    // Nine requests on one keep-alive connection: the names that answered.
    let on_one_connection = |client: &Pod, vip: &str| -> BTreeMap<String, usize> {
        let url = format!("http://{vip}/");
        let mut args = vec!["-m", "10", "-w", "\\n"];
        args.extend(std::iter::repeat_n(url.as_str(), 9));
        let out = client.exec().curl(&args).expect("curl runs");
        let mut seen = BTreeMap::new();
        for name in out.lines() {
            *seen.entry(name.to_owned()).or_insert(0) += 1;
        }
        seen
    };

    for client in &clients {
        // New connections, one per call: the L4 path.
        let seen = answers(client, "http://10.96.0.95/", 9);
        assert_eq!(seen.len(), 1, "from {}: {seen:?}", client.name);
        let (name, _) = seen.into_iter().next().expect("one");
        assert!(name.starts_with("web-"), "from {}: {name:?}", client.name);
        // Requests on one connection, and new connections: the L7 path.
        let l7 = on_one_connection(client, "10.96.0.96");
        assert_eq!(l7.len(), 1, "from {}: {l7:?}", client.name);
        let again = answers(client, "http://10.96.0.96/", 3);
        assert_eq!(again.len(), 1, "from {}: {again:?}", client.name);
        assert_eq!(
            l7.keys().next(),
            again.keys().next(),
            "from {}",
            client.name
        );
    }
    // Without affinity the same calls spread over the endpoints.
    let spread = answers(&clients[0], "http://10.96.0.97/", 9);
    assert!(spread.len() >= 2, "{spread:?}");
    let spread = on_one_connection(&clients[0], "10.96.0.98");
    assert!(spread.len() >= 2, "{spread:?}");
    // `trellis services` shows the timeout.
    let services = cluster.agents[0].cli_json("services").expect("services");
    let timeout = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "sticky"))
        .map(|s| s["client_ip_affinity"].clone());
    assert_eq!(timeout, Some(serde_json::json!(600)), "{services:#}");
}

/// Reads one line from a server that speaks first, COUNT times, each on a
/// new connection; prints each. Args: HOST PORT COUNT.
const READ_BANNER: &str = r#"
import socket, sys
for _ in range(int(sys.argv[3])):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(s.makefile().readline().strip())
    s.close()
"#;

/// A Service port that declares its protocol, by `appProtocol` or by its
/// name as Istio reads it (`tcp-who`), is not peeked at: a server that
/// speaks first gets its client at once. An undeclared one is peeked at
/// until the sniffing gives up, which `trellis status` counts.
#[test]
fn declared_ports_are_not_sniffed() {
    let mut lab = Lab::new("svc_declared").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let who = lab.add_pod(&a, "a2").expect("pod");
    let _server = who
        .serve(py::WHOAMI_SERVER, &["7001"], 7001)
        .expect("server");
    let port = |service: &str, vip: &str, port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {service}, namespace: shop}}\n\
             spec: {{clusterIP: {vip}, selector: {{app: who}}, ports: [{{{port}, port: 7001}}]}}\n"
        )
    };
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a],
        &[
            mesh::node(&a),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&who, "shop", &[("app", "who")], &[], ""),
            port("who", "10.96.0.100", "name: who"),
            port("who-tcp", "10.96.0.101", "name: tcp-who"),
            port("who-db", "10.96.0.102", "name: db, appProtocol: mysql"),
        ],
    )
    .expect("agents");
    let sniffs = || {
        let status = cluster.agents[0].cli_json("status").expect("status");
        let o = &status["outbound"];
        [o["sniffed"].as_u64(), o["sniff_timeouts"].as_u64()].map(|v| v.expect("counter"))
    };
    let banners = |vip: &str| {
        client
            .exec()
            .python_output(READ_BANNER, &[vip, "7001", "3"], Duration::from_secs(30))
            .expect("banner client")
    };
    // The server's banner (the address it sees) on each connection.
    let served = |out: String| {
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines.len() == 3 && lines.iter().all(|l| l.parse::<std::net::IpAddr>().is_ok()),
            "{out}"
        );
    };
    for vip in ["10.96.0.101", "10.96.0.102"] {
        let before = sniffs();
        served(banners(vip));
        assert_eq!(sniffs(), before, "{vip} was peeked at");
    }
    let before = sniffs();
    served(banners("10.96.0.100"));
    let after = sniffs();
    assert_eq!(
        [after[0] - before[0], after[1] - before[1]],
        [3, 3],
        "{before:?} -> {after:?}"
    );
}

/// Calls from a pod to a Service's external IP or its load balancer's
/// address are the Service's, as with kube-proxy: captured and served by
/// its endpoints; a balancer that proxies (`ipMode: Proxy`) is left alone.
#[test]
fn external_and_load_balancer_addresses_reach_the_endpoints() {
    let mut lab = Lab::new("svc_external").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let web = lab.add_pod(&a, "a2").expect("pod");
    let _server = web
        .serve(py::NAME_SERVER, &["web", "8080"], 8080)
        .expect("server");
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a],
        &[
            mesh::node(&a),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&web, "shop", &[("app", "web")], &[], ""),
            // Documentation addresses: nothing in the lab routes them.
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
             spec: {type: LoadBalancer, clusterIP: 10.96.0.110, externalIPs: [203.0.113.10], \
             selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n\
             status: {loadBalancer: {ingress: [{ip: 198.51.100.7}, {ip: 198.51.100.8, ipMode: Proxy}]}}\n"
                .to_owned(),
        ],
    )
    .expect("agents");
    for vip in ["10.96.0.110", "203.0.113.10", "198.51.100.7"] {
        let seen = answers(&client, &format!("http://{vip}/"), 2);
        assert_eq!(seen, BTreeMap::from([("web".to_owned(), 2)]), "{vip}");
    }
    // The proxying balancer's address is not captured: with no route to
    // it in the lab, the call fails.
    let seen = answers(&client, "http://198.51.100.8/", 1);
    assert_eq!(seen, BTreeMap::from([(String::new(), 1)]));
    let services = cluster.agents[0].cli_json("services").expect("services");
    assert_eq!(
        services[0]["vips"],
        serde_json::json!(["10.96.0.110", "198.51.100.7", "203.0.113.10"]),
        "{services:#}"
    );
}

/// A Service call whose endpoint refuses the connection (a pod gone before
/// its Service's endpoints say so: here, pods with nothing listening, on
/// the caller's node and across nodes) goes to another endpoint, up to
/// three tries, before any byte of the client's is sent: every call is
/// served by the one endpoint that listens.
#[test]
fn refused_connections_try_another_endpoint() {
    let mut lab = Lab::new("svc_refused").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let live = lab.add_pod(&a, "a2").expect("pod");
    let dead_a = lab.add_pod(&a, "a3").expect("pod");
    let dead_b = lab.add_pod(&b, "b1").expect("pod");
    let _server = live
        .serve(py::NAME_SERVER, &["live", "8080"], 8080)
        .expect("server");
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&live, "shop", &[("app", "web")], &[], ""),
            mesh::pod(&dead_a, "shop", &[("app", "web")], &[], ""),
            mesh::pod(&dead_b, "shop", &[("app", "web")], &[], ""),
            service("web", "10.96.0.120", "", "app: web"),
        ],
    )
    .expect("agents");
    let seen = answers(&client, "http://10.96.0.120/", 9);
    assert_eq!(seen, BTreeMap::from([("live".to_owned(), 9)]));
    let status = cluster.agents[0].cli_json("status").expect("status");
    let retries = status["outbound"]["connect_retries"].as_u64();
    // Round robin over the three, the refused left out of each call's
    // next try: 7 to 11 retries in 9 calls, by where the live one sorts.
    assert!(retries >= Some(7), "{status:#}");
    // Both kinds of refusal were met: a pod on this node, and one across
    // nodes (its node's agent answered the tunnel 503).
    let remote = cluster.agents[1].cli_json("status").expect("status");
    assert!(
        remote["inbound"]["upstream_failed"].as_u64() >= Some(1),
        "{remote:#}"
    );
}
