//! The part of CEL that Istio's Telemetry examples use, over Envoy's
//! attribute names: access log filters (`response.code >= 400`,
//! `connection.mtls && request.url_path.startsWith('/api')`,
//! `request.duration > duration('500ms')`) and the values of metric labels
//! (`request.host`, `request.headers['x-tenant']`,
//! `string(destination.port)`). Parsed once, when the policy is read (an
//! unknown attribute or a syntax error rejects the policy, naming the
//! place); evaluated over what a request or connection left behind (an
//! access log [`Entry`]). An attribute it does not have (a connection has
//! no `response.code`) is an error, as in CEL: `||` and `&&` absorb it when
//! the other side decides; a filter that ends in an error admits nothing
//! (as Envoy's), a label value that does reads `unknown`.

use std::{fmt, time::Duration};

use crate::access_log::Entry;

/// A parsed expression, with its source text (what is shown and compared).
#[derive(Clone)]
pub struct Expression {
    text: String,
    expr: Expr,
}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Expression {}

impl serde::Serialize for Expression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Why a filter did not parse: the byte offset and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("at {at}: {reason}")]
pub struct ParseError {
    pub at: usize,
    pub reason: String,
}

/// The attributes an expression may name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Attribute {
    /// `request.headers['name']`
    Header(http::HeaderName),
    DestinationPort,
    ResponseCode,
    GrpcStatus,
    ResponseSize,
    RequestSize,
    Method,
    Path,
    UrlPath,
    Host,
    Protocol,
    UserAgent,
    RequestId,
    Duration,
    Mtls,
    Upstream,
    SourcePrincipal,
    SourceWorkload,
    SourceNamespace,
    DestinationPrincipal,
    DestinationWorkload,
    DestinationNamespace,
    DestinationService,
}

const ATTRIBUTES: &[(&str, Attribute)] = &[
    ("response.code", Attribute::ResponseCode),
    ("response.grpc_status", Attribute::GrpcStatus),
    ("response.size", Attribute::ResponseSize),
    ("request.size", Attribute::RequestSize),
    ("request.method", Attribute::Method),
    ("request.path", Attribute::Path),
    ("request.url_path", Attribute::UrlPath),
    ("request.host", Attribute::Host),
    ("request.protocol", Attribute::Protocol),
    ("request.useragent", Attribute::UserAgent),
    ("request.id", Attribute::RequestId),
    ("request.duration", Attribute::Duration),
    ("connection.mtls", Attribute::Mtls),
    ("upstream.address", Attribute::Upstream),
    ("destination.port", Attribute::DestinationPort),
    ("source.principal", Attribute::SourcePrincipal),
    ("source.workload", Attribute::SourceWorkload),
    ("source.namespace", Attribute::SourceNamespace),
    ("destination.principal", Attribute::DestinationPrincipal),
    ("destination.workload", Attribute::DestinationWorkload),
    ("destination.namespace", Attribute::DestinationNamespace),
    ("destination.service", Attribute::DestinationService),
];

#[derive(Clone, Debug, PartialEq)]
enum Value {
    Int(i64),
    Str(String),
    Bool(bool),
    Duration(Duration),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Clone, Debug)]
enum Expr {
    Literal(Value),
    Attribute(Attribute),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Op, Box<Expr>, Box<Expr>),
    Call(Method, Box<Expr>, Box<Expr>),
    /// `string(x)`
    String(Box<Expr>),
}

/// No value: a missing attribute or a type mismatch.
struct NoValue;

/// The longest expression taken, in bytes, and how deep parentheses and
/// calls may nest: parsing and evaluating recurse, and an object from the
/// API must not be able to overflow the agent's stack.
pub const MAX_LEN: usize = 1024;
const MAX_DEPTH: usize = 32;

impl Expression {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        if text.len() > MAX_LEN {
            return Err(ParseError {
                at: MAX_LEN,
                reason: format!("longer than {MAX_LEN} bytes"),
            });
        }
        let mut p = Parser {
            tokens: tokenize(text)?,
            at: 0,
            len: text.len(),
            depth: 0,
        };
        let expr = p.or()?;
        if let Some((at, t)) = p.tokens.get(p.at) {
            return Err(ParseError {
                at: *at,
                reason: format!("unexpected {t}"),
            });
        }
        Ok(Self {
            text: text.to_owned(),
            expr,
        })
    }

    /// Whether it is true of `entry` (a filter: whether the line is
    /// written).
    pub fn admits(&self, entry: &Entry<'_>) -> bool {
        matches!(eval(&self.expr, entry), Ok(Value::Bool(true)))
    }

    /// Its value for `entry` as a label value (`unknown` on an error).
    pub fn label(&self, entry: &Entry<'_>) -> String {
        eval(&self.expr, entry).map_or_else(|NoValue| "unknown".to_owned(), |v| v.text())
    }

    /// The request headers it reads, which a request's [`Entry`] must keep.
    pub fn headers(&self) -> Vec<http::HeaderName> {
        fn walk(e: &Expr, out: &mut Vec<http::HeaderName>) {
            match e {
                Expr::Attribute(Attribute::Header(h)) => {
                    if !out.contains(h) {
                        out.push(h.clone());
                    }
                }
                Expr::Literal(_) | Expr::Attribute(_) => {}
                Expr::Not(x) | Expr::String(x) => walk(x, out),
                Expr::And(l, r) | Expr::Or(l, r) | Expr::Compare(_, l, r) | Expr::Call(_, l, r) => {
                    walk(l, out);
                    walk(r, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.expr, &mut out);
        out
    }
}

impl Value {
    /// As CEL's `string()` writes it.
    fn text(self) -> String {
        match self {
            Self::Int(i) => i.to_string(),
            Self::Str(s) => s,
            Self::Bool(b) => b.to_string(),
            Self::Duration(d) => format!("{}s", d.as_secs_f64()),
        }
    }
}

fn attribute(a: &Attribute, e: &Entry<'_>) -> Result<Value, NoValue> {
    let request = e.request.ok_or(NoValue);
    let text = |v: Option<&http::HeaderValue>| {
        v.and_then(|v| v.to_str().ok())
            .map(|s| Value::Str(s.to_owned()))
            .ok_or(NoValue)
    };
    let t = e.traffic;
    Ok(match a {
        Attribute::Header(name) => text(
            request?
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v),
        )?,
        Attribute::DestinationPort => Value::Int(e.upstream.ok_or(NoValue)?.port().into()),
        Attribute::ResponseCode => Value::Int(e.response_code.ok_or(NoValue)?.into()),
        Attribute::GrpcStatus => Value::Int(e.grpc_status.ok_or(NoValue)?.into()),
        Attribute::ResponseSize => Value::Int(e.bytes_out as i64),
        Attribute::RequestSize => Value::Int(e.bytes_in as i64),
        Attribute::Method => Value::Str(request?.method.as_str().to_owned()),
        Attribute::Path => Value::Str(
            request?
                .path
                .as_ref()
                .map_or("/", |p| p.as_str())
                .to_owned(),
        ),
        Attribute::UrlPath => {
            Value::Str(request?.path.as_ref().map_or("/", |p| p.path()).to_owned())
        }
        Attribute::Host => text(request?.authority.as_ref())?,
        Attribute::Protocol => {
            Value::Str(crate::access_log::version_name(request?.version).to_owned())
        }
        Attribute::UserAgent => text(request?.user_agent.as_ref())?,
        Attribute::RequestId => text(request?.request_id.as_ref())?,
        Attribute::Duration => Value::Duration(e.duration),
        Attribute::Mtls => Value::Bool(t.mtls()),
        Attribute::Upstream => Value::Str(e.upstream.ok_or(NoValue)?.to_string()),
        Attribute::SourcePrincipal => Value::Str(t.source().principal.clone()),
        Attribute::SourceWorkload => Value::Str(t.source().workload.clone()),
        Attribute::SourceNamespace => Value::Str(t.source().namespace.clone()),
        Attribute::DestinationPrincipal => Value::Str(t.destination().principal.clone()),
        Attribute::DestinationWorkload => Value::Str(t.destination().workload.clone()),
        Attribute::DestinationNamespace => Value::Str(t.destination().namespace.clone()),
        Attribute::DestinationService => Value::Str(t.service().host.clone()),
    })
}

fn eval(expr: &Expr, e: &Entry<'_>) -> Result<Value, NoValue> {
    let boolean = |x: &Expr| match eval(x, e)? {
        Value::Bool(b) => Ok(b),
        _ => Err(NoValue),
    };
    Ok(match expr {
        Expr::Literal(v) => v.clone(),
        Expr::Attribute(a) => attribute(a, e)?,
        Expr::String(x) => Value::Str(eval(x, e)?.text()),
        Expr::Not(x) => Value::Bool(!boolean(x)?),
        // CEL's commutative logic: a decided side wins over an error.
        Expr::And(l, r) => match (boolean(l), boolean(r)) {
            (Ok(false), _) | (_, Ok(false)) => Value::Bool(false),
            (Ok(true), Ok(true)) => Value::Bool(true),
            _ => return Err(NoValue),
        },
        Expr::Or(l, r) => match (boolean(l), boolean(r)) {
            (Ok(true), _) | (_, Ok(true)) => Value::Bool(true),
            (Ok(false), Ok(false)) => Value::Bool(false),
            _ => return Err(NoValue),
        },
        Expr::Compare(op, l, r) => {
            let ordering = match (eval(l, e)?, eval(r, e)?) {
                (Value::Int(a), Value::Int(b)) => a.cmp(&b),
                (Value::Str(a), Value::Str(b)) => a.cmp(&b),
                (Value::Duration(a), Value::Duration(b)) => a.cmp(&b),
                (Value::Bool(a), Value::Bool(b)) if matches!(op, Op::Eq | Op::Ne) => a.cmp(&b),
                _ => return Err(NoValue),
            };
            Value::Bool(match op {
                Op::Eq => ordering.is_eq(),
                Op::Ne => ordering.is_ne(),
                Op::Lt => ordering.is_lt(),
                Op::Le => ordering.is_le(),
                Op::Gt => ordering.is_gt(),
                Op::Ge => ordering.is_ge(),
            })
        }
        Expr::Call(method, target, argument) => match (eval(target, e)?, eval(argument, e)?) {
            (Value::Str(s), Value::Str(a)) => Value::Bool(match method {
                Method::StartsWith => s.starts_with(&a),
                Method::EndsWith => s.ends_with(&a),
                Method::Contains => s.contains(&a),
            }),
            _ => return Err(NoValue),
        },
    })
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    Int(i64),
    Str(String),
    Punct(&'static str),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ident(s) => write!(f, "{s:?}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Str(s) => write!(f, "string {s:?}"),
            Self::Punct(p) => write!(f, "{p:?}"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, ParseError> {
    const PUNCT: [&str; 16] = [
        "&&", "||", "==", "!=", "<=", ">=", "<", ">", "!", "(", ")", "[", "]", ".", ",", "-",
    ];
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let n = text[start..i].parse().map_err(|_| ParseError {
                at: start,
                reason: "a number too large".into(),
            })?;
            out.push((start, Token::Int(n)));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push((start, Token::Ident(text[start..i].to_owned())));
        } else if c == b'\'' || c == b'"' {
            let start = i;
            let end = text[i + 1..].find(c as char).ok_or(ParseError {
                at: start,
                reason: "a string without its closing quote".into(),
            })?;
            out.push((start, Token::Str(text[i + 1..i + 1 + end].to_owned())));
            i += end + 2;
        } else if let Some(p) = PUNCT.iter().find(|p| text[i..].starts_with(**p)) {
            out.push((i, Token::Punct(p)));
            i += p.len();
        } else {
            return Err(ParseError {
                at: i,
                reason: format!("unexpected {:?}", text[i..].chars().next().unwrap_or(' ')),
            });
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
    /// The text's length, where "the end" is.
    len: usize,
    /// Sub-expressions open (parentheses, calls' arguments).
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn here(&self) -> usize {
        self.tokens.get(self.at).map_or(self.len, |(at, _)| *at)
    }

    fn error<T>(&self, reason: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            at: self.here(),
            reason: reason.into(),
        })
    }

    fn eat(&mut self, punct: &str) -> bool {
        let found = matches!(self.peek(), Some(Token::Punct(p)) if *p == punct);
        if found {
            self.at += 1;
        }
        found
    }

    fn expect(&mut self, punct: &str) -> Result<(), ParseError> {
        if self.eat(punct) {
            Ok(())
        } else {
            self.error(format!("expected {punct:?}"))
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.error(format!("nested deeper than {MAX_DEPTH}"));
        }
        let parsed = self.or_chain();
        self.depth -= 1;
        parsed
    }

    fn or_chain(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.relation()?;
        while self.eat("&&") {
            left = Expr::And(Box::new(left), Box::new(self.relation()?));
        }
        Ok(left)
    }

    fn relation(&mut self) -> Result<Expr, ParseError> {
        let left = self.unary()?;
        let op = match self.peek() {
            Some(Token::Punct("==")) => Op::Eq,
            Some(Token::Punct("!=")) => Op::Ne,
            Some(Token::Punct("<")) => Op::Lt,
            Some(Token::Punct("<=")) => Op::Le,
            Some(Token::Punct(">")) => Op::Gt,
            Some(Token::Punct(">=")) => Op::Ge,
            _ => return Ok(left),
        };
        self.at += 1;
        let right = self.unary()?;
        Ok(Expr::Compare(op, Box::new(left), Box::new(right)))
    }

    /// `!` binds tighter than a comparison, as in CEL (`!a == b` is
    /// `(!a) == b`); read in a loop, so a run of them cannot recurse.
    fn unary(&mut self) -> Result<Expr, ParseError> {
        let mut nots = 0;
        while self.eat("!") {
            nots += 1;
        }
        let mut x = self.primary()?;
        for _ in 0..nots {
            x = Expr::Not(Box::new(x));
        }
        Ok(x)
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let start = self.here();
        let Some(token) = self.peek().cloned() else {
            return self.error("an expression ends too soon");
        };
        self.at += 1;
        match token {
            Token::Punct("(") => {
                let inner = self.or()?;
                self.expect(")")?;
                Ok(inner)
            }
            Token::Punct("-") => match self.peek().cloned() {
                Some(Token::Int(n)) => {
                    self.at += 1;
                    Ok(Expr::Literal(Value::Int(-n)))
                }
                _ => self.error("expected a number after '-'"),
            },
            Token::Int(n) => Ok(Expr::Literal(Value::Int(n))),
            Token::Str(s) => self.methods(Expr::Literal(Value::Str(s))),
            Token::Ident(word) => match word.as_str() {
                "string" => {
                    self.expect("(")?;
                    let inner = self.or()?;
                    self.expect(")")?;
                    self.methods(Expr::String(Box::new(inner)))
                }
                "true" => Ok(Expr::Literal(Value::Bool(true))),
                "false" => Ok(Expr::Literal(Value::Bool(false))),
                "duration" => {
                    self.expect("(")?;
                    let at = self.here();
                    let Some(Token::Str(text)) = self.peek().cloned() else {
                        return self.error("duration() takes a string such as '500ms'");
                    };
                    self.at += 1;
                    self.expect(")")?;
                    let d = parse_duration(&text).ok_or(ParseError {
                        at,
                        reason: format!("{text:?} is not a duration (such as 500ms, 2s, 1m)"),
                    })?;
                    Ok(Expr::Literal(Value::Duration(d)))
                }
                _ => {
                    let mut path = word;
                    // Attribute names are dotted; a dot before a method
                    // name followed by `(` ends the attribute.
                    while matches!(self.peek(), Some(Token::Punct(".")))
                        && !matches!(self.tokens.get(self.at + 2), Some((_, Token::Punct("("))))
                    {
                        self.at += 1;
                        match self.peek().cloned() {
                            Some(Token::Ident(next)) => {
                                self.at += 1;
                                path.push('.');
                                path.push_str(&next);
                            }
                            _ => return self.error("expected a name after '.'"),
                        }
                    }
                    if path == "request.headers" {
                        return self.header(start);
                    }
                    let Some((_, a)) = ATTRIBUTES.iter().find(|(name, _)| *name == path) else {
                        return Err(ParseError {
                            at: start,
                            reason: format!(
                                "unknown attribute {path:?} (known: {})",
                                ATTRIBUTES
                                    .iter()
                                    .map(|(n, _)| *n)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        });
                    };
                    self.methods(Expr::Attribute(a.clone()))
                }
            },
            other => Err(ParseError {
                at: start,
                reason: format!("unexpected {other}"),
            }),
        }
    }

    /// `['name']` after `request.headers`.
    fn header(&mut self, start: usize) -> Result<Expr, ParseError> {
        if !self.eat("[") {
            return Err(ParseError {
                at: start,
                reason: "request.headers is read one header at a time: request.headers['name']"
                    .into(),
            });
        }
        let at = self.here();
        let Some(Token::Str(name)) = self.peek().cloned() else {
            return self.error("expected a header name in quotes");
        };
        self.at += 1;
        self.expect("]")?;
        let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| ParseError {
            at,
            reason: format!("{name:?} is not a header name"),
        })?;
        self.methods(Expr::Attribute(Attribute::Header(name)))
    }

    /// `.startsWith(x)`, `.endsWith(x)`, `.contains(x)` after a value.
    fn methods(&mut self, mut target: Expr) -> Result<Expr, ParseError> {
        while self.eat(".") {
            let method = match self.peek() {
                Some(Token::Ident(m)) if m == "startsWith" => Method::StartsWith,
                Some(Token::Ident(m)) if m == "endsWith" => Method::EndsWith,
                Some(Token::Ident(m)) if m == "contains" => Method::Contains,
                _ => return self.error("expected startsWith, endsWith or contains"),
            };
            self.at += 1;
            self.expect("(")?;
            let argument = self.or()?;
            self.expect(")")?;
            target = Expr::Call(method, Box::new(target), Box::new(argument));
        }
        Ok(target)
    }
}

/// `500ms`, `2s`, `1m`, `1h`, `1m30s`, `250us`.
fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = [
            ("ms", Duration::from_millis(n)),
            ("us", Duration::from_micros(n)),
            ("ns", Duration::from_nanos(n)),
            ("h", Duration::from_secs(n * 3600)),
            ("m", Duration::from_secs(n * 60)),
            ("s", Duration::from_secs(n)),
        ]
        .into_iter()
        .find(|(u, _)| rest.starts_with(u))
        .map(|(u, d)| (d, u.len()))?;
        total += unit;
        rest = &rest[len..];
    }
    (!text.is_empty()).then_some(total)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        access_log::RequestLine,
        metrics::istio::{Peer, Reporter, ServiceName, Traffic},
    };

    fn traffic(mtls: bool) -> Traffic {
        let mut web = Peer::unknown();
        web.workload = "web".into();
        web.namespace = "shop".into();
        Traffic::new(
            Reporter::Destination,
            Arc::new(Peer::unknown()),
            Arc::new(web),
            Arc::new(ServiceName::of("shop/web")),
            "http",
            mtls,
        )
    }

    fn entry<'a>(
        traffic: &'a Traffic,
        request: Option<&'a RequestLine>,
        code: Option<u16>,
        ms: u64,
    ) -> Entry<'a> {
        Entry {
            traffic,
            start: std::time::SystemTime::now(),
            duration: Duration::from_millis(ms),
            upstream: Some("10.0.0.7:8080".parse().unwrap()),
            route: None,
            bytes_in: 10,
            bytes_out: 2048,
            response_code: code,
            grpc_status: None,
            flags: "-",
            trace_id: None,
            request,
        }
    }

    fn line(method: &str, path: &str) -> RequestLine {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web.shop:8080")
            .header("user-agent", "curl/8")
            .header("x-tenant", "acme")
            .body(())
            .unwrap();
        RequestLine::of(&req, &[http::HeaderName::from_static("x-tenant")])
    }

    #[test]
    fn filters_decide_as_cel_would() {
        let t = traffic(true);
        let get = line("GET", "/api/v1/items?page=2");
        let ok = entry(&t, Some(&get), Some(200), 20);
        let failed = entry(&t, Some(&get), Some(503), 900);
        let connection = entry(&t, None, None, 5);
        let cases: &[(&str, [bool; 3])] = &[
            ("response.code >= 400", [false, true, false]),
            (
                "response.code >= 400 || connection.mtls",
                [true, true, true],
            ),
            ("!(response.code < 400)", [false, true, false]),
            (
                "response.code == 200 && request.method == 'GET'",
                [true, false, false],
            ),
            (
                "request.url_path.startsWith('/api') && request.path.endsWith(\"page=2\")",
                [true, true, false],
            ),
            ("request.url_path == '/api/v1/items'", [true, true, false]),
            ("request.host.contains('shop')", [true, true, false]),
            ("request.duration > duration('500ms')", [false, true, false]),
            ("request.duration <= duration('1m30s')", [true, true, true]),
            (
                "response.size > 1000 && request.size < 100",
                [true, true, true],
            ),
            (
                "destination.workload == 'web' && destination.service == 'web.shop.svc.cluster.local'",
                [true, true, true],
            ),
            ("upstream.address.endsWith(':8080')", [true, true, true]),
            (
                "request.protocol == 'HTTP/1.1' && request.useragent.startsWith('curl')",
                [true, true, false],
            ),
            // An error the other side decides; one nothing decides.
            ("false && response.code == 'x'", [false, false, false]),
            ("response.code == 'x'", [false, false, false]),
            ("true || response.code == 'x'", [true, true, true]),
            ("response.code != -1", [true, true, false]),
            ("request.headers['x-tenant'] == 'acme'", [true, true, false]),
            // `!` before `==`: a number negated is an error, not a test.
            ("!response.code == 503", [false, false, false]),
            (
                "!!connection.mtls && !(response.code == 503)",
                [true, false, false],
            ),
            (
                "request.headers[\"x-other\"] == 'acme'",
                [false, false, false],
            ),
            (
                "string(response.code).startsWith('5')",
                [false, true, false],
            ),
            ("destination.port == 8080", [true, true, true]),
        ];
        for (text, want) in cases {
            let f = Expression::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let got = [ok.clone(), failed.clone(), connection.clone()].map(|e| f.admits(&e));
            assert_eq!(got, *want, "{text}");
        }
    }

    #[test]
    fn bad_filters_say_where_and_why() {
        for (text, at, says) in [
            (
                "response.status >= 400",
                0,
                "unknown attribute \"response.status\"",
            ),
            ("response.code >=", 16, "ends too soon"),
            ("(response.code == 200", 21, "expected \")\""),
            ("request.path.matches('x')", 13, "startsWith"),
            ("request.duration > duration('soon')", 28, "not a duration"),
            ("request.path == 'open", 16, "closing quote"),
            ("response.code == 200 200", 21, "unexpected 200"),
            ("response.code # 1", 14, "unexpected '#'"),
            ("request.headers == 'x'", 0, "one header at a time"),
            ("request.headers['a b']", 16, "not a header name"),
            ("string(response.code", 20, "expected \")\""),
        ] {
            let e = Expression::parse(text).expect_err(text);
            assert_eq!(e.at, at, "{text}: {e}");
            assert!(e.reason.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn nothing_from_the_api_overflows_or_panics() {
        let deep = format!("{}true{}", "(".repeat(40), ")".repeat(40));
        let e = Expression::parse(&deep).expect_err("too deep");
        assert!(e.reason.contains("nested deeper"), "{e}");
        let ok = format!("{}true{}", "(".repeat(20), ")".repeat(20));
        assert!(Expression::parse(&ok).is_ok());
        let long = "connection.mtls || ".repeat(60) + "true";
        assert!(
            Expression::parse(&long)
                .expect_err("long")
                .reason
                .contains("longer")
        );
        // A long run of `!` and of `||` stays within the limits.
        let t = traffic(true);
        let connection = entry(&t, None, None, 1);
        for (n, want) in [(1000, true), (1001, false)] {
            let nots = format!("{}true", "!".repeat(n));
            assert_eq!(
                Expression::parse(&nots).expect("nots").admits(&connection),
                want
            );
        }
        // Random texts from the grammar's pieces: each parses or is
        // refused, and what parses evaluates, never panicking.
        const PIECES: &[&str] = &[
            "response.code",
            "request.headers['x-tenant']",
            "request.path",
            "string(",
            "duration('1s')",
            "'é'",
            "\"",
            "'",
            "(",
            ")",
            "[",
            "]",
            "!",
            "-",
            "&&",
            "||",
            "==",
            "<",
            ">=",
            "1",
            "99999999999999999999",
            ".startsWith(",
            ".contains(",
            ",",
            "true",
            "x",
            "é",
            " ",
            "request.",
            "headers",
            "#",
        ];
        let t = traffic(false);
        let get = line("GET", "/a");
        let entries = [
            entry(&t, Some(&get), Some(200), 1),
            entry(&t, None, None, 1),
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut text = String::new();
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            for _ in 0..(seed >> 60) + 1 {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                text.push_str(PIECES[(seed >> 33) as usize % PIECES.len()]);
            }
            if let Ok(x) = Expression::parse(&text) {
                for e in &entries {
                    let _ = (x.admits(e), x.label(e), x.headers());
                }
            }
        }
    }

    #[test]
    fn values_for_labels() {
        let t = traffic(true);
        let get = line("GET", "/api/v1/items?page=2");
        let ok = entry(&t, Some(&get), Some(200), 20);
        let connection = entry(&t, None, None, 5);
        for (text, want) in [
            ("request.host", ["web.shop:8080", "unknown"]),
            ("request.headers['x-tenant']", ["acme", "unknown"]),
            ("string(destination.port)", ["8080", "8080"]),
            ("response.code", ["200", "unknown"]),
            ("connection.mtls", ["true", "true"]),
            ("'fixed'", ["fixed", "fixed"]),
        ] {
            let x = Expression::parse(text).expect(text);
            assert_eq!([x.label(&ok), x.label(&connection)], want, "{text}");
        }
        let x = Expression::parse(
            "request.headers['x-a'] == 'b' || request.headers['X-B'] == request.headers['x-a']",
        )
        .unwrap();
        assert_eq!(
            x.headers(),
            ["x-a", "x-b"].map(http::HeaderName::from_static)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250us"), Some(Duration::from_micros(250)));
        for bad in ["", "5", "ms", "5 s", "1d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
