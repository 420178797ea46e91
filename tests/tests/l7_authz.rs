//! L7 authorization with real clients and servers: an `AuthorizationPolicy`
//! with paths, methods, gRPC methods and a header condition, enforced by the
//! server's agent per request: for callers on another node inside their
//! HBONE streams, for a caller on the server's node by the outbound proxy
//! (pod IP: L4 path turned HTTP; Service VIP: the L7 path). Denied requests
//! get 403 `x-trellis-reason: denied` (gRPC `PERMISSION_DENIED`) and the
//! connection carries on; a caller the L4 part already refuses is refused
//! at connect; traffic that is not HTTP is judged by L4 rules alone.

use std::time::Duration;

use trellis_tests::{Lab, Pod, mesh, py};

const VIP: &str = "10.96.0.30";

/// `curl` from `client` with `options`, on one connection when it can: per
/// URL the status, then ` ` and the number of new connections it took, one
/// per line; `000 0` when refused.
fn curl(client: &Pod, options: &[&str], urls: &[&str]) -> String {
    let mut all = vec!["-s", "-m", "10", "-w", "%{http_code} %{num_connects}\\n"];
    all.extend_from_slice(options);
    for url in urls {
        all.extend_from_slice(&["-o", "/dev/null", url]);
    }
    let out = client
        .exec()
        .output("curl", &all, Duration::from_secs(60))
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `curl -D -` from `client` with request `headers`: the status, the
/// response head in lower case, and the body (`000` and nothing when no
/// answer came).
fn exchange(client: &Pod, url: &str, headers: &[&str]) -> (String, String, String) {
    let mut args = vec!["-s", "-m", "10", "-D", "-"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = client
        .exec()
        .output("curl", &args, Duration::from_secs(30))
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("000")
        .to_string();
    (status, head.to_lowercase(), body.to_string())
}

fn codes(out: &str) -> Vec<&str> {
    out.lines().filter_map(|l| l.split(' ').next()).collect()
}

#[test]
fn l7_authorization_per_request() {
    let mut lab = Lab::new("l7_authz").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let remote_reader = lab.add_pod(&a, "a1").expect("pod");
    let stranger = lab.add_pod(&a, "a2").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let local_reader = lab.add_pod(&b, "b2").expect("pod");
    let _servers = [
        server
            .serve(py::NAME_SERVER, &["web", "8080"], 8080)
            .expect("server"),
        server
            .serve(py::GRPC_SERVER, &["web", "50051"], 50051)
            .expect("server"),
        server
            .serve(py::ECHO_SERVER, &["9000"], 9000)
            .expect("server"),
    ];
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&remote_reader, "shop", &[], &[], ""),
            mesh::pod(&stranger, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
            mesh::pod(&local_reader, "shop", &[], &[], ""),
            // A Service with a TrafficPolicy: calls to its VIP take the L7 path.
            mesh::service("shop", "web", VIP, 80, "8080", &[("app", "web")]),
            mesh::traffic_policy("shop", "web", "retry: {attempts: 1, retryOn: [connect-failure]}"),
            // Readers may GET /public/*, call Echo/Say; a2 may use the echo
            // port, as TCP.
            mesh::authorization_policy(
                "shop",
                "web-readers",
                "{selector: {matchLabels: {app: web}}, action: ALLOW, rules: [\
                 {from: [{source: {principals: ['*/sa/a1', '*/sa/b2']}}], to: [{operation: {paths: ['/public/*'], methods: [GET]}}]}, \
                 {from: [{source: {principals: ['*/sa/a1', '*/sa/b2']}}], to: [{operation: {grpcMethods: [{service: trellis.test.Echo, method: Say}]}}]}, \
                 {from: [{source: {principals: ['*/sa/a2']}}], to: [{operation: {ports: ['9000']}}]}]}",
            ),
            // Nobody debugs the web port.
            mesh::authorization_policy(
                "shop",
                "no-debug",
                "{selector: {matchLabels: {app: web}}, action: DENY, rules: [\
                 {to: [{operation: {ports: ['8080']}}], when: [{key: 'request.headers[x-debug]', values: ['1']}]}]}",
            ),
        ],
    )
    .expect("mesh");

    let web = format!("http://{}:8080", server.ip);
    let via_vip = format!("http://{VIP}");
    for (reader, how, base) in [
        (&remote_reader, "cross-node, pod IP", &web),
        (&remote_reader, "cross-node, VIP", &via_vip),
        (&local_reader, "same node, pod IP", &web),
        (&local_reader, "same node, VIP", &via_vip),
    ] {
        // Denied requests are answered by the agent and the connection
        // stays: the allowed one after them needs no new connection.
        let out = curl(
            reader,
            &["--path-as-is"],
            &[
                &format!("{base}/private"),
                &format!("{base}/public/%2e%2e/admin"),
                &format!("{base}/public/page"),
            ],
        );
        assert_eq!(codes(&out), ["403", "403", "200"], "{how}: {out}");
        let connects: Vec<&str> = out.lines().filter_map(|l| l.split(' ').nth(1)).collect();
        assert_eq!(connects, ["1", "0", "0"], "{how}: one connection: {out}");
        let out = curl(reader, &["-X", "POST"], &[&format!("{base}/public/page")]);
        assert_eq!(codes(&out), ["403"], "{how}: POST is not allowed: {out}");
        let out = curl(
            reader,
            &["-H", "x-debug: 1"],
            &[&format!("{base}/public/page")],
        );
        assert_eq!(codes(&out), ["403"], "{how}: DENY on a header: {out}");
        let out = curl(
            reader,
            &["-H", "x-debug: 0"],
            &[&format!("{base}/public/page")],
        );
        assert_eq!(codes(&out), ["200"], "{how}: {out}");
        // The agent's answer says why.
        let out = reader
            .exec()
            .output(
                "curl",
                &["-s", "-m", "10", "-i", &format!("{base}/private")],
                Duration::from_secs(30),
            )
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(text.contains("x-trellis-reason: denied"), "{how}: {text}");
        assert!(text.contains("denied by shop/web-readers"), "{how}: {text}");

        // gRPC: Say is allowed, Count is not; the channel carries on.
        let out = reader
            .exec()
            .python_output(
                py::GRPC_PROBE,
                &[&format!("{}:50051", server.ip)],
                Duration::from_secs(60),
            )
            .expect("grpc probe");
        let out: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert_eq!(out["Say"][0], "OK", "{how}: {out}");
        assert_eq!(out["Count"][0], "PERMISSION_DENIED", "{how}: {out}");
        assert_eq!(out["Say2"][0], "OK", "{how}: {out}");
        assert!(
            out["Count"][1]
                .as_str()
                .is_some_and(|d| d.contains("denied")),
            "{how}: {out}"
        );

        // Not HTTP: the readers' rules all need HTTP, so the echo port is closed to them.
        let out = reader
            .exec()
            .python_output(
                py::ECHO_PROBE,
                &[&server.ip.to_string(), "9000"],
                Duration::from_secs(30),
            )
            .expect("echo probe");
        assert_eq!(
            out.trim(),
            "DENIED",
            "{how}: opaque traffic under L7-only rules"
        );
    }

    // a2: no L7 rule for it, so the web port refuses it at connect (401 on
    // HBONE, a reset for the client); its L4 rule lets the echo through.
    let out = curl(&stranger, &[], &[&format!("{web}/public/page")]);
    assert_eq!(codes(&out), ["000"], "a2 refused at connect: {out}");
    let out = stranger
        .exec()
        .python_output(
            py::ECHO_PROBE,
            &[&server.ip.to_string(), "9000"],
            Duration::from_secs(30),
        )
        .expect("echo probe");
    assert_eq!(out.trim(), "not http at all", "a2: L4 rule, opaque traffic");

    // Counted where decided: b's HBONE server for a1, b's outbound proxy
    // for b2 (pod IP) and its L7 path (VIP).
    let status = cluster.agents[1].cli_json("status").expect("status");
    let inbound = &status["inbound"];
    assert!(
        inbound["requests_denied"].as_u64().unwrap_or(0) >= 5,
        "{inbound}"
    );
    assert!(
        inbound["http_inspected"].as_u64().unwrap_or(0) >= 3,
        "{inbound}"
    );
    assert!(
        inbound["opaque_denied"].as_u64().unwrap_or(0) >= 1,
        "{inbound}"
    );
    assert!(inbound["denied"].as_u64().unwrap_or(0) >= 1, "{inbound}");
    let outbound = &status["outbound"];
    assert!(
        outbound["requests_denied"].as_u64().unwrap_or(0) >= 5,
        "{status}"
    );
    assert!(
        status["http"]["denied"].as_u64().unwrap_or(0) >= 5,
        "{status}"
    );
}

/// The client pod's egress NetworkPolicy limits the endpoints a Service
/// call may reach, on the L4 path (per connection) and on the L7 path (per
/// request) alike; a Service none of whose endpoints is allowed is refused.
#[test]
fn egress_network_policy_limits_service_endpoints() {
    let mut lab = Lab::new("l7_egress").expect("lab");
    let a = lab.add_node("a").expect("node");
    let client = lab.add_pod(&a, "a1").expect("pod");
    let allowed = lab.add_pod(&a, "a2").expect("pod");
    let other = lab.add_pod(&a, "a3").expect("pod");
    let _servers = [
        allowed
            .serve(py::NAME_SERVER, &["allowed", "8080"], 8080)
            .expect("server"),
        other
            .serve(py::NAME_SERVER, &["other", "8080"], 8080)
            .expect("server"),
    ];
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a],
        &[
            mesh::node(&a),
            mesh::namespace("shop", true),
            mesh::pod(&client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&allowed, "shop", &[("app", "web"), ("tier", "ok")], &[], ""),
            mesh::pod(&other, "shop", &[("app", "web"), ("tier", "no")], &[], ""),
            mesh::service("shop", "l4", "10.96.0.70", 80, "8080", &[("app", "web")]),
            mesh::service("shop", "l7", "10.96.0.71", 80, "8080", &[("app", "web")]),
            mesh::service(
                "shop",
                "blocked",
                "10.96.0.72",
                80,
                "8080",
                &[("tier", "no")],
            ),
            mesh::traffic_policy("shop", "l7", "loadBalancer: {type: RoundRobin}"),
            mesh::traffic_policy("shop", "blocked", "loadBalancer: {type: RoundRobin}"),
        ],
    )
    .expect("mesh");
    let served = |vip: &str| -> Vec<String> {
        (0..8)
            .map(|_| {
                let out = client
                    .exec()
                    .output(
                        "curl",
                        &["-s", "-m", "10", &format!("http://{vip}/")],
                        Duration::from_secs(30),
                    )
                    .expect("curl");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect()
    };
    // Before any policy, both endpoints serve.
    for vip in ["10.96.0.70", "10.96.0.71"] {
        let got = served(vip);
        assert!(
            got.iter().any(|g| g == "other") && got.iter().any(|g| g == "allowed"),
            "{vip}: {got:?}"
        );
    }
    cluster
        .apply_network_policies(&[mesh::network_policy(
            "shop",
            "client-egress",
            "{podSelector: {matchLabels: {app: client}}, policyTypes: [Egress], \
             egress: [{to: [{podSelector: {matchLabels: {tier: ok}}}], ports: [{port: 8080}]}]}",
        )])
        .expect("policy");
    for vip in ["10.96.0.70", "10.96.0.71"] {
        let got = served(vip);
        assert!(
            got.iter().all(|g| g == "allowed"),
            "{vip}: only the allowed endpoint: {got:?}"
        );
    }
    // None allowed: refused at connect (by the kernel, which applies the
    // same egress policy to the Service's backends), so no answer at all.
    let out = client
        .exec()
        .output(
            "curl",
            &[
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{exitcode}",
                "http://10.96.0.72/",
            ],
            Duration::from_secs(30),
        )
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("000 ") && !text.ends_with(" 0"), "{text}");
    let status = cluster.agents[0].cli_json("status").expect("status");
    assert!(
        status["outbound"]["policy_dropped_backends"].as_u64() >= Some(4),
        "{status}"
    );
    // The flows say why.
    let flows = cluster.agents[0].flows_since(0).expect("flows");
    assert!(
        flows
            .iter()
            .any(|f| f.to_string().contains("service-backend")),
        "{flows:?}"
    );
}

/// An identity provider made with `openssl` alone (no Trellis code): an
/// RSA key, its JWKS, and RS256 tokens signed by `openssl dgst`.
struct TokenIssuer {
    dir: std::path::PathBuf,
    kid: String,
    jwks: String,
}

impl TokenIssuer {
    fn new(dir: std::path::PathBuf, kid: &str) -> Self {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("issuer dir");
        let key = dir.join("key.pem");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl runs");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
            out.stdout
        };
        run(&["genrsa", "-out", key.to_str().expect("utf-8"), "2048"]);
        let modulus = String::from_utf8(run(&[
            "rsa",
            "-in",
            key.to_str().expect("utf-8"),
            "-noout",
            "-modulus",
        ]))
        .expect("text");
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(n), "e": "AQAB",
        }]})
        .to_string();
        Self {
            dir,
            kid: kid.into(),
            jwks,
        }
    }

    /// A token of `claims`, `exp` an hour away unless they set it.
    fn token(&self, mut claims: serde_json::Value) -> String {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        if claims.get("exp").is_none() {
            claims["exp"] = (now + 3600).into();
        }
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.kid});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let input = self.dir.join("signed");
        std::fs::write(&input, &signed).expect("write");
        let out = std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(self.dir.join("key.pem"))
            .arg(&input)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl dgst: {out:?}");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(out.stdout))
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `RequestAuthentication` with tokens from an independent issuer, enforced
/// by the server's agent on each request wherever the caller is (another
/// node, inside HBONE; the same node on the pod IP or, through the L7 path,
/// on the VIP): a request without a token passes where policy allows it, a
/// token that does not verify (forged, expired, another audience, garbage)
/// gets 401 `unauthenticated` with a bearer challenge, a verified one gives
/// the request principal and claims to `AuthorizationPolicy`, is taken off
/// the request (header or query parameter) and its claim is put in the
/// header the rule names, which a client cannot forge.
#[test]
fn request_authentication_with_jwt() {
    const JWT_VIP: &str = "10.96.0.31";
    const ISSUER: &str = "https://idp.trellis.test";
    let idp = TokenIssuer::new(std::env::temp_dir().join("l7_jwt-idp"), "k1");
    let rogue = TokenIssuer::new(std::env::temp_dir().join("l7_jwt-rogue"), "k1");
    // A provider whose key set the agent fetches (jwksUri), from a pod.
    const PARTNER: &str = "https://partner.trellis.test";
    let partner = TokenIssuer::new(std::env::temp_dir().join("l7_jwt-partner"), "p1");
    let partner_jwks = partner.dir.join("jwks.json");
    std::fs::write(&partner_jwks, &partner.jwks).expect("jwks file");
    let mut lab = Lab::new("l7_jwt").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let remote = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let local = lab.add_pod(&b, "b2").expect("pod");
    let plain = lab.add_pod(&b, "b3").expect("pod");
    let keys = lab.add_pod(&b, "b4").expect("pod");
    let _servers = [
        server
            .serve(py::REQUEST_ECHO_SERVER, &["web", "8080"], 8080)
            .expect("server"),
        plain
            .serve(py::REQUEST_ECHO_SERVER, &["plain", "8080"], 8080)
            .expect("server"),
        plain
            .serve(py::GRPC_SERVER, &["plain", "50051"], 50051)
            .expect("server"),
    ];
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&remote, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
            mesh::pod(&local, "shop", &[], &[], ""),
            mesh::pod(&plain, "shop", &[("app", "plain")], &[], ""),
            mesh::pod(&keys, "shop", &[("app", "keys")], &[], ""),
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: RequestAuthentication\n\
                 metadata: {{name: partner, namespace: shop}}\n\
                 spec: {{selector: {{matchLabels: {{app: plain}}}}, jwtRules: [{{issuer: '{PARTNER}', \
                 jwksUri: 'http://{}:8080/keys'}}]}}\n",
                keys.ip
            ),
            mesh::service("shop", "web", JWT_VIP, 80, "8080", &[("app", "web")]),
            mesh::traffic_policy("shop", "web", "retry: {attempts: 1, retryOn: [connect-failure]}"),
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: RequestAuthentication\n\
                 metadata: {{name: jwt, namespace: shop}}\n\
                 spec: {{jwtRules: [{{issuer: '{ISSUER}', \
                 audiences: [shop], jwks: '{}', outputClaimToHeaders: [{{header: x-tag, claim: team}}]}}]}}\n",
                idp.jwks
            ),
            // /api needs a token of team red; /public is open.
            mesh::authorization_policy(
                "shop",
                "api",
                &format!(
                    "{{selector: {{matchLabels: {{app: web}}}}, action: ALLOW, rules: [\
                     {{from: [{{source: {{requestPrincipals: ['{ISSUER}/*']}}}}], to: [{{operation: {{paths: ['/api/*']}}}}], \
                     when: [{{key: 'request.auth.claims[team]', values: [red]}}]}}, \
                     {{to: [{{operation: {{paths: ['/public/*']}}}}]}}]}}"
                ),
            ),
        ],
    )
    .expect("mesh");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let red = idp
        .token(serde_json::json!({"iss": ISSUER, "sub": "alice", "aud": ["shop"], "team": "red"}));
    let blue =
        idp.token(serde_json::json!({"iss": ISSUER, "sub": "bob", "aud": "shop", "team": "blue"}));
    let expired = idp.token(serde_json::json!({"iss": ISSUER, "sub": "alice", "aud": "shop", "team": "red", "exp": now - 600}));
    let other_audience =
        idp.token(serde_json::json!({"iss": ISSUER, "sub": "alice", "aud": "bank", "team": "red"}));
    let forged = rogue
        .token(serde_json::json!({"iss": ISSUER, "sub": "mallory", "aud": "shop", "team": "red"}));
    let unknown_issuer =
        rogue.token(serde_json::json!({"iss": "https://rogue.test", "sub": "m", "aud": "shop"}));

    // (status, reason header, body) of one request.
    let call = |client: &Pod, url: &str, headers: &[String]| -> (String, String, String) {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, head, body) = exchange(client, url, &headers);
        let reason = head
            .lines()
            .find_map(|l| l.strip_prefix("x-trellis-reason: ").map(String::from))
            .unwrap_or_default();
        let challenge = head
            .lines()
            .any(|l| l.starts_with("www-authenticate: bearer"));
        assert_eq!(challenge, status == "401", "{url}: {head}");
        (status, reason, body)
    };
    let bearer = |t: &str| format!("authorization: Bearer {t}");

    let pod_url = format!("http://{}:8080", server.ip);
    let vip_url = format!("http://{JWT_VIP}");
    for (client, how, base) in [
        (&remote, "cross-node, pod IP", &pod_url),
        (&remote, "cross-node, VIP", &vip_url),
        (&local, "same node, pod IP", &pod_url),
        (&local, "same node, VIP", &vip_url),
    ] {
        // No token: open paths pass (a forged claim header taken off),
        // the API is denied.
        let (status, _, body) = call(client, &format!("{base}/public/x"), &["x-tag: red".into()]);
        assert_eq!(status, "200", "{how}: {body}");
        let echo: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(
            echo["tag"],
            serde_json::Value::Null,
            "{how}: a client's own x-tag is dropped: {echo}"
        );
        let (status, reason, _) = call(client, &format!("{base}/api/x"), &[]);
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("403", "denied"),
            "{how}"
        );

        // A verified token: the principal and claim decide; the token is
        // taken off and its claim put in x-tag.
        let (status, _, body) = call(
            client,
            &format!("{base}/api/x"),
            &[bearer(&red), "x-tag: forged".into()],
        );
        assert_eq!(status, "200", "{how}: {body}");
        let echo: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(echo["tag"], "red", "{how}: {echo}");
        assert_eq!(
            echo["authz"],
            serde_json::Value::Null,
            "{how}: the token is taken off: {echo}"
        );
        let (status, reason, _) = call(client, &format!("{base}/api/x"), &[bearer(&blue)]);
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("403", "denied"),
            "{how}: team blue"
        );
        // In the access_token query parameter, taken off the path.
        let (status, _, body) = call(client, &format!("{base}/api/y?a=1&access_token={red}"), &[]);
        assert_eq!(status, "200", "{how}: {body}");
        let echo: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(echo["path"], "/api/y?a=1", "{how}: {echo}");

        // Tokens that do not verify: 401, even on an open path.
        for (token, why) in [
            (&expired, "expired"),
            (&other_audience, "audiences"),
            (&forged, "signature"),
            (&unknown_issuer, "issuer"),
            (&"a.b.c".to_string(), "not header.payload.signature"),
        ] {
            let (status, reason, body) =
                call(client, &format!("{base}/public/x"), &[bearer(token)]);
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("401", "unauthenticated"),
                "{how}: {why}: {body}"
            );
            assert!(body.contains(why), "{how}: {why}: {body}");
        }
    }

    // A pod no AuthorizationPolicy selects: the token alone is checked,
    // which is enough to read its connections as HTTP.
    for client in [&remote, &local] {
        let url = format!("http://{}:8080/any", plain.ip);
        let (status, reason, _) = call(client, &url, &[bearer(&forged)]);
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("401", "unauthenticated")
        );
        let (status, _, body) = call(client, &url, &[bearer(&blue)]);
        assert_eq!(status, "200", "{body}");
        let echo: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(
            (&echo["tag"], &echo["authz"]),
            (&"blue".into(), &serde_json::Value::Null),
            "{echo}"
        );
    }

    // gRPC: a token that does not verify is UNAUTHENTICATED, with why.
    for client in [&remote, &local] {
        let out = client
            .exec()
            .python_output(
                py::GRPC_BEARER,
                &[&format!("{}:50051", plain.ip), &blue, &forged],
                Duration::from_secs(60),
            )
            .expect("grpc");
        let out: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
        assert_eq!(out[0][0], "OK", "{out}");
        assert_eq!(out[1][0], "UNAUTHENTICATED", "{out}");
        assert!(
            out[1][1].as_str().is_some_and(|d| d.contains("signature")),
            "{out}"
        );
    }

    // The partner's keys come from its provider, which is down at first:
    // its tokens are refused, as Envoy refuses them, until the agent has
    // fetched the set (again within a second of a token needing it).
    let url = format!("http://{}:8080/any", plain.ip);
    let token = partner.token(serde_json::json!({"iss": PARTNER, "sub": "p"}));
    let (status, _, body) = call(&remote, &url, &[bearer(&token)]);
    assert_eq!(status, "401", "{body}");
    assert!(body.contains("has not been fetched"), "{body}");
    let _provider = keys
        .serve(
            py::FILE_SERVER,
            &[partner_jwks.to_str().expect("utf-8"), "8080"],
            8080,
        )
        .expect("key set server");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body) = call(&remote, &url, &[bearer(&token)]);
        if status == "200" {
            let echo: serde_json::Value = serde_json::from_str(&body).expect(&body);
            assert_eq!(echo["authz"], serde_json::Value::Null, "{echo}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never fetched: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The provider turns to a new signing key: the first token it signs is
    // refused (no key for its kid) and has the set fetched again, so the
    // next ones pass without waiting for the 20-minute refresh; tokens of
    // the retired key are refused from then on.
    let rotated = TokenIssuer::new(std::env::temp_dir().join("l7_jwt-partner2"), "p2");
    std::fs::write(&partner_jwks, &rotated.jwks).expect("jwks file");
    let new_token = rotated.token(serde_json::json!({"iss": PARTNER, "sub": "p"}));
    let (status, _, body) = call(&remote, &url, &[bearer(&new_token)]);
    assert_eq!(status, "401", "{body}");
    assert!(body.contains("no key"), "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while call(&remote, &url, &[bearer(&new_token)]).0 != "200" {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key was never fetched"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, _, body) = call(&remote, &url, &[bearer(&token)]);
    assert_eq!(status, "401", "the retired key's token: {body}");

    // The agent's status says how the fetches went.
    let status = cluster.agents[1].cli_json("status").expect("status");
    let fetches = &status["jwks"][format!("http://{}:8080/keys", keys.ip)];
    assert!(fetches["fetched"].as_u64() >= Some(1), "{fetches}");
    assert!(fetches["failed"].as_u64() >= Some(1), "{fetches}");
    assert_eq!(fetches["kids"], serde_json::json!(["p2"]), "{fetches}");
    assert!(fetches["fetched"].as_u64() >= Some(2), "{fetches}");
    // `trellis policy` lists both, with the pods each selects on b.
    let policies = cluster.agents[1].cli_json("policy").expect("policy");
    let selects = |name: &str| {
        policies["authentication"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["policy"] == name)
            .map(|p| p["selects"].clone())
    };
    assert_eq!(
        selects("shop/partner"),
        Some(serde_json::json!(["shop/b3"])),
        "{policies}"
    );
    assert_eq!(
        selects("shop/jwt").and_then(|s| s.as_array().map(Vec::len)),
        Some(4),
        "{policies}"
    );
    let text = cluster.agents[1].cli(&["policy"]).expect("policy");
    assert!(
        text.contains("REQUEST AUTHENTICATION") && text.contains(PARTNER),
        "{text}"
    );
    // Another provider's token is still refused there.
    let (status, _, _) = call(&remote, &url, &[bearer(&forged)]);
    assert_eq!(status, "401");

    // Counted where decided: b's HBONE server for a1's pod-IP and VIP
    // calls, b's outbound proxy for b2's pod-IP calls, its L7 path for
    // b2's VIP calls.
    let status = cluster.agents[1].cli_json("status").expect("status");
    for (counter, at_least) in [
        (&status["inbound"]["requests_unauthenticated"], 12),
        (&status["outbound"]["requests_unauthenticated"], 7),
        (&status["http"]["unauthenticated"], 5),
        (&status["inbound"]["requests_denied"], 4),
    ] {
        assert!(
            counter.as_u64().unwrap_or(0) >= at_least,
            "{counter} < {at_least}: {status}"
        );
    }
}

/// `AuthorizationPolicy` with `action: CUSTOM`: requests its rules match
/// are put to the policy's provider, an external authorization service
/// named in the mesh configuration (the `trellis-mesh` ConfigMap's
/// `extensionProviders`, as Istio writes them), by the destination's
/// agent, as the destination pod, through the mesh: an HTTP provider on the
/// other node, a gRPC one (Envoy's check protocol) on the server's node;
/// from a caller on each node, to the pod IP and to a Service VIP. The
/// provider's denial is the client's answer; its allowing answer's changes
/// reach the server; DENY policies still apply after it; a provider the
/// configuration lacks denies; a broken configuration keeps the last good
/// one serving.
#[test]
fn custom_policies_ask_their_providers() {
    const WEB_VIP: &str = "10.96.0.36";
    let mut lab = Lab::new("l7_custom").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let remote = lab.add_pod(&a, "a1").expect("pod");
    let http_authz = lab.add_pod(&a, "a2").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let local = lab.add_pod(&b, "b2").expect("pod");
    let grpc_authz = lab.add_pod(&b, "b3").expect("pod");
    let tcp = lab.add_pod(&b, "b4").expect("pod");
    let _servers = [
        tcp.serve(py::ECHO_SERVER, &["9005"], 9005).expect("server"),
        tcp.serve(py::ECHO_SERVER, &["9006"], 9006).expect("server"),
        server
            .serve(py::REQUEST_ECHO_SERVER, &["web", "8080"], 8080)
            .expect("server"),
        http_authz
            .serve(py::AUTHZ_SERVER, &["9000"], 9000)
            .expect("server"),
        grpc_authz
            .serve(
                py::GRPC_AUTHZ_SERVER,
                &[py::ENVOY_PROTOS, "9001", "9002"],
                9001,
            )
            .expect("server"),
    ];
    let mesh_config = |providers: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-mesh, namespace: trellis-system}}\n\
             data:\n  mesh: |\n    extensionProviders:\n{providers}"
        )
    };
    const HTTP_PROVIDER: &str = "    - name: http-authz\n      envoyExtAuthzHttp:\n\
        \x20       service: http-authz.auth.svc.cluster.local\n        port: 8000\n\
        \x20       pathPrefix: /check\n        includeRequestHeadersInCheck: [x-client]\n\
        \x20       headersToUpstreamOnAllow: [x-tag, x-auth-user]\n\
        \x20       headersToDownstreamOnAllow: [x-noise]\n\
        \x20       includeAdditionalHeadersInCheck: {x-mesh: trellis}\n";
    const GRPC_PROVIDER: &str =
        "    - name: grpc-authz\n      envoyExtAuthzGrpc: {service: auth/grpc-authz, port: 9191}\n";
    // Failures: the HTTP provider failing open (its 500 too), and a
    // provider that is not there, failing open or with its own status.
    const FAILING_PROVIDERS: &str = "    - name: open-authz\n      envoyExtAuthzHttp:\n\
        \x20       service: http-authz.auth.svc.cluster.local\n        port: 8000\n        failOpen: true\n\
        \x20   - name: gone-open\n      envoyExtAuthzHttp: {service: nowhere.auth, port: 80, failOpen: true, timeout: 0.5s}\n\
        \x20   - name: gone-closed\n      envoyExtAuthzGrpc: {service: nowhere.auth, port: 80, statusOnError: '503'}\n";
    let custom = |name: &str, provider: &str, paths: &str| {
        mesh::authorization_policy(
            "shop",
            name,
            &format!(
                "{{selector: {{matchLabels: {{app: web}}}}, action: CUSTOM, provider: {{name: {provider}}}, \
                 rules: [{{to: [{{operation: {{paths: [{paths}]}}}}]}}]}}"
            ),
        )
    };
    let mut docs = vec![
        mesh::node(&a),
        mesh::node(&b),
        mesh::namespace("shop", true),
        mesh::namespace("auth", true),
        mesh::pod(&remote, "shop", &[], &[], ""),
        mesh::pod(&local, "shop", &[], &[], ""),
        mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
        mesh::pod(&http_authz, "auth", &[("app", "http-authz")], &[], ""),
        mesh::pod(&grpc_authz, "auth", &[("app", "grpc-authz")], &[], ""),
        mesh::pod(&tcp, "shop", &[("app", "tcp")], &[], ""),
        mesh::service("shop", "web", WEB_VIP, 80, "8080", &[("app", "web")]),
        // The Service's calls take the L7 path.
        mesh::traffic_policy(
            "shop",
            "web",
            "retry: {attempts: 1, retryOn: [connect-failure]}",
        ),
        mesh::service(
            "auth",
            "http-authz",
            "10.96.0.37",
            8000,
            "9000",
            &[("app", "http-authz")],
        ),
        mesh::service_with_protocol(
            "auth",
            "grpc-authz",
            "10.96.0.38",
            9191,
            "9001",
            "grpc",
            &[("app", "grpc-authz")],
        ),
        custom("admin", "http-authz", "'/admin*'"),
        custom("ops", "grpc-authz", "'/ops*'"),
        custom("missing", "missing", "'/missing*'"),
        custom("fail-open", "open-authz", "'/fo/*'"),
        custom("gone-open", "gone-open", "'/fg/*'"),
        custom("gone-closed", "gone-closed", "'/fc/*'"),
        // Connections that are not HTTP: the gRPC provider is asked about
        // them; the HTTP one cannot judge them.
        mesh::authorization_policy(
            "shop",
            "tcp-grpc",
            "{selector: {matchLabels: {app: tcp}}, action: CUSTOM, provider: {name: grpc-authz}, \
             rules: [{to: [{operation: {ports: ['9005']}}]}]}",
        ),
        mesh::authorization_policy(
            "shop",
            "tcp-http",
            "{selector: {matchLabels: {app: tcp}}, action: CUSTOM, provider: {name: http-authz}, \
             rules: [{to: [{operation: {ports: ['9006']}}]}]}",
        ),
        mesh::authorization_policy(
            "shop",
            "no-secrets",
            "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{to: [{operation: {paths: [/admin/secret]}}]}]}",
        ),
    ];
    let mesh_at = docs.len();
    docs.push(mesh_config(&format!(
        "{HTTP_PROVIDER}{GRPC_PROVIDER}{FAILING_PROVIDERS}"
    )));
    let cluster = mesh::Cluster::start(lab.name(), &[&a, &b], &docs).expect("mesh");

    // (status, head, body) of one request.
    let call = exchange;
    let echo = |body: &str| -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    const ALICE: &str = "authorization: Bearer alice";

    let pod_url = format!("http://{}:8080", server.ip);
    let vip_url = format!("http://{WEB_VIP}");
    for (client, how, base) in [
        (&remote, "cross-node, pod IP", &pod_url),
        (&remote, "cross-node, VIP", &vip_url),
        (&local, "same node, pod IP", &pod_url),
        (&local, "same node, VIP", &vip_url),
    ] {
        let url = |p: &str| format!("{base}{p}");
        let (status, _, body) = call(client, &url("/public"), &[]);
        assert_eq!(status, "200", "{how}: no CUSTOM rule matches: {body}");

        // The HTTP provider: its denials are the client's answers.
        let (status, head, body) = call(client, &url("/admin/x"), &[]);
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("401", "who are you"),
            "{how}: {head}"
        );
        assert!(head.contains("www-authenticate: bearer"), "{how}: {head}");
        assert!(
            head.contains("x-trellis-reason: ext-auth-denied"),
            "{how}: {head}"
        );
        let (status, _, body) = call(client, &url("/admin/x"), &["authorization: Bearer bob"]);
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("403", "not you"),
            "{how}"
        );
        // Allowed: the provider's headers replace the client's forged one,
        // and the one it may hand the client reaches it.
        let (status, head, body) = call(client, &url("/admin/x"), &[ALICE, "x-tag: forged"]);
        assert_eq!(status, "200", "{how}: {body}");
        assert!(head.contains("x-noise: 1"), "{how}: {head}");
        assert_eq!(echo(&body)["tag"], "authz-alice", "{how}: {body}");
        // DENY policies still apply once the provider allows.
        let (status, head, _) = call(client, &url("/admin/secret"), &[ALICE]);
        assert_eq!(status, "403", "{how}: {head}");
        assert!(head.contains("x-trellis-reason: denied"), "{how}: {head}");

        // The gRPC provider, on the server's node: its changes to the
        // request and to the answer.
        let (status, head, body) = call(client, &url("/ops/run?token=t&x=1"), &[ALICE]);
        assert_eq!(status, "200", "{how}: {head}{body}");
        assert!(head.contains("x-authz: grpc"), "{how}: {head}");
        let got = echo(&body);
        assert_eq!(got["tag"], "authz-alice", "{how}: {got}");
        let path = got["path"].as_str().unwrap_or_default();
        assert!(
            path.starts_with("/ops/run?") && path.contains("user=alice") && !path.contains("token"),
            "{how}: {path}"
        );
        let (status, head, body) = call(client, &url("/ops/run"), &["authorization: Bearer eve"]);
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("403", "not you"),
            "{how}: {head}"
        );
        assert!(head.contains("x-denied-by: grpc-authz"), "{how}: {head}");

        // A provider the mesh configuration does not define cannot allow.
        let (status, head, _) = call(client, &url("/missing"), &[ALICE]);
        assert_eq!(status, "403", "{how}: {head}");
        assert!(head.contains("x-trellis-reason: denied"), "{how}: {head}");

        // failOpen: a provider that fails (500) or is not there lets the
        // request through; its denials still deny. statusOnError: the
        // status of a request refused because the check could not be made.
        let (status, _, body) = call(client, &url("/fo/x"), &["authorization: Bearer crash"]);
        assert_eq!(status, "200", "{how}: failed open: {body}");
        let (status, _, body) = call(client, &url("/fo/x"), &["authorization: Bearer bob"]);
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("403", "not you"),
            "{how}"
        );
        let (status, _, body) = call(client, &url("/fg/x"), &[]);
        assert_eq!(status, "200", "{how}: failed open: {body}");
        let (status, head, _) = call(client, &url("/fc/x"), &[ALICE]);
        assert_eq!(status, "503", "{how}: {head}");
        assert!(
            head.contains("x-trellis-reason: ext-auth-error"),
            "{how}: {head}"
        );
    }

    // What the providers were asked: the HTTP one the prefixed path and the
    // headers it may see; the gRPC one the caller's own identity and
    // address (the destination's agent asks, for the pod).
    let (status, _, _) = call(
        &remote,
        &format!("{pod_url}/admin/last"),
        &[ALICE, "x-client: 1", "x-other: 1"],
    );
    assert_eq!(status, "200");
    let (_, _, last) = call(
        &remote,
        &format!("http://{}:9000/__last", http_authz.ip),
        &[],
    );
    let last = echo(&last);
    assert_eq!(last["path"], "/check/admin/last", "{last}");
    let names: Vec<&str> = last["headers"]
        .as_array()
        .expect("header names")
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    assert!(
        ["x-client", "authorization", "x-mesh"]
            .iter()
            .all(|h| names.contains(h)),
        "{names:?}"
    );
    assert!(!names.contains(&"x-other"), "{names:?}");
    let (status, _, _) = call(&remote, &format!("{pod_url}/ops/last"), &[ALICE]);
    assert_eq!(status, "200");
    let (_, _, last) = call(&remote, &format!("http://{}:9002/", grpc_authz.ip), &[]);
    let last = echo(&last);
    assert_eq!(last["path"], "/ops/last", "{last}");
    assert_eq!(
        last["principal"], "spiffe://cluster.local/ns/shop/sa/a1",
        "{last}"
    );
    assert_eq!(last["source"], remote.ip.to_string(), "{last}");

    // A connection that is not HTTP is put to the gRPC provider as Envoy's
    // network filter puts it (its peers, no request): it allows a1 (across
    // nodes, HBONE) and refuses b2 (same node); the HTTP provider cannot
    // judge one, so its policy refuses them all.
    let echo_probe = |client: &Pod, port: &str| {
        client
            .exec()
            .python_output(
                py::ECHO_PROBE,
                &[&tcp.ip.to_string(), port],
                Duration::from_secs(30),
            )
            .expect("echo probe")
            .trim()
            .to_owned()
    };
    assert_eq!(
        echo_probe(&remote, "9005"),
        "not http at all",
        "a1, gRPC provider"
    );
    let (_, _, last) = call(&remote, &format!("http://{}:9002/", grpc_authz.ip), &[]);
    let last = echo(&last);
    assert_eq!(
        (&last["method"], &last["path"]),
        (&serde_json::json!(""), &serde_json::json!("")),
        "{last}"
    );
    assert_eq!(
        last["principal"], "spiffe://cluster.local/ns/shop/sa/a1",
        "{last}"
    );
    assert_eq!(last["source"], remote.ip.to_string(), "{last}");
    assert_eq!(
        last["destination_address"],
        format!("{}:9005", tcp.ip),
        "{last}"
    );
    assert_eq!(
        last["destination_principal"], "spiffe://cluster.local/ns/shop/sa/b4",
        "{last}"
    );
    assert_eq!(echo_probe(&local, "9005"), "DENIED", "b2, gRPC provider");
    for (client, who) in [(&remote, "a1"), (&local, "b2")] {
        assert_eq!(echo_probe(client, "9006"), "DENIED", "{who}, HTTP provider");
    }
    let status = cluster.agents[1].cli_json("status").expect("status");
    assert!(
        status["inbound"]["opaque_denied"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );
    assert!(
        status["outbound"]["denied"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );

    // A broken configuration is refused, named in the log, and the last
    // good one keeps serving.
    let admin = || call(&remote, &format!("{pod_url}/admin/x"), &[ALICE]).0;
    docs[mesh_at] = mesh_config(&HTTP_PROVIDER.replace("port: 8000", "port: 0"));
    cluster
        .config()
        .write("mesh.yaml", &mesh::docs(&docs))
        .expect("write");
    let field = "data.mesh.extensionProviders[0].envoyExtAuthzHttp.port";
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !cluster.agents[1].log_text().contains(field) {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken mesh configuration's error"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(admin(), "200", "the last good configuration serves");
    // Without the provider, its policy's requests are denied.
    docs[mesh_at] = mesh_config(GRPC_PROVIDER);
    cluster
        .config()
        .write("mesh.yaml", &mesh::docs(&docs))
        .expect("write");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while admin() != "403" {
        assert!(
            std::time::Instant::now() < deadline,
            "the provider's removal"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = cluster.agents[1].cli_json("status").expect("status");
    let http = &status["http"];
    assert!(http["ext_auth_denied"].as_u64().unwrap_or(0) >= 4, "{http}");
    assert!(
        http["ext_auth_failed_open"].as_u64().unwrap_or(0) >= 4,
        "{http}"
    );
    assert!(http["ext_auth_error"].as_u64().unwrap_or(0) >= 2, "{http}");
    // What `trellis policy` and `trellis config` show of them.
    let policies = cluster.agents[1].cli_json("policy").expect("policy");
    assert!(
        policies["authorization"]
            .as_array()
            .expect("policies")
            .iter()
            .any(|p| p["policy"] == "shop/ops"
                && p["action"] == "CUSTOM"
                && p["provider"] == "grpc-authz"
                && p["selects"] == serde_json::json!(["shop/b1"])),
        "{policies}"
    );
    let text = cluster.agents[1].cli(&["policy"]).expect("policy text");
    assert!(text.contains("asks provider grpc-authz"), "{text}");
    let config = cluster.agents[1].cli_json("config").expect("config");
    let providers = &config["extensionProviders"];
    assert_eq!(providers["grpc-authz"]["protocol"], "GRPC", "{providers}");
    assert!(providers.get("http-authz").is_none(), "{providers}");
}

/// Rules on addresses, hosts and the connection's attributes, as Istio
/// writes them: `ipBlocks` and `remoteIpBlocks` (the caller pod's own
/// address, proven across nodes by the HBONE `forwarded` header and the
/// certificate), `hosts` in any case and with a port, and `when` on
/// `source.ip` and `destination.port`; from a caller on each node, to the
/// pod IP and to a Service VIP (the L7 path), and for traffic that is not
/// HTTP.
#[test]
fn addresses_hosts_and_connection_attributes() {
    const WEB_VIP: &str = "10.96.0.39";
    let mut lab = Lab::new("l7_addr").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let remote = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let local = lab.add_pod(&b, "b2").expect("pod");
    let stranger = lab.add_pod(&b, "b3").expect("pod");
    let _servers = [
        server
            .serve(py::NAME_SERVER, &["web", "8080"], 8080)
            .expect("server"),
        server
            .serve(py::ECHO_SERVER, &["9000"], 9000)
            .expect("server"),
    ];
    let web = "{selector: {matchLabels: {app: web}}";
    let cluster = mesh::Cluster::start(
        lab.name(),
        &[&a, &b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&remote, "shop", &[], &[], ""),
            mesh::pod(&local, "shop", &[], &[], ""),
            mesh::pod(&stranger, "shop", &[], &[], ""),
            // Logs what it matches, decides nothing.
            mesh::authorization_policy(
                "shop",
                "audit-me",
                &format!("{web}, action: AUDIT, rules: [{{to: [{{operation: {{paths: ['/audited*']}}}}]}}]}}"),
            ),
            mesh::pod(&server, "shop", &[("app", "web")], &[], ""),
            mesh::service("shop", "web", WEB_VIP, 80, "8080", &[("app", "web")]),
            mesh::traffic_policy(
                "shop",
                "web",
                "retry: {attempts: 1, retryOn: [connect-failure]}",
            ),
            // Only a1 and b2, by address.
            mesh::authorization_policy(
                "shop",
                "callers",
                &format!(
                    "{web}, action: ALLOW, rules: [{{from: [{{source: {{remoteIpBlocks: ['{}', '{}/32']}}}}]}}]}}",
                    remote.ip, local.ip
                ),
            ),
            // a1's address may not use the echo port.
            mesh::authorization_policy(
                "shop",
                "no-remote-echo",
                &format!(
                    "{web}, action: DENY, rules: [{{from: [{{source: {{ipBlocks: ['{}']}}}}], to: [{{operation: {{ports: ['9000']}}}}]}}]}}",
                    remote.ip
                ),
            ),
            // On the web port: a DENY rule's HTTP fields are dropped for
            // traffic that is not HTTP, so without the port it would refuse
            // the echo port to everyone.
            mesh::authorization_policy(
                "shop",
                "no-secret-host",
                &format!("{web}, action: DENY, rules: [{{to: [{{operation: {{ports: ['8080'], hosts: [secret.example]}}}}]}}]}}"),
            ),
            // b2's address may not GET /private on the web port.
            mesh::authorization_policy(
                "shop",
                "no-local-private",
                &format!(
                    "{web}, action: DENY, rules: [{{to: [{{operation: {{paths: [/private]}}}}], \
                     when: [{{key: source.ip, values: ['{}']}}, {{key: destination.port, values: ['8080']}}]}}]}}",
                    local.ip
                ),
            ),
        ],
    )
    .expect("mesh");

    let pod_url = format!("http://{}:8080", server.ip);
    let vip_url = format!("http://{WEB_VIP}");
    for (client, how, base) in [
        (&remote, "cross-node, pod IP", &pod_url),
        (&remote, "cross-node, VIP", &vip_url),
        (&local, "same node, pod IP", &pod_url),
        (&local, "same node, VIP", &vip_url),
    ] {
        let url = |p: &str| format!("{base}{p}");
        let (status, _, body) = exchange(client, &url("/"), &[]);
        assert_eq!(status, "200", "{how}: {body}");
        // A host in any case, with its port.
        let (status, head, _) = exchange(client, &url("/"), &["Host: Secret.Example:8080"]);
        assert_eq!(status, "403", "{how}: {head}");
        assert!(head.contains("x-trellis-reason: denied"), "{how}: {head}");
        let (status, _, _) = exchange(client, &url("/"), &["Host: public.example"]);
        assert_eq!(status, "200", "{how}");
        let (status, _, _) = exchange(client, &url("/private"), &[]);
        let expected = if std::ptr::eq(client, &local) {
            "403"
        } else {
            "200"
        };
        assert_eq!(status, expected, "{how}: /private");
    }
    // Not HTTP: a1's address is refused the echo port, b2's is not.
    let echo = |client: &Pod| {
        client
            .exec()
            .python_output(
                py::ECHO_PROBE,
                &[&server.ip.to_string(), "9000"],
                Duration::from_secs(30),
            )
            .expect("echo probe")
            .trim()
            .to_owned()
    };
    assert_eq!(echo(&remote), "DENIED", "a1 by its address, across nodes");
    assert_eq!(echo(&local), "not http at all", "b2");
    // b3's address is in no ALLOW rule: refused at connect.
    let (status, _, _) = exchange(&stranger, &format!("{pod_url}/"), &[]);
    assert_eq!(status, "000", "b3, pod IP");
    assert_eq!(echo(&stranger), "DENIED", "b3, not HTTP");

    // AUDIT: the request it matches is logged with the decision, and
    // served.
    let (status, _, _) = exchange(&remote, &format!("{pod_url}/audited/1"), &[]);
    assert_eq!(status, "200", "an audited request is served");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = cluster.agents[1].log_text();
        if log.lines().any(|l| {
            l.contains("audit")
                && l.contains("shop/audit-me")
                && l.contains("/audited/1")
                && l.contains("allowed")
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit line:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
