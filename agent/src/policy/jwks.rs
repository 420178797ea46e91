//! Key sets a `RequestAuthentication` names by `jwksUri`, fetched by the
//! agent for the rules that select pods of its node, as istiod fetches them
//! for Envoy: again every refresh period (20 minutes, Istio's default), and
//! after a failure with a growing pause (1 s to 1 min) while the last good
//! set keeps serving. A token whose issuer's set has never been fetched is
//! refused (401), as Envoy refuses it, and has the set fetched again within
//! a second of the last try, so a provider that comes up late is used as
//! soon as it answers. A token naming a key the set lacks has it fetched
//! again too, at most every 10 s, so a provider's new signing key is
//! picked up without waiting for the refresh (a flood of such tokens costs
//! the provider one request per 10 s).
//!
//! The cache is process-wide: rules are compiled from state snapshots, and
//! many snapshots share one issuer's keys.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, OnceLock, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use super::jwt::KeySet;
use crate::state::Snapshot;

/// How often a fetched set is fetched again.
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// One fetch, from connecting to the last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A key set is small; more than this is not one.
const MAX_BYTES: usize = 1 << 20;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);
/// The least time between fetches of a set because a token named a key
/// it lacks.
const KID_REFRESH: Duration = Duration::from_secs(10);

/// What `trellis status` shows of one URI's fetches.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FetchStatus {
    /// The key ids of the set in use, when there is one.
    pub kids: Vec<String>,
    pub fetched: u64,
    pub failed: u64,
    pub last_error: Option<String>,
}

/// One URI's last good set and its fetches.
#[derive(Default)]
struct Fetched {
    keys: Option<Arc<KeySet>>,
    status: FetchStatus,
}

/// The process-wide cache and what asks the fetcher for work.
#[derive(Default)]
struct Registry {
    sets: RwLock<HashMap<String, Fetched>>,
    /// URIs whose set lacked a key a token named.
    stale: std::sync::Mutex<BTreeSet<String>>,
    /// Wakes the fetcher when a token needs a set it does not have.
    wanted_now: tokio::sync::Notify,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

impl Registry {
    fn sets(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Fetched>> {
        self.sets.read().unwrap_or_else(|e| e.into_inner())
    }

    fn sets_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Fetched>> {
        self.sets.write().unwrap_or_else(|e| e.into_inner())
    }

    fn take_stale(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.stale.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Keeps `uri`'s fetch's outcome: a new set replaces the last good one;
    /// a failure leaves it serving.
    fn record(&self, uri: &str, result: Result<KeySet, &str>) {
        let mut sets = self.sets_mut();
        let fetched = sets.entry(uri.to_string()).or_default();
        match result {
            Ok(keys) => {
                fetched.status.kids = keys.kids();
                fetched.status.fetched += 1;
                fetched.keys = Some(Arc::new(keys));
            }
            Err(why) => {
                fetched.status.failed += 1;
                fetched.status.last_error = Some(why.to_string());
            }
        }
    }
}

/// Each wanted URI's fetches.
pub fn status() -> BTreeMap<String, FetchStatus> {
    registry()
        .sets()
        .iter()
        .map(|(uri, f)| (uri.clone(), f.status.clone()))
        .collect()
}

/// Asks for `uri`'s set again: a token named a key it lacks.
pub fn refresh(uri: &str) {
    let registry = registry();
    registry
        .stale
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(uri.to_string());
    registry.wanted_now.notify_one();
}

/// The last good key set fetched from `uri`.
pub fn get(uri: &str) -> Option<Arc<KeySet>> {
    let registry = registry();
    let keys = registry.sets().get(uri).and_then(|f| f.keys.clone());
    if keys.is_none() {
        registry.wanted_now.notify_one();
    }
    keys
}

/// Checks a `jwksUri` as written: `http` or `https`, with a host.
pub fn check_uri(uri: &str) -> Result<Uri, String> {
    let wrong = || format!("{uri:?} is not an http or https URL with a host");
    let parsed: Uri = uri.parse().map_err(|_| wrong())?;
    match (parsed.scheme_str(), parsed.host()) {
        (Some("http" | "https"), Some(_)) => Ok(parsed),
        _ => Err(wrong()),
    }
}

/// The key set URIs of the rules that select pods of `node`.
fn wanted(snapshot: &Snapshot, node: &str) -> BTreeSet<String> {
    snapshot
        .local_workloads(node)
        .flat_map(|w| snapshot.jwt_rules_for(w))
        .filter_map(|r| r.keys.uri().map(str::to_owned))
        .collect()
}

/// When each URI is due, the pause after its last failure, and its last try.
struct Due {
    at: Instant,
    backoff: Duration,
    last: Option<Instant>,
}

/// Keeps the cache filled for the rules of this node's pods, until the
/// state channel closes.
pub async fn run(mut state: watch::Receiver<Arc<Snapshot>>, node: String, refresh: Duration) {
    let registry = registry();
    let mut due: HashMap<String, Due> = HashMap::new();
    loop {
        let wanted = wanted(&state.borrow_and_update(), &node);
        due.retain(|uri, _| wanted.contains(uri));
        registry.sets_mut().retain(|uri, _| wanted.contains(uri));
        let now = Instant::now();
        for uri in &wanted {
            let entry = due.entry(uri.clone()).or_insert(Due {
                at: now,
                backoff: FIRST_RETRY,
                last: None,
            });
            if entry.at > now {
                continue;
            }
            entry.last = Some(now);
            match fetch(uri).await {
                Ok(keys) => {
                    info!(uri = %uri, kids = ?keys.kids(), "key set fetched");
                    registry.record(uri, Ok(keys));
                    entry.at = Instant::now() + refresh;
                    entry.backoff = FIRST_RETRY;
                }
                Err(why) => {
                    warn!(uri = %uri, reason = %why, retry_in = ?entry.backoff, "key set not fetched; the last good one, if any, stays");
                    registry.record(uri, Err(&why));
                    entry.at = Instant::now() + entry.backoff;
                    entry.backoff = (entry.backoff * 2).min(LAST_RETRY);
                }
            }
        }
        let next = due.values().map(|d| d.at).min();
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            () = registry.wanted_now.notified() => {
                let stale = registry.take_stale();
                let sets = registry.sets();
                for (uri, d) in &mut due {
                    let gap = if sets.get(uri).is_none_or(|f| f.keys.is_none()) {
                        FIRST_RETRY
                    } else if stale.contains(uri) {
                        KID_REFRESH
                    } else {
                        continue;
                    };
                    d.at = d.at.min(d.last.map_or_else(Instant::now, |l| l + gap));
                }
            }
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// One GET of `uri`, its body read as a key set.
async fn fetch(uri: &str) -> Result<KeySet, String> {
    let uri = check_uri(uri)?;
    let body = tokio::time::timeout(FETCH_TIMEOUT, get_body(&uri))
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
    let text = std::str::from_utf8(&body).map_err(|_| "the answer is not UTF-8".to_string())?;
    KeySet::parse(text)
}

async fn get_body(uri: &Uri) -> Result<Bytes, String> {
    let host = uri.host().unwrap_or_default();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    // A bracketed IPv6 literal connects without its brackets.
    let address = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((address, port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host, |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = if https {
        let name = rustls_pki_types::ServerName::try_from(address.to_string())
            .map_err(|e| format!("{host}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(client_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        send(TokioIo::new(tls), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    if response.status() != StatusCode::OK {
        return Err(format!("HTTP {}", response.status()));
    }
    Limited::new(response.into_body(), MAX_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("reading the answer: {e}"))
}

async fn send<T>(
    io: TokioIo<T>,
    request: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// TLS to an identity provider: the system's roots (and `SSL_CERT_FILE`
/// or `SSL_CERT_DIR` when set), loaded once.
fn client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no trusted root certificates on this system".into());
            }
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| e.to_string())
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_http_or_https_with_a_host() {
        assert!(check_uri("https://idp.example/keys").is_ok());
        assert!(check_uri("http://10.1.2.3:8080/jwks.json").is_ok());
        for bad in ["ftp://idp/keys", "/keys", "idp.example", "https://"] {
            assert!(check_uri(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_key_set_is_fetched_over_http_and_bad_answers_are_errors() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let jwks = r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "e1", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for answer in [
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{jwks}",
                    jwks.len()
                ),
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string(),
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_string(),
            ] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0; 4096];
                let n = s.read(&mut buf).await.expect("read");
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(head.starts_with("GET /keys HTTP/1.1"), "{head}");
                s.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        let uri = format!("http://{addr}/keys");
        assert_eq!(fetch(&uri).await.expect("fetched").kids(), ["e1"]);
        assert_eq!(fetch(&uri).await.expect_err("404"), "HTTP 404 Not Found");
        assert!(
            fetch(&uri)
                .await
                .expect_err("not a set")
                .contains("Key Set")
        );
    }
}
