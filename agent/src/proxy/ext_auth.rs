//! A route's external authorization (the Gateway API's `ExternalAuth`
//! filter, GEP-1494, with Envoy's HTTP `ext_authz` protocol, which
//! oauth2-proxy, OPA and Authorino speak): before a request goes on, the
//! agent sends its head to an authorization Service through the mesh; a 2xx
//! answer lets it through with the answer's headers added (a user name, a
//! token), any other answer goes back to the client as the denial.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt as _;
use hyper::body::{Frame, SizeHint};

use super::http::{Body, full_body};
use crate::routes::table::ExternalAuth;

/// How long the authorization Service has to answer before the request is
/// refused (Envoy's default is 200 ms; this allows a remote node and a
/// cold connection).
pub(super) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The most of a denial's body passed on to the client.
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// Headers of the check's answer never put on the request: its framing,
/// hop-by-hop ones, and those that describe the answer itself.
const NOT_COPIED: &[HeaderName] = &[
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::DATE,
    header::SERVER,
];

/// The check for a request with this head: its method, the path after
/// `path_prefix`, the first `forward_body` bytes of its body (none by
/// default), and the headers the API always sends (`Host`, `Authorization`)
/// with the allowed ones.
pub(super) fn check(
    auth: &ExternalAuth,
    method: &http::Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Request<Body> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    let target = format!("{}{pq}", auth.path_prefix);
    let uri = match uri.authority() {
        // The request's own authority (HTTP/2), so Host and it agree.
        Some(a) => Uri::builder()
            .scheme("http")
            .authority(a.clone())
            .path_and_query(target)
            .build(),
        None => Uri::try_from(target).map_err(http::Error::from),
    }
    .unwrap_or_else(|_| Uri::from_static("/"));
    let length = body.len();
    let mut req = Request::new(full_body(body));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    let asked = headers;
    let headers = req.headers_mut();
    for name in [header::HOST, header::AUTHORIZATION]
        .iter()
        .map(HeaderName::as_str)
        .chain(auth.allowed_headers.iter().map(String::as_str))
    {
        for v in asked.get_all(name) {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                headers.append(name, v.clone());
            }
        }
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    req
}

/// Frames of a request's body read for its check, to go on before the rest.
pub(super) type Read = VecDeque<Frame<Bytes>>;

/// Reads the start of a request's body for its check: the frames read
/// (all of them go on to the backend) and their first `max` bytes (what
/// the check carries, as the API says a longer body is truncated).
pub(super) async fn read_start<B>(body: &mut B, max: usize) -> Result<(Read, Bytes), B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut frames = VecDeque::new();
    let mut start = BytesMut::new();
    while start.len() < max {
        let Some(frame) = body.frame().await.transpose()? else {
            break;
        };
        if let Some(data) = frame.data_ref() {
            let take = data.len().min(max - start.len());
            start.extend_from_slice(&data[..take]);
        }
        frames.push_back(frame);
    }
    Ok((frames, start.freeze()))
}

/// A request body whose first frames were read for its check: those, then
/// the rest as it comes. With none read it is the body itself.
pub(super) struct Prefixed<B> {
    read: Read,
    rest: B,
}

impl<B> Prefixed<B> {
    pub fn new(read: Read, rest: B) -> Self {
        Self { read, rest }
    }
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.rest.size_hint();
        if self.read.is_empty() {
            return inner;
        }
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        match inner.exact() {
            Some(n) => SizeHint::with_exact(n + read),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + read);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
        }
    }
}

/// What the authorization Service said.
pub(super) enum Verdict {
    /// Through, with these headers set on the request.
    Allow(HeaderMap),
    /// Its own answer, for the client.
    Deny(Response<Body>),
}

/// Reads the check's answer.
pub(super) async fn verdict(auth: &ExternalAuth, answer: Response<Body>) -> Verdict {
    let (parts, body) = answer.into_parts();
    if parts.status.is_success() {
        // Read to the end, so that its connection can be pooled.
        drop(read(body).await);
        let mut add = HeaderMap::new();
        for (name, value) in &parts.headers {
            let wanted = if auth.allowed_response_headers.is_empty() {
                !NOT_COPIED.contains(name) && !name.as_str().starts_with("proxy-")
            } else {
                auth.allowed_response_headers
                    .iter()
                    .any(|h| h == name.as_str())
            };
            if wanted {
                add.append(name, value.clone());
            }
        }
        return Verdict::Allow(add);
    }
    let body = read(body).await.unwrap_or_default();
    let mut deny = Response::new(full_body(body));
    *deny.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION
        ) {
            deny.headers_mut().append(name, value.clone());
        }
    }
    Verdict::Deny(deny)
}

/// A body of at most [`MAX_DENIAL_BODY`] bytes; `None` when longer or
/// broken. (Read frame by frame: `Limited` over a boxed error trips the
/// compiler's `Send` proof in the proxy's future.)
async fn read(mut body: Body) -> Option<Bytes> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if out.len() + data.len() > MAX_DENIAL_BODY {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(out.freeze())
}

/// Puts the allowed headers on the request, in place of its own.
pub(super) fn apply(add: HeaderMap, request: &mut HeaderMap) {
    for name in add.keys() {
        request.remove(name);
    }
    for (name, value) in &add {
        request.append(name, value.clone());
    }
}

/// The status of a request refused because the check could not be made
/// (Envoy's `status_on_error`): the service is not there, fails or is
/// late. Fails closed.
pub(super) const ON_ERROR: StatusCode = StatusCode::FORBIDDEN;

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(allowed: &[&str], response: &[&str]) -> ExternalAuth {
        ExternalAuth {
            service: Some(("shop/auth".into(), 80)),
            path_prefix: "/check".into(),
            allowed_headers: allowed.iter().map(|s| (*s).to_owned()).collect(),
            allowed_response_headers: response.iter().map(|s| (*s).to_owned()).collect(),
            forward_body: 0,
        }
    }

    fn check_of(auth: &ExternalAuth, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        check(
            auth,
            &http::Method::POST,
            &uri.parse().unwrap(),
            &map,
            Bytes::new(),
        )
    }

    #[test]
    fn a_check_carries_the_method_prefixed_path_and_only_the_headers_it_may() {
        let req = check_of(
            &auth(&["x-user"], &[]),
            "/items?id=7",
            &[
                ("host", "web.shop"),
                ("authorization", "Bearer t"),
                ("x-user", "alice"),
                ("cookie", "secret=1"),
                ("content-length", "12"),
            ],
        );
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(req.uri(), "/check/items?id=7");
        let names: Vec<&str> = req.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "authorization", "x-user", "content-length"]);
        assert_eq!(req.headers()[header::CONTENT_LENGTH], "0");
        let h2 = check_of(&auth(&[], &[]), "http://web.shop/a", &[]);
        assert_eq!(h2.uri(), "http://web.shop/check/a");
    }

    #[tokio::test]
    async fn the_start_of_a_body_is_read_for_the_check_and_all_of_it_goes_on() {
        use http_body_util::StreamBody;
        let chunks = ["hello ", "wide ", "world"];
        let stream = futures_util::stream::iter(chunks.iter().map(|c| {
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes())))
        }));
        let mut body = StreamBody::new(stream);
        let (read, start) = read_start(&mut body, 8).await.unwrap();
        assert_eq!(start, "hello wi", "truncated to 8 bytes");
        assert_eq!(read.len(), 2, "the frames it took to get them");
        let whole = Prefixed::new(read, body)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(whole, "hello wide world");
        let req = check(
            &auth(&[], &[]),
            &http::Method::POST,
            &"/x".parse().unwrap(),
            &HeaderMap::new(),
            start,
        );
        assert_eq!(req.headers()[header::CONTENT_LENGTH], "8");
        let sized = Prefixed::new(
            VecDeque::from([Frame::data(Bytes::from_static(b"abc"))]),
            http_body_util::Full::new(Bytes::from_static(b"defg")),
        );
        assert_eq!(hyper::body::Body::size_hint(&sized).exact(), Some(7));
    }

    fn answer(status: u16, headers: &[(&str, &str)], body: &'static str) -> Response<Body> {
        let mut r = Response::new(full_body(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            r.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        r
    }

    #[tokio::test]
    async fn an_allowing_answer_adds_its_headers_and_a_denial_is_passed_back() {
        let ok = answer(
            200,
            &[
                ("x-auth-user", "alice"),
                ("content-type", "text/plain"),
                ("content-length", "2"),
                ("x-auth-group", "a"),
                ("x-auth-group", "b"),
            ],
            "ok",
        );
        let Verdict::Allow(add) = verdict(&auth(&[], &[]), ok).await else {
            panic!("allowed")
        };
        let mut request = HeaderMap::new();
        request.insert("x-auth-user", HeaderValue::from_static("forged"));
        request.insert("content-length", HeaderValue::from_static("5"));
        apply(add, &mut request);
        assert_eq!(
            request["x-auth-user"], "alice",
            "the service's, not the client's"
        );
        assert_eq!(
            request["content-length"], "5",
            "framing stays the request's"
        );
        let groups: Vec<_> = request.get_all("x-auth-group").iter().collect();
        assert_eq!(groups, ["a", "b"]);
        let only = answer(204, &[("x-auth-user", "bob"), ("x-other", "1")], "");
        let Verdict::Allow(add) = verdict(&auth(&[], &["x-auth-user"]), only).await else {
            panic!("allowed")
        };
        assert_eq!(add.len(), 1, "{add:?}");

        let no = answer(
            401,
            &[("www-authenticate", "Bearer"), ("content-length", "6")],
            "go 'way",
        );
        let Verdict::Deny(resp) = verdict(&auth(&[], &[]), no).await else {
            panic!("denied")
        };
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        assert!(resp.headers().get("content-length").is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "go 'way");
    }
}
