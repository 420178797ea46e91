//! gRPC-Web, what a browser speaks to a gRPC service (it cannot read HTTP
//! trailers or insist on HTTP/2), translated as Envoy's `grpc_web` filter
//! does, which Istio puts on every HTTP route: a request with content type
//! `application/grpc-web[+proto]` or `application/grpc-web-text[+proto]`
//! (base64) goes upstream as gRPC over HTTP/2; its answer comes back in the
//! client's form, the trailers as a last message flagged 0x80.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::{BufMut as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper::body::{Frame, SizeHint};

use super::http::{Body, BodyError};

/// A gRPC-Web request's form, to answer in.
#[derive(Clone, Debug)]
pub(super) struct GrpcWeb {
    /// Its body is base64 (`-text`), and so is the answer's.
    pub text: bool,
    /// Its content type, which the answer gets.
    content_type: HeaderValue,
}

/// Turns a gRPC-Web request into gRPC, upstream over HTTP/2: `None` for any
/// other request, which is left as it is. The body of a `-text` request is
/// decoded where it is read ([`Decoded`]).
pub(super) fn request<B>(req: &mut Request<B>) -> Option<GrpcWeb> {
    let content_type = req.headers().get(header::CONTENT_TYPE)?.clone();
    let rest = content_type
        .to_str()
        .ok()?
        .strip_prefix("application/grpc-web")?;
    let (text, suffix) = match rest.strip_prefix("-text") {
        Some(suffix) => (true, suffix),
        None => (false, rest),
    };
    if !(suffix.is_empty() || suffix.starts_with(['+', ';'])) {
        return None;
    }
    let grpc = HeaderValue::from_str(&format!("application/grpc{suffix}")).ok()?;
    let headers = req.headers_mut();
    headers.insert(header::CONTENT_TYPE, grpc);
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.remove("x-grpc-web");
    if text {
        // Decoding changes the length.
        headers.remove(header::CONTENT_LENGTH);
    }
    if req.version() != Version::HTTP_2 {
        // gRPC is HTTP/2 only: `Host` becomes `:authority` (RFC 9113 8.3.1).
        let host = req.headers_mut().remove(header::HOST);
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Some(host) = host.as_ref().and_then(|h| h.to_str().ok())
            && let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(host)
                .path_and_query(pq)
                .build()
        {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = Version::HTTP_2;
    }
    Some(GrpcWeb { text, content_type })
}

impl GrpcWeb {
    /// The client's form of a gRPC answer (one in another protocol, an
    /// HTML error page, is left as it is). A trailers-only answer (the
    /// status in its headers, as the agent's own refusals are) is gRPC-Web
    /// as it stands.
    pub fn response(self, resp: Response<Body>) -> Response<Body> {
        let grpc = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        if !grpc {
            return resp;
        }
        let (mut parts, body) = resp.into_parts();
        parts
            .headers
            .insert(header::CONTENT_TYPE, self.content_type.clone());
        parts.headers.remove(header::CONTENT_LENGTH);
        let body = Encoded {
            inner: body,
            text: self.text,
            carry: BytesMut::new(),
            done: false,
        };
        Response::from_parts(parts, body.boxed())
    }
}

/// The trailers as gRPC-Web's last message: flag 0x80, then `name:value`
/// lines as HTTP/1.1 writes headers.
fn trailer_message(trailers: &HeaderMap) -> Bytes {
    let mut block = Vec::new();
    for (name, value) in trailers {
        block.extend_from_slice(name.as_str().as_bytes());
        block.push(b':');
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut out = BytesMut::with_capacity(5 + block.len());
    out.put_u8(0x80);
    out.put_u32(block.len() as u32);
    out.put_slice(&block);
    out.freeze()
}

/// An answer's body in gRPC-Web: its data, then its trailers as a message;
/// in base64 for the text form, in groups of three bytes so that the chunks
/// join into one base64 text (the last padded).
struct Encoded {
    inner: Body,
    text: bool,
    /// Bytes past the last whole group of three (text form).
    carry: BytesMut,
    done: bool,
}

impl Encoded {
    fn out(&mut self, data: &[u8], last: bool) -> Option<Bytes> {
        if !self.text {
            return (!data.is_empty()).then(|| Bytes::copy_from_slice(data));
        }
        self.carry.extend_from_slice(data);
        let whole = if last {
            self.carry.len()
        } else {
            self.carry.len() / 3 * 3
        };
        if whole == 0 {
            return None;
        }
        let group = self.carry.split_to(whole);
        Some(Bytes::from(STANDARD.encode(&group)))
    }
}

impl hyper::body::Body for Encoded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    // No trailers (the status was in the headers): what is
                    // left of the text form.
                    self.done = true;
                    return Poll::Ready(self.out(&[], true).map(|b| Ok(Frame::data(b))));
                }
            };
            let out = match frame.into_data() {
                Ok(data) => self.out(&data, false),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        self.done = true;
                        self.out(&trailer_message(&trailers), true)
                    }
                    Err(_) => None,
                },
            };
            if let Some(out) = out {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A `-text` request's body, decoded from base64 as it comes (a chunk may
/// end inside a group of four); any other request's as it is.
pub(super) struct Decoded<B> {
    inner: B,
    text: bool,
    carry: Vec<u8>,
}

impl<B> Decoded<B> {
    pub fn new(inner: B, text: bool) -> Self {
        Self {
            inner,
            text,
            carry: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a gRPC-Web text body that is not base64: {0}")]
struct NotBase64(base64::DecodeError);

impl<B> hyper::body::Body for Decoded<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            if !self.text {
                return polled.map(|f| f.map(|r| r.map_err(Into::into)));
            }
            let frame = match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    if self.carry.is_empty() {
                        return Poll::Ready(None);
                    }
                    let rest = std::mem::take(&mut self.carry);
                    return Poll::Ready(Some(decode(&rest).map(Frame::data)));
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let this = &mut *self;
            this.carry
                .extend(data.iter().filter(|b| !b.is_ascii_whitespace()));
            // Whole groups of four (a client may send several base64
            // texts, one per message, each a whole number of groups).
            let whole = this.carry.len() / 4 * 4;
            if whole == 0 {
                continue;
            }
            let group: Vec<u8> = this.carry.drain(..whole).collect();
            return Poll::Ready(Some(decode(&group).map(Frame::data)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.carry.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.text {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

/// Base64 groups, each padded text decoded on its own.
fn decode(groups: &[u8]) -> Result<Bytes, BodyError> {
    let mut out = Vec::with_capacity(groups.len() / 4 * 3);
    let mut start = 0;
    for (i, chunk) in groups.chunks(4).enumerate() {
        if chunk.contains(&b'=') {
            let end = (i + 1) * 4;
            STANDARD
                .decode_vec(&groups[start..end], &mut out)
                .map_err(|e| Box::new(NotBase64(e)) as BodyError)?;
            start = end;
        }
    }
    if start < groups.len() {
        STANDARD
            .decode_vec(&groups[start..], &mut out)
            .map_err(|e| Box::new(NotBase64(e)) as BodyError)?;
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn frames(items: Vec<Frame<Bytes>>) -> Body {
        StreamBody::new(futures_util::stream::iter(
            items.into_iter().map(Ok::<_, BodyError>),
        ))
        .boxed()
    }

    fn grpc_answer(
        chunks: &[&'static [u8]],
        trailers: Option<&[(&'static str, &'static str)]>,
    ) -> Response<Body> {
        let mut items: Vec<Frame<Bytes>> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c)))
            .collect();
        if let Some(t) = trailers {
            let mut map = HeaderMap::new();
            for (k, v) in t {
                map.append(*k, HeaderValue::from_static(v));
            }
            items.push(Frame::trailers(map));
        }
        let mut resp = Response::new(frames(items));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        resp
    }

    async fn body_of(resp: Response<Body>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[test]
    fn a_grpc_web_request_goes_on_as_grpc_over_http2() {
        let mut req = Request::post("/trellis.test.Echo/Say")
            .header("host", "echo.shop:50051")
            .header("content-type", "application/grpc-web-text+proto")
            .header("content-length", "12")
            .header("x-grpc-web", "1")
            .body(())
            .unwrap();
        let web = request(&mut req).expect("gRPC-Web");
        assert!(web.text);
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://echo.shop:50051/trellis.test.Echo/Say");
        assert_eq!(req.headers()["content-type"], "application/grpc+proto");
        assert_eq!(req.headers()["te"], "trailers");
        for gone in ["host", "content-length", "x-grpc-web"] {
            assert!(req.headers().get(gone).is_none(), "{gone}");
        }
        let mut binary = Request::post("/s/M")
            .header("content-type", "application/grpc-web")
            .header("content-length", "12")
            .body(())
            .unwrap();
        assert!(!request(&mut binary).expect("gRPC-Web").text);
        assert_eq!(
            binary.headers()["content-length"],
            "12",
            "the same bytes go on"
        );
        for other in ["application/grpc", "application/grpc-webby", "text/plain"] {
            let mut req = Request::post("/x")
                .header("content-type", other)
                .body(())
                .unwrap();
            assert!(request(&mut req).is_none(), "{other}");
            assert_eq!(req.version(), Version::HTTP_11);
        }
    }

    fn web(text: bool) -> GrpcWeb {
        GrpcWeb {
            text,
            content_type: HeaderValue::from_static(if text {
                "application/grpc-web-text"
            } else {
                "application/grpc-web+proto"
            }),
        }
    }

    #[tokio::test]
    async fn the_answer_carries_its_trailers_as_a_last_message() {
        let trailers: &[(&str, &str)] = &[("grpc-status", "0"), ("x-served-by", "b")];
        let resp = web(false).response(grpc_answer(&[b"\0\0\0\0\x02hi"], Some(trailers)));
        assert_eq!(resp.headers()["content-type"], "application/grpc-web+proto");
        assert!(resp.headers().get("content-length").is_none());
        let body = body_of(resp).await;
        let block = b"grpc-status:0\r\nx-served-by:b\r\n";
        let mut want = b"\0\0\0\0\x02hi\x80\0\0\0".to_vec();
        want.push(block.len() as u8);
        want.extend_from_slice(block);
        assert_eq!(&body[..], &want[..]);

        // Text: base64 in groups of three, so the chunks read as one text.
        let resp = web(true).response(grpc_answer(&[b"\0\0\0\0\x02", b"hi"], Some(trailers)));
        assert_eq!(resp.headers()["content-type"], "application/grpc-web-text");
        let text = body_of(resp).await;
        assert_eq!(STANDARD.decode(&text).unwrap(), want);

        // Trailers-only (the status in the headers): nothing added.
        let resp = web(true).response(grpc_answer(&[], None));
        assert_eq!(body_of(resp).await, "");
        // Not gRPC: left alone.
        let mut page = grpc_answer(&[b"<html>"], None);
        page.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        let page = web(false).response(page);
        assert_eq!(page.headers()["content-type"], "text/html");
        assert_eq!(body_of(page).await, "<html>");
    }

    #[tokio::test]
    async fn a_text_body_is_decoded_across_chunks_and_messages() {
        let first = STANDARD.encode(b"\0\0\0\0\x05hello");
        let second = STANDARD.encode(b"\0\0\0\0\x01!");
        let all = format!("{first}{second}");
        // Cut inside groups of four, with a line break a client may add.
        let (a, b) = all.split_at(5);
        let (b, c) = b.split_at(9);
        let chunks = [a.to_owned(), format!("{b}\r\n"), c.to_owned()];
        let body = frames(
            chunks
                .iter()
                .map(|c| Frame::data(Bytes::from(c.clone())))
                .collect(),
        );
        let decoded = Decoded::new(body, true).collect().await.unwrap().to_bytes();
        assert_eq!(&decoded[..], b"\0\0\0\0\x05hello\0\0\0\0\x01!");
        let bad = frames(vec![Frame::data(Bytes::from_static(b"!!!!"))]);
        assert!(Decoded::new(bad, true).collect().await.is_err());
        let binary = frames(vec![Frame::data(Bytes::from_static(b"as is"))]);
        let same = Decoded::new(binary, false)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(same, "as is");
    }
}
