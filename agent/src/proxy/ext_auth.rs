//! A route's external authorization (the Gateway API's `ExternalAuth`
//! filter, GEP-1494): before a request goes on, the agent asks an
//! authorization Service about it through the mesh; an allowing answer lets
//! it through with the changes the service asks for (a user name, a token),
//! any other answer goes back to the client as the denial. Two protocols,
//! both Envoy's `ext_authz` (oauth2-proxy, OPA and Authorino speak them):
//! HTTP, here, sends the request's head itself; gRPC ([`grpc`]) sends a
//! `CheckRequest`.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt as _;
use hyper::body::{Frame, SizeHint};

use super::http::{Body, full_body};
use crate::routes::table::ExternalAuth;

pub(super) mod grpc;

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
    for (name, value) in &auth.check_headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
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
    /// Through, with these changes.
    Allow(Allowed),
    /// Its own answer, for the client.
    Deny(Response<Body>),
}

/// What an allowing answer changes.
#[derive(Debug, Default)]
pub(super) struct Allowed {
    /// Headers put on the request, in order.
    pub headers: Vec<Put>,
    /// Request headers taken off.
    pub remove: Vec<HeaderName>,
    /// Query parameters set (any of the name replaced) and taken off.
    pub query_set: Vec<(String, String)>,
    pub query_remove: Vec<String>,
    /// Headers put on the client's answer.
    pub answer: Vec<Put>,
}

/// A header to put on, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Put {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub how: How,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum How {
    /// In place of any the message had (more than one of the same name in
    /// one answer: all of them).
    Replace,
    /// Besides any it had.
    Append,
    /// Only if it had none.
    IfAbsent,
    /// Only in place of one it had.
    IfPresent,
}

/// Puts `puts` on `headers`.
pub(super) fn put(puts: &[Put], headers: &mut HeaderMap) {
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for p in puts {
        let present = headers.contains_key(&p.name);
        let again = replaced.contains(&&p.name);
        let set = match p.how {
            How::Append => {
                headers.append(&p.name, p.value.clone());
                continue;
            }
            How::Replace => true,
            How::IfAbsent => !present || again,
            How::IfPresent => present,
        };
        if !set {
            continue;
        }
        if again {
            headers.append(&p.name, p.value.clone());
        } else {
            headers.insert(&p.name, p.value.clone());
            replaced.push(&p.name);
        }
    }
}

/// Makes an allowing answer's changes to the request.
pub(super) fn apply(allowed: &Allowed, headers: &mut HeaderMap, uri: &mut Uri) {
    for name in &allowed.remove {
        headers.remove(name);
    }
    put(&allowed.headers, headers);
    if allowed.query_set.is_empty() && allowed.query_remove.is_empty() {
        return;
    }
    let Some(pq) = uri.path_and_query() else {
        return;
    };
    let mut pairs: Vec<String> = pq
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split_once('=').map_or(*p, |(k, _)| k);
            !allowed.query_remove.iter().any(|r| r == name)
                && !allowed.query_set.iter().any(|(k, _)| k == name)
        })
        .map(str::to_owned)
        .collect();
    for (k, v) in &allowed.query_set {
        pairs.push(format!("{}={}", query_escape(k), query_escape(v)));
    }
    let pq = if pairs.is_empty() {
        pq.path().to_owned()
    } else {
        format!("{}?{}", pq.path(), pairs.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(new) = Uri::from_parts(parts) {
            *uri = new;
        }
    }
}

/// A query parameter's name or value, with what would end or break it
/// percent-encoded.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$'()*,;:@/?".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reads the check's answer (HTTP).
pub(super) async fn verdict(auth: &ExternalAuth, answer: Response<Body>) -> Verdict {
    let (parts, body) = answer.into_parts();
    if parts.status.is_success() {
        // Read to the end, so that its connection can be pooled.
        drop(read(body).await);
        let mut allowed = Allowed::default();
        for (name, value) in &parts.headers {
            let wanted = if auth.allowed_response_headers.is_empty() {
                !NOT_COPIED.contains(name) && !name.as_str().starts_with("proxy-")
            } else {
                auth.allowed_response_headers
                    .iter()
                    .any(|h| h == name.as_str())
            };
            if wanted {
                allowed.headers.push(Put {
                    name: name.clone(),
                    value: value.clone(),
                    how: How::Replace,
                });
            }
            if auth.downstream_on_allow.iter().any(|h| h == name.as_str()) {
                allowed.answer.push(Put {
                    name: name.clone(),
                    value: value.clone(),
                    how: How::Replace,
                });
            }
        }
        return Verdict::Allow(allowed);
    }
    let body = read(body).await.unwrap_or_default();
    let mut deny = Response::new(full_body(body));
    *deny.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        let framing = matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION
        );
        // As Envoy's allowed_client_headers: the challenge and a redirect's
        // target always go.
        let wanted = auth.downstream_on_deny.is_empty()
            || matches!(*name, header::WWW_AUTHENTICATE | header::LOCATION)
            || auth.downstream_on_deny.iter().any(|h| h == name.as_str());
        if !framing && wanted {
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

/// The status of a request refused because the check could not be made
/// (Envoy's `status_on_error`): the service is not there, fails or is
/// late. Fails closed.
pub(super) const ON_ERROR: StatusCode = StatusCode::FORBIDDEN;

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(allowed: &[&str], response: &[&str]) -> ExternalAuth {
        ExternalAuth {
            path_prefix: "/check".into(),
            allowed_headers: allowed.iter().map(|s| (*s).to_owned()).collect(),
            allowed_response_headers: response.iter().map(|s| (*s).to_owned()).collect(),
            ..ExternalAuth::new(
                crate::routes::table::AuthProtocol::Http,
                Some(("shop/auth".into(), 80)),
            )
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
        let Verdict::Allow(allowed) = verdict(&auth(&[], &[]), ok).await else {
            panic!("allowed")
        };
        let mut request = HeaderMap::new();
        request.insert("x-auth-user", HeaderValue::from_static("forged"));
        request.insert("content-length", HeaderValue::from_static("5"));
        let mut uri = Uri::from_static("/a?b=1");
        apply(&allowed, &mut request, &mut uri);
        assert_eq!(uri, "/a?b=1");
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
        let Verdict::Allow(allowed) = verdict(&auth(&[], &["x-auth-user"]), only).await else {
            panic!("allowed")
        };
        assert_eq!(allowed.headers.len(), 1, "{allowed:?}");

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

    #[tokio::test]
    async fn a_providers_header_lists_choose_what_reaches_the_client() {
        let mut provider = auth(&[], &[]);
        provider.check_headers = vec![("x-mesh".into(), "trellis".into())];
        provider.downstream_on_allow = vec!["x-session".into()];
        provider.downstream_on_deny = vec!["x-why".into()];
        let req = check_of(&provider, "/a", &[("x-mesh", "forged")]);
        assert_eq!(
            req.headers()["x-mesh"],
            "trellis",
            "the provider's, not the client's"
        );

        let ok = answer(200, &[("x-session", "s1"), ("x-other", "1")], "");
        let Verdict::Allow(allowed) = verdict(&provider, ok).await else {
            panic!("allowed")
        };
        let to_client: Vec<&str> = allowed.answer.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(to_client, ["x-session"]);

        let no = answer(
            302,
            &[
                ("location", "/login"),
                ("x-why", "expired"),
                ("x-secret", "1"),
            ],
            "",
        );
        let Verdict::Deny(resp) = verdict(&provider, no).await else {
            panic!("denied")
        };
        let mut names: Vec<&str> = resp.headers().keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["location", "x-why"],
            "a redirect's target always goes"
        );
    }

    #[test]
    fn changes_are_put_as_asked_and_the_query_is_edited() {
        let p = |name: &'static str, value: &'static str, how| Put {
            name: HeaderName::from_static(name),
            value: HeaderValue::from_static(value),
            how,
        };
        let allowed = Allowed {
            headers: vec![
                p("x-user", "alice", How::Replace),
                p("x-group", "a", How::Replace),
                p("x-group", "b", How::Replace),
                p("x-trace", "2", How::Append),
                p("x-new", "1", How::IfAbsent),
                p("x-kept", "service", How::IfAbsent),
                p("x-missing", "1", How::IfPresent),
                p("x-kept-too", "service", How::IfPresent),
            ],
            remove: vec![HeaderName::from_static("cookie")],
            query_set: vec![("user".into(), "alice smith&co".into())],
            query_remove: vec!["token".into()],
            answer: Vec::new(),
        };
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("x-user", "forged"),
            ("x-group", "forged"),
            ("x-trace", "1"),
            ("x-kept", "client"),
            ("x-kept-too", "client"),
            ("cookie", "secret"),
        ] {
            headers.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut uri = Uri::from_static("http://web.shop/items?token=t&user=mallory&page=2&token=u");
        apply(&allowed, &mut headers, &mut uri);
        let all = |name: &str| -> Vec<&str> {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("x-user"), ["alice"]);
        assert_eq!(all("x-group"), ["a", "b"]);
        assert_eq!(all("x-trace"), ["1", "2"]);
        assert_eq!(all("x-new"), ["1"]);
        assert_eq!(all("x-kept"), ["client"]);
        assert!(all("x-missing").is_empty());
        assert_eq!(all("x-kept-too"), ["service"]);
        assert!(all("cookie").is_empty());
        assert_eq!(uri, "http://web.shop/items?page=2&user=alice%20smith%26co");
        let mut uri = Uri::from_static("/only?token=t");
        apply(&allowed, &mut HeaderMap::new(), &mut uri);
        assert_eq!(uri, "/only?user=alice%20smith%26co");
        let removing = Allowed {
            query_remove: vec!["token".into()],
            ..Allowed::default()
        };
        let mut uri = Uri::from_static("/only?token=t");
        apply(&removing, &mut HeaderMap::new(), &mut uri);
        assert_eq!(uri, "/only");
    }
}
