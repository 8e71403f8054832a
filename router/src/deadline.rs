//! The time a request may take: the client's `grpc-timeout`, bounded.

use std::time::Duration;

use tonic::metadata::MetadataMap;

/// Deadline of a request whose client named none.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest deadline the router honours, whatever the client asks for.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Most of the deadline kept back so that the router's own answer ("12 attempts failed…") reaches
/// the client before the client's deadline fires and hides it behind DEADLINE_EXCEEDED.
const ANSWER_MARGIN_MAX: Duration = Duration::from_millis(50);

/// How long the router may work on a request that came with `metadata`.
pub(crate) fn budget(metadata: &MetadataMap) -> Duration {
    let asked = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_TIMEOUT)
        .min(MAX_TIMEOUT);
    asked.saturating_sub((asked / 20).min(ANSWER_MARGIN_MAX))
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.len() < 2 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("1000000u"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99n"), Some(Duration::from_nanos(99)));
        for bad in ["", "m", "10", "10x", "-1S", "123456789S", "1.5S", "é1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn budget_defaults_caps_and_keeps_a_margin() {
        let mut m = MetadataMap::new();
        assert_eq!(budget(&m), DEFAULT_TIMEOUT - ANSWER_MARGIN_MAX);
        m.insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(budget(&m), MAX_TIMEOUT - ANSWER_MARGIN_MAX);
        m.insert("grpc-timeout", "200m".parse().unwrap());
        assert_eq!(budget(&m), Duration::from_millis(190));
        m.insert("grpc-timeout", "junk".parse().unwrap());
        assert_eq!(budget(&m), DEFAULT_TIMEOUT - ANSWER_MARGIN_MAX);
    }
}
