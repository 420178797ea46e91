//! Health endpoints on 15021: `/healthz/ready` answers 200 only when every
//! readiness condition holds, and otherwise 503 with the missing ones in JSON;
//! `/healthz/live` answers 200 while the process serves at all. The admin API
//! on 127.0.0.1:15000 is in [`api`].

pub mod api;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// Named conditions that must all hold before the node reports ready, each
/// with what is wrong while it does not.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, Condition>>>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Condition {
    met: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Readiness {
    /// Starts with every condition in `names` unmet.
    pub fn new(names: &[&'static str]) -> Self {
        let conditions = names
            .iter()
            .map(|n| {
                let pending = Condition {
                    met: false,
                    detail: Some("not checked yet".into()),
                };
                (*n, pending)
            })
            .collect();
        Self {
            conditions: Arc::new(Mutex::new(conditions)),
        }
    }

    /// Sets a condition; logs the readiness line when the node becomes
    /// ready, and what is missing when it stops being ready.
    pub fn set(&self, name: &'static str, met: bool) {
        self.set_because(name, met.then_some(()).ok_or_else(String::new));
    }

    /// Sets a condition from a check: `Err` says what is wrong.
    pub fn set_because(&self, name: &'static str, check: Result<(), String>) {
        let mut conditions = self.lock();
        let was_ready = conditions.values().all(|c| c.met);
        let was = conditions.get(name).cloned();
        let now = Condition {
            met: check.is_ok(),
            detail: check.err().filter(|d| !d.is_empty()),
        };
        conditions.insert(name, now.clone());
        let ready = conditions.values().all(|c| c.met);
        if ready && !was_ready {
            info!("trellis agent ready");
        } else if was_ready && !ready {
            warn!(
                condition = name,
                detail = now.detail.as_deref().unwrap_or(""),
                "trellis agent not ready"
            );
        } else if !now.met && was.is_some_and(|w| w.detail != now.detail) {
            warn!(
                condition = name,
                detail = now.detail.as_deref().unwrap_or(""),
                "readiness condition not met"
            );
        }
    }

    /// Sets or clears a condition's detail without changing whether it is
    /// met: what is degraded while it still holds.
    pub fn note(&self, name: &'static str, detail: Option<String>) {
        if let Some(c) = self.lock().get_mut(name) {
            c.detail = detail;
        }
    }

    /// Every condition with its state, for `/healthz/ready`.
    fn details(&self) -> serde_json::Value {
        serde_json::to_value(&*self.lock()).unwrap_or_default()
    }

    /// The conditions not yet met; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, c)| !c.met)
            .map(|(n, _)| *n)
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.missing().is_empty()
    }

    /// Returns once every condition holds (checked every 50 ms: conditions
    /// are set from threads outside the runtime too).
    pub async fn until_ready(&self) {
        while !self.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Condition>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.conditions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves the health endpoints on `listener` until the task is dropped.
pub async fn serve_health(listener: TcpListener, readiness: Readiness) {
    serve(listener, "health", move |req| health(&req, &readiness)).await;
}

/// Serves HTTP/1.1 on `listener` with a synchronous handler until the task
/// is dropped.
pub async fn serve<F>(listener: TcpListener, what: &'static str, handler: F)
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = handler(req);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(listener = what, %peer, error = %e, "connection ended with an error");
            }
        });
    }
}

fn health(req: &Request<Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz/ready" => {
            let missing = readiness.missing();
            let status = if missing.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({
                "ready": missing.is_empty(),
                "missing": missing,
                "conditions": readiness.details(),
            });
            reply(status, "application/json", format!("{body}\n"))
        }
        "/healthz/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

pub fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("static content type"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_holds() {
        let r = Readiness::new(&["datapath", "state"]);
        assert_eq!(r.missing(), ["datapath", "state"]);
        r.set("datapath", true);
        assert!(!r.is_ready());
        assert_eq!(r.missing(), ["state"]);
        r.set("state", true);
        assert!(r.is_ready());
        r.set("state", false);
        assert_eq!(r.missing(), ["state"]);
    }

    #[tokio::test]
    async fn serves_ready_and_not_ready_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let readiness = Readiness::new(&["datapath"]);
        let server = tokio::spawn(serve_health(listener, readiness.clone()));

        let get = |path: &'static str| async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("hs");
            tokio::spawn(conn);
            let req = Request::get(path)
                .header("host", "x")
                .body(Full::<Bytes>::default());
            let resp = sender.send_request(req.expect("req")).await.expect("send");
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .expect("body");
            (
                status,
                String::from_utf8(body.to_bytes().to_vec()).expect("utf8"),
            )
        };

        let (status, body) = get("/healthz/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"missing\":[\"datapath\"]"), "{body}");
        readiness.set_because("datapath", Err("no programs attached".into()));
        let (_, body) = get("/healthz/ready").await;
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            body["conditions"]["datapath"],
            serde_json::json!({"met": false, "detail": "no programs attached"})
        );
        readiness.set("datapath", true);
        let (status, body) = get("/healthz/ready").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(get("/healthz/live").await.0, StatusCode::OK);
        assert_eq!(get("/nope").await.0, StatusCode::NOT_FOUND);
        server.abort();
    }
}
