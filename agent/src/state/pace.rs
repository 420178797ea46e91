//! How often the state is rebuilt while changes keep coming.
//!
//! Each change rebuilds the whole snapshot and syncs the maps, which takes
//! time linear in the cluster's size (about 170 ms at 20,000 pods). A large
//! cluster changes all the time (pods start, end, turn ready), so rebuilding
//! at every poll would keep a core busy on the agent's own bookkeeping, the
//! core the node's pods need. After a rebuild that took `t`, the next one
//! waits until `t * (1 - share) / share` has passed, so rebuilds take at
//! most `share` of one core however fast the cluster changes; changes that
//! come meanwhile are applied together by that next rebuild (istiod
//! debounces its pushes for the same reason). On a small cluster a rebuild
//! takes a millisecond and the wait is shorter than the source's poll: no
//! change is later than before.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::memo::Reuse;

/// At most this share of one core goes to rebuilding the state.
pub const SHARE: f64 = 0.2;

/// The longest wait between two rebuilds, however long one takes.
pub const MAX_GAP: Duration = Duration::from_secs(10);

/// What the rebuilds have cost, for `trellis status` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct RebuildStats {
    /// Snapshots built and applied to the maps.
    pub rebuilds: u64,
    /// Time spent in them, building and writing the maps.
    pub seconds: f64,
    /// Polls of the source put off because the last rebuild was too recent.
    pub deferred: u64,
    /// The last rebuild's time, and what its build reused and made.
    pub last_seconds: f64,
    pub last: Reuse,
    /// What every build reused and made, added up.
    pub total: Reuse,
}

/// Spaces rebuilds so that they take at most a share of one core.
#[derive(Debug)]
pub struct Pacer {
    share: f64,
    max_gap: Duration,
    not_before: Option<Instant>,
    stats: RebuildStats,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new(SHARE, MAX_GAP)
    }
}

impl Pacer {
    /// `share` in (0, 1]: the part of one core rebuilds may take.
    pub fn new(share: f64, max_gap: Duration) -> Self {
        Self {
            share: share.clamp(0.01, 1.0),
            max_gap,
            not_before: None,
            stats: RebuildStats::default(),
        }
    }

    /// Whether the source may be polled and a rebuild start at `now`; a
    /// poll that may not is counted as deferred.
    pub fn ready(&mut self, now: Instant) -> bool {
        let ready = self.not_before.is_none_or(|t| now >= t);
        if !ready {
            self.stats.deferred += 1;
        }
        ready
    }

    /// A rebuild that took `took` (polling the source, building, writing
    /// the maps) ended at `now`; its build reused and made `reuse`.
    pub fn rebuilt(&mut self, now: Instant, took: Duration, reuse: Reuse) {
        let gap = took
            .mul_f64((1.0 - self.share) / self.share)
            .min(self.max_gap);
        self.not_before = Some(now + gap);
        self.stats.rebuilds += 1;
        self.stats.seconds += took.as_secs_f64();
        self.stats.last_seconds = took.as_secs_f64();
        self.stats.last = reuse;
        self.stats.total += reuse;
    }

    pub fn stats(&self) -> RebuildStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_rebuild_waits_four_times_its_length_at_a_fifth_of_a_core() {
        let mut p = Pacer::new(0.2, MAX_GAP);
        let t0 = Instant::now();
        assert!(p.ready(t0), "the first rebuild never waits");
        p.rebuilt(t0, Duration::from_millis(150), Reuse::default());
        assert!(!p.ready(t0 + Duration::from_millis(599)));
        assert!(p.ready(t0 + Duration::from_millis(600)));
        let s = p.stats();
        assert_eq!((s.rebuilds, s.deferred), (1, 1));
        assert!((s.seconds - 0.15).abs() < 1e-9);
    }

    #[test]
    fn a_quick_rebuild_hardly_waits_and_a_huge_one_waits_at_most_the_cap() {
        let mut p = Pacer::new(0.2, Duration::from_secs(10));
        let t0 = Instant::now();
        p.rebuilt(t0, Duration::from_millis(1), Reuse::default());
        assert!(p.ready(t0 + Duration::from_millis(4)));
        p.rebuilt(t0, Duration::from_secs(60), Reuse::default());
        assert!(!p.ready(t0 + Duration::from_millis(9_999)));
        assert!(p.ready(t0 + Duration::from_secs(10)));
        assert_eq!(p.stats().deferred, 1, "one poll put off");
    }

    #[test]
    fn under_constant_change_rebuilds_take_at_most_the_share() {
        // A source that always has a change, polled every 200 ms, and a
        // rebuild of 170 ms (20,000 pods): simulated over a minute.
        let mut p = Pacer::new(0.2, MAX_GAP);
        let t0 = Instant::now();
        let (mut now, end) = (t0, t0 + Duration::from_secs(60));
        let took = Duration::from_millis(170);
        while now < end {
            if p.ready(now) {
                now += took;
                p.rebuilt(now, took, Reuse::default());
            }
            now += Duration::from_millis(200);
        }
        let busy = p.stats().seconds / (now - t0).as_secs_f64();
        assert!(busy <= 0.2, "rebuilding took {busy:.2} of a core");
        // Unpaced, the same loop rebuilds at every poll: 46% of a core.
        assert!(busy >= 0.1, "and still rebuilds often: {busy:.2}");
    }

    #[test]
    fn the_last_rebuild_is_shown_alone_and_every_one_added_up() {
        let mut p = Pacer::new(0.2, MAX_GAP);
        let t0 = Instant::now();
        let first = Reuse {
            workloads_made: 3,
            services_made: 2,
            ..Reuse::default()
        };
        let second = Reuse {
            workloads_reused: 2,
            workloads_made: 1,
            services_reused: 1,
            services_made: 1,
        };
        p.rebuilt(t0, Duration::from_millis(30), first);
        p.rebuilt(t0, Duration::from_millis(10), second);
        let s = p.stats();
        assert_eq!(s.last, second);
        assert!((s.last_seconds - 0.01).abs() < 1e-9);
        assert_eq!(
            s.total,
            Reuse {
                workloads_reused: 2,
                workloads_made: 4,
                services_reused: 1,
                services_made: 3,
            }
        );
    }
}
