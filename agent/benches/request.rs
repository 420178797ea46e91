//! What the L7 path adds to each request for correlation: an `x-request-id`
//! for a request without one (a random UUID written into its headers) and
//! the request line its access log entry keeps (shared, not copied). The
//! request is a typical HTTP/1.1 GET as hyper parses it.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use trellis_agent::access_log::{RequestLine, ensure_request_id};

fn request() -> http::Request<()> {
    http::Request::builder()
        .method("GET")
        .uri("/api/v1/items?page=2")
        .header("host", "web.shop.svc.cluster.local")
        .header("user-agent", "curl/8.5.0")
        .header("accept", "*/*")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(())
        .expect("request")
}

fn bench(c: &mut Criterion) {
    let req = request();
    c.bench_function("request_id/new", |b| {
        b.iter_batched(
            || req.headers().clone(),
            |mut headers| {
                ensure_request_id(&mut headers);
                headers
            },
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("request_id/kept", |b| {
        let mut given = req.headers().clone();
        given.insert("x-request-id", "from-the-caller".parse().expect("value"));
        b.iter(|| ensure_request_id(black_box(&mut given)))
    });
    c.bench_function("access_log/request_line", |b| {
        b.iter(|| RequestLine::of(black_box(&req), &[]))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
