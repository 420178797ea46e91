//! Resilience of the L7 path, per Service: what a `TrafficPolicy` asks
//! ([`policy`]) and the state it needs at run time, kept per agent: endpoint
//! picking ([`balance`]), retries and their budget ([`retry`]), circuit
//! breaker counters, outlier ejection, active health checks ([`health`]),
//! the local rate limit's token buckets. Like Envoy's, every limit and count
//! is this agent's own: a Service called from three nodes has three buckets.

pub mod balance;
pub mod health;
pub mod policy;
pub mod retry;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use policy::{Algorithm, HashOn, Outlier};
pub use policy::{Resilience, TrafficPolicy};
use serde::Serialize;

use crate::identity::Identity;

/// How one attempt ended, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx other than the gateway errors.
    ServerError,
    /// 502, 503, 504, a failed connect, a reset, a per-try timeout.
    GatewayError,
}

impl Outcome {
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Self::GatewayError,
            500..=599 => Self::ServerError,
            _ => Self::Success,
        }
    }
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
    /// Active health checks: `false` once `unhealthyThreshold` checks in a
    /// row failed, until `healthyThreshold` pass.
    unhealthy: bool,
    check_streak: u32,
}

/// One endpoint of a Service, as this agent sees it.
#[derive(Debug, Default)]
pub struct Endpoint {
    /// Requests in flight (least request).
    pub active: AtomicU64,
    health: Mutex<Health>,
}

impl Endpoint {
    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self, now: Instant) -> bool {
        let h = self.lock();
        !h.unhealthy && h.ejected_until.is_none_or(|t| t <= now)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.lock().ejected_until.is_some_and(|t| t > now)
    }

    /// Records an active health check; returns whether the state flipped.
    pub fn record_check(&self, ok: bool, healthy_after: u32, unhealthy_after: u32) -> bool {
        let mut h = self.lock();
        let flips = ok == h.unhealthy;
        if !flips {
            h.check_streak = 0;
            return false;
        }
        h.check_streak += 1;
        let needed = if ok { healthy_after } else { unhealthy_after };
        if h.check_streak >= needed {
            h.unhealthy = !ok;
            h.check_streak = 0;
            return true;
        }
        false
    }
}

/// What the endpoint table shows for an endpoint.
#[derive(Debug, Serialize)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    pub active: u64,
    pub healthy: bool,
    pub ejected: bool,
    pub ejections: u32,
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Consistent-hash tables, cached for one endpoint set.
#[derive(Debug)]
enum Table {
    Ring(balance::Ring),
    Maglev(balance::Maglev),
}

/// Requests and retries in flight to a Service, and connections open.
#[derive(Debug, Default, Serialize)]
pub struct Gauges {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub pending: AtomicU64,
    pub connections: AtomicU64,
}

/// One Service's run-time state under its policy.
#[derive(Debug)]
pub struct ServiceState {
    pub policy: Arc<Resilience>,
    pub gauges: Arc<Gauges>,
    rr: AtomicUsize,
    endpoints: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    table: Mutex<Option<(Vec<SocketAddr>, Table)>>,
    /// The identity health checks of meshed endpoints on other nodes are
    /// made with: the last local caller's.
    pub prober: Mutex<Option<Identity>>,
}

/// The buckets a per-source rate limit keeps at most; beyond, the oldest
/// idle ones go (a bucket refilled to full is the same as a new one).
const MAX_BUCKETS: usize = 10_000;

impl ServiceState {
    pub fn new(policy: Arc<Resilience>) -> Self {
        Self {
            policy,
            gauges: Arc::default(),
            rr: AtomicUsize::new(0),
            endpoints: Mutex::default(),
            buckets: Mutex::default(),
            table: Mutex::default(),
            prober: Mutex::default(),
        }
    }

    pub fn endpoint(&self, addr: SocketAddr) -> Arc<Endpoint> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone()
    }

    /// Drops the records of endpoints no longer in the Service.
    pub fn retain(&self, live: &[SocketAddr]) {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|a, _| live.contains(a));
    }

    pub fn endpoint_status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        let map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<EndpointStatus> = map
            .iter()
            .map(|(addr, e)| {
                let h = e.lock();
                EndpointStatus {
                    address: *addr,
                    active: e.active.load(Ordering::Relaxed),
                    healthy: !h.unhealthy,
                    ejected: h.ejected_until.is_some_and(|t| t > now),
                    ejections: h.ejections,
                }
            })
            .collect();
        out.sort_by_key(|e| e.address);
        out
    }

    /// Takes a token for a request from `source` (asked only for a limit
    /// per source); `Err(retry after)` when the bucket is empty.
    pub fn take_token(&self, source: impl FnOnce() -> String) -> Result<(), Duration> {
        let Some(limit) = &self.policy.rate_limit else {
            return Ok(());
        };
        let source = if limit.per_source {
            source()
        } else {
            String::new()
        };
        let key = source.as_str();
        let rate = f64::from(limit.tokens_per_fill) / limit.fill_interval.as_secs_f64();
        let burst = f64::from(limit.burst);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            let full_after = Duration::from_secs_f64(burst / rate);
            buckets.retain(|_, b| now.duration_since(b.last) < full_after);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    /// Picks an endpoint among `candidates` (the Service's ready endpoints):
    /// ejected and unhealthy ones are skipped unless every one is (then all
    /// are used, as Envoy's panic mode does); `tried` ones are avoided when
    /// others remain; `key` is the consistent hash's input; `held`, the
    /// endpoint the client is held to (`sessionAffinity`), is taken while
    /// it is among the endpoints left.
    pub fn pick(
        &self,
        candidates: &[SocketAddr],
        tried: &[SocketAddr],
        key: Option<u64>,
        held: Option<SocketAddr>,
    ) -> Option<(SocketAddr, Arc<Endpoint>)> {
        let now = Instant::now();
        let records: Vec<(SocketAddr, Arc<Endpoint>)> = {
            let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            candidates
                .iter()
                .map(|a| (*a, map.entry(*a).or_default().clone()))
                .collect()
        };
        let mut usable: Vec<&(SocketAddr, Arc<Endpoint>)> =
            records.iter().filter(|(_, e)| e.usable(now)).collect();
        if usable.is_empty() {
            usable = records.iter().collect();
        }
        if usable.len() > 1 && usable.iter().any(|(a, _)| !tried.contains(a)) {
            usable.retain(|(a, _)| !tried.contains(a));
        }
        if usable.is_empty() {
            return None;
        }
        if let Some(held) = held
            && let Some((addr, e)) = usable.iter().find(|(a, _)| *a == held)
        {
            return Some((*addr, e.clone()));
        }
        let i = match (self.policy.balance.algorithm, key) {
            (Algorithm::RingHash | Algorithm::Maglev, Some(key)) => {
                let set: Vec<SocketAddr> = usable.iter().map(|(a, _)| *a).collect();
                self.hashed(set, key).unwrap_or(0)
            }
            (Algorithm::Random, _) => balance::random_below(usable.len() as u64) as usize,
            (Algorithm::LeastRequest, _) => {
                let active: Vec<u64> = usable
                    .iter()
                    .map(|(_, e)| e.active.load(Ordering::Relaxed))
                    .collect();
                balance::least_request(&active)
            }
            _ => self.rr.fetch_add(1, Ordering::Relaxed) % usable.len(),
        };
        let (addr, e) = usable[i];
        Some((*addr, e.clone()))
    }

    fn hashed(&self, set: Vec<SocketAddr>, key: u64) -> Option<usize> {
        let mut cache = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if cache.as_ref().is_none_or(|(s, _)| *s != set) {
            let table = match self.policy.balance.algorithm {
                Algorithm::Maglev => Table::Maglev(balance::Maglev::new(&set)),
                _ => Table::Ring(balance::Ring::new(&set)),
            };
            *cache = Some((set, table));
        }
        match cache.as_ref().map(|(_, t)| t)? {
            Table::Ring(r) => r.pick(key),
            Table::Maglev(m) => m.pick(key),
        }
    }

    /// Counts an attempt's outcome for outlier detection: a run of failures
    /// ejects the endpoint for `base × ejections` (at most `max`), unless
    /// that would eject more than the allowed share of `endpoints`.
    pub fn record(&self, endpoint: &Endpoint, outcome: Outcome, endpoints: usize) -> bool {
        let Some(o) = &self.policy.outlier else {
            return false;
        };
        let trip = {
            let mut h = endpoint.lock();
            match outcome {
                Outcome::Success => {
                    h.consecutive_5xx = 0;
                    h.consecutive_gateway = 0;
                    false
                }
                Outcome::ServerError | Outcome::GatewayError => {
                    h.consecutive_5xx += 1;
                    if outcome == Outcome::GatewayError {
                        h.consecutive_gateway += 1;
                    }
                    o.consecutive_5xx.is_some_and(|n| h.consecutive_5xx >= n)
                        || o.consecutive_gateway_errors
                            .is_some_and(|n| h.consecutive_gateway >= n)
                }
            }
        };
        trip && self.eject(endpoint, o, endpoints)
    }

    fn eject(&self, endpoint: &Endpoint, o: &Outlier, endpoints: usize) -> bool {
        let now = Instant::now();
        let ejected = self
            .endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.ejected(now))
            .count();
        // At least one may go, as in Envoy, whatever the percentage says.
        let cap = (endpoints * o.max_ejection_percent as usize / 100).max(1);
        if ejected >= cap {
            return false;
        }
        let mut h = endpoint.lock();
        if h.ejected_until.is_some_and(|t| t > now) {
            return false;
        }
        h.ejections += 1;
        let time = o
            .base_ejection_time
            .saturating_mul(h.ejections)
            .min(o.max_ejection_time);
        h.ejected_until = Some(now + time);
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        true
    }
}

/// The consistent-hash key of a request, when the policy hashes.
pub fn hash_key(
    policy: &Resilience,
    headers: &http::HeaderMap,
    source: std::net::IpAddr,
) -> Option<HashInput> {
    match policy.balance.hash.as_ref()? {
        HashOn::Header(name) => headers
            .get(name.as_str())
            .map(|v| HashInput::Key(balance::hash(v.as_bytes()))),
        HashOn::SourceIp => Some(HashInput::Key(balance::hash(source.to_string().as_bytes()))),
        HashOn::Cookie { name, ttl } => {
            let found = headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == name).then(|| v.to_owned())
                });
            match (found, ttl) {
                (Some(v), _) => Some(HashInput::Key(balance::hash(v.as_bytes()))),
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", balance::random_below(u64::MAX));
                    let cookie = format!(
                        "{name}={value}; Max-Age={}; Path=/; HttpOnly",
                        ttl.as_secs().max(1)
                    );
                    Some(HashInput::NewCookie(
                        balance::hash(value.as_bytes()),
                        cookie,
                    ))
                }
                (None, None) => None,
            }
        }
    }
}

/// A hash key, and a cookie to set when the agent made the key up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashInput {
    Key(u64),
    NewCookie(u64, String),
}

impl HashInput {
    pub fn key(&self) -> u64 {
        match self {
            Self::Key(k) | Self::NewCookie(k, _) => *k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier_policy() -> Arc<Resilience> {
        let spec: policy::TrafficPolicySpec = serde_yaml_ng::from_str(
            "{targetRefs: [{kind: Service, name: s}], outlierDetection: {consecutive5xx: 3, baseEjectionTime: 2s, maxEjectionPercent: 50}}",
        )
        .unwrap();
        Arc::new(Resilience::compile(&spec).unwrap())
    }

    #[test]
    fn retry_conditions_written_replace_the_defaults() {
        let retry = |on: &str| {
            let spec: policy::TrafficPolicySpec = serde_yaml_ng::from_str(&format!(
                "{{targetRefs: [{{kind: Service, name: s}}], retry: {{attempts: 1{on}}}}}"
            ))
            .unwrap();
            Resilience::compile(&spec).map(|r| r.retry)
        };
        let r = retry("").unwrap();
        assert!(r.on_refused_stream && r.on_reset && r.on_connect_failure && r.on_gateway_error);
        let r = retry(", retryOn: [refused-stream]").unwrap();
        assert!(r.on_refused_stream && !r.on_reset && !r.on_connect_failure);
        let r = retry(", retryOn: [5xx]").unwrap();
        assert!(!r.on_refused_stream && r.on_5xx);
        let (field, reason) = retry(", retryOn: [refused]").unwrap_err();
        assert!(field.ends_with("retryOn[0]"), "{field}");
        assert!(reason.contains("refused-stream"), "{reason}");
    }

    #[test]
    fn consecutive_errors_eject_an_endpoint_within_the_cap() {
        let svc = ServiceState::new(outlier_policy());
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let both = [a, b];
        let mut served = Vec::new();
        for _ in 0..30 {
            let (addr, e) = svc.pick(&both, &[], None, None).unwrap();
            let outcome = if addr == b {
                Outcome::ServerError
            } else {
                Outcome::Success
            };
            svc.record(&e, outcome, 2);
            served.push(addr);
        }
        assert_eq!(served.iter().filter(|x| **x == b).count(), 3, "{served:?}");
        // The cap (50 % of 2): a then cannot be ejected as well.
        let ea = svc.endpoint(a);
        for _ in 0..3 {
            svc.record(&ea, Outcome::GatewayError, 2);
        }
        assert!(ea.usable(Instant::now()));
    }

    #[test]
    fn a_held_endpoint_is_taken_while_usable_and_untried() {
        let svc = ServiceState::new(outlier_policy());
        let [a, b, c]: [SocketAddr; 3] =
            ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"].map(|s| s.parse().unwrap());
        let all = [a, b, c];
        for _ in 0..6 {
            assert_eq!(svc.pick(&all, &[], None, Some(b)).map(|p| p.0), Some(b));
        }
        // A retry of the request goes elsewhere.
        assert_ne!(svc.pick(&all, &[b], None, Some(b)).map(|p| p.0), Some(b));
        // Ejected: another one.
        let eb = svc.endpoint(b);
        for _ in 0..3 {
            svc.record(&eb, Outcome::ServerError, 3);
        }
        assert!(!eb.usable(Instant::now()));
        for _ in 0..6 {
            assert_ne!(svc.pick(&all, &[], None, Some(b)).map(|p| p.0), Some(b));
        }
    }
}
