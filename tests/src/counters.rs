//! Sums over the kernel's verdict counters (`trellis_agent::bpf::maps::counters`)
//! for one hook, verdict and reason, across endpoints.

use trellis_agent::bpf::maps::Counter;

fn matching<'a>(
    counters: &'a [Counter],
    hook: &'a str,
    verdict: &'a str,
    reason: &'a str,
) -> impl Iterator<Item = &'a Counter> {
    counters
        .iter()
        .filter(move |c| c.hook == hook && c.verdict == verdict && c.reason == reason)
}

/// How many times the kernel counted `hook`/`verdict`/`reason`.
pub fn events(counters: &[Counter], hook: &str, verdict: &str, reason: &str) -> u64 {
    matching(counters, hook, verdict, reason)
        .map(|c| c.events)
        .sum()
}

/// The bytes counted under `hook`/`verdict`/`reason`.
pub fn bytes(counters: &[Counter], hook: &str, verdict: &str, reason: &str) -> u64 {
    matching(counters, hook, verdict, reason)
        .map(|c| c.bytes)
        .sum()
}
