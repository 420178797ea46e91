//! What a `RequestAuthentication` adds to each request that carries a
//! token, for the two algorithms identity providers use most (ES256 and
//! RS256 with a 2048-bit key): the first time a token is seen (parse and
//! signature), and each time after (the verified-token cache and the time
//! window). Keys are parsed when the policy is compiled, not here.

use std::{hint::black_box, time::SystemTime};

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use criterion::{Criterion, criterion_group, criterion_main};
use trellis_agent::policy::{
    authn::{Authentication, RequestAuthentication, authenticate},
    jwt::{KeySet, Unverified},
};

/// An RSA key made with OpenSSL, and a token it signed (`iss`
/// https://idp.example, `sub` alice), as in `policy/jwt.rs`'s tests.
const RSA_N: &str = "2HBzq5vKF_-CTIDrCbd1zWeelijgvWeyWz779haOm6uwawUjuJQeJzK2X9FiSZP3EgVQ9xtmqg0Oj7ZZoloVYIRcAiHOVpcntaQfT1pLHA4h6wff0BE2x0UyiKsb0a4-KgI0oP__pGJrQTejJrEQolBJVjtDya5vjap3D6PK77-9m4q7wujQlJTjImps9r1RALWSPYqXFzB38xQl9LMSBa7bn2ZNbv8TCf_pUVgNvywi_x2o7qBQgAC711CYm-wF1Mx1XoHEKaUXHkhoJUnZliPz8QWJm5qLQygBoRoP5rSOwsZlkk4XS0wqmgndAvWrYTKn_5b29AicaYFbF1l4cw";
const RSA_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InIxIn0.eyJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlIiwic3ViIjoiYWxpY2UifQ.bnkQeaSHBht-RHgm8G__9QHMvhgdI_i3-0eg0mHuCtWpCDRwxVM6AWK8p7q0KUfZ_vQYMggvkkHJvPCqFWY-3RG8l8grAJsbfTSFPAHTa3Zb2tF2iixdxT-R3fmRaqMR2SnIm4iGSu6sSDkehhkrPybPA4EMiXqwwE-hvKwPfsWYgECQ8hkJryVENut8I7d5YFxvjbKeKNLpezm8aXWP-3LImNs74BesNlviqmhZWwCWBX7uNYAx12WotPxfgWm_7MZFE6uszA53-yeeYAd67xG13zGfjoaL3SOt6bGouzehgZTPe3yU-33BfymCMqNPmntm7thYMqmRKijt0gV06A";

fn policy(jwks: &serde_json::Value) -> Authentication {
    let object: RequestAuthentication = serde_yaml_ng::from_str(&format!(
        "metadata: {{name: b, namespace: n}}\nspec: {{jwtRules: [{{issuer: 'https://idp.example', jwks: '{jwks}'}}]}}"
    ))
    .expect("object");
    Authentication::compile(&object)
}

fn headers(token: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("host", "web.shop".parse().expect("value"));
    h.insert(
        "authorization",
        format!("Bearer {token}").parse().expect("value"),
    );
    h
}

fn bench(c: &mut Criterion) {
    let uri: http::Uri = "/api/items".parse().expect("uri");

    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
    let point = key.public_key().as_ref();
    let es_jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "e",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}]});
    let es = policy(&es_jwks);
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"e"}"#),
        URL_SAFE_NO_PAD.encode(
            r#"{"iss":"https://idp.example","sub":"alice","aud":"shop","groups":["a","b"]}"#
        )
    );
    let sig = key
        .sign(&SystemRandom::new(), signed.as_bytes())
        .expect("sign");
    let es_headers = headers(&format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(sig.as_ref())
    ));
    // A token seen before: the verified-token cache, the time window.
    c.bench_function("jwt/es256_cached", |b| {
        b.iter(|| {
            authenticate(&es.rules, black_box(&es_headers), &uri, SystemTime::now())
                .expect("verifies")
                .expect("token")
        })
    });
    // A token seen for the first time: parse and check the signature.
    let es_token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
    let es_keys = KeySet::parse(&es_jwks.to_string()).expect("keys");
    c.bench_function("jwt/es256_first", |b| {
        b.iter(|| {
            Unverified::parse(black_box(&es_token))
                .expect("parses")
                .verify(&es_keys, &[], SystemTime::now())
                .expect("verifies")
        })
    });

    let rs_jwks =
        serde_json::json!({"keys": [{"kty": "RSA", "kid": "r1", "e": "AQAB", "n": RSA_N}]});
    let rs = policy(&rs_jwks);
    let rs_headers = headers(RSA_TOKEN);
    let rs_keys = KeySet::parse(&rs_jwks.to_string()).expect("keys");
    c.bench_function("jwt/rs256_first", |b| {
        b.iter(|| {
            Unverified::parse(black_box(RSA_TOKEN))
                .expect("parses")
                .verify(&rs_keys, &[], SystemTime::now())
                .expect("verifies")
        })
    });
    c.bench_function("jwt/rs256_cached", |b| {
        b.iter(|| {
            authenticate(&rs.rules, black_box(&rs_headers), &uri, SystemTime::now())
                .expect("verifies")
                .expect("token")
        })
    });

    // A request without a token, to a pod that accepts them: the lookup alone.
    let mut none = headers("-");
    none.remove("authorization");
    c.bench_function("jwt/no_token", |b| {
        b.iter(|| authenticate(&es.rules, black_box(&none), &uri, SystemTime::now()).expect("ok"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
