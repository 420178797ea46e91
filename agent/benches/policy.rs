//! The user-space half of a network policy update: identities, ipcache
//! CIDR identities and the compiled policy entries, on worlds sized like
//! issue 5's goal (10,000 entries). The kernel half (writing the maps) is
//! measured on real maps by `cargo xtask bench policy`.

use std::{collections::BTreeMap, fmt::Write as _, hint::black_box, path::Path};

use criterion::{Criterion, criterion_group, criterion_main};
use trellis_agent::{
    policy::compiler::{Endpoints, Identities, compile},
    state::{Snapshot, objects::parse_file},
};

/// `servers` pods on node n1 (the local endpoints) and `clients` pods on
/// n2, each client its own label set; one policy lets every client reach
/// every server on `ports` ports, one entry per (server, client, port);
/// `cidrs` ipBlock peers besides.
fn world(servers: usize, clients: usize, ports: u16, cidrs: usize) -> Snapshot {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {kubernetes.io/metadata.name: bench}}\n",
    );
    let pod = |yaml: &mut String, name: String, node: &str, labels: String, ip: String| {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{{labels}}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
        );
    };
    for i in 0..servers {
        pod(
            &mut yaml,
            format!("server-{i}"),
            "n1",
            format!("app: server, idx: \"{i}\""),
            format!("10.1.0.{}", i + 10),
        );
    }
    for i in 0..clients {
        pod(
            &mut yaml,
            format!("client-{i}"),
            "n2",
            format!("role: client, id: \"{i}\""),
            format!("10.2.{}.{}", i / 200, i % 200 + 10),
        );
    }
    let ports: Vec<String> = (0..ports)
        .map(|p| format!("{{port: {}}}", 8000 + p))
        .collect();
    let blocks: Vec<String> = (0..cidrs)
        .map(|i| {
            format!(
                "{{ipBlock: {{cidr: 172.{}.{}.0/24}}}}",
                16 + i / 250,
                i % 250
            )
        })
        .collect();
    let mut peers = vec!["{podSelector: {matchLabels: {role: client}}}".to_owned()];
    peers.extend(blocks);
    let _ = write!(
        yaml,
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: clients, namespace: bench}}\n\
         spec: {{podSelector: {{matchLabels: {{app: server}}}}, ingress: [{{from: [{}], ports: [{}]}}]}}\n",
        peers.join(", "),
        ports.join(", ")
    );
    let parsed = parse_file(Path::new("bench.yaml"), &yaml).expect("bench world parses");
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    Snapshot::build("n1", &parsed.objects)
}

fn local_endpoints(snap: &Snapshot) -> BTreeMap<String, u32> {
    snap.local_workloads("n1")
        .enumerate()
        .map(|(i, w)| (w.id(), i as u32 + 1))
        .collect()
}

fn benches(c: &mut Criterion) {
    // 10 servers × 100 client identities × 10 ports = 10,000 entries.
    let snap = world(10, 100, 10, 0);
    let endpoints = local_endpoints(&snap);
    let services = BTreeMap::new();
    let ids = Identities::build(&snap);
    let entries = compile(&snap, &ids, &Endpoints(&endpoints), &services)
        .entries
        .len();
    assert!(entries >= 10_000, "{entries} entries");
    c.bench_function("policy/compile 10k entries (identities + entries)", |b| {
        b.iter(|| {
            let ids = Identities::build(black_box(&snap));
            compile(&snap, &ids, &Endpoints(&endpoints), &services)
        });
    });

    // The ipcache's CIDR identities: 1,000 pods against 1,000 policy CIDRs.
    let snap = world(10, 1_000, 1, 1_000);
    let ids = Identities::build(&snap);
    c.bench_function("policy/cidr identities of 1k pods, 1k CIDRs", |b| {
        b.iter(|| {
            snap.workloads
                .iter()
                .flat_map(|w| &w.ips)
                .map(|ip| ids.cidr_identity_of(black_box(*ip)))
                .fold(0u32, u32::wrapping_add)
        });
    });
}

criterion_group! {
    name = policy;
    config = Criterion::default().sample_size(20);
    targets = benches
}
criterion_main!(policy);
