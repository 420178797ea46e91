//! AuthorizationPolicy with real connections: pods with different service
//! accounts and namespaces on node a call a server on node b (through HBONE,
//! where b's agent decides from the client certificate and answers 401), and
//! a pod on node b calls it on the same node (b's outbound proxy decides).
//! Allow by principal and namespace, DENY over ALLOW, port-specific rules.

use std::time::Duration;

use trellis_tests::{Lab, Pod, mesh, py};

/// `GET /` to `ip:port`: the server's name, or `DENIED` when the mesh
/// reset the connection without an answer (the reset may even beat
/// `connect()`'s return, on the same node).
fn call(client: &Pod, server: &Pod, port: u16) -> String {
    let script = format!(
        "import socket\n\
         try:\n    s = socket.create_connection(('{}', {port}), timeout=10)\n    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n    got = b''\n    while True:\n        \
         b = s.recv(4096)\n        if not b:\n            break\n        got += b\n\
         except ConnectionResetError:\n    got = b''\n\
         print(got.split(b'\\r\\n\\r\\n', 1)[1].decode() if b'200 OK' in got else 'DENIED')\n",
        server.ip
    );
    client
        .exec()
        .python_output(&script, &[], Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{} → {}:{port}: {e}", client.name, server.name))
}

#[test]
fn authorization_policies_allow_deny_and_scope_by_port() {
    let mut lab = Lab::new("authz_table").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let shop_client = lab.add_pod(&a, "a1").expect("pod");
    let dev_client = lab.add_pod(&a, "a2").expect("pod");
    let banned = lab.add_pod(&a, "a3").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let neighbour = lab.add_pod(&b, "b2").expect("pod");
    let _servers: Vec<_> = [7000u16, 7001]
        .iter()
        .map(|port| {
            server
                .serve(
                    py::NAME_SERVER,
                    &[&format!("web{port}"), &port.to_string()],
                    *port,
                )
                .expect("server")
        })
        .collect();

    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::namespace("dev", true),
            mesh::pod(&shop_client, "shop", &[], &[], ""),
            mesh::pod(&dev_client, "dev", &[], &[], ""),
            mesh::pod(&banned, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
            mesh::pod(&neighbour, "dev", &[], &[], ""),
            // shop may call web on any port, dev only on 7001...
            mesh::authorization_policy(
                "shop",
                "web-callers",
                "{selector: {matchLabels: {app: web}}, action: ALLOW, rules: [\
             {from: [{source: {namespaces: [shop]}}]}, \
             {from: [{source: {namespaces: [dev]}}], to: [{operation: {ports: ['7001']}}]}]}",
            ),
            // ...and a3's service account never, though it is in shop.
            mesh::authorization_policy(
                "shop",
                "ban-a3",
                "{action: DENY, rules: [{from: [{source: {principals: ['*/sa/a3']}}]}]}",
            ),
        ],
    )
    .expect("agents");
    let [agent_a, agent_b] = &cluster.agents[..] else {
        unreachable!("two agents")
    };

    let table: &[(&Pod, u16, &str)] = &[
        (&shop_client, 7000, "web7000"), // allowed by namespace
        (&shop_client, 7001, "web7001"),
        (&dev_client, 7000, "DENIED"), // dev: only 7001
        (&dev_client, 7001, "web7001"),
        (&banned, 7000, "DENIED"), // DENY wins over the shop ALLOW
        (&banned, 7001, "DENIED"),
        (&neighbour, 7000, "DENIED"), // same node, same rules
        (&neighbour, 7001, "web7001"),
    ];
    let mut wrong = Vec::new();
    for (client, port, want) in table {
        let got = call(client, &server, *port);
        if got != *want {
            wrong.push(format!("{} → {port}: got {got}, want {want}", client.name));
        }
    }
    assert!(
        wrong.is_empty(),
        "{wrong:#?}\n--- a\n{}\n--- b\n{}",
        agent_a.log_text(),
        agent_b.log_text()
    );

    // Cross-node denials are b's inbound 401s, the same-node one b's outbound.
    let status_b = agent_b.cli_json("status").expect("status b");
    assert_eq!(status_b["inbound"]["denied"], 3, "{status_b:#}");
    assert_eq!(status_b["outbound"]["denied"], 1, "{status_b:#}");
    let status_a = agent_a.cli_json("status").expect("status a");
    assert_eq!(status_a["outbound"]["tunnelled"], 3, "{status_a:#}");
    let log_b = agent_b.log_text();
    assert!(
        log_b.contains("connection denied by authorization policy")
            && log_b.contains("spiffe://cluster.local/ns/shop/sa/a3")
            && log_b.contains("shop/ban-a3"),
        "denials are logged with source and policy:\n{log_b}"
    );
    // `trellis policy` lists both, with the workload each selects on b.
    let policies = agent_b.cli_json("policy").expect("policy");
    let selects = |name: &str| {
        policies["authorization"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["policy"] == name)
            .map(|p| p["selects"].clone())
    };
    assert_eq!(
        selects("shop/web-callers"),
        Some(serde_json::json!(["shop/b1"])),
        "{policies:#}"
    );
    assert_eq!(
        selects("shop/ban-a3"),
        Some(serde_json::json!(["shop/b1"])),
        "{policies:#}"
    );
    let text = agent_b.cli(&["policy"]).expect("policy text");
    assert!(
        text.contains("shop/ban-a3") && text.contains("DENY"),
        "{text}"
    );
    let log_a = agent_a.log_text();
    assert!(
        log_a.contains("401"),
        "a's agent saw the 401 and says so:\n{log_a}"
    );
}
