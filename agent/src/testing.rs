//! Helpers for the unit tests.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::state::{Workload, model::MtlsMode};

/// A fresh folder under the system's temp folder, removed on drop. Names are
/// unique within the test process (tests run in parallel in one process).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("trellis-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp folder");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SplitMix64: the cases come from a seed, so a failure names its case.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Cases per run of a generated test: `default`, or the number the
/// environment variable `var` gives.
pub fn cases(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// A meshed, ready, permissive pod on node `a`, without addresses.
pub fn workload(
    namespace: &str,
    name: &str,
    service_account: &str,
    labels: &[(&str, &str)],
) -> Workload {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Workload {
        namespace: namespace.into(),
        name: name.into(),
        uid: String::new(),
        service_account: service_account.into(),
        node: "a".into(),
        labels: std::sync::Arc::new(labels),
        ips: vec![],
        netns: None,
        meshed: true,
        mtls: MtlsMode::Permissive,
        mtls_ports: BTreeMap::new(),
        ready: true,
        terminating: false,
        named_ports: BTreeMap::new(),
        label_set: 0,
    }
}

/// An object's metadata: `namespace/name`, made `age` seconds before a
/// fixed instant (the older of two policies at one level wins).
pub fn meta(namespace: &str, name: &str, age: i64) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta {
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 - age).expect("a time"),
        )),
        ..kube::api::ObjectMeta::default()
    }
}
