//! Per-CPU event counters: every hook counts what it did and why.

use trellis_common::{CounterKey, CounterValue};

use crate::maps::COUNTERS;

/// Adds one event (and `bytes`) to the counter for `key` on this CPU.
#[inline(always)]
pub fn count(key: CounterKey, bytes: u64) {
    if let Some(value) = COUNTERS.get_ptr_mut(key) {
        // SAFETY: a per-CPU slot: no other program touches it while we run.
        unsafe {
            (*value).events += 1;
            (*value).bytes += bytes;
        }
    } else {
        // Losing a race with another first insert on this CPU is impossible
        // (per-CPU); a full map drops the count, which the agent reports as
        // map occupancy.
        let _ = COUNTERS.insert(key, CounterValue { events: 1, bytes }, 0);
    }
}
