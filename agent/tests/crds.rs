//! The CRDs generated from the agent's types (`trellis_agent::crds`) against
//! the repository's examples (`deploy/examples/`) and broken variants, one
//! per validation rule of the schemas. No kube-apiserver can be installed
//! here, so the schemas are checked by `fixtures/validate_schema.py`
//! (Python `jsonschema` with Kubernetes' dialect: strict fields,
//! int-or-string, nullable). Each example must also pass the agent's own
//! parser and validation, and each broken variant the agent can judge on
//! its own must fail there too, so the CRD and the agent agree.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::{Value, json};
use trellis_agent::{crds, state::objects::parse_file};

const VALIDATOR: &str = include_str!("fixtures/validate_schema.py");

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The openAPIV3Schema of the CRD for `kind`.
fn schema(kind: &str) -> Value {
    let crd = crds::all()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("a CRD of the kind");
    let version = serde_json::to_value(&crd.spec.versions[0]).expect("version");
    version["schema"]["openAPIV3Schema"].clone()
}

/// The schema's errors for each object.
fn schema_errors(kind: &str, objects: &[Value]) -> Vec<Vec<String>> {
    let mut child = Command::new("python3")
        .args(["-c", VALIDATOR])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let request = json!({"schema": schema(kind), "objects": objects});
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("validator");
    assert!(
        out.status.success(),
        "the validator failed (is python3-jsonschema installed?)"
    );
    serde_json::from_slice(&out.stdout).expect("the validator's JSON")
}

/// The agent's verdict on one object: `Ok` or its rejection.
fn agent_verdict(object: &Value) -> Result<(), String> {
    let yaml = serde_yaml_ng::to_string(object).expect("YAML");
    let parsed = parse_file(Path::new("case.yaml"), &yaml).map_err(|e| e.to_string())?;
    match parsed.rejected.first() {
        Some((_, e)) => Err(format!("{}: {}", e.field, e.reason)),
        None if parsed.objects.len() == 1 => Ok(()),
        None => Err(format!("ignored: {:?}", parsed.ignored)),
    }
}

fn examples(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("deploy/examples").join(file)).expect("example");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML"))
        .collect()
}

#[test]
fn the_examples_pass_the_schemas_and_the_agent() {
    for (file, kind) in [
        ("authorizationpolicy.yaml", "AuthorizationPolicy"),
        ("requestauthentication.yaml", "RequestAuthentication"),
        ("peerauthentication.yaml", "PeerAuthentication"),
        ("telemetry.yaml", "Telemetry"),
        ("serviceentry.yaml", "ServiceEntry"),
        ("trafficpolicy.yaml", "TrafficPolicy"),
    ] {
        let objects = examples(file);
        assert!(objects.len() >= 3, "{file}");
        for (object, errors) in objects.iter().zip(schema_errors(kind, &objects)) {
            assert!(
                errors.is_empty(),
                "{file}: {} refused by the CRD: {errors:?}",
                object["metadata"]["name"]
            );
            assert_eq!(
                agent_verdict(object),
                Ok(()),
                "{file}: {}",
                object["metadata"]["name"]
            );
        }
    }
}

/// Sets `value` at a dotted path (`spec.rules.0.to`), making objects and
/// arrays as needed.
fn with(mut object: Value, path: &str, value: Value) -> Value {
    let mut at = &mut object;
    for part in path.split('.') {
        at = match part.parse::<usize>() {
            Ok(i) => {
                if !at.is_array() {
                    *at = json!([]);
                }
                let list = at.as_array_mut().expect("array");
                while list.len() <= i {
                    list.push(json!({}));
                }
                &mut list[i]
            }
            Err(_) => {
                if !at.is_object() {
                    *at = json!({});
                }
                at.as_object_mut()
                    .expect("object")
                    .entry(part)
                    .or_insert(Value::Null)
            }
        };
    }
    *at = value;
    object
}

fn without(mut object: Value, path: &str) -> Value {
    let (parent, last) = path.rsplit_once('.').expect("a dotted path");
    let mut at = &mut object;
    for part in parent.split('.') {
        at = match part.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[part],
        };
    }
    at.as_object_mut().expect("object").remove(last);
    object
}

/// One broken variant per rule: (rule, object, the agent refuses it too).
fn broken_authorization_policies() -> Vec<(&'static str, Value, bool)> {
    let base = examples("authorizationpolicy.yaml");
    let (l4, l7, deny) = (base[0].clone(), base[1].clone(), base[2].clone());
    let custom = base
        .iter()
        .find(|p| p["spec"]["action"] == "CUSTOM")
        .expect("a CUSTOM example")
        .clone();
    vec![
        (
            "action is ALLOW, DENY, CUSTOM or AUDIT",
            with(l4.clone(), "spec.action", json!("LOG")),
            true,
        ),
        (
            "a provider has a name",
            with(custom.clone(), "spec.provider", json!({})),
            true,
        ),
        (
            "a provider's name is a string",
            with(custom.clone(), "spec.provider.name", json!(3)),
            true,
        ),
        (
            "a port is at most 65535",
            with(
                l4.clone(),
                "spec.rules.0.to.0.operation.ports",
                json!([70000]),
            ),
            true,
        ),
        (
            "a port is at least 1",
            with(l4.clone(), "spec.rules.0.to.0.operation.ports", json!([0])),
            true,
        ),
        (
            "a port string is digits",
            with(
                l4.clone(),
                "spec.rules.0.to.0.operation.notPorts",
                json!(["http"]),
            ),
            true,
        ),
        (
            "a port is a number or a string",
            with(
                l4.clone(),
                "spec.rules.0.to.0.operation.ports",
                json!([true]),
            ),
            true,
        ),
        (
            "a principal is not empty",
            with(
                l4.clone(),
                "spec.rules.0.from.0.source.principals",
                json!([""]),
            ),
            true,
        ),
        (
            "a namespace is not empty",
            with(
                l4.clone(),
                "spec.rules.0.from.1.source.notNamespaces",
                json!([""]),
            ),
            true,
        ),
        (
            "a from entry needs its source",
            with(l4.clone(), "spec.rules.0.from.0", json!({})),
            true,
        ),
        (
            "a to entry needs its operation",
            with(l4.clone(), "spec.rules.0.to.0", json!({})),
            true,
        ),
        (
            "a path is not empty",
            with(l7.clone(), "spec.rules.0.to.0.operation.paths", json!([""])),
            true,
        ),
        (
            "a method is not empty",
            with(
                l7.clone(),
                "spec.rules.0.to.0.operation.methods",
                json!([""]),
            ),
            true,
        ),
        (
            "a gRPC method names its service",
            without(
                l7.clone(),
                "spec.rules.1.to.0.operation.grpcMethods.0.service",
            ),
            true,
        ),
        (
            "a gRPC method name is not empty",
            with(
                l7.clone(),
                "spec.rules.1.to.0.operation.grpcMethods.0.method",
                json!(""),
            ),
            true,
        ),
        (
            "a condition's key is one Trellis reads",
            with(
                deny.clone(),
                "spec.rules.0.when.0.key",
                json!("connection.sni"),
            ),
            true,
        ),
        (
            "a condition needs its key",
            without(deny.clone(), "spec.rules.0.when.0.key"),
            true,
        ),
        (
            "a condition value is not empty",
            with(deny.clone(), "spec.rules.0.when.0.values", json!([""])),
            true,
        ),
        (
            "selector labels are strings",
            with(l4.clone(), "spec.selector.matchLabels.app", json!(3)),
            true,
        ),
        (
            "no unknown fields",
            with(
                l4.clone(),
                "spec.rules.0.to.0.operation.pathz",
                json!(["/web"]),
            ),
            true,
        ),
        (
            "rules are a list",
            with(l4, "spec.rules", json!({"from": []})),
            true,
        ),
    ]
}

fn broken_traffic_policies() -> Vec<(&'static str, Value, bool)> {
    let base = examples("trafficpolicy.yaml");
    let (full, cart, chaos) = (base[0].clone(), base[1].clone(), base[2].clone());
    vec![
        (
            "targetRefs is required",
            without(full.clone(), "spec.targetRefs"),
            true,
        ),
        (
            "targetRefs is not empty",
            with(full.clone(), "spec.targetRefs", json!([])),
            true,
        ),
        (
            "a target is a Service or a route",
            with(full.clone(), "spec.targetRefs.0.kind", json!("Deployment")),
            true,
        ),
        (
            "a target's group is core or Gateway API",
            with(full.clone(), "spec.targetRefs.0.group", json!("apps")),
            true,
        ),
        (
            "a target has a name",
            with(full.clone(), "spec.targetRefs.0.name", json!("")),
            true,
        ),
        (
            "a balancer is one of five",
            with(full.clone(), "spec.loadBalancer.type", json!("Fastest")),
            true,
        ),
        (
            "at most 10 retries",
            with(full.clone(), "spec.retry.attempts", json!(11)),
            true,
        ),
        (
            "retries are not negative",
            with(full.clone(), "spec.retry.attempts", json!(-1)),
            true,
        ),
        (
            "a retry needs attempts",
            without(full.clone(), "spec.retry.attempts"),
            true,
        ),
        (
            "retryOn is a known condition",
            with(full.clone(), "spec.retry.retryOn", json!(["always"])),
            true,
        ),
        (
            "a retriable status is an HTTP status",
            with(full.clone(), "spec.retry.retriableStatusCodes", json!([99])),
            true,
        ),
        (
            "a duration is a Gateway API duration",
            with(
                full.clone(),
                "spec.retry.perTryTimeout",
                json!("half a second"),
            ),
            true,
        ),
        (
            "a backoff interval is a duration",
            with(
                full.clone(),
                "spec.retry.backoff.maxInterval",
                json!("1.5s"),
            ),
            true,
        ),
        (
            "a budget is a percentage",
            with(full.clone(), "spec.retry.budget.percent", json!(120)),
            true,
        ),
        (
            "a breaker limit is at least 1",
            with(full.clone(), "spec.circuitBreaker.maxRequests", json!(0)),
            true,
        ),
        (
            "consecutive errors are at least 1",
            with(
                full.clone(),
                "spec.outlierDetection.consecutive5xx",
                json!(0),
            ),
            true,
        ),
        (
            "at most 100 % ejected",
            with(
                full.clone(),
                "spec.outlierDetection.maxEjectionPercent",
                json!(101),
            ),
            true,
        ),
        (
            "an ejection time is a duration",
            with(
                full.clone(),
                "spec.outlierDetection.baseEjectionTime",
                json!("30"),
            ),
            true,
        ),
        (
            "a health check path is absolute",
            with(full.clone(), "spec.healthCheck.http.path", json!("healthz")),
            true,
        ),
        (
            "thresholds are at least 1",
            with(full.clone(), "spec.healthCheck.healthyThreshold", json!(0)),
            true,
        ),
        (
            "a cookie has a name",
            without(cart.clone(), "spec.loadBalancer.hash.cookie.name"),
            true,
        ),
        (
            "a cookie ttl is a duration",
            with(
                cart.clone(),
                "spec.loadBalancer.hash.cookie.ttl",
                json!("forever"),
            ),
            true,
        ),
        (
            "a rate limit allows at least 1 request",
            with(cart.clone(), "spec.rateLimit.requests", json!(0)),
            true,
        ),
        (
            "a burst is at least 1",
            with(cart.clone(), "spec.rateLimit.burst", json!(0)),
            true,
        ),
        (
            "sourceIP is a boolean",
            with(cart, "spec.loadBalancer.hash.sourceIP", json!("yes")),
            true,
        ),
        (
            "a delay percentage is at most 100",
            with(chaos.clone(), "spec.fault.delay.percent", json!(101)),
            true,
        ),
        (
            "a delay needs its duration",
            without(chaos.clone(), "spec.fault.delay.fixedDelay"),
            true,
        ),
        (
            "an abort status is 200 to 599",
            with(chaos.clone(), "spec.fault.abort.httpStatus", json!(600)),
            true,
        ),
        (
            "an abort percentage is not negative",
            with(chaos.clone(), "spec.fault.abort.percent", json!(-1)),
            true,
        ),
        (
            "no unknown fields",
            with(chaos, "spec.fault.reset", json!({"percent": 1})),
            true,
        ),
    ]
}

fn broken_request_authentications() -> Vec<(&'static str, Value, bool)> {
    let base = examples("requestauthentication.yaml");
    let (idp, partner) = (base[0].clone(), base[1].clone());
    vec![
        (
            "an issuer is not empty",
            with(idp.clone(), "spec.jwtRules.0.issuer", json!("")),
            true,
        ),
        (
            "a rule needs its issuer",
            without(idp.clone(), "spec.jwtRules.0.issuer"),
            true,
        ),
        (
            "an audience is not empty",
            with(idp.clone(), "spec.jwtRules.0.audiences", json!([""])),
            true,
        ),
        (
            "a token header needs its name",
            without(partner.clone(), "spec.jwtRules.0.fromHeaders.0.name"),
            true,
        ),
        (
            "a claim header needs its claim",
            without(idp.clone(), "spec.jwtRules.0.outputClaimToHeaders.0.claim"),
            true,
        ),
        (
            "forwardOriginalToken is a boolean",
            with(
                partner,
                "spec.jwtRules.0.forwardOriginalToken",
                json!("yes"),
            ),
            true,
        ),
        (
            "no unknown fields",
            with(idp, "spec.jwtRules.0.fromCookies", json!(["session"])),
            true,
        ),
    ]
}

#[test]
fn each_request_authentication_rule_refuses_its_breach() {
    check_broken("RequestAuthentication", broken_request_authentications());
    // What only the agent can check: the key set itself, and a jwksUri that
    // is not a URL it can fetch, each refused with the field that says so.
    let idp = examples("requestauthentication.yaml")[0].clone();
    for (object, field, reason) in [
        (
            with(idp.clone(), "spec.jwtRules.0.jwks", json!("{\"keys\": []}")),
            "spec.jwtRules[0].jwks",
            "no signing key",
        ),
        (
            with(
                without(idp.clone(), "spec.jwtRules.0.jwks"),
                "spec.jwtRules.0.jwksUri",
                json!("idp.example.com/keys"),
            ),
            "spec.jwtRules[0].jwksUri",
            "http or https",
        ),
    ] {
        let err = agent_verdict(&object).expect_err(field);
        assert!(err.starts_with(field) && err.contains(reason), "{err}");
    }
}

fn check_broken(kind: &str, cases: Vec<(&'static str, Value, bool)>) {
    let objects: Vec<Value> = cases.iter().map(|(_, o, _)| o.clone()).collect();
    let errors = schema_errors(kind, &objects);
    let mut failures = Vec::new();
    for ((rule, object, agent_too), errors) in cases.iter().zip(errors) {
        if errors.is_empty() {
            failures.push(format!("{kind}: the CRD accepts a breach of \"{rule}\""));
        }
        if *agent_too && agent_verdict(object).is_ok() {
            failures.push(format!("{kind}: the agent accepts a breach of \"{rule}\""));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn each_authorization_policy_rule_refuses_its_breach() {
    check_broken("AuthorizationPolicy", broken_authorization_policies());
}

#[test]
fn each_traffic_policy_rule_refuses_its_breach() {
    check_broken("TrafficPolicy", broken_traffic_policies());
}

#[test]
fn each_peer_authentication_rule_refuses_its_breach() {
    let base = examples("peerauthentication.yaml");
    let (mesh, web) = (base[0].clone(), base[2].clone());
    check_broken(
        "PeerAuthentication",
        vec![
            (
                "a mode is one of UNSET, DISABLE, PERMISSIVE, STRICT",
                with(mesh.clone(), "spec.mtls.mode", json!("STRICTER")),
                true,
            ),
            (
                "no unknown fields",
                with(mesh, "spec.mtls.level", json!(1)),
                true,
            ),
            (
                "a port's mode is one of the modes",
                with(web.clone(), "spec.portLevelMtls.9090.mode", json!("OFF")),
                true,
            ),
            (
                "selectors are label maps",
                with(web, "spec.selector.matchLabels", json!(["app"])),
                true,
            ),
        ],
    );
}

#[test]
fn each_telemetry_rule_refuses_its_breach() {
    let base = examples("telemetry.yaml");
    let (mesh, shop) = (base[0].clone(), base[1].clone());
    check_broken(
        "Telemetry",
        vec![
            (
                "a sampling percentage is at most 100",
                with(
                    mesh.clone(),
                    "spec.tracing.0.randomSamplingPercentage",
                    json!(150),
                ),
                true,
            ),
            (
                "a sampling percentage is at least 0",
                with(
                    mesh.clone(),
                    "spec.tracing.0.randomSamplingPercentage",
                    json!(-1),
                ),
                true,
            ),
            (
                "a custom tag has exactly one source",
                with(
                    mesh.clone(),
                    "spec.tracing.0.customTags.cluster.header",
                    json!({"name": "x-cluster"}),
                ),
                true,
            ),
            (
                "a custom tag has a source",
                with(mesh.clone(), "spec.tracing.0.customTags.cluster", json!({})),
                true,
            ),
            (
                "a provider has a name",
                with(mesh.clone(), "spec.tracing.0.providers.0.name", json!("")),
                true,
            ),
            (
                "a mode is one of CLIENT, SERVER, CLIENT_AND_SERVER",
                with(
                    shop.clone(),
                    "spec.accessLogging.0.match.mode",
                    json!("BOTH"),
                ),
                true,
            ),
            (
                "a metric is one of Istio's",
                with(
                    shop.clone(),
                    "spec.metrics.0.overrides.0.match.metric",
                    json!("REQUEST_BYTES"),
                ),
                true,
            ),
            (
                "a tag operation is UPSERT or REMOVE",
                with(
                    shop.clone(),
                    "spec.metrics.0.overrides.0.tagOverrides",
                    json!({"request_protocol": {"operation": "DELETE"}}),
                ),
                true,
            ),
            (
                "no unknown fields",
                with(
                    shop.clone(),
                    "spec.metrics.0.reportingInterval",
                    json!("15s"),
                ),
                true,
            ),
            (
                "a filter has an expression",
                with(
                    shop,
                    "spec.accessLogging.0.filter",
                    json!({"expression": ""}),
                ),
                true,
            ),
            (
                "selectors are label maps",
                with(mesh, "spec.selector.matchLabels", json!(["app"])),
                true,
            ),
        ],
    );
}

#[test]
fn each_service_entry_rule_refuses_its_breach() {
    let base = examples("serviceentry.yaml");
    let (api, ledger) = (base[0].clone(), base[2].clone());
    check_broken(
        "ServiceEntry",
        vec![
            (
                "an entry has a host",
                with(api.clone(), "spec.hosts", json!([])),
                true,
            ),
            (
                "an entry has a port",
                with(api.clone(), "spec.ports", json!([])),
                true,
            ),
            (
                "a port is at most 65535",
                with(api.clone(), "spec.ports.0.number", json!(70000)),
                true,
            ),
            (
                "a target port is at least 1",
                with(api.clone(), "spec.ports.0.targetPort", json!(0)),
                true,
            ),
            (
                "a protocol is one Istio names",
                with(api.clone(), "spec.ports.0.protocol", json!("QUIC")),
                true,
            ),
            (
                "a port has a name",
                without(api.clone(), "spec.ports.0.name"),
                true,
            ),
            (
                "location is MESH_EXTERNAL or MESH_INTERNAL",
                with(api.clone(), "spec.location", json!("OUTSIDE")),
                true,
            ),
            (
                "resolution is one of Istio's",
                with(api.clone(), "spec.resolution", json!("ROUND_ROBIN")),
                true,
            ),
            (
                "an entry has addresses",
                with(api.clone(), "spec.addresses", json!([])),
                true,
            ),
            (
                "no unknown fields",
                with(api, "spec.exportTo", json!(["."])),
                true,
            ),
            (
                "a selector has labels",
                with(ledger, "spec.workloadSelector.labels", json!({})),
                true,
            ),
        ],
    );
}

/// The ServiceEntry CRD's CEL rules refuse what the agent refuses, with
/// the agent's own words.
#[test]
fn the_service_entry_cel_rules_say_what_the_agent_says() {
    let rules = schema("ServiceEntry")["x-kubernetes-validations"]
        .as_array()
        .cloned()
        .expect("CEL rules");
    let ledger = examples("serviceentry.yaml")[2].clone();
    let breaches = [
        with(
            ledger.clone(),
            "spec.endpoints",
            json!([{"address": "10.20.0.1"}]),
        ),
        with(ledger.clone(), "spec.resolution", json!("DNS")),
        with(ledger, "spec.resolution", json!("NONE")),
    ];
    assert_eq!(rules.len(), breaches.len(), "{rules:?}");
    for (rule, breach) in rules.iter().zip(breaches) {
        let message = rule["message"].as_str().expect("a message");
        let error = agent_verdict(&breach).expect_err(message);
        assert!(error.contains(message), "{message}: {error}");
    }
}

/// The PeerAuthentication CRD's CEL rules refuse what the agent refuses,
/// with the agent's own words.
#[test]
fn the_peer_authentication_cel_rules_say_what_the_agent_says() {
    let rules = schema("PeerAuthentication")["x-kubernetes-validations"]
        .as_array()
        .cloned()
        .expect("CEL rules");
    let web = examples("peerauthentication.yaml")[2].clone();
    let ports: serde_json::Map<String, Value> = (1..=9)
        .map(|p| (format!("{}", 9000 + p), json!({"mode": "STRICT"})))
        .collect();
    let breaches = [
        without(web.clone(), "spec.selector"),
        with(web, "spec.portLevelMtls", Value::Object(ports)),
    ];
    assert_eq!(rules.len(), breaches.len(), "{rules:?}");
    for (rule, breach) in rules.iter().zip(breaches) {
        let message = rule["message"].as_str().expect("a message");
        let error = agent_verdict(&breach).expect_err(message);
        assert!(error.contains(message), "{message}: {error}");
    }
}

/// The AuthorizationPolicy CRD's CEL rules (which the validator here does
/// not run) refuse what the agent refuses, with the agent's own words: one
/// breach per rule, in order.
#[test]
fn the_authorization_policy_cel_rules_say_what_the_agent_says() {
    let rules = schema("AuthorizationPolicy")["x-kubernetes-validations"]
        .as_array()
        .cloned()
        .expect("CEL rules");
    let base = examples("authorizationpolicy.yaml");
    let custom = base
        .iter()
        .find(|p| p["spec"]["action"] == "CUSTOM")
        .expect("a CUSTOM example")
        .clone();
    let breaches = [
        without(custom, "spec.provider"),
        with(base[0].clone(), "spec.provider", json!({"name": "ext"})),
    ];
    assert_eq!(rules.len(), breaches.len(), "{rules:?}");
    for (rule, breach) in rules.iter().zip(breaches) {
        let message = rule["message"].as_str().expect("a message");
        let error = agent_verdict(&breach).expect_err(message);
        assert!(error.contains(message), "{message}: {error}");
    }
}
