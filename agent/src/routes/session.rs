//! Session persistence (GEP-1619, a route rule's `sessionPersistence`):
//! the first request of a client is balanced as usual, and its answer
//! carries a token (a cookie, or a header the client sends back) naming the
//! endpoint that served it; later requests with the token go to that
//! endpoint while it is usable and the session has not timed out, after
//! which a new session starts on another.
//!
//! The token is the endpoint's address and the session's start and last
//! use, base64url-encoded: not a secret and not signed, since all it can
//! steer a request to is one of the endpoints the request could be balanced
//! to anyway (a token naming anything else starts a new session).

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderValue, header};
use serde::{Deserialize, Serialize};

use super::http_route::parse_duration;

/// `SessionPersistence` as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionPersistence {
    #[serde(default)]
    pub session_name: Option<String>,
    #[serde(default)]
    pub absolute_timeout: Option<String>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<Kind>,
    #[serde(default)]
    pub cookie_config: Option<CookieConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Kind {
    Cookie,
    Header,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CookieConfig {
    #[serde(default)]
    pub lifetime_type: Option<Lifetime>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Lifetime {
    /// The cookie lasts `absoluteTimeout` (`Max-Age`), browser restarts
    /// included.
    Permanent,
    /// The cookie ends with the browser's session (no `Max-Age`).
    Session,
}

/// The name when the rule gives none (the API leaves it to
/// implementations).
const DEFAULT_NAME: &str = "trellis-session";

/// The API's limit on `sessionName`.
const MAX_NAME: usize = 128;

/// A compiled `sessionPersistence`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// The cookie's or header's name.
    pub name: String,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub absolute: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
    /// A cookie with `Max-Age` (the absolute timeout).
    pub permanent: bool,
}

/// `(field under sessionPersistence, reason)`.
type Invalid = (String, String);

impl SessionPersistence {
    /// Checks and compiles it.
    pub fn compile(&self) -> Result<Session, Invalid> {
        let kind = self.kind.unwrap_or(Kind::Cookie);
        let name = self.session_name.as_deref().unwrap_or(DEFAULT_NAME);
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(("sessionName".into(), format!("1 to {MAX_NAME} characters")));
        }
        // A cookie's name is a token (RFC 6265 4.1.1), as a header's is.
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err((
                "sessionName".into(),
                format!("{name:?} is not a token a cookie or header can be named"),
            ));
        }
        let duration = |field: &str, v: &Option<String>| -> Result<Option<Duration>, Invalid> {
            match v.as_deref().map(parse_duration).transpose() {
                Ok(Some(d)) if d.is_zero() => Err((field.into(), "must be more than 0".into())),
                Ok(d) => Ok(d),
                Err(reason) => Err((field.into(), reason)),
            }
        };
        let absolute = duration("absoluteTimeout", &self.absolute_timeout)?;
        let idle = duration("idleTimeout", &self.idle_timeout)?;
        let lifetime = self.cookie_config.as_ref().and_then(|c| c.lifetime_type);
        let permanent = lifetime == Some(Lifetime::Permanent);
        if permanent && absolute.is_none() {
            return Err((
                "absoluteTimeout".into(),
                "required when cookieConfig.lifetimeType is Permanent".into(),
            ));
        }
        if kind == Kind::Header && lifetime.is_some() {
            return Err(("cookieConfig".into(), "only for type Cookie".into()));
        }
        Ok(Session {
            // Header names are lower case on the wire.
            name: match kind {
                Kind::Header => name.to_ascii_lowercase(),
                Kind::Cookie => name.to_owned(),
            },
            kind,
            absolute,
            idle,
            permanent,
        })
    }
}

/// What a token holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub endpoint: SocketAddr,
    /// When the session began and when it was last used, in milliseconds
    /// since the epoch (a wall clock: sessions outlive the agent's
    /// restarts).
    pub started: u64,
    pub used: u64,
}

impl Token {
    fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}|{}|{}", self.endpoint, self.started, self.used))
    }

    fn decode(text: &str) -> Option<Self> {
        let raw = URL_SAFE_NO_PAD.decode(text.trim()).ok()?;
        let raw = std::str::from_utf8(&raw).ok()?;
        let mut parts = raw.split('|');
        let token = Self {
            endpoint: parts.next()?.parse().ok()?,
            started: parts.next()?.parse().ok()?,
            used: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(token)
    }
}

/// Milliseconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Session {
    /// The request's session, while it has not timed out at `now`.
    pub fn of(&self, request: &HeaderMap, now: u64) -> Option<Token> {
        let token = match self.kind {
            Kind::Header => request
                .get(self.name.as_str())
                .and_then(|v| Token::decode(v.to_str().ok()?)),
            Kind::Cookie => request
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == self.name).then(|| Token::decode(v))?
                }),
        }?;
        let within = |limit: Option<Duration>, since: u64| {
            limit.is_none_or(|l| u128::from(now.saturating_sub(since)) < l.as_millis())
        };
        (within(self.absolute, token.started) && within(self.idle, token.used)).then_some(token)
    }

    /// The token the answer carries, if any: a new session when the request
    /// had none or was served elsewhere, the same one with its last use
    /// moved on when an idle timeout needs it.
    pub fn next(&self, held: Option<Token>, served: SocketAddr, now: u64) -> Option<Token> {
        match held {
            Some(t) if t.endpoint == served => self.idle.map(|_| Token { used: now, ..t }),
            _ => Some(Token {
                endpoint: served,
                started: now,
                used: now,
            }),
        }
    }

    /// Puts `token` on an answer: `Set-Cookie` or the header.
    pub fn set(&self, token: Token, answer: &mut HeaderMap) {
        let value = token.encode();
        let text = match self.kind {
            Kind::Header => value,
            Kind::Cookie => {
                let mut cookie = format!("{}={value}; Path=/; HttpOnly", self.name);
                if self.permanent
                    && let Some(a) = self.absolute
                {
                    // What is left of the session, not its whole length.
                    let gone = Duration::from_millis(token.used.saturating_sub(token.started));
                    let left = a.saturating_sub(gone).as_secs();
                    cookie.push_str(&format!("; Max-Age={}", left.max(1)));
                }
                cookie
            }
        };
        let Ok(value) = HeaderValue::from_str(&text) else {
            return;
        };
        match self.kind {
            Kind::Header => {
                if let Ok(name) = http::HeaderName::from_bytes(self.name.as_bytes()) {
                    answer.insert(name, value);
                }
            }
            Kind::Cookie => {
                answer.append(header::SET_COOKIE, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(yaml: &str) -> Session {
        serde_yaml_ng::from_str::<SessionPersistence>(yaml)
            .unwrap()
            .compile()
            .unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn cookie(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn a_cookie_session_names_its_endpoint_until_it_times_out() {
        let s = session("{sessionName: shop, absoluteTimeout: 1h, idleTimeout: 10m}");
        let served = addr("10.1.0.5:8080");
        let first = s.next(None, served, 1_000_000).expect("a new session");
        let mut answer = HeaderMap::new();
        s.set(first, &mut answer);
        let set = answer[header::SET_COOKIE].to_str().unwrap().to_owned();
        assert!(
            set.starts_with("shop=") && set.ends_with("; Path=/; HttpOnly"),
            "{set}"
        );
        assert!(!set.contains("Max-Age"), "a session cookie: {set}");
        let value = set.split(';').next().unwrap();
        let request = cookie(&format!("a=1; {value}; b=2"));
        assert_eq!(s.of(&request, 1_599_999), Some(first), "idle under 10m");
        assert_eq!(s.of(&request, 1_600_000), None, "idle 10m");
        // Used 500 s in: the idle time counts from there, the absolute from
        // the start.
        let used = s.next(Some(first), served, 1_500_000).expect("moved on");
        assert_eq!((used.started, used.used), (1_000_000, 1_500_000));
        let mut answer = HeaderMap::new();
        s.set(used, &mut answer);
        let value = answer[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(s.of(&cookie(&value), 2_099_999), Some(used));
        assert_eq!(
            s.of(&cookie(&value), 4_600_000),
            None,
            "past the absolute 1h"
        );
        // Served elsewhere (its endpoint gone or failed): a new session.
        let moved = s
            .next(Some(used), addr("10.1.0.6:8080"), 1_700_000)
            .unwrap();
        assert_eq!(
            (moved.endpoint, moved.started),
            (addr("10.1.0.6:8080"), 1_700_000)
        );
        // Without an idle timeout a kept session needs no new token.
        let plain = session("{}");
        assert_eq!(plain.name, "trellis-session");
        assert_eq!(plain.next(Some(first), served, 5_000_000), None);
        for bad in ["trellis-session=x", "trellis-session=", "other=1"] {
            assert_eq!(plain.of(&cookie(bad), 1_000_000), None, "{bad}");
        }
    }

    #[test]
    fn a_header_session_and_a_permanent_cookie() {
        let s = session("{sessionName: X-Shop-Session, type: Header}");
        let t = s.next(None, addr("[fd00::5]:80"), 10).unwrap();
        let mut answer = HeaderMap::new();
        s.set(t, &mut answer);
        let mut request = HeaderMap::new();
        request.insert("x-shop-session", answer["x-shop-session"].clone());
        assert_eq!(s.of(&request, 1_000_000), Some(t), "no timeout");
        let p = session("{absoluteTimeout: 2h, cookieConfig: {lifetimeType: Permanent}}");
        let t = p.next(None, addr("10.1.0.5:80"), 100_000).unwrap();
        let mut answer = HeaderMap::new();
        p.set(Token { used: 160_000, ..t }, &mut answer);
        let set = answer[header::SET_COOKIE].to_str().unwrap();
        assert!(set.ends_with("; Max-Age=7140"), "{set}");
    }

    #[test]
    fn bad_settings_name_their_field() {
        let err = |yaml: &str| {
            serde_yaml_ng::from_str::<SessionPersistence>(yaml)
                .unwrap()
                .compile()
                .unwrap_err()
                .0
        };
        assert_eq!(
            err("{cookieConfig: {lifetimeType: Permanent}}"),
            "absoluteTimeout"
        );
        assert_eq!(
            err("{type: Header, cookieConfig: {lifetimeType: Session}}"),
            "cookieConfig"
        );
        assert_eq!(err("{sessionName: 'a b'}"), "sessionName");
        assert_eq!(
            err(&format!("{{sessionName: {}}}", "a".repeat(129))),
            "sessionName"
        );
        assert_eq!(err("{idleTimeout: 5d}"), "idleTimeout");
        assert_eq!(err("{absoluteTimeout: 0s}"), "absoluteTimeout");
    }
}
