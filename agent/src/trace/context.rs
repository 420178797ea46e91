//! Trace context in request headers: W3C Trace Context (`traceparent`,
//! `tracestate`) and B3 (the `x-b3-*` headers, or the single `b3` header),
//! read from a request and written back with the agent's span as the new
//! parent. A malformed header counts as absent (W3C: restart the trace).

use http::{HeaderMap, HeaderValue};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// Which B3 form the request came with: the agent answers in the same one,
/// with a 64-bit trace id kept 64-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum B3 {
    Multi { short: bool },
    Single { short: bool },
}

/// The caller's trace, as its headers carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: TraceId,
    /// The caller's span: the parent of the agent's.
    pub parent: Option<SpanId>,
    /// The caller's sampling decision; `None` leaves it to the agent.
    pub sampled: Option<bool>,
    pub trace_state: Option<String>,
    b3: Option<B3>,
}

/// The trace context of `headers`: `traceparent` when valid, else B3.
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let b3 = b3(headers);
    if let Some((trace_id, parent, sampled)) = text("traceparent").and_then(traceparent) {
        return Some(Incoming {
            trace_id,
            parent: Some(parent),
            sampled: Some(sampled),
            trace_state: text("tracestate").map(str::to_owned),
            // B3 headers that go along are kept in step.
            b3: b3.map(|(form, ..)| form),
        });
    }
    let (form, trace_id, parent, sampled) = b3?;
    Some(Incoming {
        trace_id,
        parent,
        sampled,
        trace_state: None,
        b3: Some(form),
    })
}

/// Writes the context a span of the agent's passes on: `traceparent`
/// always, and the caller's B3 form when it used one. `tracestate` goes on
/// unchanged (the agent adds no entry of its own).
pub fn inject(
    headers: &mut HeaderMap,
    incoming: Option<&Incoming>,
    trace_id: &TraceId,
    span_id: &SpanId,
    sampled: bool,
) {
    let value = |s: String| HeaderValue::from_str(&s).expect("hex digits are a header value");
    headers.insert(
        "traceparent",
        value(format!(
            "00-{}-{}-{}",
            hex(trace_id),
            hex(span_id),
            if sampled { "01" } else { "00" }
        )),
    );
    let Some(incoming) = incoming else { return };
    let trace = |short: bool| {
        if short {
            hex(&trace_id[8..])
        } else {
            hex(trace_id)
        }
    };
    match incoming.b3 {
        None => {}
        Some(B3::Multi { short }) => {
            headers.insert("x-b3-traceid", value(trace(short)));
            headers.insert("x-b3-spanid", value(hex(span_id)));
            match incoming.parent {
                Some(parent) => headers.insert("x-b3-parentspanid", value(hex(&parent))),
                None => headers.remove("x-b3-parentspanid"),
            };
            headers.insert(
                "x-b3-sampled",
                HeaderValue::from_static(if sampled { "1" } else { "0" }),
            );
            headers.remove("x-b3-flags");
        }
        Some(B3::Single { short }) => {
            let mut b3 = format!(
                "{}-{}-{}",
                trace(short),
                hex(span_id),
                if sampled { "1" } else { "0" }
            );
            if let Some(parent) = incoming.parent {
                b3.push('-');
                b3.push_str(&hex(&parent));
            }
            headers.insert("b3", value(b3));
        }
    }
}

/// `version-traceid-parentid-flags`; versions above 00 may add fields.
/// The digits are lowercase (`HEXDIGLC`): any other value is invalid and
/// ignored, as the W3C says.
fn traceparent(text: &str) -> Option<(TraceId, SpanId, bool)> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut parts = text.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let more = parts.next().is_some();
    if version.len() != 2 || version == "ff" || (version == "00" && more) || flags.len() != 2 {
        return None;
    }
    u8::from_str_radix(version, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let trace_id: TraceId = unhex(trace)?;
    let span_id: SpanId = unhex(span)?;
    (trace_id != [0; 16] && span_id != [0; 8]).then_some((trace_id, span_id, flags & 1 == 1))
}

/// B3's sampling state: `1`/`true` sampled, `0`/`false` not, `d` debug.
fn b3_sampled(text: &str) -> Option<bool> {
    match text {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// A B3 trace id: 64 bits (zero-extended) or 128.
fn b3_trace(text: &str) -> Option<(TraceId, bool)> {
    let id: TraceId = match text.len() {
        16 => {
            let low: [u8; 8] = unhex(text)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        32 => unhex(text)?,
        _ => return None,
    };
    (id != [0; 16]).then_some((id, text.len() == 16))
}

type B3Context = (B3, TraceId, Option<SpanId>, Option<bool>);

fn b3(headers: &HeaderMap) -> Option<B3Context> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(single) = text("b3") {
        // `{trace}-{span}[-{sampled}[-{parent}]]`; a lone sampling state
        // carries no trace.
        let mut parts = single.trim().split('-');
        let (trace_id, short) = b3_trace(parts.next()?)?;
        let span: SpanId = unhex(parts.next()?)?;
        let sampled = match parts.next() {
            Some(s) => Some(b3_sampled(s)?),
            None => None,
        };
        return Some((B3::Single { short }, trace_id, Some(span), sampled));
    }
    let (trace_id, short) = b3_trace(text("x-b3-traceid")?)?;
    let span: SpanId = unhex(text("x-b3-spanid")?)?;
    let sampled = if text("x-b3-flags") == Some("1") {
        Some(true)
    } else {
        text("x-b3-sampled").and_then(b3_sampled)
    };
    Some((B3::Multi { short }, trace_id, Some(span), sampled))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// `N` bytes from exactly `2N` hex digits (W3C wants lowercase; B3 senders
/// vary, so either case is read).
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn traceparent_is_read_and_rewritten_with_the_agents_span() {
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-00f067aa0ba902b7-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let incoming = extract(&h).unwrap();
        assert_eq!(hex(&incoming.trace_id), TRACE);
        assert_eq!(hex(&incoming.parent.unwrap()), "00f067aa0ba902b7");
        assert_eq!(incoming.sampled, Some(true));
        assert_eq!(incoming.trace_state.as_deref(), Some("congo=t61rcWkgMzE"));
        inject(
            &mut h,
            Some(&incoming),
            &incoming.trace_id,
            &[1, 2, 3, 4, 5, 6, 7, 8],
            true,
        );
        assert_eq!(
            h["traceparent"],
            format!("00-{TRACE}-0102030405060708-01").as_str()
        );
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        assert!(h.get("x-b3-traceid").is_none());
    }

    #[test]
    fn malformed_traceparents_count_as_absent() {
        for bad in [
            format!("00-{TRACE}-00f067aa0ba902b7-01-extra"),
            format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
            format!("00-{TRACE}-0000000000000000-01"),
            format!("00-{TRACE}-00f067aa0ba902b-01"),
            "00-xyz-00f067aa0ba902b7-01".into(),
            format!("00-{}-00f067aa0ba902b7-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-00F067AA0BA902B7-01"),
        ] {
            assert_eq!(extract(&headers(&[("traceparent", &bad)])), None, "{bad}");
        }
        // A later version may add fields.
        let later = format!("01-{TRACE}-00f067aa0ba902b7-00-what-comes");
        let incoming = extract(&headers(&[("traceparent", &later)])).unwrap();
        assert_eq!(incoming.sampled, Some(false));
    }

    #[test]
    fn b3_multi_headers_keep_their_form() {
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let incoming = extract(&h).unwrap();
        assert_eq!(hex(&incoming.trace_id), "0000000000000000463ac35c9f6413ad");
        assert_eq!(incoming.sampled, Some(true));
        inject(&mut h, Some(&incoming), &incoming.trace_id, &[9; 8], true);
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad");
        assert_eq!(h["x-b3-spanid"], "0909090909090909");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_eq!(
            h["traceparent"],
            "00-0000000000000000463ac35c9f6413ad-0909090909090909-01"
        );
        // No sampling state: the agent decides.
        let deferred = headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", "a2fb4a1d1a96d312")]);
        assert_eq!(extract(&deferred).unwrap().sampled, None);
        let debug = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]);
        assert_eq!(extract(&debug).unwrap().sampled, Some(true));
    }

    #[test]
    fn b3_single_header() {
        let mut h = headers(&[("b3", &format!("{TRACE}-e457b5a2e4d86bd1-0"))]);
        let incoming = extract(&h).unwrap();
        assert_eq!(incoming.sampled, Some(false));
        inject(
            &mut h,
            Some(&incoming),
            &incoming.trace_id,
            &[0xab; 8],
            false,
        );
        assert_eq!(
            h["b3"],
            format!("{TRACE}-abababababababab-0-e457b5a2e4d86bd1").as_str()
        );
        // A lone sampling state, or garbage, carries no trace.
        assert_eq!(extract(&headers(&[("b3", "0")])), None);
        assert_eq!(extract(&headers(&[("b3", "zz-yy")])), None);
    }

    #[test]
    fn a_new_trace_gets_a_traceparent_only() {
        let mut h = HeaderMap::new();
        inject(&mut h, None, &[0x11; 16], &[0x22; 8], false);
        assert_eq!(
            h["traceparent"],
            "00-11111111111111111111111111111111-2222222222222222-00"
        );
        assert_eq!(h.len(), 1);
    }
}
