//! Picking an endpoint: round robin, random, least request (power of two
//! choices), and the consistent hashes, ring hash and Maglev, for session
//! affinity. The hashes are the agent's own (FNV-1a, then a mixer), so every
//! agent of a cluster maps a key to the same endpoint.

use std::net::SocketAddr;

/// FNV-1a 64 with a splitmix64 finish: stable across builds and machines.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn endpoint_hash(addr: &SocketAddr, salt: u64) -> u64 {
    let mut key = addr.to_string().into_bytes();
    key.extend_from_slice(&salt.to_le_bytes());
    hash(&key)
}

/// Virtual nodes per endpoint on the ring: enough for an even spread of a
/// few dozen endpoints, small enough to rebuild on every endpoint change.
const RING_REPLICAS: u64 = 160;

/// A hash ring: sorted (point, endpoint index).
#[derive(Clone, Debug)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

impl Ring {
    pub fn new(endpoints: &[SocketAddr]) -> Self {
        let mut points: Vec<(u64, usize)> = endpoints
            .iter()
            .enumerate()
            .flat_map(|(i, e)| (0..RING_REPLICAS).map(move |r| (endpoint_hash(e, r), i)))
            .collect();
        points.sort_unstable();
        Self { points }
    }

    /// The endpoint index owning `key`: the first point at or after it.
    pub fn pick(&self, key: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let at = self.points.partition_point(|(p, _)| *p < key);
        Some(self.points[at % self.points.len()].1)
    }
}

/// Maglev's lookup table size: a prime, much larger than the endpoint count,
/// so each endpoint's share is within ~1 % of even.
pub const MAGLEV_SIZE: usize = 65_537;

/// A Maglev lookup table (Eisenbud et al., NSDI 2016): each endpoint fills
/// the table in its own permutation order, one slot per turn.
#[derive(Clone, Debug)]
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    pub fn new(endpoints: &[SocketAddr]) -> Self {
        let m = MAGLEV_SIZE as u64;
        let n = endpoints.len();
        if n == 0 {
            return Self { table: Vec::new() };
        }
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| {
                let offset = endpoint_hash(e, 0xa1) % m;
                let skip = endpoint_hash(e, 0xb2) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == MAGLEV_SIZE {
                    break 'fill;
                }
            }
        }
        Self { table }
    }

    pub fn pick(&self, key: u64) -> Option<usize> {
        (!self.table.is_empty()).then(|| self.table[(key % MAGLEV_SIZE as u64) as usize] as usize)
    }
}

/// A fast, non-cryptographic random number below `n` (load balancing and
/// fault percentages need spread, not secrecy).
pub fn random_below(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    // Multiply-shift: unbiased enough for weights and shares.
    ((u128::from(random_u64()) * u128::from(n)) >> 64) as u64
}

/// 64 fast, non-cryptographic random bits (xorshift, seeded per thread
/// from the OS).
pub fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    fn seed() -> u64 {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b) | 1
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// Whether an event with a chance of `ppm` parts per million happens.
pub fn chance(ppm: u32) -> bool {
    random_below(1_000_000) < u64::from(ppm)
}

/// Power of two choices: two distinct random candidates, the one with fewer
/// requests in flight.
pub fn least_request(active: &[u64]) -> usize {
    let n = active.len() as u64;
    if n < 2 {
        return 0;
    }
    let a = random_below(n);
    let b = (a + 1 + random_below(n - 1)) % n;
    let (a, b) = (a as usize, b as usize);
    if active[b] < active[a] { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    #[test]
    fn ring_is_stable_and_moves_little_when_an_endpoint_goes() {
        let five = endpoints(5);
        let ring = Ring::new(&five);
        let four = Ring::new(&five[..4]);
        let keys: Vec<u64> = (0..10_000u32).map(|k| hash(&k.to_le_bytes())).collect();
        let mut moved = 0;
        let mut counts = [0usize; 5];
        for k in &keys {
            let a = ring.pick(*k).unwrap();
            counts[a] += 1;
            assert_eq!(Ring::new(&five).pick(*k), Some(a), "deterministic");
            if a < 4 && four.pick(*k) != Some(a) {
                moved += 1;
            }
        }
        // Only keys of the removed endpoint move.
        assert_eq!(moved, 0);
        // Each of five gets 20 % ± 8 points with 160 replicas.
        assert!(
            counts.iter().all(|c| (1200..=2800).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn maglev_is_even_and_disrupts_little() {
        let five = endpoints(5);
        let table = Maglev::new(&five);
        let mut counts = [0usize; 5];
        for slot in &table.table {
            counts[*slot as usize] += 1;
        }
        // Maglev's guarantee: shares within a few slots of M/N.
        let even = MAGLEV_SIZE / 5;
        assert!(counts.iter().all(|c| c.abs_diff(even) <= 5), "{counts:?}");
        let four = Maglev::new(&five[..4]);
        let changed = table
            .table
            .iter()
            .zip(&four.table)
            .filter(|(a, b)| **a != 4 && a != b)
            .count();
        // Slots of surviving endpoints rarely change (the paper: a few %).
        assert!(changed < MAGLEV_SIZE / 20, "{changed}");
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let mut wins = 0;
        for _ in 0..1000 {
            if least_request(&[10, 0]) == 1 {
                wins += 1;
            }
        }
        assert_eq!(wins, 1000, "with two endpoints both are always compared");
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[least_request(&[5, 5, 0])] += 1;
        }
        // The idle one wins whenever drawn: 2 of 3 pairs contain it.
        assert!(counts[2] > 1800, "{counts:?}");
    }

    #[test]
    fn chance_is_roughly_its_percentage() {
        let hits = (0..100_000).filter(|_| chance(100_000)).count();
        assert!((9_000..=11_000).contains(&hits), "{hits}");
        assert!(!chance(0));
        assert!(chance(1_000_000));
    }
}
