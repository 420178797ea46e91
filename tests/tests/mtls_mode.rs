//! STRICT and PERMISSIVE mTLS, enforced by `trl_pod_to` on the pods'
//! interfaces: a strict pod takes new connections only from its node's own
//! stack (its agent delivering HBONE, kubelet-style probes from the node);
//! plaintext from a pod outside the mesh or from another node is dropped
//! and counted as `plaintext-in-strict`. A permissive pod takes both.

use std::time::Duration;

use trellis_agent::bpf::maps::counters;
use trellis_tests::{Exec, Lab, mesh, py};

/// `GET /` to `ip:7000` from `from`: the server's name, or `DROPPED` when no
/// connection could be made within two seconds.
fn call(from: &Exec, ip: &str) -> String {
    call_port(from, ip, 7000)
}

/// [`call`] to `port`.
fn call_port(from: &Exec, ip: &str, port: u16) -> String {
    let script = format!(
        "import socket\n\
         try:\n    s = socket.create_connection(('{ip}', {port}), timeout=2)\n\
         except (socket.timeout, TimeoutError):\n    print('DROPPED')\n    raise SystemExit\n\
         s.settimeout(10)\ns.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\ngot = b''\n\
         while True:\n    b = s.recv(4096)\n    if not b:\n        break\n    got += b\n\
         print(got.split(b'\\r\\n\\r\\n', 1)[1].decode())\n"
    );
    from.python_output(&script, &[], Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("call to {ip}: {e}"))
}

#[test]
fn strict_pods_drop_plaintext_from_outside_the_mesh_permissive_ones_take_it() {
    let mut lab = Lab::new("mtls_mode").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let meshed_client = lab.add_pod(&a, "a1").expect("pod");
    let outsider = lab.add_pod(&a, "a2").expect("pod");
    let strict = lab.add_pod(&b, "b1").expect("pod");
    let permissive = lab.add_pod(&b, "b2").expect("pod");
    let neighbour = lab.add_pod(&b, "b3").expect("pod");
    let _servers: Vec<_> = [&strict, &permissive]
        .iter()
        .map(|p| {
            p.serve(py::NAME_SERVER, &[&p.name, "7000"], 7000)
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
            mesh::namespace("outside", false),
            mesh::pod(&meshed_client, "shop", &[], &[], ""),
            mesh::pod(&outsider, "outside", &[], &[], ""),
            mesh::pod(&strict, "shop", &[("trellis.dev/mtls", "strict")], &[], ""),
            mesh::pod(&permissive, "shop", &[], &[], ""),
            mesh::pod(&neighbour, "outside", &[], &[], ""),
        ],
    )
    .expect("agents");
    let [_agent_a, agent_b] = &cluster.agents[..] else {
        unreachable!("two agents")
    };
    let hooked = agent_b.cli_json("workloads").expect("workloads");
    let (strict_ip, permissive_ip) = (strict.ip.to_string(), permissive.ip.to_string());

    let table: &[(&str, Exec, &str, &str)] = &[
        ("meshed pod, HBONE", meshed_client.exec(), &strict_ip, "b1"),
        (
            "meshed pod, HBONE",
            meshed_client.exec(),
            &permissive_ip,
            "b2",
        ),
        (
            "pod outside the mesh",
            outsider.exec(),
            &strict_ip,
            "DROPPED",
        ),
        (
            "pod outside the mesh",
            outsider.exec(),
            &permissive_ip,
            "b2",
        ),
        ("node a's own namespace", a.exec(), &strict_ip, "DROPPED"),
        ("node a's own namespace", a.exec(), &permissive_ip, "b2"),
        ("unmeshed pod on b", neighbour.exec(), &strict_ip, "DROPPED"),
        ("node b's probe", b.exec(), &strict_ip, "b1"),
    ];
    let mut wrong = Vec::new();
    for (who, exec, ip, want) in table {
        let got = call(exec, ip);
        if got != *want {
            wrong.push(format!("{who} → {ip}: got {got}, want {want}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{wrong:#?}\nworkloads on b: {hooked:#}\n--- b\n{}",
        agent_b.log_text()
    );

    let tally = |reason: &str| {
        counters(&b.bpffs)
            .expect("counters")
            .iter()
            .filter(|c| c.hook == "tc_egress" && c.reason == reason)
            .map(|c| c.events)
            .sum::<u64>()
    };
    // Three refused connections, each SYN retried within its two seconds.
    assert!(tally("plaintext-in-strict") >= 3, "drops are counted");
    // The agent's connection for a1's call (known by its socket mark) and
    // the node's probe (from the node's address).
    assert!(
        tally("from-agent") >= 1,
        "the agent's connection is counted"
    );
    assert!(tally("host") >= 1, "the node's probe is counted");
    let endpoints = hooked["endpoints"].as_array().expect("endpoints").clone();
    let strict_ep = endpoints
        .iter()
        .find(|e| e["workload"] == "shop/b1")
        .expect("b1");
    assert_eq!(strict_ep["mtls"], "strict", "{strict_ep:#}");
    assert_eq!(strict_ep["tc_hooked"], true, "{strict_ep:#}");
    let outside_ep = endpoints
        .iter()
        .find(|e| e["workload"] == "outside/b3")
        .expect("b3");
    // Every local pod gets the pod programs (network policy applies to all).
    assert_eq!(outside_ep["tc_hooked"], true, "{outside_ep:#}");
}

/// Istio's `PeerAuthentication`: mesh-wide STRICT from the root namespace
/// (`trellis-system`), a namespace's PERMISSIVE over it, a workload's port
/// made PERMISSIVE under it (`portLevelMtls`, in the kernel's per-pod
/// ports), and a change applied to running agents: plaintext from outside
/// the mesh reaches exactly the pods and ports that allow it.
#[test]
fn peer_authentication_sets_modes_per_mesh_namespace_workload_and_port() {
    let mut lab = Lab::new("mtls_pa").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let meshed_client = lab.add_pod(&a, "a1").expect("pod");
    let outsider = lab.add_pod(&a, "a2").expect("pod");
    let web = lab.add_pod(&b, "b1").expect("pod");
    let db = lab.add_pod(&b, "b2").expect("pod");
    let lax = lab.add_pod(&b, "b3").expect("pod");
    let _servers: Vec<_> = [(&web, 7000), (&web, 7001), (&db, 7000), (&lax, 7000)]
        .iter()
        .map(|(p, port)| {
            p.serve(py::NAME_SERVER, &[&p.name, &port.to_string()], *port)
                .expect("server")
        })
        .collect();
    let web_policy = |spec: &str| mesh::peer_authentication("shop", "web", spec);
    let mut docs = vec![
        mesh::node(&a),
        mesh::node(&b),
        mesh::namespace("shop", true),
        mesh::namespace("lax", true),
        mesh::namespace("outside", false),
        mesh::pod(&meshed_client, "shop", &[], &[], ""),
        mesh::pod(&outsider, "outside", &[], &[], ""),
        mesh::pod(&web, "shop", &[("app", "web")], &[], ""),
        mesh::pod(&db, "shop", &[("app", "db")], &[], ""),
        mesh::pod(&lax, "lax", &[], &[], ""),
        mesh::peer_authentication("trellis-system", "default", "{mtls: {mode: STRICT}}"),
        mesh::peer_authentication("lax", "lax", "{mtls: {mode: PERMISSIVE}}"),
        // The pod's mode stays the mesh's (UNSET); its port 7001 is open.
        web_policy(
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {'7001': {mode: PERMISSIVE}}}",
        ),
    ];
    let cluster = mesh::Cluster::start(lab.name(), &[&a, &b], &docs).expect("agents");
    let agent_b = &cluster.agents[1];
    let (web_ip, db_ip, lax_ip) = (web.ip.to_string(), db.ip.to_string(), lax.ip.to_string());
    let check = |table: &[(&str, &Exec, &str, u16, &str)]| {
        let wrong: Vec<String> = table
            .iter()
            .filter_map(|(who, exec, ip, port, want)| {
                let got = call_port(exec, ip, *port);
                (got != *want).then(|| format!("{who} → {ip}:{port}: got {got}, want {want}"))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{wrong:#?}\n--- b\n{}",
            agent_b.log_text()
        );
    };
    let (meshed, outside) = (meshed_client.exec(), outsider.exec());
    check(&[
        ("meshed pod, HBONE", &meshed, &web_ip, 7000, "b1"),
        ("meshed pod, HBONE", &meshed, &web_ip, 7001, "b1"),
        ("outsider, strict pod", &outside, &web_ip, 7000, "DROPPED"),
        (
            "outsider, its permissive port",
            &outside,
            &web_ip,
            7001,
            "b1",
        ),
        (
            "outsider, mesh-wide strict",
            &outside,
            &db_ip,
            7000,
            "DROPPED",
        ),
        (
            "outsider, permissive namespace",
            &outside,
            &lax_ip,
            7000,
            "b3",
        ),
    ]);
    let workloads = agent_b.cli_json("workloads").expect("workloads");
    let endpoint = |name: &str| {
        workloads["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["workload"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {workloads:#}"))
    };
    let web_ep = endpoint("shop/b1");
    assert_eq!(web_ep["mtls"], "strict", "{web_ep:#}");
    assert_eq!(web_ep["mtls_ports"]["7001"], "permissive", "{web_ep:#}");
    assert_eq!(endpoint("lax/b3")["mtls"], "permissive");

    // The workload's own mode, now PERMISSIVE, with its port 7001 STRICT:
    // the running agents apply it.
    let last = docs.len() - 1;
    docs[last] = web_policy(
        "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {'7001': {mode: STRICT}}}",
    );
    cluster
        .config()
        .write("mesh.yaml", &mesh::docs(&docs))
        .expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while call_port(&outside, &web_ip, 7000) != "b1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the workload's new mode\n{}",
            agent_b.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    check(&[
        (
            "outsider, its strict port",
            &outside,
            &web_ip,
            7001,
            "DROPPED",
        ),
        ("meshed pod, its strict port", &meshed, &web_ip, 7001, "b1"),
        (
            "outsider, mesh-wide strict",
            &outside,
            &db_ip,
            7000,
            "DROPPED",
        ),
    ]);
    // What `trellis policy` shows of them.
    let policies = agent_b.cli_json("policy").expect("policy");
    assert!(
        policies["peer_authentication"]
            .as_array()
            .expect("peer authentication")
            .iter()
            .any(|p| p["name"] == "web"
                && p["mode"] == "PERMISSIVE"
                && p["ports"]["7001"] == "STRICT"),
        "{policies:#}"
    );
    let text = agent_b.cli(&["policy"]).expect("policy text");
    assert!(
        text.contains("PEER AUTHENTICATION") && text.contains("7001 STRICT"),
        "{text}"
    );
}
