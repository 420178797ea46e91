//! A gRPC call's deadline, as its client sends it (`grpc-timeout`). The
//! agent holds the call to it, as Istio's Envoy does (every route gets
//! `grpc_timeout_header_max: 0`): all attempts and backoffs fit in it, each
//! attempt tells the server the time left, and an answer still streaming
//! when it passes is ended with DEADLINE_EXCEEDED and its upstream stream
//! reset (`super::deadline`), so a server that ignores deadlines stops
//! being asked to work for a client that has given up.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The most digits a value may have (gRPC over HTTP/2: "TimeoutValue").
const MAX_DIGITS: usize = 8;
const MAX_VALUE: u64 = 99_999_999;

/// The client's `grpc-timeout`; `None` when absent or not in the protocol's
/// form (one to eight digits and a unit of H, M, S, m, u or n), which the
/// call then goes without, as Envoy lets it.
pub fn parse(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value: the finest unit it fits in, rounded
/// down (the server's deadline is never later than the client's).
pub fn encode(left: Duration) -> HeaderValue {
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    let nanos = left.as_nanos();
    let (value, unit) = units
        .iter()
        .map(|(per, unit)| (nanos / per, *unit))
        .find(|(value, _)| *value <= u128::from(MAX_VALUE))
        .unwrap_or((u128::from(MAX_VALUE), "H"));
    HeaderValue::from_str(&format!("{value}{unit}")).unwrap_or(HeaderValue::from_static("0n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(GRPC_TIMEOUT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn reads_and_writes_the_protocol_form() {
        assert_eq!(parse(&header("300m")), Some(Duration::from_millis(300)));
        assert_eq!(parse(&header("2S")), Some(Duration::from_secs(2)));
        assert_eq!(parse(&header("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse(&header("99999999n")),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            "",
            "m",
            "300",
            "123456789m",
            "1.5S",
            "-1S",
            "10s",
            "10x",
            "１S",
        ] {
            assert_eq!(parse(&header(bad)), None, "{bad:?}");
        }
        assert_eq!(parse(&HeaderMap::new()), None);

        assert_eq!(encode(Duration::from_nanos(500)), "500n");
        assert_eq!(encode(Duration::from_millis(300)), "300000u");
        assert_eq!(encode(Duration::from_secs(150)), "150000m");
        assert_eq!(encode(Duration::from_secs(3 * 86_400)), "259200S");
        assert_eq!(encode(Duration::from_secs(u64::MAX)), "99999999H");
        // What is written reads back no later than it was.
        for d in [1, 999, 1_234_567, 99_999_999_999, 123_456_789_012_345] {
            let d = Duration::from_nanos(d);
            let back = parse(&header(encode(d).to_str().unwrap())).unwrap();
            assert!(
                back <= d && d - back < d / 1000 + Duration::from_nanos(1),
                "{d:?}"
            );
        }
    }
}
