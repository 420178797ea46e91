//! Kubernetes NetworkPolicy, the way the upstream network-policy e2e suite
//! checks it: namespaces x and y (in the mesh) and z (not), each with pods
//! a, b and c (a and c on node a, b on node b), each serving TCP and UDP on
//! 80 and 81. For each case the test applies the policies, probes every one
//! of the 81 pod pairs on the ports in question with a real client inside
//! the source pod, and compares the whole reachability matrix with the
//! expected one (printed on a mismatch). A pod probing itself goes over
//! loopback and is always allowed, as upstream's `AllowLoopback`.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use trellis_tests::{Lab, Node, Pod, mesh, process::ChildGuard, py};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NAMES: [&str; 3] = ["a", "b", "c"];
const PROBE_TIMEOUT: &str = "1.5";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

use Proto::{Tcp, Udp};

/// A pod of the matrix, or (`ns` "node") node b's own address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct P {
    ns: &'static str,
    name: &'static str,
}

impl P {
    fn id(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
    fn on_node_b(&self) -> bool {
        self.name == "b"
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Allow,
    Deny,
    /// Denied by the source's egress policy at connect()/sendto(): EPERM.
    Eperm,
}

fn want(allowed: bool) -> Want {
    if allowed { Want::Allow } else { Want::Deny }
}

type Expect = Box<dyn Fn(P, P, u16, Proto) -> Want>;

struct Case {
    name: &'static str,
    policies: Vec<String>,
    probes: &'static [(u16, Proto)],
    /// Also probe node b's address (a server in its namespace).
    node_target: bool,
    expect: Expect,
}

const TCP80: &[(u16, Proto)] = &[(80, Tcp)];
const ALL: &[(u16, Proto)] = &[(80, Tcp), (81, Tcp), (80, Udp), (81, Udp)];
const TCP_BOTH: &[(u16, Proto)] = &[(80, Tcp), (81, Tcp)];

struct World {
    pods: Vec<(P, Pod)>,
    node_b: Node,
    cluster: mesh::Cluster,
    /// The policies written last.
    applied: std::cell::RefCell<Vec<String>>,
    _servers: Vec<ChildGuard>,
}

impl World {
    fn pod_ip(&self, p: P) -> String {
        if p.ns == "node" {
            return self.node_b.ip.to_string();
        }
        self.pods
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, pod)| pod.ip.to_string())
            .expect("a matrix pod")
    }

    fn fingerprints(&self) -> Vec<String> {
        self.cluster
            .agents
            .iter()
            .map(|a| {
                a.cli_json("status").expect("status")["policy"]["fingerprint"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// Writes the policies and waits until every agent applies them.
    fn apply(&self, policies: &[String]) {
        if *self.applied.borrow() == policies {
            return;
        }
        *self.applied.borrow_mut() = policies.to_vec();
        let before = self.fingerprints();
        if policies.is_empty() {
            let _ = self.cluster.config().remove("netpol.yaml");
        } else {
            self.cluster
                .config()
                .write("netpol.yaml", &mesh::docs(policies))
                .expect("write policies");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.fingerprints();
            if now.iter().zip(&before).all(|(n, b)| n != b) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agents did not apply the policies: {before:?} → {now:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Probes every (source, target, port) at once; the outcome of each.
    fn probe(
        &self,
        probes: &[(u16, Proto)],
        node_target: bool,
    ) -> BTreeMap<(P, P, u16, Proto), String> {
        let mut targets: Vec<P> = self.pods.iter().map(|(p, _)| *p).collect();
        if node_target {
            targets.push(P {
                ns: "node",
                name: "b",
            });
        }
        let mut runs = Vec::new();
        for (src, pod) in &self.pods {
            let mut args = vec![PROBE_TIMEOUT.to_owned()];
            let mut labels = BTreeMap::new();
            for dst in &targets {
                for (i, (port, proto)) in probes.iter().enumerate() {
                    let label = format!("{}-{}-{i}", dst.ns, dst.name);
                    let proto_name = if *proto == Tcp { "TCP" } else { "UDP" };
                    args.push(format!(
                        "{label},{},{port},{proto_name},{}",
                        self.pod_ip(*dst),
                        server_name(*dst)
                    ));
                    labels.insert(label, (*dst, *port, *proto));
                }
            }
            let mut cmd = pod.exec().command("python3").expect("command");
            cmd.arg("-c")
                .arg(py::NETPOL_PROBE)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            runs.push((*src, labels, ChildGuard::spawn(&mut cmd).expect("prober")));
        }
        let mut out = BTreeMap::new();
        for (src, labels, child) in runs {
            let output = child
                .wait_output(Duration::from_secs(30))
                .expect("prober ends");
            let text = String::from_utf8_lossy(&output.stdout);
            for line in text.lines() {
                let (label, result) = line.split_once(' ').expect("LABEL RESULT");
                let (dst, port, proto) = labels[label];
                out.insert((src, dst, port, proto), result.to_owned());
            }
            assert_eq!(
                out.keys().filter(|(s, ..)| *s == src).count(),
                labels.len(),
                "prober in {} printed {text:?}, stderr {:?}",
                src.id(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        out
    }

    /// Runs a case; the mismatch report when the matrix is not as expected.
    fn check(&self, case: &Case) -> Option<String> {
        self.apply(&case.policies);
        let got = self.probe(case.probes, case.node_target);
        let mut wrong = Vec::new();
        for (&(src, dst, port, proto), result) in &got {
            let w = if src == dst {
                Want::Allow
            } else {
                (case.expect)(src, dst, port, proto)
            };
            let ok = match w {
                Want::Allow => result == "OK",
                Want::Deny => result != "OK",
                Want::Eperm => result == "EPERM",
            };
            if !ok {
                wrong.push(format!(
                    "{} → {} {port}/{proto:?}: want {w:?}, got {result}",
                    src.id(),
                    dst.id()
                ));
            }
        }
        if wrong.is_empty() {
            eprintln!("case {}: {} probes as expected", case.name, got.len());
            return None;
        }
        Some(format!(
            "case {}: {} of {} probes wrong:\n  {}\n{}",
            case.name,
            wrong.len(),
            got.len(),
            wrong.join("\n  "),
            matrix(&got, case.probes)
        ))
    }
}

fn server_name(p: P) -> String {
    format!("{}-{}", p.ns, p.name)
}

/// The reachability matrix, one table per port: `.` reachable, `X` not,
/// `E` refused with EPERM.
fn matrix(got: &BTreeMap<(P, P, u16, Proto), String>, probes: &[(u16, Proto)]) -> String {
    let mut text = String::new();
    let dsts: std::collections::BTreeSet<P> = got.keys().map(|k| k.1).collect();
    for (port, proto) in probes {
        text += &format!("{port}/{proto:?}   ");
        for d in &dsts {
            text += &format!("{:>5}", d.id());
        }
        text += "\n";
        let mut srcs: Vec<P> = got.keys().map(|k| k.0).collect();
        srcs.dedup();
        for s in srcs {
            text += &format!("{:>8}", s.id());
            for d in &dsts {
                let mark = match got.get(&(s, *d, *port, *proto)).map(String::as_str) {
                    Some("OK") => ".",
                    Some("EPERM") => "E",
                    Some(_) => "X",
                    None => "?",
                };
                text += &format!("{mark:>5}");
            }
            text += "\n";
        }
    }
    text
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    mesh::network_policy(ns, name, spec)
}

fn cases(world: &World) -> Vec<Case> {
    let node_b_pods = "10.1.2.0/24";
    let xb_ip = world.pod_ip(P { ns: "x", name: "b" });
    let xa = P { ns: "x", name: "a" };
    let is = move |p: P, ns: &str, name: &str| p.ns == ns && p.name == name;
    vec![
        Case {
            name: "no policy: everything reachable",
            policies: vec![],
            probes: ALL,
            node_target: false,
            expect: Box::new(|_, _, _, _| Want::Allow),
        },
        Case {
            name: "default deny ingress in x",
            policies: vec![np("x", "deny", "{podSelector: {}, policyTypes: [Ingress]}")],
            probes: ALL,
            node_target: false,
            expect: Box::new(|_, d, _, _| want(d.ns != "x")),
        },
        Case {
            name: "deny ingress to x/a only",
            policies: vec![np(
                "x",
                "deny-a",
                "{podSelector: {matchLabels: {pod: a}}, ingress: []}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |_, d, _, _| want(d != xa)),
        },
        Case {
            name: "default deny egress in x, DNS-like UDP 81 allowed",
            policies: vec![np(
                "x",
                "deny-egress",
                "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: 81, protocol: UDP}]}]}",
            )],
            probes: ALL,
            node_target: false,
            expect: Box::new(|s, _, port, proto| {
                if s.ns != "x" || (port == 81 && proto == Udp) {
                    Want::Allow
                } else {
                    Want::Eperm
                }
            }),
        },
        Case {
            name: "allow x/a from namespace y by label",
            policies: vec![np(
                "x",
                "from-y",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| want(d != xa || s.ns == "y")),
        },
        Case {
            name: "policy updated in place: from y becomes from z",
            policies: vec![np(
                "x",
                "from-y",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| want(d != xa || s.ns == "z")),
        },
        Case {
            name: "allow x/a from pod b of its namespace",
            policies: vec![np(
                "x",
                "from-b",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| want(d != xa || is(s, "x", "b"))),
        },
        Case {
            name: "pod and namespace selector together (one peer)",
            policies: vec![np(
                "x",
                "together",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}, podSelector: {matchLabels: {pod: b}}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| want(d != xa || is(s, "y", "b"))),
        },
        Case {
            name: "pod and namespace selector as two peers",
            policies: vec![np(
                "x",
                "apart",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}, {podSelector: {matchLabels: {pod: b}}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| want(d != xa || s.ns == "y" || is(s, "x", "b"))),
        },
        Case {
            name: "namespace selector with NotIn",
            policies: vec![np(
                "x",
                "not-x",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| want(d != xa || s.ns != "x")),
        },
        Case {
            name: "any namespace, pods c only",
            policies: vec![np(
                "x",
                "any-c",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| want(d != xa || s.name == "c")),
        },
        Case {
            name: "ingress on TCP 80 only",
            policies: vec![np(
                "x",
                "port-80",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{ports: [{port: 80}]}]}",
            )],
            probes: ALL,
            node_target: false,
            expect: Box::new(move |_, d, port, proto| {
                want(d != xa || (port == 80 && proto == Tcp))
            }),
        },
        Case {
            name: "named ports: serve-81-tcp and serve-80-udp",
            policies: vec![np(
                "x",
                "named",
                "{podSelector: {}, ingress: [{ports: [{port: serve-81-tcp}, {port: serve-80-udp, protocol: UDP}]}]}",
            )],
            probes: ALL,
            node_target: false,
            expect: Box::new(|_, d, port, proto| {
                want(d.ns != "x" || (port == 81 && proto == Tcp) || (port == 80 && proto == Udp))
            }),
        },
        Case {
            name: "endPort range 80-81 TCP",
            policies: vec![np(
                "x",
                "range",
                "{podSelector: {}, ingress: [{ports: [{port: 80, endPort: 81, protocol: TCP}]}]}",
            )],
            probes: ALL,
            node_target: false,
            expect: Box::new(|_, d, _, proto| want(d.ns != "x" || proto == Tcp)),
        },
        Case {
            name: "endPort range 81-90 UDP",
            policies: vec![np(
                "x",
                "range-udp",
                "{podSelector: {}, ingress: [{ports: [{port: 81, endPort: 90, protocol: UDP}]}]}",
            )],
            probes: ALL,
            node_target: false,
            expect: Box::new(|_, d, port, proto| want(d.ns != "x" || (proto == Udp && port == 81))),
        },
        Case {
            name: "two policies select x/a: union",
            policies: vec![
                np(
                    "x",
                    "from-y",
                    "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}",
                ),
                np(
                    "x",
                    "from-z",
                    "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]}]}",
                ),
            ],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| want(d != xa || s.ns != "x")),
        },
        Case {
            name: "ipBlock with except",
            policies: vec![np(
                "x",
                "block",
                &format!(
                    "{{podSelector: {{matchLabels: {{pod: a}}}}, ingress: [{{from: [{{ipBlock: {{cidr: {node_b_pods}, except: [{xb_ip}/32]}}}}]}}]}}"
                ),
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| {
                want(d != xa || (s.on_node_b() && !is(s, "x", "b")))
            }),
        },
        Case {
            name: "egress to an ipBlock (node b's pods)",
            policies: vec![np(
                "x",
                "egress-block",
                &format!(
                    "{{podSelector: {{matchLabels: {{pod: a}}}}, policyTypes: [Egress], egress: [{{to: [{{ipBlock: {{cidr: {node_b_pods}}}}}]}}]}}"
                ),
            )],
            probes: &[(80, Tcp), (80, Udp)],
            node_target: false,
            expect: Box::new(move |s, d, _, _| {
                if s != xa || d.on_node_b() {
                    Want::Allow
                } else {
                    Want::Eperm
                }
            }),
        },
        Case {
            name: "egress to an ipBlock outside the cluster CIDR",
            policies: vec![np(
                "x",
                "egress-outside",
                "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.255.0.0/24}}]}]}",
            )],
            probes: TCP80,
            node_target: true,
            expect: Box::new(move |s, d, _, _| {
                if s != xa || d.ns == "node" {
                    Want::Allow
                } else {
                    Want::Eperm
                }
            }),
        },
        Case {
            name: "egress to namespace y only",
            policies: vec![np(
                "x",
                "egress-y",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(|s, d, _, _| {
                if s.ns != "x" || d.ns == "y" {
                    Want::Allow
                } else {
                    Want::Eperm
                }
            }),
        },
        Case {
            name: "egress to y on UDP 80 only",
            policies: vec![np(
                "x",
                "egress-y-udp",
                "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}], ports: [{port: 80, protocol: UDP}]}]}",
            )],
            probes: ALL,
            node_target: false,
            expect: Box::new(move |s, d, port, proto| {
                if s != xa || (d.ns == "y" && port == 80 && proto == Udp) {
                    Want::Allow
                } else {
                    Want::Eperm
                }
            }),
        },
        Case {
            name: "egress by named port (the peer's serve-81-tcp)",
            policies: vec![np(
                "x",
                "egress-named",
                "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{ports: [{port: serve-81-tcp}]}]}",
            )],
            probes: TCP_BOTH,
            node_target: false,
            expect: Box::new(move |s, _, port, _| {
                if s != xa || port == 81 {
                    Want::Allow
                } else {
                    Want::Eperm
                }
            }),
        },
        Case {
            name: "ingress and egress in one policy",
            policies: vec![np(
                "x",
                "both",
                "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress, Egress], \
                 ingress: [{from: [{podSelector: {}}]}], egress: [{to: [{podSelector: {}}]}]}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(move |s, d, _, _| {
                if s == xa && d.ns != "x" {
                    Want::Eperm
                } else {
                    want(d != xa || s.ns == "x")
                }
            }),
        },
        Case {
            name: "meshed y: deny ingress except from z",
            policies: vec![np(
                "y",
                "from-z",
                "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]}]}",
            )],
            probes: &[(80, Tcp), (80, Udp)],
            node_target: false,
            expect: Box::new(|s, d, _, _| want(d.ns != "y" || s.ns == "z")),
        },
        Case {
            name: "plain z: default deny ingress",
            policies: vec![np("z", "deny", "{podSelector: {}, ingress: []}")],
            probes: &[(80, Tcp), (81, Udp)],
            node_target: false,
            expect: Box::new(|_, d, _, _| want(d.ns != "z")),
        },
        Case {
            name: "plain z: allow from x on TCP 81",
            policies: vec![np(
                "z",
                "from-x-81",
                "{podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}}], ports: [{port: 81}]}]}",
            )],
            probes: ALL,
            node_target: false,
            expect: Box::new(|s, d, port, proto| {
                want(d.ns != "z" || (s.ns == "x" && port == 81 && proto == Tcp))
            }),
        },
        Case {
            name: "plain z: egress only within z",
            policies: vec![np(
                "z",
                "egress-z",
                "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{podSelector: {}}]}]}",
            )],
            probes: &[(80, Tcp), (80, Udp)],
            node_target: false,
            expect: Box::new(|s, d, _, _| {
                if s.ns != "z" || d.ns == "z" {
                    Want::Allow
                } else {
                    Want::Eperm
                }
            }),
        },
        Case {
            name: "matchExpressions: deny ingress to pods a and b of x",
            policies: vec![np(
                "x",
                "deny-ab",
                "{podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}, ingress: []}",
            )],
            probes: TCP80,
            node_target: false,
            expect: Box::new(|_, d, _, _| want(d.ns != "x" || d.name == "c")),
        },
        Case {
            name: "default deny plus allow-all ingress: union allows",
            policies: vec![
                np("x", "deny", "{podSelector: {}, ingress: []}"),
                np("x", "allow-all", "{podSelector: {}, ingress: [{}]}"),
            ],
            probes: TCP80,
            node_target: false,
            expect: Box::new(|_, _, _, _| Want::Allow),
        },
        Case {
            name: "ingress UDP only, any port",
            policies: vec![np(
                "x",
                "udp-only",
                "{podSelector: {}, ingress: [{ports: [{protocol: UDP}]}]}",
            )],
            probes: ALL,
            node_target: false,
            expect: Box::new(|_, d, _, proto| want(d.ns != "x" || proto == Udp)),
        },
        Case {
            name: "policies deleted: everything reachable again",
            policies: vec![],
            probes: ALL,
            node_target: false,
            expect: Box::new(|_, _, _, _| Want::Allow),
        },
    ]
}

#[test]
fn network_policy_reachability_matrix() {
    let mut lab = Lab::new("netpol").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let mut pods = Vec::new();
    let mut docs = vec![
        mesh::node(&a),
        mesh::node(&b),
        mesh::namespace("x", true),
        mesh::namespace("y", true),
        mesh::namespace("z", false),
    ];
    let mut servers = Vec::new();
    for ns in NAMESPACES {
        for name in NAMES {
            let node = if name == "b" { &b } else { &a };
            let pod = lab.add_pod(node, &format!("{ns}{name}")).expect("pod");
            let p = P { ns, name };
            docs.push(mesh::pod(
                &pod,
                ns,
                &[("pod", name)],
                &[
                    ("serve-80-tcp", 80),
                    ("serve-81-tcp", 81),
                    ("serve-80-udp", 80),
                    ("serve-81-udp", 81),
                ],
                "",
            ));
            servers.push(
                pod.exec()
                    .python(py::NETPOL_SERVER, &[&server_name(p)])
                    .expect("server"),
            );
            pods.push((p, pod));
        }
    }
    servers.push(
        b.exec()
            .python(
                py::NETPOL_SERVER,
                &[&server_name(P {
                    ns: "node",
                    name: "b",
                })],
            )
            .expect("node server"),
    );
    for (_, pod) in &pods {
        pod.exec()
            .wait_port(&pod.ip.to_string(), 81, Duration::from_secs(10))
            .expect("server up");
    }
    let cluster = mesh::Cluster::start(lab.name(), &[&a, &b], &docs).expect("agents");
    let world = World {
        pods,
        node_b: b.clone(),
        cluster,
        applied: std::cell::RefCell::new(Vec::new()),
        _servers: servers,
    };

    let mut failures = Vec::new();
    let cases = cases(&world);
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for case in &cases {
        if let Some(report) = world.check(case) {
            eprintln!("{report}");
            failures.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
