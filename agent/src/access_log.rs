//! Access logs: one structured line per request (L7) or connection (L4),
//! through tracing at target `access` (so `--log-format json` makes them
//! JSON, and `--log-level` can silence them: `info,access=off`), with a
//! sampled share (`--access-log-sample`, 0 turns them off). A workload's
//! Telemetry may turn its lines off, or keep those a filter admits
//! ([`crate::cel`]).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime},
};

use crate::metrics::istio::Traffic;

/// The share of requests and connections logged, in parts per million.
static SAMPLE_PPM: AtomicU32 = AtomicU32::new(1_000_000);

/// Sets the share logged (0.0 to 1.0).
pub fn set_sample(ratio: f64) {
    SAMPLE_PPM.store(
        (ratio.clamp(0.0, 1.0) * 1_000_000.0).round() as u32,
        Ordering::Relaxed,
    );
}

/// Whether this one is logged: checked before an entry is built (nothing
/// is when the log level leaves target `access` out).
pub fn sampled() -> bool {
    let ppm = SAMPLE_PPM.load(Ordering::Relaxed);
    ppm > 0
        && tracing::enabled!(target: "access", tracing::Level::INFO)
        && (ppm >= 1_000_000 || crate::resilience::balance::chance(ppm))
}

/// One line's fields beyond the traffic's labels.
#[derive(Clone)]
pub struct Entry<'a> {
    pub traffic: &'a Traffic,
    pub start: SystemTime,
    pub duration: Duration,
    /// The endpoint the agent connected to.
    pub upstream: Option<SocketAddr>,
    /// `namespace/name` of the route that matched.
    pub route: Option<&'a str>,
    /// Bytes from the client, and from the server.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub response_code: Option<u16>,
    pub grpc_status: Option<u8>,
    pub flags: &'a str,
    /// The W3C or B3 trace id the request carried.
    pub trace_id: Option<&'a str>,
    /// An HTTP request's line and the headers named (none for L4).
    pub request: Option<&'a RequestLine>,
}

/// What a line names of an HTTP request, as Envoy's default access log
/// does; taken when the request comes in, and only for a sampled one. The
/// parts share the request's buffers (no copies on the request path).
#[derive(Debug)]
pub struct RequestLine {
    pub method: http::Method,
    /// The path and query as the client sent them.
    pub path: Option<http::uri::PathAndQuery>,
    pub authority: Option<http::HeaderValue>,
    pub version: http::Version,
    pub user_agent: Option<http::HeaderValue>,
    pub request_id: Option<http::HeaderValue>,
    /// The headers a Telemetry's expressions read (`request.headers[..]`).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl RequestLine {
    /// `req`'s, keeping the `wanted` headers too.
    pub fn of<B>(req: &http::Request<B>, wanted: &[http::HeaderName]) -> Self {
        let header = |name: &str| req.headers().get(name).cloned();
        Self {
            method: req.method().clone(),
            path: req.uri().path_and_query().cloned(),
            authority: authority(req),
            version: req.version(),
            user_agent: header("user-agent"),
            request_id: header(REQUEST_ID),
            headers: wanted
                .iter()
                .filter_map(|n| Some((n.clone(), req.headers().get(n)?.clone())))
                .collect(),
        }
    }
}

/// The authority a request names: its URI's (HTTP/2, absolute form), else
/// its `Host` header (shared, not copied).
pub fn authority<B>(req: &http::Request<B>) -> Option<http::HeaderValue> {
    match req.uri().authority() {
        Some(a) => http::HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(http::header::HOST).cloned(),
    }
}

/// A header's text for a log line.
fn text(v: Option<&http::HeaderValue>) -> &str {
    v.and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// The header that names a request across the hops that log it.
pub const REQUEST_ID: &str = "x-request-id";

/// Gives a request without an `x-request-id` a new one (a random UUID), as
/// Envoy does, so each hop's log lines, the trace and the app's own logs
/// can be joined; one the request has is kept.
pub fn ensure_request_id(headers: &mut http::HeaderMap) {
    // Named once: a `&str` key is parsed on every call.
    const NAME: http::HeaderName = http::HeaderName::from_static(REQUEST_ID);
    if headers.contains_key(&NAME) {
        return;
    }
    use crate::resilience::balance::random_u64;
    let bits = (u128::from(random_u64()) << 64) | u128::from(random_u64());
    // Version 4 and the RFC 9562 variant.
    let bits = (bits & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let mut text = [0u8; 36];
    let mut nibble = 32;
    for (i, c) in text.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            *c = b'-';
            continue;
        }
        nibble -= 1;
        *c = b"0123456789abcdef"[((bits >> (nibble * 4)) & 0xf) as usize];
    }
    if let Ok(v) = http::HeaderValue::from_bytes(&text) {
        headers.insert(NAME, v);
    }
}

/// Writes one line (the caller checked [`sampled`]).
pub fn write(e: &Entry<'_>) {
    let t = e.traffic;
    let (source, destination, service) = (t.source(), t.destination(), t.service());
    let start = humantime_rfc3339(e.start);
    let r = e.request;
    tracing::info!(
        target: "access",
        start = %start,
        duration_ms = e.duration.as_secs_f64() * 1000.0,
        reporter = t.reporter_name(),
        protocol = t.protocol(),
        src_workload = %source.workload,
        src_namespace = %source.namespace,
        src_principal = %source.principal,
        dst_workload = %destination.workload,
        dst_namespace = %destination.namespace,
        dst_principal = %destination.principal,
        dst_service = %service.host,
        route = e.route.unwrap_or("-"),
        upstream = %e.upstream.map_or_else(|| "-".to_owned(), |u| u.to_string()),
        bytes_in = e.bytes_in,
        bytes_out = e.bytes_out,
        response_code = e.response_code.unwrap_or(0),
        grpc_status = e.grpc_status.map_or(-1, i32::from),
        flags = e.flags,
        mtls = t.mtls(),
        trace_id = e.trace_id.unwrap_or("-"),
        method = r.map_or("-", |r| r.method.as_str()),
        path = r.map_or("-", |r| r.path.as_ref().map_or("/", |p| p.as_str())),
        authority = text(r.and_then(|r| r.authority.as_ref())),
        http_version = r.map_or("-", |r| version_name(r.version)),
        user_agent = text(r.and_then(|r| r.user_agent.as_ref())),
        request_id = text(r.and_then(|r| r.request_id.as_ref())),
        "access"
    );
}

pub(crate) fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// A trace id from `traceparent` (W3C) or `x-b3-traceid` (B3).
pub fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let id = tp.split('-').nth(1)?;
        return (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_owned());
    }
    let b3 = headers.get("x-b3-traceid")?.to_str().ok()?;
    (matches!(b3.len(), 16 | 32) && b3.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| b3.to_owned())
}

/// RFC 3339 in UTC with milliseconds, without a date crate.
fn humantime_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    match time::OffsetDateTime::from_unix_timestamp_nanos(d.as_nanos() as i128) {
        Ok(dt) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            dt.millisecond()
        ),
        Err(_) => format!("{}", d.as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids() {
        let mut h = http::HeaderMap::new();
        assert_eq!(trace_id(&h), None);
        h.insert("x-b3-traceid", "463ac35c9f6413ad".parse().unwrap());
        assert_eq!(trace_id(&h).as_deref(), Some("463ac35c9f6413ad"));
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert("traceparent", "00-xyz-00f067aa0ba902b7-01".parse().unwrap());
        assert_eq!(trace_id(&h), None);
    }

    #[test]
    fn request_ids_are_made_when_missing_and_kept_when_given() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut h = http::HeaderMap::new();
            ensure_request_id(&mut h);
            let id = h[REQUEST_ID].to_str().unwrap().to_owned();
            let b = id.as_bytes();
            assert_eq!(b.len(), 36, "{id}");
            assert!(
                [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
                    && b[14] == b'4'
                    && matches!(b[19], b'8' | b'9' | b'a' | b'b')
                    && id
                        .bytes()
                        .filter(|c| *c != b'-')
                        .all(|c| c.is_ascii_hexdigit()),
                "a version 4 UUID: {id}"
            );
            assert!(seen.insert(id), "unique");
        }
        let mut h = http::HeaderMap::new();
        h.insert(REQUEST_ID, "from-the-caller".parse().unwrap());
        ensure_request_id(&mut h);
        assert_eq!(h[REQUEST_ID], "from-the-caller");
    }

    #[test]
    fn timestamps() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(humantime_rfc3339(t), "2023-11-14T22:13:20.123Z");
    }
}
