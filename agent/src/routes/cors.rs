//! The Gateway API's CORS filter (GEP-1767, an `HTTPRoute` rule's filter of
//! `type: CORS`): the agent answers a browser's preflight itself, as
//! Envoy's CORS filter does for Istio, and marks the answers to the
//! cross-origin requests the rule allows, so a web page served from another
//! origin may read them.

use http::{HeaderMap, HeaderValue, Method, header};
use serde::{Deserialize, Serialize};

/// `HTTPCORSFilter` as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CorsFilter {
    /// `<scheme>://<host>(:<port>)`; the host may start with `*` (any
    /// labels to its left); `*` alone allows every origin.
    #[serde(default)]
    pub allow_origins: Vec<String>,
    #[serde(default)]
    pub allow_credentials: Option<bool>,
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Seconds a browser may keep a preflight's answer; 5 when absent.
    #[serde(default)]
    pub max_age: Option<i64>,
}

/// The API's limits on the lists.
const MAX_ORIGINS: usize = 64;
const MAX_METHODS: usize = 9;
const MAX_HEADERS: usize = 64;

/// The API's default `maxAge`.
const DEFAULT_MAX_AGE: u32 = 5;

/// A compiled CORS filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cors {
    origins: Allowed<Origin>,
    credentials: bool,
    methods: Allowed<String>,
    headers: Allowed<String>,
    expose: Allowed<String>,
    max_age: u32,
}

/// A list that may be `*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum Allowed<T> {
    Any,
    Only(Vec<T>),
}

/// An allowed origin: scheme, host (exact, or `*` and the suffix after it)
/// and port (the scheme's when not written).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct Origin {
    scheme: String,
    host: Host,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum Host {
    Exact(String),
    /// `*` then this, which the request's host must end with (after at
    /// least one character of its own); empty for `*` alone.
    Suffix(String),
}

/// `(field under the filter, reason)`.
type Invalid = (String, String);

impl CorsFilter {
    /// Checks and compiles the filter.
    pub fn compile(&self) -> Result<Cors, Invalid> {
        let origins =
            wildcard_list(
                "allowOrigins",
                &self.allow_origins,
                MAX_ORIGINS,
                |v| match parse_origin(v, true) {
                    Some(o) => Ok(o),
                    None => Err(format!(
                        "{v:?} is not <scheme>://<host>(:<port>) with scheme http or https"
                    )),
                },
            )?;
        let methods = wildcard_list("allowMethods", &self.allow_methods, MAX_METHODS, |v| {
            Method::from_bytes(v.as_bytes())
                .map(|_| v.clone())
                .map_err(|_| format!("{v:?} is not an HTTP method"))
        })?;
        let header = |v: &String| {
            http::HeaderName::try_from(v.as_str())
                .map(|h| h.as_str().to_owned())
                .map_err(|_| format!("{v:?} is not a header name"))
        };
        let headers = wildcard_list("allowHeaders", &self.allow_headers, MAX_HEADERS, header)?;
        let expose = wildcard_list("exposeHeaders", &self.expose_headers, MAX_HEADERS, header)?;
        let max_age = match self.max_age {
            None => DEFAULT_MAX_AGE,
            Some(s) => u32::try_from(s)
                .ok()
                .filter(|s| *s >= 1 && i32::try_from(*s).is_ok())
                .ok_or_else(|| ("maxAge".to_owned(), format!("{s} is not from 1 to 2^31-1")))?,
        };
        Ok(Cors {
            origins,
            credentials: self.allow_credentials == Some(true),
            methods,
            headers,
            expose,
            max_age,
        })
    }
}

/// A list of at most `max` values or `*` alone, each value compiled.
fn wildcard_list<T>(
    field: &str,
    values: &[String],
    max: usize,
    compile: impl Fn(&String) -> Result<T, String>,
) -> Result<Allowed<T>, Invalid> {
    if values.len() > max {
        return Err((field.to_owned(), format!("at most {max} values")));
    }
    if values.iter().any(|v| v == "*") {
        return if values.len() == 1 {
            Ok(Allowed::Any)
        } else {
            Err((field.to_owned(), "'*' cannot stand alongside others".into()))
        };
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| compile(v).map_err(|reason| (format!("{field}[{i}]"), reason)))
        .collect::<Result<_, _>>()
        .map(Allowed::Only)
}

/// An origin `<scheme>://<host>(:<port>)`, lower-cased; `pattern` lets the
/// host start with `*`.
fn parse_origin(v: &str, pattern: bool) -> Option<Origin> {
    let (scheme, rest) = v.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    // An IPv6 host keeps its brackets, and its colons are not the port's.
    let (host, port) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains(']') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0)?,
    };
    let host = host.to_ascii_lowercase();
    if host.is_empty() || host.contains(['/', '?', '#', '@']) {
        return None;
    }
    let host = match host.strip_prefix('*') {
        Some(suffix) if pattern && !suffix.contains('*') => Host::Suffix(suffix.to_owned()),
        Some(_) => return None,
        None if host.contains('*') => return None,
        None => Host::Exact(host),
    };
    if let Host::Exact(h) | Host::Suffix(h) = &host
        && !h.is_empty()
        && http::uri::Authority::try_from(h.trim_start_matches('.')).is_err()
    {
        return None;
    }
    Some(Origin { scheme, host, port })
}

impl Origin {
    fn allows(&self, origin: &Origin) -> bool {
        self.scheme == origin.scheme
            && self.port == origin.port
            && match (&self.host, &origin.host) {
                (Host::Exact(a), Host::Exact(b)) => a == b,
                (Host::Suffix(s), Host::Exact(b)) => b.len() > s.len() && b.ends_with(s.as_str()),
                _ => false,
            }
    }
}

/// Whether a request is a CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(header::ORIGIN)
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl Cors {
    /// The request's `Origin` when this filter allows it.
    fn allowed<'h>(&self, headers: &'h HeaderMap) -> Option<&'h HeaderValue> {
        let value = headers.get(header::ORIGIN)?;
        match &self.origins {
            Allowed::Any => Some(value),
            Allowed::Only(list) => {
                let origin = parse_origin(value.to_str().ok()?, false)?;
                list.iter().any(|o| o.allows(&origin)).then_some(value)
            }
        }
    }

    /// `Access-Control-Allow-Origin` (with `Vary: Origin` when the answer
    /// depends on it) and `-Credentials`.
    fn origin_headers(&self, origin: &HeaderValue, out: &mut HeaderMap) {
        if self.origins == Allowed::Any && !self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        } else {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            out.append(header::VARY, HeaderValue::from_static("origin"));
        }
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }

    /// The headers of the agent's answer to a preflight: none of CORS's
    /// when the origin is not allowed (the browser then stops), as the API
    /// allows.
    pub fn preflight(&self, request: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::new();
        let Some(origin) = self.allowed(request) else {
            return out;
        };
        self.origin_headers(origin, &mut out);
        // With credentials a browser reads `*` literally: the request's own
        // method and headers are named instead.
        let list = |allowed: &Allowed<String>, asked: header::HeaderName| match allowed {
            Allowed::Any if !self.credentials => Some(HeaderValue::from_static("*")),
            Allowed::Any => request.get(asked).cloned(),
            Allowed::Only(l) if l.is_empty() => None,
            Allowed::Only(l) => HeaderValue::from_str(&l.join(", ")).ok(),
        };
        if let Some(v) = list(&self.methods, header::ACCESS_CONTROL_REQUEST_METHOD) {
            out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        if let Some(v) = list(&self.headers, header::ACCESS_CONTROL_REQUEST_HEADERS) {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        out.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(self.max_age),
        );
        out
    }

    /// The headers to put on the answer to a request from an allowed
    /// origin; `None` for a request without one, left as it is.
    pub fn response_headers(&self, request: &HeaderMap) -> Option<HeaderMap> {
        let origin = self.allowed(request)?;
        let mut out = HeaderMap::new();
        self.origin_headers(origin, &mut out);
        let expose = match &self.expose {
            Allowed::Any if !self.credentials => Some(HeaderValue::from_static("*")),
            Allowed::Any => None,
            Allowed::Only(l) if l.is_empty() => None,
            Allowed::Only(l) => HeaderValue::from_str(&l.join(", ")).ok(),
        };
        if let Some(v) = expose {
            out.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
        Some(out)
    }

    /// Puts `headers` (from [`Self::response_headers`]) on an answer, in
    /// place of the backend's own CORS headers; `Vary` is added to.
    pub fn apply(headers: HeaderMap, answer: &mut HeaderMap) {
        for (name, value) in &headers {
            if name == header::VARY {
                answer.append(name, value.clone());
            } else {
                answer.insert(name, value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(yaml: &str) -> Cors {
        serde_yaml_ng::from_str::<CorsFilter>(yaml)
            .unwrap()
            .compile()
            .unwrap()
    }

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn origins_match_by_scheme_host_and_port_with_a_leading_wildcard() {
        let c = cors(
            "{allowOrigins: ['https://shop.example.com', 'http://*.example.org:8080', 'http://[::1]:3000']}",
        );
        let allowed = |o: &str| c.allowed(&request(&[("origin", o)])).is_some();
        assert!(allowed("https://shop.example.com"));
        assert!(
            allowed("https://SHOP.example.com:443"),
            "default port, any case"
        );
        assert!(!allowed("http://shop.example.com"), "another scheme");
        assert!(!allowed("https://shop.example.com:8443"), "another port");
        assert!(!allowed("https://evil-shop.example.com"));
        assert!(allowed("http://a.example.org:8080"));
        assert!(allowed("http://a.b.example.org:8080"), "greedy to the left");
        assert!(
            !allowed("http://example.org:8080"),
            "the wildcard takes a label"
        );
        assert!(!allowed("http://a.example.org"), "port 80");
        assert!(!allowed("http://aexample.org:8080"));
        assert!(allowed("http://[::1]:3000"));
        assert!(!allowed("null"));
        assert!(!allowed("https://shop.example.com/path"));
        let any = cors("{allowOrigins: ['*']}");
        assert!(any.allowed(&request(&[("origin", "null")])).is_some());
    }

    #[test]
    fn a_preflight_is_answered_with_the_lists_or_the_request_s_own_under_credentials() {
        let c = cors(
            "{allowOrigins: ['https://a.test'], allowMethods: [GET, PUT], allowHeaders: [x-token, Content-Type], maxAge: 60}",
        );
        let h = c.preflight(&request(&[
            ("origin", "https://a.test"),
            ("access-control-request-method", "PUT"),
        ]));
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("https://a.test")
        );
        assert_eq!(get(&h, "vary"), Some("origin"));
        assert_eq!(get(&h, "access-control-allow-methods"), Some("GET, PUT"));
        assert_eq!(
            get(&h, "access-control-allow-headers"),
            Some("x-token, content-type")
        );
        assert_eq!(get(&h, "access-control-max-age"), Some("60"));
        assert_eq!(get(&h, "access-control-allow-credentials"), None);
        let other = c.preflight(&request(&[
            ("origin", "https://b.test"),
            ("access-control-request-method", "PUT"),
        ]));
        assert!(other.is_empty(), "{other:?}");

        let any = cors("{allowOrigins: ['*'], allowMethods: ['*'], allowHeaders: ['*']}");
        let asked = request(&[
            ("origin", "https://b.test"),
            ("access-control-request-method", "DELETE"),
            ("access-control-request-headers", "x-a, x-b"),
        ]);
        let h = any.preflight(&asked);
        assert_eq!(get(&h, "access-control-allow-origin"), Some("*"));
        assert_eq!(get(&h, "vary"), None);
        assert_eq!(get(&h, "access-control-allow-methods"), Some("*"));
        assert_eq!(get(&h, "access-control-allow-headers"), Some("*"));
        assert_eq!(get(&h, "access-control-max-age"), Some("5"));
        let creds = cors(
            "{allowOrigins: ['*'], allowMethods: ['*'], allowHeaders: ['*'], allowCredentials: true}",
        );
        let h = creds.preflight(&asked);
        assert_eq!(
            get(&h, "access-control-allow-origin"),
            Some("https://b.test")
        );
        assert_eq!(get(&h, "access-control-allow-credentials"), Some("true"));
        assert_eq!(get(&h, "access-control-allow-methods"), Some("DELETE"));
        assert_eq!(get(&h, "access-control-allow-headers"), Some("x-a, x-b"));
    }

    #[test]
    fn an_allowed_request_s_answer_names_its_origin_and_exposed_headers() {
        let c = cors("{allowOrigins: ['https://a.test'], exposeHeaders: [x-total]}");
        assert!(c.response_headers(&request(&[])).is_none());
        assert!(
            c.response_headers(&request(&[("origin", "https://b.test")]))
                .is_none()
        );
        let add = c
            .response_headers(&request(&[("origin", "https://a.test")]))
            .unwrap();
        let mut answer = request(&[
            ("vary", "accept-encoding"),
            ("access-control-allow-origin", "*"),
        ]);
        Cors::apply(add, &mut answer);
        assert_eq!(
            get(&answer, "access-control-allow-origin"),
            Some("https://a.test"),
            "the backend's own is replaced"
        );
        let vary: Vec<_> = answer.get_all("vary").iter().collect();
        assert_eq!(vary, ["accept-encoding", "origin"]);
        assert_eq!(
            get(&answer, "access-control-expose-headers"),
            Some("x-total")
        );
        let any = cors("{allowOrigins: ['*'], exposeHeaders: ['*'], allowCredentials: true}");
        let h = any
            .response_headers(&request(&[("origin", "https://b.test")]))
            .unwrap();
        assert_eq!(
            get(&h, "access-control-expose-headers"),
            None,
            "'*' is literal then"
        );
    }

    #[test]
    fn bad_lists_name_their_field() {
        let err = |yaml: &str| {
            serde_yaml_ng::from_str::<CorsFilter>(yaml)
                .unwrap()
                .compile()
                .unwrap_err()
        };
        assert_eq!(
            err("{allowOrigins: ['*', 'https://a.test']}").0,
            "allowOrigins"
        );
        assert_eq!(err("{allowOrigins: ['ftp://a.test']}").0, "allowOrigins[0]");
        assert_eq!(
            err("{allowOrigins: ['https://a.*.test']}").0,
            "allowOrigins[0]"
        );
        assert_eq!(
            err("{allowOrigins: ['https://a.test:0']}").0,
            "allowOrigins[0]"
        );
        assert_eq!(
            err("{allowMethods: ['GET', 'BAD METHOD']}").0,
            "allowMethods[1]"
        );
        assert_eq!(err("{allowHeaders: ['x y']}").0, "allowHeaders[0]");
        assert_eq!(err("{maxAge: 0}").0, "maxAge");
        assert_eq!(err("{maxAge: 4294967296}").0, "maxAge");
        let many = format!("{{allowMethods: [{}]}}", ["GET"; 10].join(", "));
        assert_eq!(err(&many).0, "allowMethods");
    }
}
