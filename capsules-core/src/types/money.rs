//! Money: integer micro-credits. 1 credit = 1 USD = 1 000 000 µcr.
//!
//! There is no floating point anywhere in this module or anywhere money flows (a test greps the
//! money modules for it). Decimal strings parse exactly; arithmetic is checked.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Micro-credits per credit.
pub const MICROS_PER_CREDIT: i64 = 1_000_000;

/// An amount of money in micro-credits (signed: grants are positive, charges negative in the
/// ledger; balances may go negative through storage accrued while asleep).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct MicroCredits(i64);

/// The name users read: an amount of credits, stored as micro-credits.
pub type Credits = MicroCredits;

impl MicroCredits {
    pub const ZERO: MicroCredits = MicroCredits(0);

    pub const fn from_micros(micros: i64) -> Self {
        MicroCredits(micros)
    }
    /// Whole credits (`credits(5)` = 5.00).
    pub const fn credits(whole: i64) -> Self {
        MicroCredits(whole * MICROS_PER_CREDIT)
    }
    pub const fn micros(self) -> i64 {
        self.0
    }
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn checked_add(self, other: MicroCredits) -> Result<MicroCredits> {
        self.0
            .checked_add(other.0)
            .map(MicroCredits)
            .ok_or_else(|| Error::internal("a money sum overflowed 64 bits of micro-credits"))
    }
    pub fn checked_sub(self, other: MicroCredits) -> Result<MicroCredits> {
        self.0
            .checked_sub(other.0)
            .map(MicroCredits)
            .ok_or_else(|| Error::internal("a money difference overflowed 64 bits of micro-credits"))
    }
    /// `rate × units`, exact.
    pub fn checked_mul(self, units: u64) -> Result<MicroCredits> {
        i64::try_from(units)
            .ok()
            .and_then(|u| self.0.checked_mul(u))
            .map(MicroCredits)
            .ok_or_else(|| Error::internal("a charge overflowed 64 bits of micro-credits"))
    }
    pub fn negate(self) -> MicroCredits {
        MicroCredits(-self.0)
    }

    /// Sums exactly; errors on overflow.
    pub fn sum<I: IntoIterator<Item = MicroCredits>>(items: I) -> Result<MicroCredits> {
        items.into_iter().try_fold(MicroCredits::ZERO, |a, b| a.checked_add(b))
    }

    /// Parses a non-negative decimal amount of credits: `2`, `2.00`, `0.5`, `.5`, `0.000001`.
    pub fn parse(s: &str) -> Result<Self> {
        const RULE: &str =
            "an amount is a non-negative decimal number of credits with at most 6 decimals, like 2.00 or 0.5";
        let bad = |why: &str| {
            Err(Error::invalid_input(format!(
                "amount {s:?} is not valid: {why}; {RULE}"
            )))
        };
        let t = s.trim();
        if t.is_empty() {
            return bad("it is empty");
        }
        if t.starts_with('-') {
            return bad("it is negative");
        }
        if t.bytes().any(|b| b == b'e' || b == b'E') && t.bytes().any(|b| b.is_ascii_digit()) {
            return bad("exponents are not allowed");
        }
        let t = t.strip_prefix('+').unwrap_or(t);
        let (int, frac) = match t.split_once('.') {
            Some((i, f)) => (i, f),
            None => (t, ""),
        };
        if int.is_empty() && frac.is_empty() {
            return bad("it has no digits");
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return bad("it is not a decimal number");
        }
        if frac.len() > 6 {
            return bad("it has more than 6 decimals (the smallest unit is 0.000001)");
        }
        let whole: i64 = if int.is_empty() {
            0
        } else {
            match int.parse::<i64>() {
                Ok(v) => v,
                Err(_) => return bad("it is too large"),
            }
        };
        let mut micros_frac: i64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            micros_frac += i64::from(b - b'0') * 10_i64.pow(5 - i as u32);
        }
        match whole
            .checked_mul(MICROS_PER_CREDIT)
            .and_then(|w| w.checked_add(micros_frac))
        {
            Some(v) => Ok(MicroCredits(v)),
            None => bad("it is too large"),
        }
    }
}

impl fmt::Display for MicroCredits {
    /// Credits with two decimals, more when the amount needs them: `2.00`, `0.009`, `-0.0001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = self.0 < 0;
        let abs = self.0.unsigned_abs();
        let whole = abs / MICROS_PER_CREDIT as u64;
        let frac = abs % MICROS_PER_CREDIT as u64;
        let mut digits = format!("{frac:06}");
        while digits.len() > 2 && digits.ends_with('0') {
            digits.pop();
        }
        write!(f, "{}{whole}.{digits}", if neg { "-" } else { "" })
    }
}

impl fmt::Debug for MicroCredits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}µcr", self.0)
    }
}

impl FromStr for MicroCredits {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl std::iter::Sum for MicroCredits {
    /// Panics on overflow (use [`MicroCredits::sum`] to get an error instead).
    fn sum<I: Iterator<Item = MicroCredits>>(iter: I) -> Self {
        MicroCredits::sum(iter).expect("money sum overflowed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn parses_exactly() {
        for (s, v) in [
            ("2.00", 2_000_000),
            ("0.5", 500_000),
            (".5", 500_000),
            ("2", 2_000_000),
            ("0.000001", 1),
            ("0.01", 10_000),
            ("1.", 1_000_000),
            ("123456.789012", 123_456_789_012),
        ] {
            assert_eq!(MicroCredits::parse(s).unwrap().micros(), v, "{s}");
        }
    }

    #[test]
    fn refuses_bad_amounts_naming_the_rule() {
        for (s, why) in [
            ("-1", "negative"),
            ("1e3", "exponent"),
            ("0.0000001", "more than 6 decimals"),
            ("abc", "not a decimal"),
            ("NaN", "not a decimal"),
            ("inf", "not a decimal"),
            ("", "empty"),
            (".", "no digits"),
            ("1.2.3", "not a decimal"),
            ("99999999999999999999", "too large"),
        ] {
            let e = MicroCredits::parse(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{s}");
            assert!(e.message().contains(why), "{s}: {}", e.message());
            assert!(e.message().contains("at most 6 decimals"), "{}", e.message());
        }
    }

    #[test]
    fn formats() {
        assert_eq!(MicroCredits::credits(5).to_string(), "5.00");
        assert_eq!(MicroCredits::from_micros(9000).to_string(), "0.009");
        assert_eq!(MicroCredits::from_micros(1).to_string(), "0.000001");
        assert_eq!(MicroCredits::from_micros(-1500).to_string(), "-0.0015");
        assert_eq!(MicroCredits::from_micros(2_500_000).to_string(), "2.50");
        for s in ["2.00", "0.009", "0.000001", "17.25"] {
            assert_eq!(MicroCredits::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn sums_are_exact_over_a_million_entries() {
        let entries: Vec<MicroCredits> = (0..1_000_000_i64)
            .map(|i| MicroCredits::from_micros(i % 7 + 1))
            .collect();
        let expected: i64 = (0..1_000_000_i64).map(|i| i % 7 + 1).sum();
        assert_eq!(MicroCredits::sum(entries).unwrap().micros(), expected);
        assert!(
            MicroCredits::from_micros(i64::MAX)
                .checked_add(MicroCredits::from_micros(1))
                .is_err()
        );
    }

    proptest::proptest! {
        #[test]
        fn format_then_parse_is_identity(micros in 0_i64..=i64::MAX / 2) {
            let m = MicroCredits::from_micros(micros);
            proptest::prop_assert_eq!(MicroCredits::parse(&m.to_string()).unwrap(), m);
        }

        #[test]
        fn parsing_never_panics_and_refusals_name_the_rule(s in "\\PC{0,24}") {
            if let Err(e) = MicroCredits::parse(&s) {
                proptest::prop_assert_eq!(e.kind(), ErrorKind::InvalidInput);
                proptest::prop_assert!(e.message().contains("at most 6 decimals"));
            }
        }

        #[test]
        fn decimal_strings_parse_exactly(whole in 0_u32..1_000_000, frac in 0_u32..1_000_000) {
            let s = format!("{whole}.{frac:06}");
            let want = i64::from(whole) * 1_000_000 + i64::from(frac);
            proptest::prop_assert_eq!(MicroCredits::parse(&s).unwrap().micros(), want);
        }
    }
}
