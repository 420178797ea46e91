//! JSON Web Tokens (RFC 7519) in compact JWS form, checked against a JSON
//! Web Key Set (RFC 7517): the signature (RS256/384/512, ES256/384, EdDSA
//! with Ed25519), the time window and the audience, as Envoy's jwt_authn
//! filter checks them for Istio's `RequestAuthentication`.
//!
//! Keys are parsed once, when the policy is compiled; a token costs one
//! signature check and two small JSON parses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ED25519, ParsedPublicKey,
    RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512,
    RsaPublicKeyComponents,
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::{Map, Value};

/// How far a token's `exp` and `nbf` may be off the agent's clock, as
/// Envoy's default `clock_skew_seconds`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why a token was refused: what the client reads after a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the token is not header.payload.signature in base64url")]
    Malformed,
    #[error("the token's header is not a JWS header: {0}")]
    Header(String),
    #[error("the token's payload is not a JSON object")]
    Payload,
    #[error(
        "the token's algorithm {0:?} is not accepted (RS256, RS384, RS512, ES256, ES384, EdDSA)"
    )]
    Algorithm(String),
    #[error("the token's issuer {0:?} is not configured")]
    UnknownIssuer(String),
    #[error("no key of the issuer's set matches the token's kid and alg")]
    NoKey,
    #[error("the issuer's key set at {0} has not been fetched")]
    KeysUnavailable(String),
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's audiences are not allowed")]
    Audience,
}

/// A signature algorithm of JWS (RFC 7518 section 3; RFC 8037 for EdDSA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "EdDSA" => Self::EdDsa,
            _ => return None,
        })
    }
}

/// One usable key: its id and a parsed verifier per algorithm it serves.
struct Key {
    kid: Option<String>,
    verifiers: Vec<(Alg, ParsedPublicKey)>,
}

/// The keys of one issuer.
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| k.kid.as_deref().unwrap_or("-")))
            .finish()
    }
}

/// A JWK as RFC 7517/7518 write it; fields of other key types are ignored.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

impl KeySet {
    /// Parses a JWKS document. Keys meant for encryption (`use: enc`) are
    /// skipped; a signing key that cannot be used is an error naming it, and
    /// so is a set left without any key.
    pub fn parse(json: &str) -> Result<Self, String> {
        let jwks: Jwks =
            serde_json::from_str(json).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        let mut keys = Vec::new();
        for (i, jwk) in jwks.keys.iter().enumerate() {
            if jwk.usage.as_deref() == Some("enc") {
                continue;
            }
            keys.push(Key::parse(jwk).map_err(|why| format!("keys[{i}]: {why}"))?);
        }
        if keys.is_empty() {
            return Err("no signing key in the set".into());
        }
        Ok(Self { keys })
    }

    /// The key ids, for status output.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().filter_map(|k| k.kid.clone()).collect()
    }
}

fn b64(field: &str, value: Option<&String>) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("no {field:?}"))?;
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|e| format!("{field:?} is not base64url: {e}"))
}

impl Key {
    fn parse(jwk: &Jwk) -> Result<Self, String> {
        let named = jwk
            .alg
            .as_deref()
            .map(|a| Alg::parse(a).ok_or_else(|| format!("alg {a:?} is not supported")))
            .transpose()?;
        let wanted = |algs: &[Alg]| -> Result<Vec<Alg>, String> {
            match named {
                Some(a) if algs.contains(&a) => Ok(vec![a]),
                Some(a) => Err(format!("alg {a:?} does not fit a {} key", jwk.kty)),
                None => Ok(algs.to_vec()),
            }
        };
        let rejected = |e: aws_lc_rs::error::KeyRejected| format!("the key is rejected: {e}");
        let mut verifiers = Vec::new();
        match jwk.kty.as_str() {
            "RSA" => {
                let components = RsaPublicKeyComponents {
                    n: b64("n", jwk.n.as_ref())?,
                    e: b64("e", jwk.e.as_ref())?,
                };
                for alg in wanted(&[Alg::Rs256, Alg::Rs384, Alg::Rs512])? {
                    let params = match alg {
                        Alg::Rs384 => &RSA_PKCS1_2048_8192_SHA384,
                        Alg::Rs512 => &RSA_PKCS1_2048_8192_SHA512,
                        _ => &RSA_PKCS1_2048_8192_SHA256,
                    };
                    verifiers.push((
                        alg,
                        components.to_parsed_public_key(params).map_err(rejected)?,
                    ));
                }
            }
            "EC" => {
                let (alg, params): (_, &'static signature::EcdsaVerificationAlgorithm) =
                    match jwk.crv.as_deref() {
                        Some("P-256") => (Alg::Es256, &ECDSA_P256_SHA256_FIXED),
                        Some("P-384") => (Alg::Es384, &ECDSA_P384_SHA384_FIXED),
                        other => return Err(format!("curve {other:?} is not supported")),
                    };
                wanted(&[alg])?;
                // The uncompressed point: 0x04, x, y.
                let mut point = vec![4];
                point.extend(b64("x", jwk.x.as_ref())?);
                point.extend(b64("y", jwk.y.as_ref())?);
                verifiers.push((alg, ParsedPublicKey::new(params, point).map_err(rejected)?));
            }
            "OKP" => {
                if jwk.crv.as_deref() != Some("Ed25519") {
                    return Err(format!("curve {:?} is not supported", jwk.crv));
                }
                wanted(&[Alg::EdDsa])?;
                let x = b64("x", jwk.x.as_ref())?;
                verifiers.push((
                    Alg::EdDsa,
                    ParsedPublicKey::new(&ED25519, x).map_err(rejected)?,
                ));
            }
            other => {
                return Err(format!("kty {other:?} is not supported (RSA, EC, OKP)"));
            }
        }
        Ok(Self {
            kid: jwk.kid.clone(),
            verifiers,
        })
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// A token split and its header and payload read, not yet verified.
pub struct Unverified<'t> {
    /// `header.payload`, the signed bytes.
    signed: &'t str,
    /// The payload as sent (base64url), for `outputPayloadToHeader`.
    pub payload_b64: &'t str,
    signature: Vec<u8>,
    alg: Alg,
    kid: Option<String>,
    pub claims: Map<String, Value>,
}

impl<'t> Unverified<'t> {
    pub fn parse(token: &'t str) -> Result<Self, Error> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::Malformed);
        };
        let decode = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|_| Error::Malformed);
        let head: Header =
            serde_json::from_slice(&decode(header)?).map_err(|e| Error::Header(e.to_string()))?;
        let alg = Alg::parse(&head.alg).ok_or(Error::Algorithm(head.alg))?;
        let claims = match serde_json::from_slice(&decode(payload)?) {
            Ok(Value::Object(map)) => map,
            _ => return Err(Error::Payload),
        };
        Ok(Self {
            signed: &token[..header.len() + 1 + payload.len()],
            payload_b64: payload,
            signature: decode(signature)?,
            alg,
            kid: head.kid,
            claims,
        })
    }

    /// The `iss` claim.
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// Checks the signature with a key of `keys` (the one its `kid` names,
    /// when it names one), the time window at `now`, and, when `audiences`
    /// is not empty, that the token names one of them.
    pub fn verify(
        &self,
        keys: &KeySet,
        audiences: &[String],
        now: SystemTime,
    ) -> Result<(), Error> {
        let mut candidates = keys
            .keys
            .iter()
            .filter(|k| self.kid.is_none() || k.kid.is_none() || k.kid == self.kid)
            .flat_map(|k| &k.verifiers)
            .filter(|(alg, _)| *alg == self.alg)
            .peekable();
        if candidates.peek().is_none() {
            return Err(Error::NoKey);
        }
        if !candidates.any(|(_, key)| {
            key.verify_sig(self.signed.as_bytes(), &self.signature)
                .is_ok()
        }) {
            return Err(Error::Signature);
        }
        check_time(&self.claims, now)?;
        if !audiences.is_empty() && !self.audiences().any(|a| audiences.iter().any(|w| w == a)) {
            return Err(Error::Audience);
        }
        Ok(())
    }

    /// The `aud` claim: one string or a list of them.
    pub fn audiences(&self) -> impl Iterator<Item = &str> {
        strings(self.claims.get("aud"))
    }
}

/// Checks the time window of verified `claims` at `now`: `exp` and `nbf`,
/// each with [`CLOCK_SKEW`].
pub fn check_time(claims: &Map<String, Value>, now: SystemTime) -> Result<(), Error> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let skew = CLOCK_SKEW.as_secs_f64();
    let time = |claim: &str| claims.get(claim).and_then(Value::as_f64);
    if time("exp").is_some_and(|exp| now > exp + skew) {
        return Err(Error::Expired);
    }
    if time("nbf").is_some_and(|nbf| now + skew < nbf) {
        return Err(Error::NotYetValid);
    }
    Ok(())
}

/// A claim read as strings: a string, or the strings of a list.
pub fn strings(value: Option<&Value>) -> impl Iterator<Item = &str> {
    let (one, many) = match value {
        Some(Value::String(s)) => (Some(s.as_str()), None),
        Some(Value::Array(list)) => (None, Some(list.iter().filter_map(Value::as_str))),
        _ => (None, None),
    };
    one.into_iter().chain(many.into_iter().flatten())
}

/// A claim's value as text for a header or a match: a string as it is, a
/// number or boolean as JSON writes it; objects, lists and null have none.
pub fn claim_text(value: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(_) | Value::Bool(_) => Some(value.to_string().into()),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use aws_lc_rs::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _},
    };
    use serde_json::json;

    use super::*;

    /// An ES256 key and its JWKS.
    pub(crate) fn es256(kid: &str) -> (EcdsaKeyPair, String) {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
        let point = key.public_key().as_ref();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }]});
        (key, jwks.to_string())
    }

    pub(crate) fn sign_es256(key: &EcdsaKeyPair, kid: &str, claims: &Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "kid": kid}).to_string());
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{payload}");
        let sig = key
            .sign(&SystemRandom::new(), signed.as_bytes())
            .expect("sign");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    fn check(token: &str, keys: &KeySet, audiences: &[&str]) -> Result<(), Error> {
        let audiences: Vec<String> = audiences.iter().map(|a| a.to_string()).collect();
        Unverified::parse(token)?.verify(keys, &audiences, SystemTime::now())
    }

    #[test]
    fn es256_tokens_verify_and_their_window_and_audience_are_checked() {
        let (key, jwks) = es256("k1");
        let keys = KeySet::parse(&jwks).expect("jwks");
        assert_eq!(keys.kids(), ["k1"]);
        let t = now();
        let good = sign_es256(
            &key,
            "k1",
            &json!({"iss": "i", "sub": "s", "aud": ["a", "b"], "exp": t + 100}),
        );
        assert_eq!(check(&good, &keys, &["b"]), Ok(()));
        assert_eq!(check(&good, &keys, &[]), Ok(()));
        assert_eq!(check(&good, &keys, &["c"]), Err(Error::Audience));
        let token = Unverified::parse(&good).expect("parse");
        assert_eq!(token.issuer(), Some("i"));
        assert_eq!(token.audiences().collect::<Vec<_>>(), ["a", "b"]);

        // Past the skew, not within it.
        let old = sign_es256(&key, "k1", &json!({"iss": "i", "exp": t - 120}));
        assert_eq!(check(&old, &keys, &[]), Err(Error::Expired));
        let skewed = sign_es256(&key, "k1", &json!({"iss": "i", "exp": t - 30}));
        assert_eq!(check(&skewed, &keys, &[]), Ok(()));
        let early = sign_es256(&key, "k1", &json!({"iss": "i", "nbf": t + 600}));
        assert_eq!(check(&early, &keys, &[]), Err(Error::NotYetValid));

        // Another key's signature, an edited payload, an unknown kid.
        let (other, _) = es256("k1");
        let forged = sign_es256(&other, "k1", &json!({"iss": "i"}));
        assert_eq!(check(&forged, &keys, &[]), Err(Error::Signature));
        let parts: Vec<&str> = good.split('.').collect();
        let edited = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(json!({"iss": "i", "sub": "admin"}).to_string()),
            parts[2]
        );
        assert_eq!(check(&edited, &keys, &[]), Err(Error::Signature));
        let unknown = sign_es256(&key, "k2", &json!({"iss": "i"}));
        assert_eq!(check(&unknown, &keys, &[]), Err(Error::NoKey));
    }

    #[test]
    fn malformed_tokens_are_refused_with_their_reason() {
        let (_, jwks) = es256("k");
        let keys = KeySet::parse(&jwks).expect("jwks");
        let h = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let p = h(json!({"iss": "i"}));
        for (token, want) in [
            ("", Error::Malformed),
            ("a.b", Error::Malformed),
            ("a.b.c.d", Error::Malformed),
            ("!!.b.c", Error::Malformed),
            (
                &format!("{}.{p}.AA", h(json!({"alg": "none"}))),
                Error::Algorithm("none".into()),
            ),
            (
                &format!("{}.{p}.AA", h(json!({"alg": "HS256"}))),
                Error::Algorithm("HS256".into()),
            ),
            (
                &format!("{}.{}.AA", h(json!({"alg": "ES256"})), h(json!([1]))),
                Error::Payload,
            ),
            (
                &format!("{}.{p}.AA", h(json!({"alg": "ES256"}))),
                Error::Signature,
            ),
            (
                &format!("{}.{p}.AA", h(json!({"alg": "RS256"}))),
                Error::NoKey,
            ),
        ] {
            assert_eq!(check(token, &keys, &[]), Err(want), "{token}");
        }
        assert!(matches!(
            check(&format!("{}.{p}.AA", h(json!({"typ": "JWT"}))), &keys, &[]),
            Err(Error::Header(_))
        ));
    }

    const RSA_N: &str = "2HBzq5vKF_-CTIDrCbd1zWeelijgvWeyWz779haOm6uwawUjuJQeJzK2X9FiSZP3EgVQ9xtmqg0Oj7ZZoloVYIRcAiHOVpcntaQfT1pLHA4h6wff0BE2x0UyiKsb0a4-KgI0oP__pGJrQTejJrEQolBJVjtDya5vjap3D6PK77-9m4q7wujQlJTjImps9r1RALWSPYqXFzB38xQl9LMSBa7bn2ZNbv8TCf_pUVgNvywi_x2o7qBQgAC711CYm-wF1Mx1XoHEKaUXHkhoJUnZliPz8QWJm5qLQygBoRoP5rSOwsZlkk4XS0wqmgndAvWrYTKn_5b29AicaYFbF1l4cw";
    const RSA_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InIxIn0.eyJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlIiwic3ViIjoiYWxpY2UifQ.bnkQeaSHBht-RHgm8G__9QHMvhgdI_i3-0eg0mHuCtWpCDRwxVM6AWK8p7q0KUfZ_vQYMggvkkHJvPCqFWY-3RG8l8grAJsbfTSFPAHTa3Zb2tF2iixdxT-R3fmRaqMR2SnIm4iGSu6sSDkehhkrPybPA4EMiXqwwE-hvKwPfsWYgECQ8hkJryVENut8I7d5YFxvjbKeKNLpezm8aXWP-3LImNs74BesNlviqmhZWwCWBX7uNYAx12WotPxfgWm_7MZFE6uszA53-yeeYAd67xG13zGfjoaL3SOt6bGouzehgZTPe3yU-33BfymCMqNPmntm7thYMqmRKijt0gV06A";

    #[test]
    fn rsa_and_ed25519_keys_verify_their_algorithms() {
        // RS256 with a key and signature made by OpenSSL (`openssl genrsa
        // 2048`, `openssl dgst -sha256 -sign`), so the JWK reading is checked
        // against another implementation's key.
        let rsa = json!({"keys": [{"kty": "RSA", "kid": "r1", "e": "AQAB", "n": RSA_N}]});
        let keys = KeySet::parse(&rsa.to_string()).expect("jwks");
        assert_eq!(check(RSA_TOKEN, &keys, &[]), Ok(()));
        let claims = Unverified::parse(RSA_TOKEN).expect("parse").claims;
        assert_eq!(claims["sub"], "alice");
        // One signature byte changed (not the last character, whose low
        // bits are padding).
        let at = RSA_TOKEN.len() - 5;
        let flipped = if &RSA_TOKEN[at..=at] == "A" { "B" } else { "A" };
        let bad = format!("{}{flipped}{}", &RSA_TOKEN[..at], &RSA_TOKEN[at + 1..]);
        assert_eq!(check(&bad, &keys, &[]), Err(Error::Signature));

        let ed = Ed25519KeyPair::generate().expect("key");
        let jwks = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(ed.public_key().as_ref())},
            {"kty": "oct", "use": "enc", "k": "AAAA"},
        ]});
        let keys = KeySet::parse(&jwks.to_string()).expect("jwks");
        let header = URL_SAFE_NO_PAD.encode(json!({"alg": "EdDSA"}).to_string());
        let payload = URL_SAFE_NO_PAD.encode(json!({"iss": "i"}).to_string());
        let signed = format!("{header}.{payload}");
        let token = format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(ed.sign(signed.as_bytes()).as_ref())
        );
        assert_eq!(check(&token, &keys, &[]), Ok(()));
    }

    #[test]
    fn key_sets_that_cannot_be_used_are_errors_naming_the_key() {
        for (jwks, want) in [
            ("[]", "not a JSON Web Key Set"),
            (r#"{"keys": []}"#, "no signing key"),
            (
                r#"{"keys": [{"kty": "oct", "k": "AAAA"}]}"#,
                "keys[0]: kty \"oct\"",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "e": "AQAB"}]}"#,
                "keys[0]: no \"n\"",
            ),
            (
                r#"{"keys": [{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]}"#,
                "curve",
            ),
            (
                r#"{"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}"#,
                "rejected",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "alg": "ES256", "n": "AA", "e": "AQAB"}]}"#,
                "does not fit",
            ),
            (
                r#"{"keys": [{"kty": "RSA", "alg": "HS256", "n": "AA", "e": "AQAB"}]}"#,
                "not supported",
            ),
        ] {
            let err = KeySet::parse(jwks).expect_err(jwks);
            assert!(err.contains(want), "{jwks}: {err}");
        }
    }
}
