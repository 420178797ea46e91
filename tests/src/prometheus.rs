//! An agent's Prometheus endpoint as the tests read it: parsed by the
//! Python OpenMetrics parser (so a scrape that is not valid OpenMetrics
//! fails the test), as `[name, labels, value]` samples.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Node, py};

/// Every sample of `node`'s agent: `[name, labels, value]`.
pub fn scrape(node: &Node) -> Vec<Value> {
    let out = node
        .exec()
        .python_output(
            py::SCRAPE,
            &[&format!("http://{}:15020/metrics", node.ip)],
            Duration::from_secs(30),
        )
        .expect("scrape parses as OpenMetrics");
    serde_json::from_str::<Vec<Value>>(out.trim()).expect(&out)
}

/// The sum of `name` over the samples whose labels include `want`.
pub fn sum(samples: &[Value], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s[0] == name && want.iter().all(|(k, v)| s[1][*k] == *v))
        .map(|s| s[2].as_f64().unwrap_or(0.0))
        .sum()
}

/// Scrapes until `check` holds (connections are counted closed a moment
/// after the client has gone), or gives the last scrape to fail with.
pub fn until(node: &Node, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(node);
        if check(&samples) || Instant::now() > deadline {
            return samples;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
