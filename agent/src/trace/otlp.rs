//! OTLP export of finished spans: `ExportTraceServiceRequest` in protobuf
//! (a dozen fields of opentelemetry-proto's `trace/v1`, written with
//! [`crate::protobuf`]), sent over gRPC (HTTP/2,
//! `TraceService/Export`) or HTTP/protobuf (`POST /v1/traces`) to a
//! plaintext collector, in batches.

use std::{collections::BTreeMap, sync::Arc, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Finished, Kind, Resource, TraceStats, Value};
use crate::protobuf::{self, bytes, fixed32, fixed64, message, string, varint_field};

/// Spans sent in one request at most.
const MAX_BATCH: usize = 512;
/// A batch waits this long after its first span for others to join it.
const LINGER: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Protocol {
    #[value(name = "grpc")]
    #[serde(rename = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Where spans go: `http://host:port[/path]`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Endpoint {
    #[serde(serialize_with = "as_text")]
    pub uri: Uri,
    pub protocol: Protocol,
}

impl Endpoint {
    /// Checks `text` as an OTLP endpoint; `Err` says why not.
    pub fn parse(text: &str, protocol: Protocol) -> Result<Self, String> {
        let uri: Uri = text.parse().map_err(|e| format!("not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err("https is not supported: export to a collector on the node or in the cluster over http".into());
            }
            _ => return Err("the URL needs the http scheme (http://host:port)".into()),
        }
        let authority = uri.authority().ok_or("the URL has no host")?;
        if authority.port_u16().is_none() {
            return Err("the URL needs a port (4317 for grpc, 4318 for http/protobuf)".into());
        }
        Ok(Self { uri, protocol })
    }

    /// The request path: gRPC's method, or for HTTP the URL's own path
    /// (`/v1/traces` under a bare base URL, as the OTLP exporter spec says).
    fn path(&self) -> &str {
        match (self.protocol, self.uri.path()) {
            (Protocol::Grpc, _) => GRPC_PATH,
            (Protocol::HttpProtobuf, "" | "/") => "/v1/traces",
            (Protocol::HttpProtobuf, path) => path,
        }
    }
}

fn as_text<S: serde::Serializer>(uri: &Uri, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(uri)
}

/// An open connection to the collector.
enum Conn {
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
}

/// Sends batches from `queue` until every sender is gone.
pub async fn export(
    endpoint: Endpoint,
    mut queue: mpsc::Receiver<Finished>,
    stats: Arc<TraceStats>,
) {
    info!(endpoint = %endpoint.uri, protocol = ?endpoint.protocol, "exporting spans over OTLP");
    let mut conn: Option<Conn> = None;
    let mut failing = false;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            let room = MAX_BATCH - batch.len();
            match tokio::time::timeout_at(deadline, queue.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let body = encode(&batch);
        let count = batch.len() as u64;
        batch.clear();
        // A broken pooled connection gets one fresh try.
        let mut result = Err(String::new());
        for _ in 0..2 {
            result = send(&endpoint, &mut conn, body.clone()).await;
            if result.is_ok() {
                break;
            }
            conn = None;
        }
        match result {
            Ok(()) => {
                stats.exported.fetch_add(count, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                if failing {
                    info!(endpoint = %endpoint.uri, "span export works again");
                    failing = false;
                }
            }
            Err(e) => {
                stats.failed.fetch_add(count, Ordering::Relaxed);
                if failing {
                    debug!(endpoint = %endpoint.uri, error = %e, spans = count, "span export failed");
                } else {
                    warn!(endpoint = %endpoint.uri, error = %e, spans = count, "span export failed; spans are dropped until the collector answers");
                    failing = true;
                }
            }
        }
    }
}

async fn send(endpoint: &Endpoint, conn: &mut Option<Conn>, message: Bytes) -> Result<(), String> {
    if conn.is_none() {
        *conn = Some(
            tokio::time::timeout(CONNECT_TIMEOUT, connect(endpoint))
                .await
                .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))??,
        );
    }
    let authority = endpoint.uri.authority().map_or("", |a| a.as_str());
    let request = Request::post(endpoint.path()).header(http::header::HOST, authority);
    let exchange = async {
        match conn.as_mut().expect("connected above") {
            Conn::H2(send) => {
                let framed = protobuf::grpc_frame(&message);
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(authority)
                    .path_and_query(endpoint.path())
                    .build()
                    .map_err(|e| e.to_string())?;
                let request = Request::post(uri)
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers")
                    .body(Full::new(framed))
                    .map_err(|e| e.to_string())?;
                send.ready().await.map_err(|e| e.to_string())?;
                let response = send
                    .send_request(request)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status();
                let head = response.headers().clone();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                let trailers = body.trailers().cloned().unwrap_or_default();
                let grpc = |name| {
                    trailers
                        .get(name)
                        .or_else(|| head.get(name))
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                match grpc("grpc-status").as_deref() {
                    Some("0") if status == StatusCode::OK => Ok(()),
                    code => Err(format!(
                        "HTTP {status}, grpc-status {}: {}",
                        code.unwrap_or("none"),
                        grpc("grpc-message").unwrap_or_default()
                    )),
                }
            }
            Conn::H1(send) => {
                let request = request
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(message))
                    .map_err(|e| e.to_string())?;
                send.ready().await.map_err(|e| e.to_string())?;
                let response = send
                    .send_request(request)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status();
                // Read to the end so the connection can carry the next batch.
                let _ = response.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}"))
                }
            }
        }
    };
    tokio::time::timeout(EXPORT_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {EXPORT_TIMEOUT:?}"))?
}

async fn connect(endpoint: &Endpoint) -> Result<Conn, String> {
    let authority = endpoint.uri.authority().expect("checked when parsed");
    let port = authority.port_u16().expect("checked when parsed");
    let stream = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    match endpoint.protocol {
        Protocol::Grpc => {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Conn::H2(send))
        }
        Protocol::HttpProtobuf => {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Conn::H1(send))
        }
    }
}

/// `ExportTraceServiceRequest` of `spans`, one `ResourceSpans` per resource.
pub fn encode(spans: &[Finished]) -> Bytes {
    let mut by_resource: BTreeMap<&str, (&Resource, Vec<&Finished>)> = BTreeMap::new();
    for span in spans {
        by_resource
            .entry(span.resource.key())
            .or_insert_with(|| (&span.resource, Vec::new()))
            .1
            .push(span);
    }
    let mut out = Vec::with_capacity(256 * spans.len());
    for (resource, spans) in by_resource.values() {
        message(&mut out, 1, |rs| {
            message(rs, 1, |r| {
                for (key, value) in &resource.attributes {
                    key_value(r, 1, key, &Value::Str(value.clone()));
                }
            });
            message(rs, 2, |ss| {
                message(ss, 1, |scope| {
                    string(scope, 1, "trellis");
                    string(scope, 2, env!("CARGO_PKG_VERSION"));
                });
                for span in spans {
                    message(ss, 2, |s| encode_span(s, span));
                }
            });
        });
    }
    Bytes::from(out)
}

/// `opentelemetry.proto.trace.v1.Span`.
fn encode_span(out: &mut Vec<u8>, span: &Finished) {
    bytes(out, 1, &span.trace_id);
    bytes(out, 2, &span.span_id);
    if let Some(state) = &span.trace_state {
        string(out, 3, state);
    }
    if let Some(parent) = &span.parent {
        bytes(out, 4, parent);
    }
    string(out, 5, &span.name);
    varint_field(
        out,
        6,
        match span.kind {
            Kind::Server => 2,
            Kind::Client => 3,
        },
    );
    fixed64(out, 7, span.start_unix_nanos);
    fixed64(out, 8, span.end_unix_nanos);
    for (key, value) in &span.attributes {
        key_value(out, 9, key, value);
    }
    for (key, value) in &span.tags {
        key_value(out, 9, key, &Value::Str(value.clone()));
    }
    // Status: message (2), code (3: 1 ok, 2 error); unset when neither.
    if let Some(error) = &span.error {
        message(out, 15, |s| {
            string(s, 2, error);
            varint_field(s, 3, 2);
        });
    }
    // W3C trace flags: sampled (only sampled spans are recorded).
    fixed32(out, 16, 1);
}

/// `KeyValue { key = 1; AnyValue value = 2 }`.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    message(out, field, |kv| {
        string(kv, 1, key);
        message(kv, 2, |any| match value {
            Value::Str(s) => string(any, 1, s),
            Value::Bool(b) => varint_field(any, 2, u64::from(*b)),
            Value::Int(i) => varint_field(any, 3, *i as u64),
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_attribute_is_a_ten_byte_varint() {
        let mut out = Vec::new();
        key_value(&mut out, 9, "a", &Value::Int(-1));
        assert_eq!(out.len(), 2 + 3 + 2 + 11);
        assert_eq!(out[..5], [0x4a, 16, 0x0a, 1, b'a']);
    }

    #[test]
    fn a_span_encodes_under_its_resource() {
        let resource = Arc::new(Resource::new(vec![("service.name", "web.default".into())]));
        let span = Finished {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
            trace_state: None,
            name: "GET".into(),
            kind: Kind::Server,
            start_unix_nanos: 10,
            end_unix_nanos: 20,
            attributes: vec![("http.response.status_code", Value::Int(200))],
            tags: vec![("team".into(), "payments".into())],
            error: None,
            resource,
        };
        let out = encode(&[span.clone(), span]);
        // One ResourceSpans (field 1, length-delimited) holding both spans.
        assert_eq!(out[0], 0x0a);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("web.default").count(), 1);
        assert_eq!(text.matches("http.response.status_code").count(), 2);
        assert_eq!(text.matches("payments").count(), 2, "custom tags too");
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(Endpoint::parse("http://10.0.0.1:4317", Protocol::Grpc).is_ok());
        let base = Endpoint::parse("http://collector:4318", Protocol::HttpProtobuf).unwrap();
        assert_eq!(base.path(), "/v1/traces");
        let full = Endpoint::parse("http://c:4318/otlp/v1/traces", Protocol::HttpProtobuf).unwrap();
        assert_eq!(full.path(), "/otlp/v1/traces");
        for bad in ["https://c:4317", "c:4317", "http://c", "not a url"] {
            assert!(Endpoint::parse(bad, Protocol::Grpc).is_err(), "{bad}");
        }
    }
}
