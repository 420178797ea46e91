//! The state at cluster scale: building a node's view from every object
//! (done again on each change the source reports) and the lookups each
//! proxied connection and request makes in it (a Service by VIP, by name; a
//! workload by name; the authorization policies that judge it), on a
//! cluster of 20,000 pods, 2,000 Services, 200 HTTPRoutes and 500
//! AuthorizationPolicies. Before the timings it prints the heap the
//! objects and the snapshot take (a source keeps the one, the proxies
//! read the other).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
};

use criterion::{Criterion, criterion_group, criterion_main};
use trellis_agent::{
    identity::Identity,
    policy::authz::{Caller, Verdict, authorize},
    state::{Object, Snapshot, memo::Memo, objects::parse_file},
};

/// The system allocator, counting the bytes live (a relaxed add per call:
/// a few nanoseconds against the hundreds each build's allocation takes).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes `make` leaves live, and what it made.
fn heap<T>(make: impl FnOnce() -> T) -> (f64, T) {
    let before = LIVE.load(Ordering::Relaxed);
    let made = make();
    let after = LIVE.load(Ordering::Relaxed);
    (
        after.saturating_sub(before) as f64 / f64::from(1 << 20),
        made,
    )
}

use trellis_agent::state::synthetic::{PODS_PER_SERVICE, cluster_yaml, pod_ip, vip};

fn cluster(slices: bool) -> Vec<Object> {
    let parsed =
        parse_file(Path::new("cluster.yaml"), &cluster_yaml(slices)).expect("the cluster parses");
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    parsed.objects
}

fn benches(c: &mut Criterion) {
    let (objects_mib, objects) = heap(|| cluster(true));
    let (snapshot_mib, snap) = heap(|| Snapshot::build("n1", &objects));
    println!(
        "state/heap: {} objects {objects_mib:.1} MiB, their snapshot {snapshot_mib:.1} MiB",
        objects.len()
    );
    drop((snap, objects));
    for (slices, name) in [(false, "selectors"), (true, "endpoint slices")] {
        let objects = cluster(slices);
        let snap = Snapshot::build("n1", &objects);
        assert_eq!(snap.workloads.len(), trellis_agent::state::synthetic::PODS);
        let (svc, _) = snap
            .service_for(format!("{}:80", vip(99, 19)).parse().expect("addr"))
            .expect("the last Service by its VIP");
        assert_eq!(svc.backends[&80].len(), PODS_PER_SERVICE);
        let routed = snap.routes.port("ns-99/svc-1", 80).expect("a route");
        assert_eq!(routed.for_client("ns-0").map(<[_]>::len), Some(1));
        c.bench_function(
            &format!("state/build 20k pods, 2k Services, 200 routes ({name})"),
            |b| b.iter(|| Snapshot::build("n1", black_box(&objects))),
        );
        // What a change costs with what the last build made kept: one pod
        // added, then removed again, as a source hands them over (every
        // other object the same `Arc`).
        let extra = parse_file(
            Path::new("extra.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: ns-0, labels: {app: svc-0}}\n\
             spec: {nodeName: n3, containers: [{name: c}]}\nstatus: {podIP: 10.100.0.250}\n",
        )
        .expect("the pod parses")
        .objects;
        let with_extra: Vec<Object> = objects.iter().chain(&extra).cloned().collect();
        let mut memo = Memo::default();
        Snapshot::build_with("n1", &objects, &mut memo);
        let mut turn = 0usize;
        c.bench_function(
            &format!("state/rebuild after a pod is added or removed ({name})"),
            |b| {
                b.iter(|| {
                    turn += 1;
                    let now = if turn.is_multiple_of(2) {
                        &objects
                    } else {
                        &with_extra
                    };
                    Snapshot::build_with("n1", black_box(now), &mut memo)
                })
            },
        );
        println!("state/rebuild: {:?}", memo.last);
    }

    let snap = Snapshot::build("n1", &cluster(true));
    // The last Service and pod made: a scan in order finds them last.
    let vip: SocketAddr = format!("{}:80", vip(99, 19)).parse().expect("addr");
    c.bench_function("state/a Service by VIP (2k Services)", |b| {
        b.iter(|| snap.service_for(black_box(vip)).is_some())
    });
    c.bench_function("state/a Service by name (2k Services)", |b| {
        b.iter(|| snap.service(black_box("ns-99/svc-19")).is_some())
    });
    let last = format!("ns-99/svc-19-{}", PODS_PER_SERVICE - 1);
    c.bench_function("state/a workload by name (20k pods)", |b| {
        b.iter(|| snap.workload(black_box(&last)).is_some())
    });
    // A pod of the last namespace calls one its policies select.
    let source = Identity::new("cluster.local", "ns-99", "default");
    let dst: SocketAddr = format!("{}:8080", pod_ip(99, 0, 0)).parse().expect("addr");
    let from = pod_ip(99, 0, 1).parse().expect("addr");
    assert_eq!(
        authorize(&snap, Caller::new(&source, from), dst),
        Verdict::Allow
    );
    let stranger = Identity::new("cluster.local", "ns-0", "default");
    assert!(matches!(
        authorize(&snap, Caller::new(&stranger, from), dst),
        Verdict::Deny { .. }
    ));
    c.bench_function("state/authorize a connection (500 policies)", |b| {
        b.iter(|| authorize(&snap, Caller::new(black_box(&source), from), black_box(dst)))
    });
}

criterion_group! {
    name = state;
    config = Criterion::default().sample_size(10);
    targets = benches
}
criterion_main!(state);
