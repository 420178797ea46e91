//! Certificates in a running mesh: a root rotated through the trust bundle
//! mid-transfer, certificates renewed every few seconds under load, and an
//! external issuer's files (made here with `openssl`, no Trellis code)
//! loaded, reloaded and refused when broken, with no private key of the run
//! ever showing in logs, admin dumps or errors.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use base64::Engine as _;
use trellis_agent::identity::ca::Ca;
use trellis_tests::{
    Agent, ChildGuard, Lab, Pod,
    lab::Node,
    mesh::{self, Certs},
    py,
};

const NAME_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7000;

/// Two nodes; pod a1 on a calls pod b1 on b, which serves its name on 8080
/// and echoes on 7000.
struct Pair {
    lab: Lab,
    a: Node,
    b: Node,
    client: Pod,
    server: Pod,
    _servers: [ChildGuard; 2],
}

impl Pair {
    fn new(name: &str) -> Self {
        let mut lab = Lab::new(name).expect("lab");
        let a = lab.add_node("a").expect("node");
        let b = lab.add_node("b").expect("node");
        let client = lab.add_pod(&a, "a1").expect("pod");
        let server = lab.add_pod(&b, "b1").expect("pod");
        let servers = [
            server
                .serve(py::NAME_SERVER, &["b1", &NAME_PORT.to_string()], NAME_PORT)
                .expect("name server"),
            server
                .serve(py::ECHO_SERVER, &[&ECHO_PORT.to_string()], ECHO_PORT)
                .expect("echo server"),
        ];
        Self {
            lab,
            a,
            b,
            client,
            server,
            _servers: servers,
        }
    }

    fn docs(&self) -> Vec<String> {
        vec![
            mesh::node(&self.a),
            mesh::node(&self.b),
            mesh::namespace("shop", true),
            mesh::pod(&self.client, "shop", &[("app", "client")], &[], ""),
            mesh::pod(&self.server, "shop", &[("app", "server")], &[], ""),
        ]
    }

    /// [`py::LOAD`] from a1 to b1 for `secs`, in the background: a new
    /// connection every 20 ms and one echo connection held throughout.
    fn load(&self, secs: u64) -> JoinHandle<serde_json::Value> {
        let exec = self.client.exec();
        let ip = self.server.ip.to_string();
        std::thread::spawn(move || {
            let secs = secs.to_string();
            let out = exec
                .python_output(
                    py::LOAD,
                    &[
                        &ip,
                        &NAME_PORT.to_string(),
                        &ip,
                        &ECHO_PORT.to_string(),
                        &secs,
                    ],
                    Duration::from_secs(secs.parse::<u64>().expect("secs") + 30),
                )
                .expect("load");
            serde_json::from_str(&out).expect("load output")
        })
    }

    /// One GET from a1 to b1: the body, or the error.
    fn call(&self) -> String {
        let url = format!("http://{}:{NAME_PORT}/", self.server.ip);
        match self
            .client
            .exec()
            .output("curl", &["-sS", "-m", "5", &url], Duration::from_secs(10))
        {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into(),
            Ok(out) => String::from_utf8_lossy(&out.stderr).into(),
            Err(e) => e.to_string(),
        }
    }
}

/// Polls `check` every 200 ms until it holds or `limit` passes.
fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn certs(agent: &Agent) -> serde_json::Value {
    agent.cli_json("certs").expect("trellis certs")
}

/// Every `(identity, serial, issuers)` an agent holds now.
fn held(agent: &Agent) -> Vec<(String, String, String)> {
    certs(agent)["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            (s(&c["identity"]), s(&c["serial"]), s(&c["issuers"][0]))
        })
        .collect()
}

/// A load run's outcome: no failed request, the echo connection alive
/// throughout.
fn assert_load_clean(load: &serde_json::Value, secs: u64, logs: &str) {
    assert_eq!(load["errors"], serde_json::json!([]), "{load:#}\n{logs}");
    assert_eq!(
        load["echo_errors"],
        serde_json::json!([]),
        "{load:#}\n{logs}"
    );
    // Pings every 100 ms: at least half of them on a loaded 2-core machine.
    let echoed = load["echo_ok"].as_u64().unwrap_or(0);
    assert!(echoed >= secs * 5, "{load:#}");
    assert!(
        load["bodies"]["b1"].as_u64().unwrap_or(0) > secs * 5,
        "{load:#}"
    );
}

fn logs(agents: &[Agent]) -> String {
    agents
        .iter()
        .enumerate()
        .map(|(i, a)| format!("--- agent {i}\n{}", a.log_text()))
        .collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) {
    mesh::write_atomic(path, bytes).expect("writing a certificate file");
}

#[test]
fn a_root_rotation_through_the_trust_bundle_keeps_transfers_and_new_connections_working() {
    let pair = Pair::new("certs_root_rotation");
    let cluster =
        mesh::Cluster::start(pair.lab.name(), &[&pair.a, &pair.b], &pair.docs()).expect("agents");
    let agents = &cluster.agents;
    assert_eq!(pair.call(), "b1", "{}", logs(agents));

    let ca_dir = PathBuf::from(cluster.ca().path());
    let next_dir = ca_dir.with_extension("next");
    let _ = std::fs::remove_dir_all(&next_dir);
    Ca::init(&next_dir, "cluster.local").expect("the next root");
    let read = |dir: &Path, name: &str| std::fs::read(dir.join(name)).expect("read");
    let (old_root, new_root) = (read(&ca_dir, "ca.crt"), read(&next_dir, "ca.crt"));
    let old_key = read(&ca_dir, "ca.key");
    let subject = |pem: &[u8]| {
        let der = pem_der(pem);
        trellis_agent::identity::ca::subject_of(&der.into()).expect("subject")
    };
    let (old_subject, new_subject) = (subject(&old_root), subject(&new_root));

    const SECS: u64 = 16;
    let load = pair.load(SECS);
    std::thread::sleep(Duration::from_secs(2));
    let before = held(&agents[0]);
    assert!(
        before.iter().all(|(_, _, issuers)| *issuers == old_subject),
        "{before:?}"
    );

    // 1. Every node trusts both roots.
    write_atomic(
        &ca_dir.join("bundle.crt"),
        &[old_root.as_slice(), new_root.as_slice()].concat(),
    );
    for agent in agents {
        wait_for(Duration::from_secs(5), "both roots trusted", || {
            certs(agent)["trust_bundle_roots"] == 2
        });
    }
    // 2. The new signing pair: every certificate re-issued from it, while
    //    connections made with the old ones keep running.
    write_atomic(&ca_dir.join("ca.key"), &read(&next_dir, "ca.key"));
    write_atomic(&ca_dir.join("ca.crt"), &new_root);
    for agent in agents {
        wait_for(
            Duration::from_secs(5),
            "certificates from the new root",
            || {
                let now = held(agent);
                !now.is_empty() && now.iter().all(|(_, _, issuers)| *issuers == new_subject)
            },
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    // 3. The old root retired.
    write_atomic(&ca_dir.join("bundle.crt"), &new_root);
    for agent in agents {
        wait_for(Duration::from_secs(5), "the old root retired", || {
            certs(agent)["trust_bundle_roots"] == 1
        });
    }

    let load = load.join().expect("load thread");
    assert_load_clean(&load, SECS, &logs(agents));
    assert_eq!(
        pair.call(),
        "b1",
        "a new connection on new-root certificates"
    );
    for agent in agents {
        let reloads = &certs(agent)["reloads"];
        assert_eq!(reloads["reloads"], 3, "{reloads}");
        assert_eq!(reloads["errors"], 0, "{reloads}");
    }
    // a's tunnel made with the old certificate took no new streams after
    // the change: new ones went on a connection with the new certificate.
    let pool = &agents[0].cli_json("status").expect("status")["hbone_pool"]["stats"];
    assert!(pool["retired"].as_u64() >= Some(1), "{pool}");
    assert!(pool["connections_opened"].as_u64() >= Some(2), "{pool}");
    // Neither signing key shows in the logs or the certificate dumps.
    let mut haystack = logs(agents);
    for agent in agents {
        haystack += &agent.cli(&["certs"]).expect("certs");
        haystack += &certs(agent).to_string();
    }
    for key in [old_key, read(&next_dir, "ca.key")] {
        for needle in key_needles(&key) {
            assert!(!haystack.contains(&needle), "a CA key leaks: {needle}");
        }
    }
    let _ = std::fs::remove_dir_all(&next_dir);
}

/// The DER of the first PEM block.
fn pem_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).expect("PEM is text");
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64")
}

#[test]
fn certificates_renewed_every_few_seconds_keep_long_transfers_and_new_connections_working() {
    let pair = Pair::new("certs_rotation_load");
    let cluster = mesh::Cluster::start_with(
        pair.lab.name(),
        &[&pair.a, &pair.b],
        &pair.docs(),
        Certs::SharedCa,
        &["--cert-lifetime", "4s"],
    )
    .expect("agents");
    let agents = &cluster.agents;

    const SECS: u64 = 14;
    let load = pair.load(SECS);
    let mut serials: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(SECS);
    while Instant::now() < end {
        for agent in agents {
            for (identity, serial, _) in held(agent) {
                serials.entry(identity).or_default().insert(serial);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let load = load.join().expect("load thread");
    assert_load_clean(&load, SECS, &logs(agents));

    // Renewed at about half of 4 s: at least 4 certificates each in 14 s.
    for sa in ["a1", "b1"] {
        let id = format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        let seen = serials.get(&id).map_or(0, BTreeSet::len);
        assert!(seen >= 4, "{id}: {seen} serials seen: {serials:#?}");
    }
    let pool = &agents[0].cli_json("status").expect("status")["hbone_pool"]["stats"];
    assert!(pool["retired"].as_u64() >= Some(3), "{pool}");
    let log = agents[0].log_text();
    assert!(log.contains("renewed a certificate"), "{log}");
}

/// An external CA, made with `openssl` alone: a root, and leaf SVIDs for
/// identities, written the way cert-manager writes a Secret.
struct Issuer {
    dir: PathBuf,
    root_crt: PathBuf,
    root_key: PathBuf,
    /// Every private key file written, for the leak search.
    keys: Vec<PathBuf>,
    next: u32,
}

impl Issuer {
    fn new(dir: PathBuf) -> Self {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("issuer dir");
        let (root_crt, root_key) = (dir.join("root.crt"), dir.join("root.key"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/O=External Issuer/CN=External Root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            root_key.to_str().expect("utf-8"),
            "-out",
            root_crt.to_str().expect("utf-8"),
        ]);
        Self {
            keys: vec![root_key.clone()],
            dir,
            root_crt,
            root_key,
            next: 0,
        }
    }

    /// A new key and leaf for `spiffe://cluster.local/ns/<ns>/sa/<sa>` in
    /// the issuer's own folder; `sec1` writes the key in the traditional
    /// `EC PRIVATE KEY` form. Returns (cert PEM, key PEM, serial hex).
    fn leaf(&mut self, ns: &str, sa: &str, sec1: bool) -> (Vec<u8>, Vec<u8>, String) {
        self.next += 1;
        let base = self.dir.join(format!("{sa}-{}", self.next));
        let (key, csr, crt, ext) = (
            base.with_extension("key"),
            base.with_extension("csr"),
            base.with_extension("crt"),
            base.with_extension("ext"),
        );
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=critical,URI:spiffe://cluster.local/ns/{ns}/sa/{sa}\n\
                 basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .expect("ext");
        let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/O=cluster.local",
            "-keyout",
            &s(&key),
            "-out",
            &s(&csr),
        ]);
        if sec1 {
            openssl(&["ec", "-in", &s(&key), "-out", &s(&key)]);
        }
        // A leading byte below 0x80 and not zero: DER keeps it as written.
        let serial = format!("5e{:06x}{:08x}", std::process::id() & 0xff_ffff, self.next);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &s(&self.root_crt),
            "-CAkey",
            &s(&self.root_key),
            "-set_serial",
            &format!("0x{serial}"),
            "-days",
            "1",
            "-extfile",
            &s(&ext),
            "-out",
            &s(&crt),
        ]);
        self.keys.push(key.clone());
        let read = |p: &Path| std::fs::read(p).expect("read");
        (read(&crt), read(&key), serial)
    }

    /// Writes a leaf into a node's certificate folder, as a Secret update.
    fn install(&mut self, node_dir: &Path, ns: &str, sa: &str, sec1: bool) -> String {
        let (crt, key, serial) = self.leaf(ns, sa, sec1);
        let folder = node_dir.join(ns).join(sa);
        std::fs::create_dir_all(&folder).expect("folder");
        write_atomic(
            &folder.join("ca.crt"),
            &std::fs::read(&self.root_crt).expect("root"),
        );
        write_atomic(&folder.join("tls.key"), &key);
        write_atomic(&folder.join("tls.crt"), &crt);
        serial
    }
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every form a private key could leak in: its PEM lines, its DER in
/// base64 and hex, and the EC private scalar in hex (with and without
/// colons), base64 and as a Rust byte-slice `Debug` (`12, 34, …`).
fn key_needles(pem: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(pem);
    let mut needles: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect();
    let der = pem_der(pem);
    let b64 = base64::engine::general_purpose::STANDARD;
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    needles.push(b64.encode(&der));
    needles.push(hex(&der));
    // ECPrivateKey: INTEGER 1, then the 32-byte scalar as an OCTET STRING,
    // in SEC1 and inside PKCS#8 alike.
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an EC private key")
        + 5;
    let scalar = &der[at..at + 32];
    needles.push(hex(scalar));
    needles.push(hex(scalar).to_uppercase());
    needles.push(
        scalar
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    );
    needles.push(b64.encode(scalar));
    needles.push(
        scalar[..12]
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    );
    needles
}

#[test]
fn external_certificates_load_reload_and_refuse_bad_files_and_no_key_ever_leaks() {
    let pair = Pair::new("certs_files");
    let tmp = std::env::temp_dir();
    let (dir_a, dir_b) = (
        tmp.join(format!("{}-certs-a", pair.lab.name())),
        tmp.join(format!("{}-certs-b", pair.lab.name())),
    );
    for dir in [&dir_a, &dir_b] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("cert dir");
    }
    let mut issuer = Issuer::new(tmp.join(format!("{}-issuer", pair.lab.name())));
    let a1_serial = issuer.install(&dir_a, "shop", "a1", false);
    let b1_serial = issuer.install(&dir_b, "shop", "b1", true);

    let cluster = mesh::Cluster::start_with(
        pair.lab.name(),
        &[&pair.a, &pair.b],
        &pair.docs(),
        Certs::Files(&[&dir_a, &dir_b]),
        &[],
    )
    .expect("agents");
    let agents = &cluster.agents;
    assert_eq!(pair.call(), "b1", "{}", logs(agents));
    let serial_of = |agent: &Agent, sa: &str| {
        held(agent)
            .into_iter()
            .find(|(id, _, _)| id.ends_with(&format!("/sa/{sa}")))
            .map(|(_, serial, _)| serial)
    };
    assert_eq!(serial_of(&agents[0], "a1"), Some(a1_serial.clone()));
    assert_eq!(serial_of(&agents[1], "b1"), Some(b1_serial));
    let doc = certs(&agents[0]);
    assert_eq!(doc["source"]["kind"], "files", "{doc:#}");
    assert_eq!(
        doc["trust_bundle"][0],
        "O=External Issuer, CN=External Root"
    );

    // The issuer renews b1: picked up, and new connections present it.
    let b1_renewed = issuer.install(&dir_b, "shop", "b1", false);
    wait_for(Duration::from_secs(5), "b1's renewed certificate", || {
        serial_of(&agents[1], "b1").as_ref() == Some(&b1_renewed)
    });
    let opened = |agent: &Agent| {
        agent.cli_json("status").expect("status")["inbound"]["connections"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = opened(&agents[1]);
    // A new connection from a: its pooled tunnel still runs on the old
    // certificate of b1 (valid), so force a fresh one by renewing a1 too.
    let a1_renewed = issuer.install(&dir_a, "shop", "a1", false);
    wait_for(Duration::from_secs(5), "a1's renewed certificate", || {
        serial_of(&agents[0], "a1").as_ref() == Some(&a1_renewed)
    });
    assert_eq!(pair.call(), "b1", "{}", logs(agents));
    assert!(
        opened(&agents[1]) > before,
        "a new tunnel with the new certificates"
    );

    // Broken files: a key of another certificate, then garbage. Refused
    // with the file and the reason; the last good certificate keeps serving.
    let a1_folder = dir_a.join("shop/a1");
    let (_, stray_key, _) = issuer.leaf("shop", "a1", false);
    write_atomic(&a1_folder.join("tls.key"), &stray_key);
    wait_for(
        Duration::from_secs(6),
        "the mismatched key reported",
        || certs(&agents[0])["reloads"]["errors"] == 1,
    );
    let error = certs(&agents[0])["reloads"]["last_error"].to_string();
    assert!(
        error.contains("shop/a1/tls.key") && error.contains("does not belong"),
        "{error}"
    );
    write_atomic(
        &a1_folder.join("tls.key"),
        b"-----BEGIN PRIVATE KEY-----\nTUlHSEFBSUJBREFUQmdjcWhrak9QUUlCQmdncWhrak9QUU1CQndSdE1Hc0NBUUVFSUxzS0N5\n-----END PRIVATE KEY-----\n",
    );
    wait_for(Duration::from_secs(6), "the garbage key reported", || {
        certs(&agents[0])["reloads"]["errors"] == 2
    });
    assert_eq!(serial_of(&agents[0], "a1"), Some(a1_renewed.clone()));
    assert_eq!(pair.call(), "b1", "the last good certificate serves");

    // No key of the run anywhere: logs at debug level, every admin dump
    // (JSON and text), and the errors above.
    let mut haystack = logs(agents);
    for agent in agents {
        for command in ["status", "workloads", "certs", "policy"] {
            haystack += &agent.cli(&[command]).expect("cli");
            haystack += &agent.cli(&[command, "-o", "json"]).expect("cli json");
        }
    }
    for node in [&pair.a, &pair.b] {
        for path in ["config", "status", "certs", "workloads", "policies", "maps"] {
            let out = node
                .exec()
                .output(
                    "curl",
                    &["-sS", "-m", "5", &format!("http://127.0.0.1:15000/{path}")],
                    Duration::from_secs(10),
                )
                .expect("admin API");
            haystack += &String::from_utf8_lossy(&out.stdout);
        }
    }
    assert!(
        !haystack.contains("PRIVATE KEY"),
        "a PEM private key marker is shown"
    );
    let mut checked = 0;
    for key in &issuer.keys {
        for needle in key_needles(&std::fs::read(key).expect("key")) {
            assert!(
                !haystack.contains(&needle),
                "key material of {} leaks: {needle}",
                key.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked > 40,
        "{checked} forms of {} keys",
        issuer.keys.len()
    );
    for dir in [&dir_a, &dir_b, &issuer.dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn a_node_is_not_ready_until_its_workloads_certificates_can_be_had() {
    let pair = Pair::new("certs_ready");
    let tmp = std::env::temp_dir();
    let dir = tmp.join(format!("{}-certs-a", pair.lab.name()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cert dir");
    let config = mesh::ConfigDir::new(pair.lab.name()).expect("config dir");
    for (i, doc) in pair.docs().iter().enumerate() {
        config.write(&format!("{i:02}.yaml"), doc).expect("doc");
    }
    let config_dir = config.path().to_str().expect("UTF-8").to_owned();
    let cert_dir = dir.to_str().expect("UTF-8").to_owned();
    let mut agent = Agent::start(
        &pair.a,
        &["--config-dir", &config_dir, "--cert-dir", &cert_dir],
    )
    .expect("agent");

    // Everything else comes up; the certificate of pod a1 is not there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, body) = loop {
        let (code, body) = pair.a.readiness();
        let others_met = ["datapath", "state", "hbone"]
            .iter()
            .all(|c| body["conditions"][c]["met"] == true);
        if others_met || Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, "503", "{body}");
    assert_eq!(
        body["missing"],
        serde_json::json!(["certificates"]),
        "{body}"
    );
    let detail = body["conditions"]["certificates"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(
        detail.contains(&format!("{}/shop/a1", dir.display())),
        "the detail names the folder to fill: {body}"
    );

    // The issuer writes it: ready, with no restart.
    let mut issuer = Issuer::new(tmp.join(format!("{}-issuer", pair.lab.name())));
    issuer.install(&dir, "shop", "a1", false);
    agent
        .wait_ready(Duration::from_secs(30))
        .expect("ready once the certificate is there");
    let (code, body) = pair.a.readiness();
    assert_eq!(code, "200", "{body}");
    assert_eq!(body["conditions"]["certificates"]["met"], true);
    let _ = std::fs::remove_dir_all(&dir);
}
