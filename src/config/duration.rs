//! Go `time.ParseDuration` / `time.Duration.String` compatible helpers.
//!
//! kube-proxy's config file and flags carry durations as Go strings ("30s",
//! "1m30s", "500ms", "1.5h"); this is a small, dependency-free port of the
//! accepted grammar: `[+-]?(digits[.digits]unit)+` or the bare string "0".

use std::fmt;
use std::time::Duration;

/// Why a string is not a Go duration. Displays as the reason only; callers add
/// the offending value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurationError {
    Empty,
    Negative,
    MissingNumber,
    MissingUnit,
    UnknownUnit(String),
    Overflow,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurationError::Empty => f.write_str("empty duration"),
            DurationError::Negative => f.write_str("negative durations are not allowed"),
            DurationError::MissingNumber => f.write_str("expected a number before the unit"),
            DurationError::MissingUnit => {
                f.write_str("missing unit (use ns, us, ms, s, m or h, e.g. \"30s\")")
            }
            DurationError::UnknownUnit(u) => write!(f, "unknown unit {u:?}"),
            DurationError::Overflow => f.write_str("duration too large"),
        }
    }
}

impl std::error::Error for DurationError {}

/// Nanoseconds per unit, as Go's `unitMap`.
fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        // Go accepts both the micro sign (U+00B5) and Greek mu (U+03BC).
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return None,
    })
}

/// Parse a Go duration string. Negative values are rejected because no
/// kube-proxy setting accepts them (upstream validation refuses them later).
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let mut s = input;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    // Go's limit: the value must fit an int64 of nanoseconds.
    const MAX_NANOS: u128 = i64::MAX as u128;
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(int_len);
        s = rest;
        let mut frac_part = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &rest[..frac_len];
            s = &rest[frac_len..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(DurationError::MissingNumber);
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(s.len(), |(i, _)| i);
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        if unit.is_empty() {
            return Err(DurationError::MissingUnit);
        }
        let scale = unit_nanos(unit).ok_or_else(|| DurationError::UnknownUnit(unit.to_string()))?;

        let mut whole: u128 = 0;
        for d in int_part.bytes() {
            whole = whole
                .checked_mul(10)
                .and_then(|w| w.checked_add(u128::from(d - b'0')))
                .filter(|w| *w <= MAX_NANOS)
                .ok_or(DurationError::Overflow)?;
        }
        let mut value = whole.checked_mul(scale).ok_or(DurationError::Overflow)?;
        // Fractions below a nanosecond are truncated, as in Go; 18 digits is
        // already finer than 1ns for the largest unit.
        let mut frac_value: u128 = 0;
        let mut frac_scale: u128 = 1;
        for d in frac_part.bytes().take(18) {
            frac_value = frac_value * 10 + u128::from(d - b'0');
            frac_scale *= 10;
        }
        value += frac_value * scale / frac_scale;
        total = total.checked_add(value).ok_or(DurationError::Overflow)?;
        if total > MAX_NANOS {
            return Err(DurationError::Overflow);
        }
    }
    if negative && total != 0 {
        return Err(DurationError::Negative);
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| DurationError::Overflow)?;
    // The remainder is < 1e9 and therefore fits u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

/// Render like Go's `time.Duration.String` ("1m30s", "500ms", "0s"), so
/// messages show values the way kube-proxy users write them.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}us", trim_fraction(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim_fraction(nanos, 1_000_000));
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let sec_str = trim_fraction(
        u128::from(s) * 1_000_000_000 + u128::from(d.subsec_nanos()),
        1_000_000_000,
    );
    if h > 0 {
        format!("{h}h{m}m{sec_str}s")
    } else if m > 0 {
        format!("{m}m{sec_str}s")
    } else {
        format!("{sec_str}s")
    }
}

/// `value / unit` as a decimal with trailing zeros removed.
fn trim_fraction(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let frac_str = format!("{frac:0width$}");
    format!("{whole}.{}", frac_str.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_go_examples() {
        let cases: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("+5s", Duration::from_secs(5)),
            ("30s", Duration::from_secs(30)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("2h22m", Duration::from_secs(2 * 3600 + 22 * 60)),
            ("24h0m0s", Duration::from_secs(86_400)),
            ("500ms", ms(500)),
            ("1.5s", ms(1500)),
            (".5s", ms(500)),
            ("5.s", Duration::from_secs(5)),
            ("1.5h", Duration::from_secs(5400)),
            ("250ms", ms(250)),
            ("10us", Duration::from_micros(10)),
            ("10\u{b5}s", Duration::from_micros(10)),
            ("10\u{3bc}s", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("1h1m1s1ms1us1ns", Duration::new(3661, 1_001_001)),
            ("0.000000001s", Duration::from_nanos(1)),
            ("0.0000000019s", Duration::from_nanos(1)),
            ("2562047h", Duration::from_secs(2_562_047 * 3600)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_go_duration(input), Ok(*want), "input {input:?}");
        }
    }

    #[test]
    fn rejects_malformed() {
        let cases: &[(&str, DurationError)] = &[
            ("", DurationError::Empty),
            ("-", DurationError::Empty),
            ("30", DurationError::MissingUnit),
            ("1m30", DurationError::MissingUnit),
            ("3x", DurationError::UnknownUnit("x".into())),
            ("1sec", DurationError::UnknownUnit("sec".into())),
            ("1 s", DurationError::UnknownUnit(" s".into())),
            ("s", DurationError::MissingNumber),
            (".s", DurationError::MissingNumber),
            ("-1s", DurationError::Negative),
            ("3000000h", DurationError::Overflow),
            ("99999999999999999999999s", DurationError::Overflow),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_go_duration(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
        assert_eq!(format_go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_go_duration(ms(1500)), "1.5s");
        assert_eq!(format_go_duration(ms(250)), "250ms");
        assert_eq!(format_go_duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(format_go_duration(Duration::from_nanos(12)), "12ns");
    }

    #[test]
    fn format_then_parse_round_trips() {
        for d in [
            ms(1),
            ms(999),
            ms(1001),
            Duration::from_secs(86_399),
            Duration::new(7, 5),
        ] {
            assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d));
        }
    }
}
