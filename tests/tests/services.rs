//! How a Service's calls pick their endpoints, with real clients across two
//! nodes: `internalTrafficPolicy: Local` keeps a node's calls on that node's
//! endpoints and refuses them where there is none, `Cluster` spreads them;
//! `trafficDistribution: PreferSameNode` prefers the node's endpoints and
//! falls back to the others.
//!
//! ServiceEntry: a service outside the mesh (pods of a namespace the mesh
//! leaves alone, standing in for hosts outside the cluster) is reached at
//! the address its entry gives it, balanced over its endpoints, and
//! reported under its host name; routes and traffic policies attach to
//! entries; an entry that selects meshed pods reaches them over HBONE; an
//! entry the agent cannot serve is refused naming its file, field and
//! reason while the others keep serving. With the mesh configuration's
//! `outboundTrafficPolicy: REGISTRY_ONLY`, a meshed pod reaches only what
//! the cluster knows: the kernel refuses a connect to anything else, and a
//! ServiceEntry admits it.

use std::{collections::BTreeMap, time::Duration};

use trellis_tests::{
    Lab, Pod, eventually, mesh,
    prometheus::{sum, until},
    py,
};

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

/// Documentation addresses: nothing in the lab routes them, so a call
/// reaches an endpoint only if the agent captured it.
const PAYMENTS_VIP: &str = "192.0.2.10";
const LEDGER_VIP: &str = "192.0.2.20";
const BROKEN_VIP: &str = "192.0.2.30";
const PAYMENTS_2_VIP: &str = "192.0.2.11";
/// How long a change of the config folder may take to apply.
const WAIT: Duration = Duration::from_secs(10);

fn entry(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: ServiceEntry\n\
         metadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n"
    )
}

/// The first line a TCP server at `host:port` sends `client`, or the error.
fn first_line(client: &Pod, host: &str, port: u16) -> String {
    let script = format!(
        "import socket\ns = socket.create_connection(('{host}', {port}), timeout=5)\n\
         print(s.makefile().readline().strip())\n"
    );
    client
        .exec()
        .python_output(&script, &[], Duration::from_secs(15))
        .unwrap_or_else(|e| format!("failed: {e}"))
}

#[test]
fn service_entries_reach_endpoints_outside_and_inside_the_mesh_under_their_host_names() {
    let mut lab = Lab::new("svc_entry").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let ext1 = lab.add_pod(&b, "b1").expect("pod");
    let ext2 = lab.add_pod(&b, "b2").expect("pod");
    let ledger = lab.add_pod(&b, "b3").expect("pod");
    // Two endpoints on different ports: one through the entry's
    // targetPort, one through its own port for the entry's port name.
    let _servers = [
        ext1.serve(py::NAME_SERVER, &["ext-1", "8080"], 8080)
            .expect("server"),
        ext2.serve(py::NAME_SERVER, &["ext-2", "9090"], 9090)
            .expect("server"),
        ledger
            .serve(py::WHOAMI_SERVER, &["5432"], 5432)
            .expect("server"),
    ];
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::namespace("outside", false),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&ext1, "outside", &[("app", "ext")], &[], ""),
            mesh::pod(&ext2, "outside", &[("app", "ext")], &[], ""),
            mesh::pod(&ledger, "shop", &[("app", "ledger")], &[], ""),
            entry(
                "payments",
                &format!(
                    "{{hosts: [api.payments.example], addresses: [{PAYMENTS_VIP}], \
                     ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}], \
                     location: MESH_EXTERNAL, resolution: STATIC, \
                     endpoints: [{{address: {}}}, {{address: {}, ports: {{http: 9090}}}}]}}",
                    ext1.ip, ext2.ip
                ),
            ),
            entry(
                "ledger",
                &format!(
                    "{{hosts: [ledger.internal], addresses: [{LEDGER_VIP}], \
                     ports: [{{number: 5432, name: tcp-pg, protocol: TCP}}], \
                     location: MESH_INTERNAL, resolution: STATIC, \
                     workloadSelector: {{labels: {{app: ledger}}}}}}"
                ),
            ),
        ],
    )
    .expect("agents");
    let [agent_a, agent_b] = &cluster.agents[..] else {
        unreachable!("two agents")
    };
    let logs = || {
        format!(
            "--- a\n{}\n--- b\n{}",
            agent_a.log_text(),
            agent_b.log_text()
        )
    };

    // Outside the mesh: both endpoints answer at the entry's address.
    let seen = answers(&client, &format!("http://{PAYMENTS_VIP}/"), 8);
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ext-1", "ext-2"],
        "{seen:?}\n{}",
        logs()
    );
    assert_eq!(seen.values().sum::<usize>(), 8, "{seen:?}");

    // Reported under the entry's host, in its namespace, by the caller's
    // agent (nothing stands on the other side to report).
    let payments = [
        ("reporter", "source"),
        ("destination_service", "api.payments.example"),
        ("destination_service_name", "api.payments.example"),
        ("destination_service_namespace", "shop"),
        ("source_workload", "a1"),
    ];
    let samples = until(&a, |s| {
        sum(s, "istio_tcp_connections_closed_total", &payments) >= 8.0
    });
    assert_eq!(
        sum(&samples, "istio_tcp_connections_opened_total", &payments),
        8.0,
        "{samples:?}"
    );

    // Inside the mesh: the selected pod on b, over HBONE (it sees the
    // client pod's own address, as b's agent delivers it).
    let tunnelled = |agent: &trellis_tests::Agent| {
        agent.cli_json("status").expect("status")["outbound"]["tunnelled"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = tunnelled(agent_a);
    for _ in 0..3 {
        assert_eq!(
            first_line(&client, LEDGER_VIP, 5432),
            client.ip.to_string(),
            "{}",
            logs()
        );
    }
    assert_eq!(tunnelled(agent_a) - before, 3);
    let ledger_labels = [
        ("reporter", "source"),
        ("destination_service", "ledger.internal"),
        ("destination_workload", "b3"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let samples = until(&a, |s| {
        sum(s, "istio_tcp_connections_closed_total", &ledger_labels) >= 3.0
    });
    assert_eq!(
        sum(
            &samples,
            "istio_tcp_connections_opened_total",
            &ledger_labels
        ),
        3.0,
        "{samples:?}"
    );

    // Routes and traffic policies attach to entries as to Services, by
    // Istio's group too: a path goes to a second entry (ext-2 alone) on
    // the L7 path, reported under that entry's host...
    let payments_2 = entry(
        "payments-2",
        &format!(
            "{{hosts: [v2.payments.example], addresses: [{PAYMENTS_2_VIP}], \
             ports: [{{number: 80, name: http, protocol: HTTP}}], resolution: STATIC, \
             endpoints: [{{address: {}, ports: {{http: 9090}}}}]}}",
            ext2.ip
        ),
    );
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: payments, namespace: shop}\n\
         spec: {parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: payments, port: 80}], \
         rules: [{matches: [{path: {type: PathPrefix, value: /v2}}], \
         backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: payments-2, port: 80}]}, \
         {backendRefs: [{group: trellis.dev, kind: ServiceEntry, name: payments, port: 80}]}]}\n";
    cluster
        .config()
        .write("routes.yaml", &mesh::docs(&[payments_2, route.to_owned()]))
        .expect("write");
    let v2 = format!("http://{PAYMENTS_VIP}/v2/charge");
    eventually("the route sends /v2 to the second entry", WAIT, || {
        answers(&client, &v2, 4) == BTreeMap::from([("ext-2".to_owned(), 4)])
    });
    assert_eq!(
        answers(&client, &v2, 6),
        BTreeMap::from([("ext-2".to_owned(), 6)]),
        "{}",
        logs()
    );
    let v2_labels = [
        ("reporter", "source"),
        ("destination_service", "v2.payments.example"),
        ("response_code", "200"),
    ];
    let samples = until(&a, |s| sum(s, "istio_requests_total", &v2_labels) >= 6.0);
    assert!(
        sum(&samples, "istio_requests_total", &v2_labels) >= 6.0,
        "{samples:?}"
    );
    // ... and a TrafficPolicy on that entry applies to what the route
    // sends it (here, a fault that answers every request).
    let policy = "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\n\
         metadata: {name: payments-2, namespace: shop}\n\
         spec: {targetRefs: [{group: trellis.dev, kind: ServiceEntry, name: payments-2}], \
         fault: {abort: {httpStatus: 503, percent: 100}}}\n";
    cluster
        .config()
        .write("policy.yaml", policy)
        .expect("write");
    let status = || {
        client
            .exec()
            .curl(&["-m", "3", "-o", "/dev/null", "-w", "%{http_code}", &v2])
            .expect("curl runs")
    };
    eventually("the TrafficPolicy's fault on the entry", WAIT, || {
        status() == "503"
    });
    assert_eq!(status(), "503", "{}", logs());
    let root = answers(&client, &format!("http://{PAYMENTS_VIP}/"), 4);
    assert!(
        root.keys().all(|k| k == "ext-1" || k == "ext-2"),
        "the route's other rule, without the policy: {root:?}"
    );

    // What the agent holds, as an operator sees it.
    let text = agent_a.cli(&["services"]).expect("services");
    assert!(
        text.contains("shop/payments")
            && text.contains("ServiceEntry MESH_EXTERNAL")
            && text.contains("api.payments.example")
            && text.contains(&format!("{}:9090", ext2.ip)),
        "{text}"
    );

    // An entry the agent cannot serve (its endpoints by DNS name) is
    // refused with its file, field and reason; nothing else changes, and
    // its address is not captured.
    cluster
        .config()
        .write(
            "broken.yaml",
            &entry(
                "by-dns",
                &format!(
                    "{{hosts: [api.example.org], addresses: [{BROKEN_VIP}], \
                     ports: [{{number: 80, name: http}}], resolution: DNS, \
                     endpoints: [{{address: api.example.org}}]}}"
                ),
            ),
        )
        .expect("write");
    eventually("the broken entry reported", WAIT, || {
        agent_a.log_text().contains("broken.yaml")
    });
    let log = agent_a.log_text();
    assert!(
        log.contains("broken.yaml")
            && log.contains("spec.resolution")
            && log.contains("resolution is STATIC or NONE"),
        "{log}"
    );
    let still = answers(&client, &format!("http://{PAYMENTS_VIP}/"), 2);
    assert!(
        still.keys().all(|k| k == "ext-1" || k == "ext-2"),
        "{still:?}"
    );
    let refused = answers(&client, &format!("http://{BROKEN_VIP}/"), 1);
    assert_eq!(
        refused,
        BTreeMap::from([(String::new(), 1)]),
        "the refused entry's address is not served"
    );
}

/// The mesh configuration with Istio's outbound traffic policy `mode`.
fn outbound_policy(mode: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-mesh, namespace: trellis-system}}\n\
         data:\n  mesh: |\n    outboundTrafficPolicy: {{mode: {mode}}}\n"
    )
}

#[test]
fn registry_only_refuses_what_the_cluster_does_not_know_until_an_entry_names_it() {
    let mut lab = Lab::new("svc_registry").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let known = lab.add_pod(&a, "a2").expect("pod");
    // A host the cluster's objects never mention (outside the cluster).
    let stranger = lab.add_pod(&a, "a3").expect("pod");
    let _servers = [
        known
            .serve(py::NAME_SERVER, &["known", "8080"], 8080)
            .expect("server"),
        stranger
            .serve(py::NAME_SERVER, &["stranger", "8080"], 8080)
            .expect("server"),
        client
            .serve(py::NAME_SERVER, &["self", "9000"], 9000)
            .expect("server"),
    ];
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a],
        &[
            mesh::node(&a),
            mesh::namespace("shop", true),
            mesh::namespace("outside", false),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&known, "outside", &[("app", "known")], &[], ""),
        ],
    )
    .expect("agents");
    let agent = &cluster.agents[0];
    let call = |url: &str| answers(&client, url, 1);
    let one = |name: &str| BTreeMap::from([(name.to_owned(), 1)]);
    let refused = one("");
    let stranger_url = format!("http://{}:8080/", stranger.ip);
    let known_url = format!("http://{}:8080/", known.ip);

    // ALLOW_ANY (no configuration): anywhere.
    assert_eq!(call(&stranger_url), one("stranger"));

    let set_mode = |mode: &str| {
        cluster
            .config()
            .write("mesh-config.yaml", &outbound_policy(mode))
            .expect("write");
        eventually(&format!("{mode} applied"), WAIT, || {
            agent.cli_json("status").expect("status")["outbound_traffic_policy"] == mode
        });
    };
    set_mode("REGISTRY_ONLY");
    let counted = || {
        trellis_tests::counters::events(
            &trellis_agent::bpf::maps::counters(&a.bpffs).expect("counters"),
            "connect4",
            "deny",
            "not-in-registry",
        )
    };
    let before = counted();
    assert_eq!(call(&stranger_url), refused, "{}", agent.log_text());
    assert!(counted() > before, "the kernel counted the refusal");
    let flows = agent.flows_since(0).expect("flows");
    assert!(
        flows.iter().any(|f| {
            let f = f.to_string();
            f.contains("not-in-registry") && f.contains(&stranger.ip.to_string())
        }),
        "a flow event says why: {flows:?}"
    );
    // What the cluster knows (a pod, meshed or not) and the pod's own
    // loopback still answer.
    assert_eq!(call(&known_url), one("known"));
    assert_eq!(call("http://127.0.0.1:9000/"), one("self"));

    // A ServiceEntry names the stranger: reached at the entry's address
    // (the agent, not the pod, connects to it), still not at its own.
    cluster
        .config()
        .write(
            "entry.yaml",
            &entry(
                "stranger",
                &format!(
                    "{{hosts: [stranger.example], addresses: [192.0.2.40], resolution: STATIC, \
                     ports: [{{number: 80, name: http, targetPort: 8080}}], \
                     endpoints: [{{address: {}}}]}}",
                    stranger.ip
                ),
            ),
        )
        .expect("write");
    eventually("the entry admits the stranger", WAIT, || {
        call("http://192.0.2.40/") == one("stranger")
    });
    assert_eq!(call(&stranger_url), refused);
    // One with `resolution: NONE` for the stranger's own address admits
    // calls to it as dialled.
    cluster
        .config()
        .write(
            "direct.yaml",
            &entry(
                "stranger-direct",
                &format!(
                    "{{hosts: [direct.stranger.example], addresses: [{}], \
                     ports: [{{number: 8080, name: http}}], resolution: NONE}}",
                    stranger.ip
                ),
            ),
        )
        .expect("write");
    eventually("the NONE entry admits the stranger's address", WAIT, || {
        call(&stranger_url) == one("stranger")
    });

    // Back to ALLOW_ANY: anywhere again.
    set_mode("ALLOW_ANY");
    assert_eq!(call(&stranger_url), one("stranger"));
}
