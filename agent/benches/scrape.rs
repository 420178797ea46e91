//! A scrape of a busy node: issue 7's goal is under 50 ms for 1,000
//! workloads and 10,000 series. The registry holds Istio's families with a
//! TCP label set per workload (4 series each, the L4 traffic most
//! workloads have) and request label sets (49 series each: the counter and
//! three histograms) until 10,000 series; the benchmark is the OpenMetrics
//! encoding `/metrics` does on every scrape. Beside it, the cost the L7
//! path pays per request for its metrics on that busy node (issue 7: metrics
//! on may cost at most 2% of requests per agent CPU second).

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use prometheus_client::registry::Registry;
use trellis_agent::metrics::istio::{
    IstioMetrics, Peer, Reporter, Request, RequestLabels, ServiceName, TcpLabels, Traffic,
};
use trellis_agent::{
    access_log::{Entry, RequestLine},
    policy::telemetry::{Reporting, Side, Telemetries, Telemetry, TelemetryPolicy, TelemetrySpec},
};

const WORKLOADS: usize = 1_000;
const SERIES: usize = 10_000;

fn peer(i: usize) -> Arc<Peer> {
    let ns = format!("ns{}", i % 20);
    Arc::new(Peer {
        workload: format!("workload-{i}"),
        principal: format!("spiffe://cluster.local/ns/{ns}/sa/sa-{i}"),
        app: format!("app-{i}"),
        version: "v1".into(),
        canonical_service: format!("app-{i}"),
        canonical_revision: "v1".into(),
        namespace: ns,
    })
}

/// The registry, and the number of series its exposition has.
fn busy_node() -> (Registry, usize) {
    let mut registry = Registry::default();
    let metrics = IstioMetrics::register(&mut registry);
    let peers: Vec<Arc<Peer>> = (0..WORKLOADS).map(peer).collect();
    let traffic = |i: usize, protocol| {
        let dst = &peers[i % WORKLOADS];
        Traffic::new(
            Reporter::Destination,
            peers[(i * 7 + 1) % WORKLOADS].clone(),
            dst.clone(),
            Arc::new(ServiceName::of(&format!(
                "{}/{}",
                dst.namespace, dst.canonical_service
            ))),
            protocol,
            true,
        )
    };
    for i in 0..WORKLOADS {
        let labels = TcpLabels {
            traffic: traffic(i, "tcp"),
            flags: "-",
            relabelled: None,
        };
        let everything = Reporting::default();
        metrics.tcp_opened(&labels, &everything, None);
        metrics.tcp_closed(&labels, (1_000, 20_000), &everything, None);
    }
    let count = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encodes");
        text.lines().filter(|l| !l.starts_with('#')).count()
    };
    let mut i = 0;
    while count(&registry) < SERIES {
        // 49 series per label set: check every 20.
        for _ in 0..20 {
            let labels = RequestLabels {
                traffic: traffic(i, "http"),
                response_code: if i % 5 == 0 { 503 } else { 200 },
                grpc_status: None,
                flags: "-",
                relabelled: None,
            };
            metrics.request(
                &Request {
                    labels: &labels,
                    duration_ms: 3.0,
                    request_bytes: 100,
                    response_bytes: 2_000,
                    messages: None,
                },
                &Reporting::default(),
                None,
            );
            i += 1;
        }
    }
    let series = count(&registry);
    (registry, series)
}

fn scrape(c: &mut Criterion) {
    let (registry, series) = busy_node();
    eprintln!("scrape: {WORKLOADS} workloads, {series} series");
    c.bench_function("scrape/1000_workloads_10000_series", |b| {
        b.iter(|| {
            let mut text = String::with_capacity(64 * 1024);
            prometheus_client::encoding::text::encode(&mut text, black_box(&registry))
                .expect("encodes");
            black_box(text)
        });
    });
}

fn record(c: &mut Criterion) {
    let mut registry = Registry::default();
    let metrics = IstioMetrics::register(&mut registry);
    // A thousand pairs of pods already counted; then one pair's requests
    // recorded one after another, as a keep-alive connection's are.
    let peers: Vec<Arc<Peer>> = (0..WORKLOADS).map(peer).collect();
    for i in 0..WORKLOADS {
        let dst = &peers[(i + 1) % WORKLOADS];
        let service = format!("{}/svc-{i}", dst.namespace);
        let labels = request_labels((&peers[i], dst), &service, Reporter::Source, false);
        metrics.request(
            &Request {
                labels: &labels,
                duration_ms: 0.2,
                request_bytes: 100,
                response_bytes: 1_100,
                messages: None,
            },
            &Reporting::default(),
            None,
        );
    }
    let labels = request_labels((&peers[3], &peers[4]), "ns4/svc-3", Reporter::Source, false);
    time_request(
        c,
        "record/one_request_among_1000_pairs",
        &metrics,
        &labels,
        (&Reporting::default(), None),
    );
}

/// A 200 answer's labels for a request from `src` to `dst` calling `service`.
fn request_labels(
    (src, dst): (&Arc<Peer>, &Arc<Peer>),
    service: &str,
    reporter: Reporter,
    mtls: bool,
) -> RequestLabels {
    RequestLabels {
        traffic: Traffic::new(
            reporter,
            src.clone(),
            dst.clone(),
            Arc::new(ServiceName::of(service)),
            "http",
            mtls,
        ),
        response_code: 200,
        grpc_status: None,
        flags: "-",
        relabelled: None,
    }
}

/// Times recording one request with `labels`, as `reporting` says.
fn time_request(
    c: &mut Criterion,
    name: &str,
    metrics: &IstioMetrics,
    labels: &RequestLabels,
    (reporting, entry): (&Reporting, Option<&Entry<'_>>),
) {
    c.bench_function(name, |b| {
        b.iter(|| {
            metrics.request(
                black_box(&Request {
                    labels,
                    duration_ms: 0.2,
                    request_bytes: 100,
                    response_bytes: 1_100,
                    messages: None,
                }),
                reporting,
                entry,
            )
        });
    });
}

/// The same request when its workload's Telemetry changes the labels of
/// every metric (one REMOVE, one UPSERT from a header): the label list is
/// made anew for each request.
fn record_relabelled(c: &mut Criterion) {
    let mut registry = Registry::default();
    let metrics = IstioMetrics::register(&mut registry);
    let spec: TelemetrySpec = serde_yaml_ng::from_str(
        "metrics: [{overrides: [{tagOverrides: {source_version: {operation: REMOVE}, \
         tenant: {value: \"request.headers['x-tenant']\"}}}]}]",
    )
    .expect("spec");
    let mut object = Telemetry::new("tenants", spec);
    object.metadata.namespace = Some("ns4".into());
    let reporting = Telemetries::new("trellis-system", vec![TelemetryPolicy::compile(&object)])
        .reporting_for("ns4", &Default::default(), Side::Server);
    let peers: Vec<Arc<Peer>> = (0..WORKLOADS).map(peer).collect();
    let labels = request_labels(
        (&peers[3], &peers[4]),
        "ns4/svc-3",
        Reporter::Destination,
        true,
    );
    let req = http::Request::builder()
        .uri("/items")
        .header("x-tenant", "acme")
        .body(())
        .expect("request");
    let line = RequestLine::of(&req, &reporting.headers);
    let entry = Entry {
        traffic: &labels.traffic,
        start: std::time::SystemTime::now(),
        duration: std::time::Duration::from_micros(200),
        upstream: None,
        route: None,
        bytes_in: 100,
        bytes_out: 1_100,
        response_code: Some(200),
        grpc_status: None,
        flags: "-",
        trace_id: None,
        request: Some(&line),
    };
    time_request(
        c,
        "record/one_request_relabelled",
        &metrics,
        &labels,
        (&reporting, Some(&entry)),
    );
}

criterion_group!(benches, scrape, record, record_relabelled);
criterion_main!(benches);
