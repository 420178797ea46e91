//! How a Service's calls pick their endpoints, with real clients across two
//! nodes: `internalTrafficPolicy: Local` keeps a node's calls on that node's
//! endpoints and refuses them where there is none, `Cluster` spreads them;
//! `trafficDistribution: PreferSameNode` prefers the node's endpoints and
//! falls back to the others.

use std::collections::BTreeMap;

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
