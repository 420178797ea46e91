//! Active health checks: each endpoint of a Service whose policy asks for
//! them is probed on an interval (an HTTP GET of a path, 2xx healthy, or a
//! TCP connect), and taken out of the pick after `unhealthyThreshold` misses
//! in a row, back after `healthyThreshold` passes: a dead backend leaves
//! the rotation before a request has to fail on it.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tracing::info;

use super::{ServiceState, balance::random_below, policy::HealthCheck};

/// Probes `endpoint` of `service` until the task is aborted.
pub async fn run<F, Fut>(
    service: Arc<ServiceState>,
    name: String,
    endpoint: SocketAddr,
    check: HealthCheck,
    probe: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let record = service.endpoint(endpoint);
    loop {
        let result = match tokio::time::timeout(check.timeout, probe()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        };
        let ok = result.is_ok();
        if record.record_check(ok, check.healthy_threshold, check.unhealthy_threshold) {
            match result {
                Ok(()) => info!(service = name, %endpoint, "health check: healthy again"),
                Err(e) => info!(service = name, %endpoint, reason = e, "health check: unhealthy"),
            }
        }
        // ±10 % jitter, so that checks of many endpoints spread out.
        let jitter = check.interval.as_micros() as u64 / 10;
        let wait = check.interval.as_micros() as u64 - jitter + random_below(2 * jitter + 1);
        tokio::time::sleep(Duration::from_micros(wait)).await;
    }
}
