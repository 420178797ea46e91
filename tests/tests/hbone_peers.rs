//! Node b's HBONE server against clients that are not Trellis: `openssl
//! s_client` without a certificate, with one from another CA, with an
//! expired one (all refused); Python's `h2` over `ssl` with a valid one
//! (CONNECT honoured, 400 for a destination that is not the dialled pod, 401
//! when policy denies), and bad input: garbage, plaintext HTTP/1, no ALPN,
//! 10,000 streams at once, a client that stops reading, one that never
//! answers a keepalive ping. The agent stays up and the next client is served.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use trellis_agent::identity::{Identity, ca::Ca};
use trellis_tests::{Lab, Node, mesh, py};

/// Writes `identity`'s certificate (PEM) and key (PEM) into `dir`, signed by
/// `ca`, valid from `from` for `lifetime`.
fn issue(
    node: &Node,
    ca: &Ca,
    dir: &Path,
    name: &str,
    sa: &str,
    from: SystemTime,
    lifetime: Duration,
) -> (PathBuf, PathBuf) {
    let svid = ca
        .issue(&Identity::new("cluster.local", "shop", sa), lifetime, from)
        .expect("issue");
    let (der, key_der) = (
        dir.join(format!("{name}.der")),
        dir.join(format!("{name}.key.der")),
    );
    std::fs::write(&der, svid.chain[0].as_ref()).expect("cert");
    std::fs::write(&key_der, svid.key().secret_der()).expect("key");
    let (pem, key_pem) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key.pem")),
    );
    let path = |p: &PathBuf| p.to_str().expect("utf-8").to_owned();
    node.exec()
        .run(
            "openssl",
            &[
                "x509",
                "-inform",
                "DER",
                "-in",
                &path(&der),
                "-out",
                &path(&pem),
            ],
        )
        .expect("cert to PEM");
    node.exec()
        .run(
            "openssl",
            &[
                "pkey",
                "-inform",
                "DER",
                "-in",
                &path(&key_der),
                "-out",
                &path(&key_pem),
            ],
        )
        .expect("key to PEM");
    (pem, key_pem)
}

#[test]
fn independent_clients_bad_certificates_and_bad_input() {
    let mut lab = Lab::new("hbone_peers").expect("lab");
    let a = lab.add_node("a").expect("node");
    let b = lab.add_node("b").expect("node");
    let elsewhere = lab.add_pod(&a, "a1").expect("pod");
    let server = lab.add_pod(&b, "b1").expect("pod");
    let _echo = server
        .serve(py::ECHO_SERVER, &["7000"], 7000)
        .expect("echo");

    let cluster = mesh::Cluster::start_with(
        lab.name(),
        &[&b],
        &[
            mesh::node(&a),
            mesh::node(&b),
            mesh::namespace("shop", true),
            mesh::pod(&elsewhere, "shop", &[], &[], ""),
            mesh::pod(&server, "shop", &[], &[], ""),
            mesh::authorization_policy(
                "shop",
                "no-intruder",
                "{action: DENY, rules: [{from: [{source: {principals: ['*/sa/intruder']}}]}]}",
            ),
        ],
        mesh::Certs::SharedCa,
        // Short enough to see a silent client closed within the test.
        &[
            "--hbone-keepalive-interval",
            "3s",
            "--hbone-keepalive-timeout",
            "2s",
        ],
    )
    .expect("agents");
    let agent_b = &cluster.agents[0];

    let files = std::env::temp_dir().join(format!("{}-certs", lab.name()));
    let _ = std::fs::remove_dir_all(&files);
    std::fs::create_dir_all(&files).expect("cert dir");
    let ca = Ca::load(Path::new(cluster.ca().path())).expect("load ca");
    let now = SystemTime::now();
    let day = Duration::from_secs(86400);
    let (good, good_key) = issue(&a, &ca, &files, "good", "py-client", now, day);
    let (denied, denied_key) = issue(&a, &ca, &files, "denied", "intruder", now, day);
    let (expired, expired_key) = issue(
        &a,
        &ca,
        &files,
        "expired",
        "py-client",
        now - 2 * Duration::from_secs(3600),
        Duration::from_secs(3600),
    );
    let other = Ca::in_memory("cluster.local").expect("other ca");
    let (foreign, foreign_key) = issue(&a, &other, &files, "foreign", "py-client", now, day);
    let ca_cert = Path::new(cluster.ca().path()).join("ca.crt");
    let p = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let target = format!("{}:15008", server.ip);

    // openssl s_client: the handshake must not give a working tunnel. TLS 1.3
    // sends the client certificate after the server's Finished, so the
    // refusal shows as an alert on the first read.
    let s_client = |cert: Option<(&Path, &Path)>| {
        let mut args = vec![
            "s_client".to_owned(),
            "-connect".into(),
            target.clone(),
            "-alpn".into(),
            "h2".into(),
            "-CAfile".into(),
            p(&ca_cert),
            "-ign_eof".into(),
        ];
        if let Some((c, k)) = cert {
            args.extend(["-cert".into(), p(c), "-key".into(), p(k)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = a
            .exec()
            .output("openssl", &args, Duration::from_secs(20))
            .expect("s_client");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for (case, cert, want) in [
        ("no certificate", None, "alert certificate required"),
        (
            "another CA",
            Some((foreign.as_path(), foreign_key.as_path())),
            "alert unknown ca",
        ),
        (
            "expired",
            Some((expired.as_path(), expired_key.as_path())),
            "alert certificate expired",
        ),
    ] {
        let out = s_client(cert);
        assert!(out.contains(want), "{case}: want {want:?} in:\n{out}");
    }

    let out = a
        .exec()
        .python_output(
            py::HBONE_PEER,
            &[
                &server.ip.to_string(),
                "7000",
                &p(&good),
                &p(&good_key),
                &p(&ca_cert),
                &elsewhere.ip.to_string(),
                &p(&denied),
                &p(&denied_key),
                "7",
            ],
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("python h2 client: {e}\n--- b\n{}", agent_b.log_text()));
    let res: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(res["valid"], "200", "{res:#}");
    assert_eq!(res["echo"], "hello through hbone", "{res:#}");
    assert_eq!(res["not_local"], "400", "{res:#}");
    assert_eq!(res["denied"], "401", "{res:#}");
    for case in ["no_alpn", "garbage", "http1"] {
        assert_eq!(res[case], "closed", "{case}: {res:#}");
    }
    let flood = &res["flood"];
    let ok = flood["ok"].as_u64().unwrap_or(0);
    // Past 100 streams each is refused; a client that keeps going past h2's
    // reset budget is told to calm down (GOAWAY) and closed.
    assert!(ok <= 100, "at most 100 streams at once: {flood}");
    assert!(
        flood["refused"].as_u64().unwrap_or(0) > 0 || !flood["goaway"].is_null(),
        "the rest refused or the connection told to go away: {flood}"
    );
    assert_eq!(res["staller"], "200", "{res:#}");
    assert_eq!(res["after"], "200", "{res:#}");
    assert_eq!(res["after_echo"], "still fine", "{res:#}");
    // Pings every 3 s, 2 s to answer: the silent client is gone within 5 s,
    // the one that answers is still there after 7.
    assert_eq!(res["silent_open"], "200", "{res:#}");
    assert_eq!(res["silent"], "closed", "{res:#}");
    assert_eq!(res["answering"], "200", "{res:#}");
    assert_eq!(res["answering_echo"], "still here", "{res:#}");

    // Still up, and the refusals are logged with their reason.
    let status = agent_b.cli_json("status").expect("status b");
    assert!(
        status["inbound"]["rejected"].as_u64().unwrap_or(0) >= 6,
        "{status:#}"
    );
    assert_eq!(status["inbound"]["denied"], 1, "{status:#}");
    assert!(
        status["inbound"]["keepalive_timeouts"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{status:#}"
    );
    let log = agent_b.log_text();
    for reason in [
        "did not negotiate ALPN h2",
        "TLS handshake",
        "ENHANCE_YOUR_CALM",
        "the peer did not answer a keepalive ping",
    ] {
        assert!(log.contains(reason), "log names {reason:?}:\n{log}");
    }
    let _ = std::fs::remove_dir_all(&files);
}
