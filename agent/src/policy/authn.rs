//! `RequestAuthentication` (`trellis.dev/v1alpha1`, Istio's shape): which
//! JSON Web Tokens the selected workloads accept, checked by the
//! destination's agent on each HTTP request before authorization.
//!
//! As in Istio: a request with a token that does not verify (signature,
//! issuer, time window, audience) is refused with 401; a request without a
//! token passes with no request principal, so an `AuthorizationPolicy` with
//! `requestPrincipals` is what makes a token required. A verified token
//! gives the request principal `<iss>/<sub>` and its claims to
//! `AuthorizationPolicy` (`requestPrincipals`, `request.auth.*`
//! conditions). The token is taken off the request before it reaches the
//! pod unless `forwardOriginalToken` says otherwise, and the headers
//! `outputPayloadToHeader` and `outputClaimToHeaders` name are always
//! replaced, so a client cannot send them itself.
//!
//! Keys are given inline (`jwks`) or fetched from `jwksUri` by the agent of
//! each node with pods the rule selects ([`super::jwks`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    authz::Selector,
    jwt::{self, KeySet, Unverified},
};
use crate::state::Workload;

/// Which JSON Web Tokens requests to the selected workloads may carry: a
/// token that fails its checks gets 401; one that passes gives the request
/// a principal (`<iss>/<sub>`) and claims for `AuthorizationPolicy`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "RequestAuthentication",
    doc = "Trellis RequestAuthentication: the JSON Web Tokens a workload accepts.",
    namespaced,
    shortname = "tra",
    derive = "PartialEq",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// Which pods of the namespace it applies to; all of them when absent.
    #[serde(default)]
    pub selector: Option<Selector>,
    /// One per issuer; a token is checked by the rule of its `iss`.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// The token's `iss` this rule checks.
    #[schemars(length(min = 1))]
    pub issuer: String,
    /// The token's `aud` must name one of these, when given.
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub audiences: Vec<String>,
    /// The issuer's JSON Web Key Set, as JSON; or give `jwksUri`.
    #[serde(default)]
    pub jwks: Option<String>,
    /// Where the agent fetches the key set (`http` or `https`; again every
    /// 20 minutes).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Where the token is; `Authorization: Bearer <token>` and the
    /// `access_token` query parameter when neither this nor `fromParams`
    /// is given.
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    #[schemars(inner(length(min = 1)))]
    pub from_params: Vec<String>,
    /// A header the verified payload (base64url, as in the token) is put in.
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token on the request to the pod (taken off by default).
    #[serde(default)]
    pub forward_original_token: bool,
    /// Headers set to a claim's value (a string, number or boolean).
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    #[schemars(length(min = 1))]
    pub name: String,
    /// Taken off the value before the token, as `Bearer `.
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    #[schemars(length(min = 1))]
    pub header: String,
    /// A top-level claim, or a nested one as `a.b`.
    #[schemars(length(min = 1))]
    pub claim: String,
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))
}

/// Checks what the schema cannot say: a field path and a reason.
pub fn validate(spec: &RequestAuthenticationSpec) -> Result<(), (String, String)> {
    for (r, rule) in spec.jwt_rules.iter().enumerate() {
        compile_rule(rule)
            .map_err(|(field, reason)| (format!("spec.jwtRules[{r}].{field}"), reason))?;
    }
    Ok(())
}

/// Where a token may be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Location {
    Header { name: String, prefix: String },
    Param(String),
}

/// A rule ready to check tokens.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub issuer: String,
    pub audiences: Vec<String>,
    #[serde(flatten)]
    pub keys: Keys,
    pub locations: Vec<Location>,
    pub forward_original_token: bool,
    #[serde(skip)]
    verified: VerifiedCache,
    #[serde(skip)]
    payload_header: Option<HeaderName>,
    #[serde(skip)]
    claim_headers: Vec<(HeaderName, Vec<String>)>,
}

/// Where a rule's keys come from (shown as `kids` or `jwksUri`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Keys {
    /// Written in the policy (`jwks`).
    Inline {
        kids: Vec<String>,
        #[serde(skip)]
        set: KeySet,
    },
    /// Fetched by [`super::jwks`] from this URL (`jwksUri`).
    Fetched {
        #[serde(rename = "jwksUri")]
        uri: String,
    },
}

impl Keys {
    pub fn uri(&self) -> Option<&str> {
        match self {
            Self::Inline { .. } => None,
            Self::Fetched { uri } => Some(uri),
        }
    }
}

fn compile_rule(rule: &JwtRule) -> Result<Rule, (String, String)> {
    if rule.issuer.is_empty() {
        return Err(("issuer".into(), "empty".into()));
    }
    if let Some(i) = rule.audiences.iter().position(String::is_empty) {
        return Err((format!("audiences[{i}]"), "empty".into()));
    }
    let keys = match (&rule.jwks, &rule.jwks_uri) {
        (Some(_), Some(_)) => {
            return Err(("jwksUri".into(), "give jwks or jwksUri, not both".into()));
        }
        (Some(jwks), None) => {
            let set = KeySet::parse(jwks).map_err(|why| ("jwks".to_string(), why))?;
            Keys::Inline {
                kids: set.kids(),
                set,
            }
        }
        (None, Some(uri)) => {
            super::jwks::check_uri(uri).map_err(|why| ("jwksUri".to_string(), why))?;
            Keys::Fetched { uri: uri.clone() }
        }
        (None, None) => {
            return Err((
                "jwks".into(),
                "give the issuer's key set in jwks, or its URL in jwksUri".into(),
            ));
        }
    };
    let mut locations = Vec::new();
    for (i, h) in rule.from_headers.iter().enumerate() {
        let name = header_name(&h.name).map_err(|why| (format!("fromHeaders[{i}].name"), why))?;
        let prefix = h.prefix.clone().unwrap_or_default();
        locations.push(Location::Header {
            name: name.as_str().into(),
            prefix,
        });
    }
    for (i, p) in rule.from_params.iter().enumerate() {
        if p.is_empty() {
            return Err((format!("fromParams[{i}]"), "empty".into()));
        }
        locations.push(Location::Param(p.clone()));
    }
    if locations.is_empty() {
        locations = vec![
            Location::Header {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ];
    }
    let payload_header = rule
        .output_payload_to_header
        .as_deref()
        .map(header_name)
        .transpose()
        .map_err(|why| ("outputPayloadToHeader".to_string(), why))?;
    let mut claim_headers = Vec::new();
    for (i, c) in rule.output_claim_to_headers.iter().enumerate() {
        let name = header_name(&c.header)
            .map_err(|why| (format!("outputClaimToHeaders[{i}].header"), why))?;
        let path: Vec<String> = c.claim.split('.').map(String::from).collect();
        if path.iter().any(String::is_empty) {
            return Err((
                format!("outputClaimToHeaders[{i}].claim"),
                format!("{:?}: a claim name, or names joined by `.`", c.claim),
            ));
        }
        claim_headers.push((name, path));
    }
    Ok(Rule {
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        locations,
        forward_original_token: rule.forward_original_token,
        keys,
        payload_header,
        claim_headers,
        verified: VerifiedCache::default(),
    })
}

/// A policy ready to check requests, as the state snapshot holds it.
#[derive(Clone, Debug, Serialize)]
pub struct Authentication {
    pub namespace: String,
    pub name: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub rules: Vec<Arc<Rule>>,
    /// What it was compiled from: two are equal when this is.
    #[serde(skip)]
    spec: RequestAuthenticationSpec,
}

impl PartialEq for Authentication {
    fn eq(&self, other: &Self) -> bool {
        (&self.namespace, &self.name, &self.spec) == (&other.namespace, &other.name, &other.spec)
    }
}

impl Eq for Authentication {}

impl Authentication {
    /// Compiles a validated object (a rule that does not compile, which
    /// validation has refused already, is left out).
    pub fn compile(object: &RequestAuthentication) -> Self {
        Self {
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            selector: object
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone()),
            rules: object
                .spec
                .jwt_rules
                .iter()
                .filter_map(|r| compile_rule(r).ok().map(Arc::new))
                .collect(),
            spec: object.spec.clone(),
        }
    }

    /// Whether it selects `workload`.
    pub fn applies_to(&self, workload: &Workload) -> bool {
        super::authz::selects(&self.namespace, self.selector.as_ref(), workload)
    }
}

/// What a verified token says, kept for its next use.
#[derive(Debug)]
struct Verified {
    principal: String,
    claims: Map<String, Value>,
    /// The payload as sent (base64url), for `outputPayloadToHeader`.
    payload: String,
    /// The fetched set it was verified with (`jwksUri`): a new set
    /// verifies it again.
    keys: Option<Arc<KeySet>>,
}

/// Tokens a rule has verified, so that a client sending the same token on
/// each request pays for its signature once, as Envoy's jwt_authn cache
/// does: a hit still checks the time window. Bounded; emptied when full.
#[derive(Default)]
struct VerifiedCache(std::sync::Mutex<HashMap<Box<str>, Arc<Verified>>>);

/// Entries per rule.
const CACHE_SIZE: usize = 1024;

impl std::fmt::Debug for VerifiedCache {
    // Tokens are credentials: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.0.lock().map_or(0, |m| m.len());
        write!(f, "{len} verified tokens")
    }
}

impl VerifiedCache {
    fn get(&self, token: &str) -> Option<Arc<Verified>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    fn put(&self, token: &str, verified: Arc<Verified>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= CACHE_SIZE {
            map.clear();
        }
        map.insert(token.into(), verified);
    }
}

/// A request's verified token.
#[derive(Debug)]
pub struct Authenticated {
    verified: Arc<Verified>,
    rule: Arc<Rule>,
    location: Location,
}

impl Authenticated {
    /// `<iss>/<sub>`, as Istio's request principal.
    pub fn principal(&self) -> &str {
        &self.verified.principal
    }

    pub fn claims(&self) -> &Map<String, Value> {
        &self.verified.claims
    }

    /// A claim, nested ones named by their path.
    pub fn claim(&self, path: &[impl AsRef<str>]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        rest.iter()
            .try_fold(self.claims().get(first.as_ref())?, |v, key| {
                v.as_object()?.get(key.as_ref())
            })
    }
}

impl Location {
    fn find(&self, headers: &HeaderMap, uri: &Uri) -> Option<String> {
        match self {
            Self::Header { name, prefix } => headers.get_all(name.as_str()).iter().find_map(|v| {
                let v = v.to_str().ok()?;
                // The scheme is case-insensitive (RFC 9110 11.1).
                let token = match v.get(..prefix.len()) {
                    Some(p) if p.eq_ignore_ascii_case(prefix) => &v[prefix.len()..],
                    _ => return None,
                };
                Some(token.trim().to_string())
            }),
            Self::Param(name) => crate::query::value(uri.query(), name),
        }
        .filter(|t| !t.is_empty())
    }
}

/// Checks the token of a request to a workload that `rules` apply to:
/// `None` when it carries none, the verified token, or why it is refused.
pub fn authenticate(
    rules: &[Arc<Rule>],
    headers: &HeaderMap,
    uri: &Uri,
    now: SystemTime,
) -> Result<Option<Authenticated>, jwt::Error> {
    let found = rules.iter().find_map(|rule| {
        rule.locations
            .iter()
            .find_map(|l| Some((l, l.find(headers, uri)?)))
    });
    let Some((location, token)) = found else {
        return Ok(None);
    };
    let fetched_keys = |rule: &Rule| rule.keys.uri().and_then(super::jwks::get);
    for rule in rules.iter().filter(|r| r.locations.contains(location)) {
        let Some(verified) = rule.verified.get(&token) else {
            continue;
        };
        let current = match &verified.keys {
            Some(keys) => fetched_keys(rule).is_some_and(|now| Arc::ptr_eq(keys, &now)),
            None => true,
        };
        if current {
            jwt::check_time(&verified.claims, now)?;
            return Ok(Some(Authenticated {
                verified,
                rule: rule.clone(),
                location: location.clone(),
            }));
        }
    }
    let unverified = Unverified::parse(&token)?;
    let issuer = unverified.issuer().unwrap_or_default();
    let rule = rules
        .iter()
        .find(|r| r.issuer == issuer && r.locations.contains(location))
        .ok_or_else(|| jwt::Error::UnknownIssuer(issuer.into()))?;
    let fetched = match &rule.keys {
        Keys::Inline { .. } => None,
        Keys::Fetched { uri } => {
            Some(super::jwks::get(uri).ok_or_else(|| jwt::Error::KeysUnavailable(uri.clone()))?)
        }
    };
    let keys = match &rule.keys {
        Keys::Inline { set, .. } => set,
        Keys::Fetched { .. } => fetched.as_deref().ok_or(jwt::Error::NoKey)?,
    };
    let checked = unverified.verify(keys, &rule.audiences, now);
    if let (Err(jwt::Error::NoKey), Some(uri)) = (&checked, rule.keys.uri()) {
        // The provider may have a new signing key.
        super::jwks::refresh(uri);
    }
    checked?;
    let sub = unverified
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let verified = Arc::new(Verified {
        principal: format!("{issuer}/{sub}"),
        payload: unverified.payload_b64.to_string(),
        claims: unverified.claims,
        keys: fetched,
    });
    rule.verified.put(&token, verified.clone());
    Ok(Some(Authenticated {
        verified,
        rule: rule.clone(),
        location: location.clone(),
    }))
}

/// The changes authentication makes to an admitted request: the headers
/// the rules output are cleared (a client may not set them), then, with a
/// verified token, set from it, and the token taken off unless its rule
/// forwards it.
pub fn edit(
    rules: &[Arc<Rule>],
    auth: Option<&Authenticated>,
    headers: &mut HeaderMap,
    uri: &mut Uri,
) {
    for rule in rules {
        for name in rule
            .payload_header
            .iter()
            .chain(rule.claim_headers.iter().map(|(n, _)| n))
        {
            headers.remove(name);
        }
    }
    let Some(auth) = auth else { return };
    let rule = &auth.rule;
    if !rule.forward_original_token {
        match &auth.location {
            Location::Header { name, .. } => {
                headers.remove(name.as_str());
            }
            Location::Param(name) => *uri = without_param(uri, name),
        }
    }
    if let Some(name) = &rule.payload_header
        && let Ok(value) = HeaderValue::from_str(&auth.verified.payload)
    {
        headers.insert(name.clone(), value);
    }
    for (name, path) in &rule.claim_headers {
        if let Some(text) = auth.claim(path).and_then(jwt::claim_text)
            && let Ok(value) = HeaderValue::from_str(&text)
        {
            headers.insert(name.clone(), value);
        }
    }
}

/// `uri` without the query parameter `name`.
fn without_param(uri: &Uri, name: &str) -> Uri {
    let Some(query) = uri.query() else {
        return uri.clone();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    let pq = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    match pq.parse() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return uri.clone(),
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::jwt::tests::{es256, sign_es256};

    fn compile(yaml: &str) -> Result<Authentication, (String, String)> {
        let spec: RequestAuthenticationSpec = serde_yaml_ng::from_str(yaml).expect("spec");
        validate(&spec)?;
        Ok(Authentication::compile(&RequestAuthentication {
            metadata: kube::api::ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("jwt".into()),
                ..kube::api::ObjectMeta::default()
            },
            spec,
        }))
    }

    /// A verified token with `claims` (and the issuer `https://idp.example`).
    pub(crate) fn authenticated(claims: serde_json::Value) -> Authenticated {
        let (key, jwks) = es256("k");
        let a = compile(&spec(&jwks, "")).expect("valid");
        let mut claims = claims;
        claims["iss"] = json!("https://idp.example");
        let token = sign_es256(&key, "k", &claims);
        let (headers, uri) = request(&[("authorization", &format!("Bearer {token}"))], "/");
        authenticate(&a.rules, &headers, &uri, SystemTime::now())
            .expect("verifies")
            .expect("a token")
    }

    fn spec(jwks: &str, extra: &str) -> String {
        format!("jwtRules: [{{issuer: https://idp.example, jwks: '{jwks}'{extra}}}]")
    }

    fn request(headers: &[(&str, &str)], uri: &str) -> (HeaderMap, Uri) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        (map, uri.parse().expect("uri"))
    }

    #[test]
    fn a_verified_token_gives_principal_and_claims_and_is_taken_off() {
        let (key, jwks) = es256("k");
        let a = compile(&spec(&jwks, ", outputPayloadToHeader: x-jwt, outputClaimToHeaders: [{header: x-group, claim: org.team}, {header: x-level, claim: level}]")).expect("valid");
        let token = sign_es256(
            &key,
            "k",
            &json!({"iss": "https://idp.example", "sub": "alice", "org": {"team": "red"}, "level": 3}),
        );
        let (mut headers, mut uri) = request(
            &[
                ("authorization", &format!("bearer {token}")),
                ("x-group", "forged"),
            ],
            "/p?x=1",
        );
        let auth = authenticate(&a.rules, &headers, &uri, SystemTime::now())
            .expect("verifies")
            .expect("a token");
        assert_eq!(auth.principal(), "https://idp.example/alice");
        assert_eq!(auth.claim(&["org", "team"]), Some(&json!("red")));
        edit(&a.rules, Some(&auth), &mut headers, &mut uri);
        assert!(headers.get("authorization").is_none());
        assert_eq!(headers["x-group"], "red");
        assert_eq!(headers["x-level"], "3");
        assert_eq!(headers["x-jwt"], token.split('.').nth(1).expect("payload"));

        // No token: passes, and the output headers are still cleared.
        let (mut headers, mut uri) = request(&[("x-group", "forged"), ("x-jwt", "e30")], "/");
        assert!(
            authenticate(&a.rules, &headers, &uri, SystemTime::now())
                .expect("ok")
                .is_none()
        );
        edit(&a.rules, None, &mut headers, &mut uri);
        assert!(headers.is_empty());
    }

    #[test]
    fn a_verified_token_is_kept_and_its_time_window_checked_again() {
        let (key, jwks) = es256("k");
        let a = compile(&spec(&jwks, "")).expect("valid");
        let exp = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 10;
        let token = sign_es256(
            &key,
            "k",
            &json!({"iss": "https://idp.example", "sub": "c", "exp": exp}),
        );
        let (headers, uri) = request(&[("authorization", &format!("Bearer {token}"))], "/");
        let first = authenticate(&a.rules, &headers, &uri, SystemTime::now())
            .expect("ok")
            .expect("token");
        let again = authenticate(&a.rules, &headers, &uri, SystemTime::now())
            .expect("ok")
            .expect("token");
        assert!(
            Arc::ptr_eq(&first.verified, &again.verified),
            "the second use is a cache hit"
        );
        let later = SystemTime::now() + std::time::Duration::from_secs(120);
        assert_eq!(
            authenticate(&a.rules, &headers, &uri, later).map(|a| a.is_some()),
            Err(jwt::Error::Expired)
        );
        // Bounded: a full cache starts again.
        for i in 0..CACHE_SIZE {
            a.rules[0]
                .verified
                .put(&format!("t{i}"), first.verified.clone());
        }
        assert!(a.rules[0].verified.0.lock().expect("lock").len() <= CACHE_SIZE);
        assert_eq!(format!("{:?}", a.rules[0].verified), "1 verified tokens");
    }

    #[test]
    fn tokens_in_query_parameters_and_custom_headers() {
        let (key, jwks) = es256("k");
        let token = sign_es256(
            &key,
            "k",
            &json!({"iss": "https://idp.example", "sub": "bob"}),
        );
        // The default locations: the access_token parameter, taken off.
        let a = compile(&spec(&jwks, "")).expect("valid");
        let (mut headers, mut uri) = request(&[], &format!("/p?a=1&access_token={token}&b=2"));
        let auth = authenticate(&a.rules, &headers, &uri, SystemTime::now()).expect("ok");
        edit(&a.rules, auth.as_ref(), &mut headers, &mut uri);
        assert_eq!(uri, "/p?a=1&b=2");

        // Only the locations given; kept when forwarded.
        let a = compile(&spec(
            &jwks,
            ", fromHeaders: [{name: x-token}], forwardOriginalToken: true",
        ))
        .expect("valid");
        let (headers, uri) = request(&[("authorization", &format!("Bearer {token}"))], "/");
        assert!(
            authenticate(&a.rules, &headers, &uri, SystemTime::now())
                .expect("ok")
                .is_none()
        );
        let (mut headers, mut uri) = request(&[("x-token", &token)], "/");
        let auth = authenticate(&a.rules, &headers, &uri, SystemTime::now()).expect("ok");
        assert_eq!(
            auth.as_ref().map(|a| a.principal()),
            Some("https://idp.example/bob")
        );
        edit(&a.rules, auth.as_ref(), &mut headers, &mut uri);
        assert_eq!(headers["x-token"], token);
    }

    #[test]
    fn bad_tokens_are_refused() {
        let (key, jwks) = es256("k");
        let a = compile(&spec(&jwks, ", audiences: [shop]")).expect("valid");
        let check = |token: &str| {
            let (headers, uri) = request(&[("authorization", &format!("Bearer {token}"))], "/");
            authenticate(&a.rules, &headers, &uri, SystemTime::now())
                .map(|a| a.map(|a| a.principal().to_string()))
        };
        let ok = sign_es256(
            &key,
            "k",
            &json!({"iss": "https://idp.example", "sub": "s", "aud": "shop"}),
        );
        assert_eq!(check(&ok), Ok(Some("https://idp.example/s".into())));
        let other_aud = sign_es256(
            &key,
            "k",
            &json!({"iss": "https://idp.example", "aud": "bank"}),
        );
        assert_eq!(check(&other_aud), Err(jwt::Error::Audience));
        let other_iss = sign_es256(
            &key,
            "k",
            &json!({"iss": "https://evil.example", "aud": "shop"}),
        );
        assert_eq!(
            check(&other_iss),
            Err(jwt::Error::UnknownIssuer("https://evil.example".into()))
        );
        assert_eq!(check("garbage"), Err(jwt::Error::Malformed));
    }

    #[test]
    fn invalid_rules_name_their_field() {
        let (_, jwks) = es256("k");
        for (yaml, field, reason) in [
            (
                "jwtRules: [{issuer: i}]".to_string(),
                "spec.jwtRules[0].jwks",
                "key set",
            ),
            (
                "jwtRules: [{issuer: i, jwksUri: 'ftp://idp/keys'}]".into(),
                "spec.jwtRules[0].jwksUri",
                "http or https",
            ),
            (
                spec(&jwks, ", jwksUri: 'https://idp/keys'"),
                "spec.jwtRules[0].jwksUri",
                "not both",
            ),
            (
                "jwtRules: [{issuer: i, jwks: '{}'}]".into(),
                "spec.jwtRules[0].jwks",
                "not a JSON Web Key Set",
            ),
            (
                spec(&jwks, ", fromHeaders: [{name: 'bad header'}]"),
                "spec.jwtRules[0].fromHeaders[0].name",
                "not a header name",
            ),
            (
                spec(
                    &jwks,
                    ", outputClaimToHeaders: [{header: x, claim: 'a..b'}]",
                ),
                "spec.jwtRules[0].outputClaimToHeaders[0].claim",
                "claim name",
            ),
        ] {
            let (f, r) = compile(&yaml).expect_err(&yaml);
            assert_eq!(f, field, "{yaml}");
            assert!(r.contains(reason), "{yaml}: {r}");
        }
    }
}
