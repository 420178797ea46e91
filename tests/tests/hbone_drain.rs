//! Shutdown drains HBONE tunnels: on SIGTERM the destination node's agent
//! sends GOAWAY, lets running streams go on for the drain time, then exits
//! cleanly, closing what is still open.

use std::time::{Duration, Instant};

use trellis_tests::{Lab, mesh, py};

#[test]
fn sigterm_sends_goaway_and_running_streams_finish_within_the_drain_time() {
    let mut lab = Lab::new("hbone_drain").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let _echo = server
        .serve(py::ECHO_SERVER, &["7000"], 7000)
        .expect("echo server");
    let mut cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&server, "shop", &[("app", "echo")], &[], ""),
        ],
    )
    .expect("agents");

    // Two tunnelled connections for 4 s: "busy" pings every 200 ms and then
    // closes; "quiet" stays open, waiting.
    let exec = client.exec();
    let ip = server.ip.to_string();
    let pair = std::thread::spawn(move || {
        exec.python_output(py::IDLE_PAIR, &[&ip, "7000", "4"], Duration::from_secs(30))
    });
    std::thread::sleep(Duration::from_secs(1));
    let status = cluster.agents[1].cli_json("status").expect("status b");
    // Both connections started at once: one or two tunnels (dials race).
    assert!(
        status["inbound"]["open"].as_u64() >= Some(1),
        "tunnels open: {status:#}"
    );

    // SIGTERM b's agent while both streams run.
    let started = Instant::now();
    let exit = cluster.agents[1].terminate().expect("agent b exits");
    let took = started.elapsed();
    assert!(exit.success(), "{exit}");
    let out: serde_json::Value =
        serde_json::from_str(&pair.join().expect("thread").expect("pair")).expect("json");
    let log = cluster.agents[1].log_text();
    // The busy stream kept working through the drain, to its own end.
    assert_eq!(out["busy_errors"], serde_json::json!([]), "{out}\n{log}");
    assert!(out["busy_ok"].as_u64() >= Some(10), "{out}");
    // The quiet one outlived the drain time and was closed at its end (not
    // left hanging until the client's own timeout).
    let quiet = out["quiet"].as_str().unwrap_or_default();
    assert!(quiet == "closed" || quiet.contains("Reset"), "{out}");
    // The agent waited for the running streams rather than exiting at once,
    // and no longer than its drain time allows.
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(9),
        "drain took {took:?}"
    );
    assert!(log.contains("draining HBONE tunnels"), "{log}");
    assert!(log.contains("drain time is up"), "{log}");
}
