//! The agent's own metrics, `trellis_*`, read when scraped: the kernel
//! programs' per-CPU counters (events and bytes by hook, verdict and
//! reason: redirects, policy verdicts, sk_msg, drops), map occupancy against
//! capacity, certificate expiry per identity, the proxies' counters, the
//! HBONE pool's, and build info.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{
    bpf, hbone::client::Pool, hbone::server::Inbound, identity::manager::CertManager,
    proxy::outbound::Outbound,
};

/// What the collector reads at each scrape.
pub struct NodeCollector {
    /// The state source's health, kept by the state thread.
    pub source: Arc<std::sync::Mutex<crate::state::SourceStats>>,
    /// The tracer's counters, when tracing is on.
    pub tracing: Option<Arc<crate::trace::TraceStats>>,
    pub bpffs: PathBuf,
    pub certs: Arc<CertManager>,
    pub pool: Arc<Pool>,
    pub outbound: Arc<Outbound>,
    pub inbound: Arc<Inbound>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector")
            .field("bpffs", &self.bpffs)
            .finish_non_exhaustive()
    }
}

/// Counters of a proxy's stats struct (its JSON form: name → number) that
/// are gauges, not counts.
const GAUGES: &[&str] = &["open"];

impl NodeCollector {
    /// Every numeric field of `stats` as `trellis_<prefix>_<field>`.
    fn stats(
        encoder: &mut DescriptorEncoder,
        prefix: &str,
        help: &str,
        stats: &impl serde::Serialize,
    ) -> Result<(), std::fmt::Error> {
        let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(stats) else {
            return Ok(());
        };
        for (name, value) in fields {
            let Some(v) = value.as_u64() else { continue };
            let full = format!("trellis_{prefix}_{name}");
            if GAUGES.contains(&name.as_str()) {
                let g = ConstGauge::new(v as i64);
                g.encode(encoder.encode_descriptor(&full, help, None, g.metric_type())?)?;
            } else {
                let c = ConstCounter::new(v);
                c.encode(encoder.encode_descriptor(&full, help, None, c.metric_type())?)?;
            }
        }
        Ok(())
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let info = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "trellis_build_info",
            "The agent's version",
            None,
            MetricType::Gauge,
        )?;
        info.encode(family.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)?;

        // Kernel counters, summed over endpoints.
        if let Ok(counters) = bpf::maps::counters(&self.bpffs) {
            let mut sums: std::collections::BTreeMap<(&str, &str, &str), (u64, u64)> =
                Default::default();
            for c in &counters {
                let e = sums.entry((c.hook, c.verdict, c.reason)).or_default();
                e.0 += c.events;
                e.1 += c.bytes;
            }
            let mut events = encoder.encode_descriptor(
                "trellis_datapath_events",
                "Kernel program events by hook, verdict and reason (per-CPU counters, summed)",
                None,
                MetricType::Counter,
            )?;
            for ((hook, verdict, reason), (n, _)) in &sums {
                let labels = [("hook", *hook), ("verdict", *verdict), ("reason", *reason)];
                ConstCounter::new(*n).encode(events.encode_family(&labels)?)?;
            }
            let mut bytes = encoder.encode_descriptor(
                "trellis_datapath_bytes",
                "Bytes the kernel programs' events carried, by hook, verdict and reason",
                None,
                MetricType::Counter,
            )?;
            for ((hook, verdict, reason), (_, b)) in &sums {
                let labels = [("hook", *hook), ("verdict", *verdict), ("reason", *reason)];
                ConstCounter::new(*b).encode(bytes.encode_family(&labels)?)?;
            }
        }
        if let Ok(maps) = bpf::maps::occupancy(&self.bpffs) {
            let mut entries = encoder.encode_descriptor(
                "trellis_map_entries",
                "Entries in each pinned map",
                None,
                MetricType::Gauge,
            )?;
            for m in &maps {
                ConstGauge::new(m.entries as i64)
                    .encode(entries.encode_family(&[("map", m.name)])?)?;
            }
            let mut capacity = encoder.encode_descriptor(
                "trellis_map_capacity",
                "Capacity (max_entries) of each pinned map",
                None,
                MetricType::Gauge,
            )?;
            for m in &maps {
                ConstGauge::new(i64::from(m.max_entries))
                    .encode(capacity.encode_family(&[("map", m.name)])?)?;
            }
        }
        let now = SystemTime::now();
        let mut expiry = encoder.encode_descriptor(
            "trellis_certificate_expiry_seconds",
            "Seconds until each held workload certificate expires",
            None,
            MetricType::Gauge,
        )?;
        for svid in self.certs.list() {
            let left = svid
                .not_after
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64();
            ConstGauge::new(left)
                .encode(expiry.encode_family(&[("identity", svid.identity.as_str())])?)?;
        }
        Self::stats(
            &mut encoder,
            "outbound",
            "Outbound proxy counter",
            &self.outbound.stats,
        )?;
        Self::stats(
            &mut encoder,
            "http",
            "L7 path counter",
            self.outbound.http_stats(),
        )?;
        Self::stats(
            &mut encoder,
            "inbound",
            "HBONE server counter",
            &self.inbound.stats,
        )?;
        Self::stats(
            &mut encoder,
            "hbone_pool",
            "HBONE client pool counter",
            &self.pool.stats,
        )?;
        if let Some(stats) = &self.tracing {
            Self::stats(&mut encoder, "tracing", "Tracing counter", &**stats)?;
        }
        let pool = self.pool.list();
        let open = ConstGauge::new(pool.len() as i64);
        open.encode(encoder.encode_descriptor(
            "trellis_hbone_pool_connections",
            "HBONE connections the pool holds open",
            None,
            open.metric_type(),
        )?)?;
        let streams = ConstGauge::new(pool.iter().map(|e| e.streams as i64).sum::<i64>());
        streams.encode(encoder.encode_descriptor(
            "trellis_hbone_pool_streams",
            "CONNECT streams open on the pool's connections",
            None,
            streams.metric_type(),
        )?)?;
        self.reloads(&mut encoder)?;
        self.upstreams(&mut encoder)
    }
}

impl NodeCollector {
    /// `trellis_config_reloads_total{source, outcome}`: the config folder's
    /// and the certificate source's changes, applied or refused (the last
    /// good version kept serving).
    fn reloads(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let source = self
            .source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let config = source.reloads;
        let certs = self.certs.reload_stats();
        {
            let mut family = encoder.encode_descriptor(
                "trellis_config_reloads",
                "Changes of a watched source, applied (ok) or refused (failed)",
                None,
                MetricType::Counter,
            )?;
            for (source, outcome, n) in [
                ("config", "ok", config.ok),
                ("config", "failed", config.failed),
                ("certificates", "ok", certs.reloads),
                ("certificates", "failed", certs.errors),
            ] {
                ConstCounter::new(n)
                    .encode(family.encode_family(&[("source", source), ("outcome", outcome)])?)?;
            }
        }
        let rebuilds = source.rebuilds;
        for (name, help, n) in [
            (
                "trellis_state_rebuilds",
                "Snapshots of the state built and written to the kernel maps",
                rebuilds.rebuilds,
            ),
            (
                "trellis_state_rebuilds_deferred",
                "Polls of the state source put off because the last rebuild was too recent (rebuilds take at most a fifth of a core)",
                rebuilds.deferred,
            ),
        ] {
            let c = ConstCounter::new(n);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let seconds = ConstCounter::new(rebuilds.seconds);
        seconds.encode(encoder.encode_descriptor(
            "trellis_state_rebuild_seconds",
            "Time spent building snapshots and writing them to the kernel maps",
            None,
            seconds.metric_type(),
        )?)?;
        {
            let mut family = encoder.encode_descriptor(
                "trellis_state_rebuild_objects",
                "Workloads and Service views a rebuild took from the one before it (reused) or made again (made)",
                None,
                MetricType::Counter,
            )?;
            let t = rebuilds.total;
            for (kind, outcome, n) in [
                ("workload", "reused", t.workloads_reused),
                ("workload", "made", t.workloads_made),
                ("service", "reused", t.services_reused),
                ("service", "made", t.services_made),
            ] {
                ConstCounter::new(n as u64)
                    .encode(family.encode_family(&[("kind", kind), ("outcome", outcome)])?)?;
            }
        }
        if let Some(kube) = source.kubernetes {
            Self::stats(
                encoder,
                "kubernetes",
                "Kubernetes API source counter",
                &kube,
            )?;
            let stale = ConstGauge::new(source.stale_seconds);
            stale.encode(encoder.encode_descriptor(
                "trellis_state_stale_seconds",
                "How long the API server has been failing (0 while it answers); the last known state keeps serving",
                None,
                stale.metric_type(),
            )?)?;
        }
        Ok(())
    }

    /// `trellis_upstream_endpoints{service, state}`: the L7 path's endpoints
    /// by health (`healthy`, `unhealthy` by active checks, `ejected` by
    /// outlier detection), per Service it has sent to: bounded by Services,
    /// not endpoints.
    fn upstreams(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "trellis_upstream_endpoints",
            "Endpoints of each Service the L7 path sends to, by health",
            None,
            MetricType::Gauge,
        )?;
        for (service, endpoints) in self.outbound.http_endpoints() {
            let count = |f: &dyn Fn(&crate::resilience::EndpointStatus) -> bool| {
                endpoints.iter().filter(|e| f(e)).count() as i64
            };
            for (state, n) in [
                ("healthy", count(&|e| e.healthy && !e.ejected)),
                ("unhealthy", count(&|e| !e.healthy)),
                ("ejected", count(&|e| e.ejected)),
            ] {
                ConstGauge::new(n).encode(
                    family.encode_family(&[("service", service.as_str()), ("state", state)])?,
                )?;
            }
        }
        Ok(())
    }
}
