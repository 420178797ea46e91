//! The agent with its state from the Kubernetes API (`--kubernetes
//! --kubeconfig`), against the stand-in API server of
//! `agent/tests/fixtures/fake_apiserver.py` (no real kube-apiserver can be
//! installed here) running in the node's namespace: the objects it serves
//! end in the kernel maps (a pod calls a Service, or a ServiceEntry's
//! address, and reaches its backend),
//! an outage leaves the data path serving while metrics and readiness say
//! the state is stale, and a Service added during the outage works once the
//! API is back.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_tests::{Agent, Lab, Node, mesh, py};

const SCRIPT: &str = include_str!("../../agent/tests/fixtures/fake_apiserver.py");
const PORT: u16 = 16443;

fn to_json(yaml: &str) -> Value {
    serde_yaml_ng::from_str(yaml).expect("YAML")
}

fn control(node: &Node, body: &Value) {
    let url = format!("http://127.0.0.1:{PORT}/__control");
    let body = body.to_string();
    let out = node
        .exec()
        .curl(&["-f", "-m", "5", "-X", "POST", "-d", &body, &url])
        .expect("curl");
    assert!(out.contains("\"ok\""), "control {body}: {out}");
}

fn apply(node: &Node, plural: &str, yaml: &str) {
    control(
        node,
        &json!({"op": "apply", "plural": plural, "object": to_json(yaml)}),
    );
}

/// `curl` from `client` to `url`: the body, or empty on failure.
fn call(client: &trellis_tests::Pod, url: &str) -> String {
    client.exec().curl(&["-m", "3", url]).expect("curl")
}

fn metric(node: &Node, name: &str) -> f64 {
    let url = format!("http://{}:15020/metrics", node.ip);
    node.exec()
        .curl(&["-m", "5", &url])
        .expect("curl")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

fn readiness(node: &Node) -> Value {
    node.readiness().1
}

/// Waits for `check`; the limit covers the watchers' longest backoff (30 s).
fn eventually(what: &str, check: impl Fn() -> bool) {
    trellis_tests::eventually(what, Duration::from_secs(45), check);
}

#[test]
fn state_from_the_api_server_reaches_the_maps_and_survives_an_outage() {
    let mut lab = Lab::new("kubernetes").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&a, "a2").expect("pod");
    let _web = server
        .serve(py::NAME_SERVER, &["web", "8080"], 8080)
        .expect("server");
    let _api = a
        .exec()
        .python(SCRIPT, &[&PORT.to_string()])
        .expect("fake API server");
    a.exec()
        .wait_port("127.0.0.1", PORT, Duration::from_secs(20))
        .expect("API up");
    apply(&a, "nodes", &mesh::node(&a));
    apply(&a, "namespaces", &mesh::namespace("shop", true));
    apply(
        &a,
        "pods",
        &mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
    );
    apply(
        &a,
        "pods",
        &mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
    );
    apply(
        &a,
        "services",
        &mesh::service("shop", "web", "10.96.0.50", 80, "8080", &[("app", "web")]),
    );

    // A service outside the cluster, known by its ServiceEntry alone.
    apply(
        &a,
        "serviceentries",
        &format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: ServiceEntry\n\
             metadata: {{name: partner, namespace: shop}}\n\
             spec: {{hosts: [partner.example], addresses: [192.0.2.60], resolution: STATIC, \
             ports: [{{number: 80, name: http, targetPort: 8080}}], endpoints: [{{address: {}}}]}}\n",
            server.ip
        ),
    );

    let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", lab.name()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{PORT}'}}}}]\n\
             users: [{{name: none, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: none}}}}]\n"
        ),
    )
    .expect("kubeconfig");
    let mut agent = Agent::start(
        &a,
        &[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().expect("UTF-8"),
        ],
    )
    .expect("agent");
    agent
        .wait_ready(Duration::from_secs(30))
        .expect("ready from the API's objects");
    assert_eq!(call(&client, "http://10.96.0.50/"), "web");
    assert_eq!(call(&client, "http://192.0.2.60/"), "web");
    assert_eq!(metric(&a, "trellis_state_stale_seconds"), 0.0);

    // The API server goes away: traffic keeps flowing, the state is stale.
    control(&a, &json!({"op": "down"}));
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let (stale, ready) = (metric(&a, "trellis_state_stale_seconds"), readiness(&a));
        let detail = ready["conditions"]["state"]["detail"]
            .as_str()
            .unwrap_or("");
        if stale > 10.0 && detail.starts_with("stale") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale in metrics and readiness: stale_seconds {stale}, readiness {ready}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        readiness(&a)["ready"],
        true,
        "stale, not broken: {}",
        readiness(&a)
    );
    assert_eq!(
        call(&client, "http://10.96.0.50/"),
        "web",
        "the data path keeps serving"
    );

    // A Service made during the outage works once the API is back.
    apply(
        &a,
        "services",
        &mesh::service("shop", "web2", "10.96.0.51", 80, "8080", &[("app", "web")]),
    );
    control(&a, &json!({"op": "up"}));
    eventually("the new Service in the maps", || {
        call(&client, "http://10.96.0.51/") == "web"
    });
    eventually("fresh again", || {
        metric(&a, "trellis_state_stale_seconds") == 0.0
            && readiness(&a)["conditions"]["state"]["detail"].is_null()
    });
    let _ = std::fs::remove_file(&kubeconfig);
}
