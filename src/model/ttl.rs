//! How long an environment lives: parsed from `90s`, `2h`, `infinite`, ….

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::field::FieldError;

/// How long an environment lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ttl {
    Finite(Duration),
    Infinite,
}

impl Ttl {
    /// Parses `90s`, `30m`, `2h`, `1d`, `1h30m`, a bare number of minutes, or `infinite`.
    pub fn parse(field: &str, s: &str) -> Result<Ttl, FieldError> {
        let s = s.trim();
        let bad =
            || FieldError::new(field, format!("{s:?} is not a TTL; expected e.g. 90s, 30m, 2h, 1h30m or \"infinite\""));
        if s.eq_ignore_ascii_case("infinite") {
            return Ok(Ttl::Infinite);
        }
        if s.is_empty() {
            return Err(bad());
        }
        if let Ok(mins) = s.parse::<u64>() {
            return Ttl::from_secs(field, mins.checked_mul(60).ok_or_else(bad)?);
        }
        let mut total: u64 = 0;
        let mut num = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                _ => return Err(bad()),
            };
            let n: u64 = num.parse().map_err(|_| bad())?;
            total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
            num.clear();
        }
        if !num.is_empty() {
            return Err(bad());
        }
        Ttl::from_secs(field, total)
    }

    /// A finite duration in the TTL syntax, where zero (`0`, `0s`) is allowed.
    pub fn parse_duration(field: &str, s: &str) -> Result<Duration, FieldError> {
        if matches!(s.trim(), "0" | "0s") {
            return Ok(Duration::ZERO);
        }
        match Ttl::parse(field, s)? {
            Ttl::Finite(d) => Ok(d),
            Ttl::Infinite => Err(FieldError::new(field, "must be a finite duration, e.g. 90s or 10m")),
        }
    }

    fn from_secs(field: &str, secs: u64) -> Result<Ttl, FieldError> {
        if secs == 0 {
            return Err(FieldError::new(field, "a TTL must be longer than zero"));
        }
        Ok(Ttl::Finite(Duration::from_secs(secs)))
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ttl::Infinite => f.write_str("infinite"),
            Ttl::Finite(d) => {
                let s = d.as_secs();
                match (s / 3600, (s % 3600) / 60, s % 60) {
                    (0, 0, sec) => write!(f, "{sec}s"),
                    (0, m, 0) => write!(f, "{m}m"),
                    (h, 0, 0) => write!(f, "{h}h"),
                    (h, m, sec) => write!(f, "{h}h{m}m{sec}s"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        let secs = |s| match Ttl::parse("ttl", s).unwrap() {
            Ttl::Finite(d) => d.as_secs(),
            Ttl::Infinite => u64::MAX,
        };
        assert_eq!(secs("90s"), 90);
        assert_eq!(secs("30m"), 1800);
        assert_eq!(secs("1h30m"), 5400);
        assert_eq!(secs("45"), 2700);
        assert_eq!(secs("infinite"), u64::MAX);
        for bad in ["", "0m", "5x", "m", "-1h", "99999999999999999999h"] {
            assert_eq!(Ttl::parse("ttl", bad).unwrap_err().field, "ttl", "{bad}");
        }
        assert_eq!(Ttl::parse("ttl", "1h30m").unwrap().to_string(), "1h30m0s");
        assert_eq!(Ttl::parse("ttl", "2h").unwrap().to_string(), "2h");
    }

    #[test]
    fn durations_allow_zero_but_not_infinite() {
        assert_eq!(Ttl::parse_duration("linger", "0s").unwrap(), Duration::ZERO);
        assert_eq!(Ttl::parse_duration("linger", "10m").unwrap(), Duration::from_secs(600));
        assert_eq!(Ttl::parse_duration("linger", "infinite").unwrap_err().field, "linger");
        assert_eq!(Ttl::parse_duration("linger", "x").unwrap_err().field, "linger");
    }
}
