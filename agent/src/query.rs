//! Query strings, `key=value&…` with percent-escapes and `+` for a space:
//! the admin API's, and those of proxied requests (route matches, a token
//! in a parameter).

/// The pairs of `query`, values unescaped; a key without `=` has an empty value.
pub fn pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (unescape(key), unescape(value))
    })
}

/// The first value of parameter `name` in `query`, unescaped.
pub fn value(query: Option<&str>, name: &str) -> Option<String> {
    pairs(query?).find_map(|(k, v)| (k == name).then_some(v))
}

/// Percent-escapes what a query value may not hold as is.
pub fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        // Two hex digits, no sign (`from_str_radix` would take "+1").
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_unescapes() {
        let value = "x/a b&c=d%";
        let q = format!("k={}&flag", escape(value));
        let got: Vec<_> = pairs(&q).collect();
        assert_eq!(
            got,
            [("k".into(), value.into()), ("flag".into(), String::new())]
        );
        assert_eq!(unescape("a+b%2"), "a b%2");
        assert_eq!(unescape("%+1%2b"), "% 1+", "a sign is not a hex digit");
        assert_eq!(
            super::value(Some("a=1&tok=x%2Fy&tok=2"), "tok").as_deref(),
            Some("x/y")
        );
        assert_eq!(super::value(Some("a=1"), "tok"), None);
        assert_eq!(super::value(None, "tok"), None);
    }
}
