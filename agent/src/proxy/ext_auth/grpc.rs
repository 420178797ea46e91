//! Envoy's gRPC check protocol (`envoy.service.auth.v3.Authorization/Check`),
//! the one OPA's Envoy plugin, Authorino and Istio's CUSTOM providers
//! speak: the request's attributes go as a `CheckRequest`, the
//! `CheckResponse` allows it (with changes to its headers and query and to
//! the client's answer) or denies it with the answer the client gets.
//!
//! The messages are written and read field by field ([`crate::protobuf`]);
//! field numbers are those of `envoy/service/auth/v3/*.proto` and
//! `envoy/config/core/v3/base.proto`.

use std::{collections::BTreeMap, net::SocketAddr, time::SystemTime};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::BodyExt as _;

use super::{Allowed, How, Put, Verdict};
use crate::{
    protobuf::{self, DecodeError, Fields, Value, map_entry, message, string, varint_field},
    proxy::http::{Body, full_body},
    routes::table::ExternalAuth,
};

/// The check's method.
const PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Who asks and whom: what the check says of the request's two ends.
pub(in crate::proxy) struct Peers<'a> {
    /// The client pod's address and SPIFFE ID.
    pub source: SocketAddr,
    pub source_principal: Option<String>,
    /// The Service called, `namespace/name` (its endpoint is not chosen
    /// yet); empty when a pod's agent asks for a CUSTOM policy.
    pub destination_service: &'a str,
    /// The destination pod's address and SPIFFE ID, when its agent asks
    /// (CUSTOM).
    pub destination: Option<SocketAddr>,
    pub destination_principal: Option<String>,
}

/// The check for `req`: a gRPC call to the authorization service with a
/// `CheckRequest` of the request's attributes: its head (the headers the
/// filter allows, all when it names none), the first `forward_body` bytes
/// of its body, and its peers.
pub(in crate::proxy) fn check<B>(
    auth: &ExternalAuth,
    req: &Request<B>,
    body: &[u8],
    peers: &Peers<'_>,
    now: SystemTime,
) -> Request<Body> {
    call(auth, &check_request(auth, req, body, peers, now))
}

/// The check for a connection that is not HTTP, as Envoy's network
/// `ext_authz` filter makes it: a `CheckRequest` of its peers alone.
pub(in crate::proxy) fn connection_check(
    auth: &ExternalAuth,
    peers: &Peers<'_>,
    now: SystemTime,
) -> Request<Body> {
    let mut out = Vec::with_capacity(256);
    message(&mut out, 1, |attributes| {
        write_peers(attributes, peers);
        message(attributes, 4, |request| write_time(request, now));
    });
    call(auth, &out)
}

/// The gRPC call to `auth`'s service carrying the `CheckRequest` `message`.
fn call(auth: &ExternalAuth, message: &[u8]) -> Request<Body> {
    let (namespace, name) = auth
        .service
        .as_ref()
        .and_then(|(s, _)| s.split_once('/'))
        .unwrap_or(("", ""));
    let port = auth.service.as_ref().map_or(0, |(_, p)| *p);
    let mut check = Request::new(full_body(protobuf::grpc_frame(message)));
    *check.method_mut() = http::Method::POST;
    *check.version_mut() = Version::HTTP_2;
    *check.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(format!("{name}.{namespace}:{port}"))
        .path_and_query(PATH)
        .build()
        .unwrap_or_else(|_| Uri::from_static(PATH));
    let headers = check.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let timeout = auth.timeout.as_millis();
    if let Ok(v) = HeaderValue::from_str(&format!("{timeout}m")) {
        headers.insert("grpc-timeout", v);
    }
    check
}

/// `CheckRequest { AttributeContext attributes = 1; }`.
fn check_request<B>(
    auth: &ExternalAuth,
    req: &Request<B>,
    body: &[u8],
    peers: &Peers<'_>,
    now: SystemTime,
) -> Vec<u8> {
    let uri = req.uri();
    let headers = req.headers();
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    // Envoy's form: lower-case names, the pseudo-headers first, values of
    // one name joined with commas; `host` is `:authority`.
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in [
        (":authority", host.as_str()),
        (":method", req.method().as_str()),
        (":path", path),
        (":scheme", "http"),
    ] {
        map.insert(name.into(), value.into());
    }
    for (name, value) in headers {
        let name = name.as_str();
        if name == "host"
            || !(auth.allowed_headers.is_empty() || auth.allowed_headers.iter().any(|a| a == name))
        {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.to_owned())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let size: i64 = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(-1);
    let protocol = match req.version() {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    };
    let mut out = Vec::with_capacity(512);
    message(&mut out, 1, |attributes| {
        write_peers(attributes, peers);
        // request: Request { Timestamp time = 1; HttpRequest http = 2; }
        message(attributes, 4, |request| {
            write_time(request, now);
            message(request, 2, |http| {
                if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
                    string(http, 1, id);
                }
                string(http, 2, req.method().as_str());
                for (name, value) in &map {
                    map_entry(http, 3, name, value);
                }
                string(http, 4, path);
                string(http, 5, &host);
                string(http, 6, "http");
                varint_field(http, 9, size as u64);
                string(http, 10, protocol);
                if !body.is_empty() {
                    // `body` is a protobuf string: bytes that are not UTF-8
                    // go as `raw_body`, as Envoy's `pack_as_bytes` sends.
                    match std::str::from_utf8(body) {
                        Ok(text) => string(http, 11, text),
                        Err(_) => protobuf::bytes(http, 12, body),
                    }
                }
            });
        });
    });
    out
}

/// `AttributeContext { Peer source = 1; Peer destination = 2; }`, where
/// `Peer { Address address = 1; string service = 2; string principal = 4; }`.
fn write_peers(attributes: &mut Vec<u8>, peers: &Peers<'_>) {
    message(attributes, 1, |peer| {
        write_address(peer, peers.source);
        if let Some(principal) = &peers.source_principal {
            string(peer, 4, principal);
        }
    });
    message(attributes, 2, |peer| {
        if let Some(address) = peers.destination {
            write_address(peer, address);
        }
        if !peers.destination_service.is_empty() {
            string(peer, 2, peers.destination_service);
        }
        if let Some(principal) = &peers.destination_principal {
            string(peer, 4, principal);
        }
    });
}

/// `Address { SocketAddress socket_address = 1; }`, where `SocketAddress {
/// string address = 2; uint32 port_value = 3; }`.
fn write_address(peer: &mut Vec<u8>, at: SocketAddr) {
    message(peer, 1, |address| {
        message(address, 1, |socket| {
            string(socket, 2, &at.ip().to_canonical().to_string());
            varint_field(socket, 3, u64::from(at.port()));
        });
    });
}

/// `AttributeContext.Request.time` (a `Timestamp`).
fn write_time(request: &mut Vec<u8>, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    message(request, 1, |time| {
        varint_field(time, 1, since.as_secs());
        varint_field(time, 2, u64::from(since.subsec_nanos()));
    });
}

/// Reads the check's answer: the service's decision, or why there is none
/// (a failed call, a broken message): the request is then refused.
pub(in crate::proxy) async fn verdict(answer: Response<Body>) -> Result<Verdict, String> {
    let (parts, mut body) = answer.into_parts();
    if parts.status != StatusCode::OK {
        return Err(format!("its answer is HTTP {}, not gRPC", parts.status));
    }
    let mut data = BytesMut::new();
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("its answer broke: {e}"))?;
        match frame.into_data() {
            Ok(chunk) => {
                if data.len() + chunk.len() > 5 + protobuf::MAX_MESSAGE {
                    return Err(format!(
                        "its answer is over {} bytes",
                        protobuf::MAX_MESSAGE
                    ));
                }
                data.extend_from_slice(&chunk);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = t;
                }
            }
        }
    }
    // A call that failed before answering has its status in the headers
    // ("trailers-only").
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| parts.headers.get(name))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    match field("grpc-status").as_deref() {
        Some("0") => {}
        status => {
            return Err(format!(
                "grpc-status {}: {}",
                status.unwrap_or("missing"),
                field("grpc-message").unwrap_or_default()
            ));
        }
    }
    let message = protobuf::grpc_unframe(&data).map_err(|e| format!("its CheckResponse: {e}"))?;
    decide(message).map_err(|e| format!("its CheckResponse: {e}"))
}

/// `CheckResponse { google.rpc.Status status = 1; oneof { DeniedHttpResponse
/// denied_response = 2; OkHttpResponse ok_response = 3;
/// DeniedHttpResponse error_response = 5; } }`: OK allows, any other code
/// denies.
fn decide(response: &[u8]) -> Result<Verdict, DecodeError> {
    let mut code = 0;
    let (mut denied, mut ok) = (None, None);
    for field in Fields::new(response) {
        match field? {
            (1, v) => {
                for f in Fields::new(bytes_of(v)?) {
                    if let (1, v) = f? {
                        code = v.as_u64().ok_or(DecodeError::WrongType)?;
                    }
                }
            }
            (2 | 5, v) => denied = Some(bytes_of(v)?),
            (3, v) => ok = Some(bytes_of(v)?),
            _ => {}
        }
    }
    if code != 0 {
        return Ok(Verdict::Deny(denial(denied.unwrap_or_default())?));
    }
    let mut allowed = Allowed::default();
    for field in Fields::new(ok.unwrap_or_default()) {
        match field? {
            (2, v) => allowed.headers.extend(header_option(bytes_of(v)?)?),
            (5, v) => {
                if let Some(name) = request_header(v.as_str()?) {
                    allowed.remove.push(name);
                }
            }
            (6, v) => allowed.answer.extend(header_option(bytes_of(v)?)?),
            (7, v) => {
                let (mut key, mut value) = ("", "");
                for f in Fields::new(bytes_of(v)?) {
                    match f? {
                        (1, v) => key = v.as_str()?,
                        (2, v) => value = v.as_str()?,
                        _ => {}
                    }
                }
                if !key.is_empty() {
                    allowed.query_set.push((key.to_owned(), value.to_owned()));
                }
            }
            (8, v) => allowed.query_remove.push(v.as_str()?.to_owned()),
            _ => {}
        }
    }
    // What the request is routed and framed by stays the client's.
    allowed
        .headers
        .retain(|p| request_header(p.name.as_str()).is_some());
    Ok(Verdict::Allow(allowed))
}

/// `DeniedHttpResponse { HttpStatus status = 1; repeated HeaderValueOption
/// headers = 2; string body = 3; }`: the client's answer, 403 when the
/// status is not set.
fn denial(denied: &[u8]) -> Result<Response<Body>, DecodeError> {
    let mut status = StatusCode::FORBIDDEN;
    let mut puts = Vec::new();
    let mut body = Bytes::new();
    for field in Fields::new(denied) {
        match field? {
            (1, v) => {
                for f in Fields::new(bytes_of(v)?) {
                    if let (1, v) = f? {
                        let code = v.as_u64().ok_or(DecodeError::WrongType)?;
                        if let Some(s) = u16::try_from(code)
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .filter(|s| !s.is_informational())
                        {
                            status = s;
                        }
                    }
                }
            }
            (2, v) => puts.extend(header_option(bytes_of(v)?)?),
            (3, v) => body = Bytes::copy_from_slice(v.as_str()?.as_bytes()),
            _ => {}
        }
    }
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    puts.retain(|p| {
        !matches!(
            p.name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION
        )
    });
    super::put(&puts, resp.headers_mut());
    Ok(resp)
}

/// `HeaderValueOption { HeaderValue header = 1; BoolValue append = 2;
/// HeaderAppendAction append_action = 3; bool keep_empty_value = 4; }`,
/// `HeaderValue { string key = 1; string value = 2; bytes raw_value = 3; }`.
/// `append` set wins over the action; unset, the action says, where its
/// default (append if present) reads as replace, as Envoy has `append`
/// default to false in these messages. `None` for what is not a header
/// (a bad name or value), or an empty value not asked to be kept.
fn header_option(option: &[u8]) -> Result<Option<Put>, DecodeError> {
    let (mut key, mut value, mut raw): (&str, &[u8], &[u8]) = ("", b"", b"");
    let (mut append, mut action, mut keep_empty) = (None, 0, false);
    for field in Fields::new(option) {
        match field? {
            (1, v) => {
                for f in Fields::new(bytes_of(v)?) {
                    match f? {
                        (1, v) => key = v.as_str()?,
                        (2, v) => value = v.as_str()?.as_bytes(),
                        (3, v) => raw = bytes_of(v)?,
                        _ => {}
                    }
                }
            }
            (2, v) => {
                let mut set = false;
                for f in Fields::new(bytes_of(v)?) {
                    if let (1, v) = f? {
                        set = v.as_u64().ok_or(DecodeError::WrongType)? != 0;
                    }
                }
                append = Some(set);
            }
            (3, v) => action = v.as_u64().ok_or(DecodeError::WrongType)?,
            (4, v) => keep_empty = v.as_u64().ok_or(DecodeError::WrongType)? != 0,
            _ => {}
        }
    }
    let value = if raw.is_empty() { value } else { raw };
    if value.is_empty() && !keep_empty {
        return Ok(None);
    }
    let how = match (append, action) {
        (Some(true), _) => How::Append,
        (Some(false), _) => How::Replace,
        (None, 1) => How::IfAbsent,
        (None, 3) => How::IfPresent,
        (None, _) => How::Replace,
    };
    let (Ok(name), Ok(value)) = (
        HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes()),
        HeaderValue::from_bytes(value),
    ) else {
        return Ok(None);
    };
    Ok(Some(Put { name, value, how }))
}

/// A request header an allowing answer may change: not `Host` (nor a
/// pseudo-header, which is not a header name) or the body's framing.
fn request_header(name: &str) -> Option<HeaderName> {
    let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()?;
    (!matches!(
        name,
        header::HOST | header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION
    ))
    .then_some(name)
}

fn bytes_of(v: Value<'_>) -> Result<&[u8], DecodeError> {
    v.as_bytes().ok_or(DecodeError::WrongType)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::table::AuthProtocol;

    fn auth(allowed: &[&str]) -> ExternalAuth {
        ExternalAuth {
            allowed_headers: allowed.iter().map(|s| (*s).to_owned()).collect(),
            ..ExternalAuth::new(AuthProtocol::Grpc, Some(("shop/authz".into(), 9001)))
        }
    }

    /// The fields of a message as `(number, value)`, every one read.
    fn fields(m: &[u8]) -> Vec<(u32, Value<'_>)> {
        Fields::new(m).collect::<Result<_, _>>().expect("a message")
    }

    fn field<'a>(m: &'a [u8], number: u32) -> Value<'a> {
        fields(m)
            .into_iter()
            .find(|(n, _)| *n == number)
            .unwrap_or_else(|| panic!("field {number}"))
            .1
    }

    fn text(v: Value<'_>) -> &str {
        v.as_str().expect("a string")
    }

    #[test]
    fn the_check_carries_the_requests_attributes() {
        let req = Request::post("/items?id=7")
            .header("host", "web.shop")
            .header("authorization", "Bearer t")
            .header("x-group", "a")
            .header("x-group", "b")
            .header("cookie", "secret=1")
            .header("content-length", "4")
            .header("x-request-id", "r-1")
            .body(())
            .unwrap();
        let peers = Peers {
            source: "[::ffff:10.1.0.2]:40000".parse().unwrap(),
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/client".into()),
            destination_service: "shop/web",
            destination: None,
            destination_principal: None,
        };
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5);
        let check = check(&auth(&[]), &req, b"\xffbin", &peers, now);
        assert_eq!(
            check.uri(),
            "http://authz.shop:9001/envoy.service.auth.v3.Authorization/Check"
        );
        assert_eq!(check.version(), Version::HTTP_2);
        assert_eq!(check.headers()["content-type"], "application/grpc");
        assert_eq!(check.headers()["grpc-timeout"], "2000m");

        let message = check_request(&auth(&[]), &req, b"\xffbin", &peers, now);
        let attributes = field(&message, 1).as_bytes().unwrap();
        let source = field(attributes, 1).as_bytes().unwrap();
        let socket = field(field(source, 1).as_bytes().unwrap(), 1)
            .as_bytes()
            .unwrap();
        assert_eq!(text(field(socket, 2)), "10.1.0.2");
        assert_eq!(field(socket, 3), Value::Varint(40000));
        assert_eq!(
            text(field(source, 4)),
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        let destination = field(attributes, 2).as_bytes().unwrap();
        assert_eq!(text(field(destination, 2)), "shop/web");
        let request = field(attributes, 4).as_bytes().unwrap();
        let time = field(request, 1).as_bytes().unwrap();
        assert_eq!(
            fields(time),
            [(1, Value::Varint(1_700_000_000)), (2, Value::Varint(5))]
        );
        let http = field(request, 2).as_bytes().unwrap();
        assert_eq!(text(field(http, 1)), "r-1");
        assert_eq!(text(field(http, 2)), "POST");
        assert_eq!(text(field(http, 4)), "/items?id=7");
        assert_eq!(text(field(http, 5)), "web.shop");
        assert_eq!(text(field(http, 6)), "http");
        assert_eq!(field(http, 9), Value::Varint(4));
        assert_eq!(text(field(http, 10)), "HTTP/1.1");
        // Not UTF-8: raw_body, not body.
        assert_eq!(field(http, 12).as_bytes(), Some(&b"\xffbin"[..]));
        assert!(fields(http).iter().all(|(n, _)| *n != 11));
        let headers = |m: &[u8]| -> Vec<(String, String)> {
            fields(m)
                .into_iter()
                .filter(|(n, _)| *n == 3)
                .map(|(_, e)| {
                    let e = e.as_bytes().unwrap();
                    (text(field(e, 1)).to_owned(), text(field(e, 2)).to_owned())
                })
                .collect()
        };
        let all = headers(http);
        let names: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                ":authority",
                ":method",
                ":path",
                ":scheme",
                "authorization",
                "content-length",
                "cookie",
                "x-group",
                "x-request-id"
            ]
        );
        assert!(all.contains(&("x-group".into(), "a,b".into())));

        // With allowed headers, those and the pseudo-headers only; a text
        // body as `body`; no length known is -1.
        let req = Request::get("http://web.shop/a")
            .version(Version::HTTP_2)
            .header("authorization", "Bearer t")
            .header("x-group", "a")
            .body(())
            .unwrap();
        let message = check_request(&auth(&["x-group"]), &req, b"text", &peers, now);
        let attributes = field(&message, 1).as_bytes().unwrap();
        let http = field(field(attributes, 4).as_bytes().unwrap(), 2)
            .as_bytes()
            .unwrap();
        let names: Vec<String> = headers(http).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [":authority", ":method", ":path", ":scheme", "x-group"]
        );
        assert_eq!(text(field(http, 11)), "text");
        assert_eq!(field(http, 9), Value::Varint(u64::MAX));
        assert_eq!(text(field(http, 10)), "HTTP/2");
    }

    #[tokio::test]
    async fn a_connection_check_carries_its_peers_and_no_request() {
        let peers = Peers {
            source: "10.1.0.2:40000".parse().unwrap(),
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/client".into()),
            destination_service: "",
            destination: Some("10.1.1.12:9000".parse().unwrap()),
            destination_principal: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
        };
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5);
        let check = connection_check(&auth(&[]), &peers, now);
        assert_eq!(
            check.uri(),
            "http://authz.shop:9001/envoy.service.auth.v3.Authorization/Check"
        );
        let body = check.into_body().collect().await.expect("body").to_bytes();
        let message = protobuf::grpc_unframe(&body).expect("one gRPC message");
        let attributes = field(message, 1).as_bytes().unwrap();
        fn socket(peer: &[u8]) -> (String, Value<'_>) {
            let socket = field(field(peer, 1).as_bytes().unwrap(), 1)
                .as_bytes()
                .unwrap();
            (text(field(socket, 2)).to_owned(), field(socket, 3))
        }
        let source = field(attributes, 1).as_bytes().unwrap();
        assert_eq!(socket(source), ("10.1.0.2".into(), Value::Varint(40000)));
        assert_eq!(
            text(field(source, 4)),
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        let destination = field(attributes, 2).as_bytes().unwrap();
        assert_eq!(
            socket(destination),
            ("10.1.1.12".into(), Value::Varint(9000))
        );
        assert_eq!(
            text(field(destination, 4)),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(fields(destination).iter().all(|(n, _)| *n != 2));
        // The time, and no HTTP request.
        let request = field(attributes, 4).as_bytes().unwrap();
        assert_eq!(
            fields(request).iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [1]
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Written by Python's protobuf with Envoy's generated messages
    // (xds-protos): an OK with headers to set, append, add if absent and
    // replace if present, `host` and an empty value (both dropped), an
    // empty value to keep, headers to remove, an answer header and query
    // edits; a denial with 401, a challenge, a length and a body; a bare
    // PERMISSION_DENIED.
    const OK: &str = "0a001ab00112110a0f0a06582d557365721205616c69636512120a0c0a07782d67726f757012016112020801120e0a0a0a05782d6e65771201311801120f0a0b0a06782d6f6e6c791201311803120e0a0c0a04686f737412046576696c120b0a090a07782d656d70747912120a0e0a0c782d6b6570742d656d70747920012a06636f6f6b69652a04486f737432110a0f0a07782d617574687a1204677270633a0d0a04757365721205616c6963654205746f6b656e";
    const DENIED: &str = "0a06081012026e6f12480a03089103121c0a1a0a107777772d61757468656e746963617465120642656172657212160a140a0e636f6e74656e742d6c656e677468120239391a0b77686f2061726520796f75";
    const BARE: &str = "0a020807";

    #[tokio::test]
    async fn envoys_answers_read_as_their_verdicts() {
        let Ok(Verdict::Allow(allowed)) = decide(&hex(OK)) else {
            panic!("allowed")
        };
        let puts: Vec<(&str, &str, How)> = allowed
            .headers
            .iter()
            .map(|p| (p.name.as_str(), p.value.to_str().unwrap(), p.how))
            .collect();
        assert_eq!(
            puts,
            [
                ("x-user", "alice", How::Replace),
                ("x-group", "a", How::Append),
                ("x-new", "1", How::IfAbsent),
                ("x-only", "1", How::IfPresent),
                ("x-kept-empty", "", How::Replace),
            ]
        );
        assert_eq!(allowed.remove, [HeaderName::from_static("cookie")]);
        assert_eq!(allowed.answer.len(), 1);
        assert_eq!(allowed.answer[0].name, "x-authz");
        assert_eq!(allowed.query_set, [("user".to_owned(), "alice".to_owned())]);
        assert_eq!(allowed.query_remove, ["token"]);

        let Ok(Verdict::Deny(resp)) = decide(&hex(DENIED)) else {
            panic!("denied")
        };
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        assert!(
            resp.headers().get("content-length").is_none(),
            "framing is the agent's"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "who are you");

        let Ok(Verdict::Deny(resp)) = decide(&hex(BARE)) else {
            panic!("denied")
        };
        assert_eq!(resp.status(), 403);

        // An empty message is OK with nothing to change, a broken one an
        // error.
        assert!(matches!(decide(b""), Ok(Verdict::Allow(_))));
        assert!(decide(&hex(&OK[..OK.len() - 4])).is_err());
    }

    fn grpc_answer(body: Bytes, status: Option<&'static str>, in_head: bool) -> Response<Body> {
        use http_body_util::{BodyExt as _, StreamBody};
        let mut trailers = HeaderMap::new();
        if let Some(s) = status {
            trailers.insert("grpc-status", HeaderValue::from_static(s));
            trailers.insert("grpc-message", HeaderValue::from_static("boom"));
        }
        let frames = if in_head {
            vec![]
        } else {
            vec![
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(body)),
                Ok(hyper::body::Frame::trailers(trailers.clone())),
            ]
        };
        let mut resp = Response::new(
            StreamBody::new(futures_util::stream::iter(frames))
                .map_err(|never| match never {})
                .boxed(),
        );
        if in_head {
            *resp.headers_mut() = trailers;
        }
        resp
    }

    #[tokio::test]
    async fn a_failed_or_broken_call_is_no_verdict() {
        let ok = protobuf::grpc_frame(&hex(OK));
        assert!(matches!(
            verdict(grpc_answer(ok.clone(), Some("0"), false)).await,
            Ok(Verdict::Allow(_))
        ));
        let err = |r: Result<Verdict, String>| match r {
            Err(e) => e,
            Ok(_) => panic!("a verdict"),
        };
        let e = err(verdict(grpc_answer(ok.clone(), Some("13"), false)).await);
        assert_eq!(e, "grpc-status 13: boom");
        let e = err(verdict(grpc_answer(Bytes::new(), Some("14"), true)).await);
        assert_eq!(e, "grpc-status 14: boom");
        let e = err(verdict(grpc_answer(ok.clone(), None, false)).await);
        assert!(e.starts_with("grpc-status missing"), "{e}");
        let e = err(verdict(grpc_answer(ok.slice(..7), Some("0"), false)).await);
        assert!(e.contains("cut short"), "{e}");
        let mut not_ok = grpc_answer(ok, Some("0"), false);
        *not_ok.status_mut() = StatusCode::NOT_FOUND;
        let e = err(verdict(not_ok).await);
        assert!(e.contains("HTTP 404"), "{e}");
    }
}
