//! Protocol detection on a captured connection: HTTP/1.x (a request line),
//! HTTP/2 with prior knowledge (the client preface), or anything else (TLS
//! from the app included), which stays opaque TCP. The Service port's
//! `appProtocol` overrides sniffing; a client that says nothing within the
//! detection timeout is taken for a server-first protocol and relayed as
//! opaque TCP, so the server can speak first.
//!
//! Sniffing peeks (`MSG_PEEK`): the bytes stay in the socket, and the opaque
//! path relays them as if nothing had looked.

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    net::TcpStream,
};

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Http1 => "http/1.1",
            Self::Http2 => "http/2",
            Self::Opaque => "tcp",
        }
    }
}

/// Protocols a Service port may declare that the agent serves as HTTP.
const HTTP: &[&str] = &[
    "http",
    "http2",
    "grpc",
    "grpc-web",
    "h2c",
    "kubernetes.io/h2c",
];
/// Protocols it relays as opaque TCP without peeking: TLS from the app,
/// and the server-first and binary ones Istio names (a server that speaks
/// first would wait out the sniffing timeout on every connection).
const OPAQUE: &[&str] = &[
    "tcp",
    "https",
    "tls",
    "mongo",
    "mysql",
    "redis",
    "kubernetes.io/ws",
    "kubernetes.io/wss",
];

/// What a Service port declares, read as Istio reads it: its `appProtocol`,
/// else its name as `<protocol>[-<suffix>]` (`http-web`, `tcp-db`, `mysql`).
/// `Some(true)` for HTTP (the version is still read from the first bytes),
/// `Some(false)` for opaque TCP, `None` when sniffing decides.
pub fn declared(app_protocol: Option<&str>, port_name: &str) -> Option<bool> {
    let kind = |p: &str| {
        if HTTP.iter().any(|h| h.eq_ignore_ascii_case(p)) {
            Some(true)
        } else if OPAQUE.iter().any(|o| o.eq_ignore_ascii_case(p)) {
            Some(false)
        } else {
            None
        }
    };
    if let Some(declared) = app_protocol.and_then(kind) {
        return Some(declared);
    }
    let name = port_name.to_ascii_lowercase();
    kind(&name).or_else(|| kind(name.split_once('-')?.0))
}

/// Whether a Service port declares HTTP/2 (`http2`, `grpc`, `h2c`), read
/// as [`declared`] reads it: then its backends speak HTTP/2, and HTTP/1.1
/// requests go to them as HTTP/2, as Istio sends them.
pub fn declares_http2(app_protocol: Option<&str>, port_name: &str) -> bool {
    const H2: &[&str] = &["http2", "grpc", "h2c", "kubernetes.io/h2c"];
    let is_h2 = |p: &str| H2.iter().any(|h| h.eq_ignore_ascii_case(p));
    if let Some(p) = app_protocol.filter(|p| declared(Some(p), "").is_some()) {
        return is_h2(p);
    }
    let name = port_name.to_ascii_lowercase();
    is_h2(&name) || name.split_once('-').is_some_and(|(p, _)| is_h2(p))
}

/// Whether the port's `appProtocol` is `grpc-web`: its server speaks
/// gRPC-Web itself (over HTTP/1.1, see [`declares_http2`]), so the agent
/// passes it through rather than making it gRPC.
pub fn declares_grpc_web(app_protocol: Option<&str>) -> bool {
    app_protocol.is_some_and(|p| p.eq_ignore_ascii_case("grpc-web"))
}

/// The HTTP/2 client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods a request line may start with (RFC 9110 and WebDAV's common ones).
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"REPORT",
];

/// The protocol the first bytes show; `None` while they could still be
/// either.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    let n = bytes.len().min(PREFACE.len());
    if bytes[..n] == PREFACE[..n] {
        return (n == PREFACE.len()).then_some(Protocol::Http2);
    }
    // A method token and a space. A longer method could still follow its
    // prefix (`POST` / `PROPFIND`), hence the wait for the space.
    let mut undecided = false;
    for method in METHODS {
        let n = bytes.len().min(method.len());
        if bytes[..n] != method[..n] {
            continue;
        }
        match bytes.get(method.len()) {
            Some(b' ') => return Some(Protocol::Http1),
            Some(_) => {}
            None => undecided = true,
        }
    }
    (!undecided).then_some(Protocol::Opaque)
}

/// Peeks at the connection until its first bytes decide, the client closes,
/// or `timeout` passes (opaque: the server may be the one to speak first).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Protocol {
    sniff(stream, timeout).await.unwrap_or(Protocol::Opaque)
}

/// [`detect`], with `None` when `timeout` passed before the first bytes
/// decided (a server that speaks first, or a slow client).
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; PREFACE.len()];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        match peeked {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(Protocol::Opaque),
            Ok(Ok(n)) => {
                if let Some(p) = classify(&buf[..n]) {
                    return Some(p);
                }
                if n == seen {
                    // Nothing new since the last look: peek returns at once
                    // while bytes wait, so pause before looking again.
                    if tokio::time::timeout_at(
                        deadline,
                        tokio::time::sleep(Duration::from_millis(1)),
                    )
                    .await
                    .is_err()
                    {
                        return None;
                    }
                }
                seen = n;
            }
        }
    }
}

/// [`detect`] for a stream that cannot be peeked (an HBONE stream): reads
/// until the first bytes decide, and returns them to be put back.
pub async fn detect_read<R: AsyncRead + Unpin>(
    stream: &mut R,
    timeout: Duration,
) -> (Protocol, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::with_capacity(PREFACE.len());
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                seen.extend_from_slice(&buf[..n]);
                if let Some(p) = classify(&seen) {
                    return (p, seen);
                }
            }
            _ => return (Protocol::Opaque, seen),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_prefaces() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http1));
        assert_eq!(classify(b"PROPFIND / HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(PREFACE), Some(Protocol::Http2));
        // Too short to tell.
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        // Not HTTP.
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GETX / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Opaque));
    }

    #[test]
    fn app_protocol_then_the_port_name_declare() {
        assert_eq!(declared(Some("http"), ""), Some(true));
        assert_eq!(declared(Some("grpc"), ""), Some(true));
        assert_eq!(declared(Some("HTTP2"), ""), Some(true));
        assert_eq!(declared(Some("kubernetes.io/h2c"), ""), Some(true));
        assert_eq!(declared(Some("tcp"), ""), Some(false));
        assert_eq!(declared(Some("mysql"), ""), Some(false));
        assert_eq!(declared(None, ""), None);
        // appProtocol wins over the name; an unknown one leaves it to the name.
        assert_eq!(declared(Some("tcp"), "http-web"), Some(false));
        assert_eq!(declared(Some("example.com/custom"), "http-web"), Some(true));
        assert!(declares_http2(Some("grpc"), ""));
        assert!(declares_http2(Some("kubernetes.io/h2c"), "http-web"));
        assert!(declares_http2(None, "grpc-api"));
        assert!(declares_http2(Some("example.com/custom"), "http2"));
        assert!(!declares_http2(Some("http"), "grpc"), "appProtocol first");
        assert!(
            !declares_http2(Some("grpc-web"), ""),
            "gRPC-Web is HTTP/1.1"
        );
        assert!(declares_grpc_web(Some("GRPC-Web")));
        assert!(!declares_grpc_web(Some("grpc")) && !declares_grpc_web(None));
        assert!(!declares_http2(None, "http-grpc"));
        // Istio's port names: `<protocol>[-<suffix>]`.
        for (name, want) in [
            ("http", Some(true)),
            ("http-web", Some(true)),
            ("HTTP-Web", Some(true)),
            ("http2-api", Some(true)),
            ("grpc", Some(true)),
            ("grpc-web", Some(true)),
            ("grpc-web-ui", Some(true)),
            ("tcp-db", Some(false)),
            ("mysql", Some(false)),
            ("mysql-primary", Some(false)),
            ("https-admin", Some(false)),
            ("tls", Some(false)),
            ("redis-cache", Some(false)),
            ("web", None),
            ("httpx", None),
            ("http_web", None),
            ("metrics-http", None),
            ("", None),
        ] {
            assert_eq!(declared(None, name), want, "{name}");
        }
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout_and_bytes_stay() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            s
        });
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(
            detect(&server, Duration::from_millis(50)).await,
            Protocol::Opaque
        );
        let _client = client.await.unwrap();
        // Split writes decide once the method's space arrives, and the
        // bytes are still there to read.
        let mut late = server;
        assert_eq!(detect(&late, Duration::from_secs(5)).await, Protocol::Http1);
        let mut first = [0u8; 3];
        late.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
    }
}
