//! Numbers as the input wrote them: exact, never rounded on the way.
//!
//! serde_json keeps each number's text (`arbitrary_precision`), so an
//! integer beyond 64 bits or a decimal with more digits than a double holds
//! reaches the destination as written. This module says what such a number
//! is (an integer that fits 64 bits, a value a double holds exactly, or
//! neither) and writes it in one canonical text, so that two spellings of
//! one value (`1.50`, `15e-1`) are one key and one stored value, and two
//! different values are never one.
//!
//! The canonical text is RFC 8785's (JCS) for every value a double holds
//! exactly, so ordinary records keep the keys and stored JSON they always
//! had; any other value is written with all its digits.

use serde_json::{Number, Value};

/// RFC 8785 canonical JSON of a value.
pub fn canonical_json(value: &Value) -> String {
    // Serializing a serde_json::Value cannot fail: its numbers are finite
    // and its keys are strings.
    serde_jcs::to_string(value).unwrap_or_default()
}

/// A finite decimal: `0.digits × 10^point`, digits without leading or
/// trailing zeros (none at all for zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    point: i64,
}

impl Decimal {
    /// Reads a JSON number (an exponent may carry `+`), or Rust's `{:e}`.
    pub fn parse(text: &str) -> Option<Decimal> {
        let (negative, body) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match body.find(['e', 'E']) {
            Some(at) => (&body[..at], Some(&body[at + 1..])),
            None => (body, None),
        };
        let (int, frac) = match mantissa.split_once('.') {
            Some((i, f)) => (i, f),
            None => (mantissa, ""),
        };
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let exponent: i64 = match exponent {
            None => 0,
            Some(e) => {
                let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // Beyond any double either way; saturate instead of failing.
                let magnitude: i64 = digits.parse().unwrap_or(i64::MAX / 4).min(i64::MAX / 4);
                if e.starts_with('-') {
                    -magnitude
                } else {
                    magnitude
                }
            }
        };
        let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
        let mut point = int.len() as i64 + exponent;
        let leading = digits.iter().take_while(|&&d| d == 0).count();
        digits.drain(..leading);
        point -= leading as i64;
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            return Some(Decimal {
                negative: false,
                digits,
                point: 0,
            });
        }
        Some(Decimal {
            negative,
            digits,
            point,
        })
    }

    /// True below zero.
    pub fn is_negative(&self) -> bool {
        self.negative
    }

    /// True for a whole number.
    pub fn is_integer(&self) -> bool {
        self.point >= self.digits.len() as i64
    }

    /// Digits before the decimal point (0 for `0.5`).
    pub fn integer_digits(&self) -> i64 {
        self.point.max(0)
    }

    /// Digits after the decimal point (0 for `120`).
    pub fn fraction_digits(&self) -> i64 {
        (self.digits.len() as i64 - self.point).max(0)
    }

    /// Plain notation with at least `scale` fraction digits: `-12.50`.
    /// Only for values of reasonable size (callers check the digit counts).
    pub fn plain(&self, scale: usize) -> String {
        let mut out = String::new();
        if self.negative {
            out.push('-');
        }
        let digit = |i: i64| -> char {
            if i >= 0 && (i as usize) < self.digits.len() {
                (b'0' + self.digits[i as usize]) as char
            } else {
                '0'
            }
        };
        if self.point <= 0 {
            out.push('0');
        } else {
            for i in 0..self.point {
                out.push(digit(i));
            }
        }
        let fraction = (self.fraction_digits() as usize).max(scale);
        if fraction > 0 {
            out.push('.');
            for i in 0..fraction as i64 {
                out.push(digit(self.point + i));
            }
        }
        out
    }

    /// The value as ECMAScript writes a number (the rules JCS uses), from
    /// these digits: plain from 1e-6 up to 1e21, else with an exponent.
    /// Whole numbers are always written plain, digit for digit.
    fn canonical(&self) -> String {
        let k = self.digits.len() as i64;
        let n = self.point;
        if self.digits.is_empty() {
            return "0".into();
        }
        if self.is_integer() || (-6 < n && n <= 21) {
            return self.plain(0);
        }
        let mut out = String::new();
        if self.negative {
            out.push('-');
        }
        out.push((b'0' + self.digits[0]) as char);
        if k > 1 {
            out.push('.');
            out.extend(self.digits[1..].iter().map(|d| (b'0' + d) as char));
        }
        let e = n - 1;
        out.push('e');
        out.push(if e < 0 { '-' } else { '+' });
        out.push_str(&e.unsigned_abs().to_string());
        out
    }
}

/// The double a number parses to, when that double is finite and holds
/// exactly the value the text wrote (its shortest form has the same value:
/// `0.1` yes, `9007199254740993` no).
pub fn exact_f64(n: &Number) -> Option<f64> {
    let text = n.as_str();
    let f: f64 = text.parse().ok().filter(|f: &f64| f.is_finite())?;
    if few_digits(text) {
        return Some(f);
    }
    // The shortest text of the double (`1.2345e-7`), on the stack.
    let mut buffer = ryu::Buffer::new();
    same_value(buffer.format_finite(f), text).then_some(f)
}

/// The parts of a number's text that fix its value, without allocating:
/// the sign, the mantissa's digits (a `.` among them), the span of its
/// significant digits and where the point falls relative to the first.
struct Parts<'a> {
    negative: bool,
    mantissa: &'a [u8],
    first: usize,
    last: usize,
    point: i64,
}

impl<'a> Parts<'a> {
    fn of(text: &'a str) -> Option<Parts<'a>> {
        let (negative, body) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match body.bytes().position(|b| b | 0x20 == b'e') {
            Some(at) => (&body[..at], &body[at + 1..]),
            None => (body, "0"),
        };
        let exponent: i64 = exponent
            .strip_prefix('+')
            .unwrap_or(exponent)
            .parse()
            .ok()?;
        let mantissa = mantissa.as_bytes();
        let dot = mantissa
            .iter()
            .position(|&b| b == b'.')
            .unwrap_or(mantissa.len());
        let significant = |b: &u8| b.is_ascii_digit() && *b != b'0';
        let first = mantissa.iter().position(significant)?;
        let last = mantissa.iter().rposition(significant)?;
        // Digits between the first significant one and the point.
        let before = if first < dot {
            (dot - first) as i64
        } else {
            -((first - dot - 1) as i64)
        };
        Some(Parts {
            negative,
            mantissa,
            first,
            last,
            point: before + exponent,
        })
    }

    fn digits(&self) -> impl Iterator<Item = u8> + '_ {
        self.mantissa[self.first..=self.last]
            .iter()
            .copied()
            .filter(|&b| b != b'.')
    }
}

/// True when two number texts denote the same value.
fn same_value(a: &str, b: &str) -> bool {
    match (Parts::of(a), Parts::of(b)) {
        (Some(a), Some(b)) => {
            a.negative == b.negative && a.point == b.point && a.digits().eq(b.digits())
        }
        // No significant digit: zero (or not a number at all).
        (None, None) => Decimal::parse(a) == Decimal::parse(b),
        _ => false,
    }
}

/// True for plain notation with at most 15 significant digits, of a size
/// far from a double's limits: every such decimal survives a double (the
/// 15 digits of `DBL_DIG`), so the common case needs no comparison.
fn few_digits(text: &str) -> bool {
    let mut significant = 0;
    let mut started = false;
    let mut whole = 0;
    let mut in_fraction = false;
    for b in text.bytes() {
        match b {
            b'-' => {}
            b'.' => in_fraction = true,
            b'0'..=b'9' => {
                started |= b != b'0';
                significant += usize::from(started);
                whole += usize::from(!in_fraction);
            }
            _ => return false,
        }
    }
    significant <= 15 && whole <= 300 && text.len() <= 300
}

/// The value as a 64-bit integer, when it is a whole number that fits
/// (`7`, `7.0`, `7e0`), exactly.
pub fn exact_i64(n: &Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let d = Decimal::parse(n.as_str())?;
    if !d.is_integer() || d.point > 19 {
        return None;
    }
    d.plain(0).parse().ok()
}

/// True when a double holds the number exactly, or a 64-bit integer does.
pub fn fits_64_bits(n: &Number) -> bool {
    n.as_i64().is_some() || n.as_u64().is_some() || exact_f64(n).is_some()
}

/// The canonical text of a number: one text per value. JCS's form when a
/// double holds the value exactly, and the plain digits of a 64-bit
/// integer; otherwise every digit of the value.
pub fn canonical(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    if exact_f64(n).is_some() {
        return canonical_json(&Value::Number(n.clone()));
    }
    match Decimal::parse(n.as_str()) {
        Some(d) => d.canonical(),
        None => n.to_string(),
    }
}

/// The canonical form of a number as a JSON number.
pub fn normalized(n: &Number) -> Number {
    let text = canonical(n);
    if text == n.as_str() {
        return n.clone();
    }
    serde_json::from_str(&text).unwrap_or_else(|_| n.clone())
}

/// RFC 8785 canonical JSON, except that a number a double cannot hold
/// exactly keeps all its digits (JCS would round it to the nearest
/// double). The same text as JCS for every value without such numbers.
pub fn exact_json(value: &Value) -> String {
    if !has_inexact(value) {
        return canonical_json(value);
    }
    let mut out = String::new();
    write_exact(&mut out, value);
    out
}

/// The first number inside `value` that neither a 64-bit integer nor a
/// double holds exactly, for stores whose JSON keeps only those.
pub fn first_beyond_64_bits(value: &Value) -> Option<&Number> {
    match value {
        Value::Number(n) if !fits_64_bits(n) => Some(n),
        Value::Array(items) => items.iter().find_map(first_beyond_64_bits),
        Value::Object(map) => map.values().find_map(first_beyond_64_bits),
        _ => None,
    }
}

/// True when some number inside `value` is one a double does not hold.
fn has_inexact(value: &Value) -> bool {
    match value {
        Value::Number(n) => exact_f64(n).is_none(),
        Value::Array(items) => items.iter().any(has_inexact),
        Value::Object(map) => map.values().any(has_inexact),
        _ => false,
    }
}

fn write_exact(out: &mut String, value: &Value) {
    match value {
        Value::Number(n) => out.push_str(&canonical(n)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_exact(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // JCS orders members by the UTF-16 code units of their names.
            let mut members: Vec<(Vec<u16>, &String, &Value)> = map
                .iter()
                .map(|(k, v)| (k.encode_utf16().collect(), k, v))
                .collect();
            members.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (_, name, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&canonical_json(&Value::String(name.clone())));
                out.push(':');
                write_exact(out, item);
            }
            out.push('}');
        }
        other => out.push_str(&canonical_json(other)),
    }
}

/// The first number among the fields that lies beyond a double's range
/// (`1e400`), as a reason to reject the record: no column type idemload
/// creates holds it, and RFC 8785 (hash keys) cannot write it.
pub fn beyond_double(fields: &crate::record::Fields) -> Option<String> {
    fn find(value: &Value) -> Option<&Number> {
        match value {
            Value::Number(n) if out_of_range(n) => Some(n),
            Value::Array(items) => items.iter().find_map(find),
            Value::Object(map) => map.values().find_map(find),
            _ => None,
        }
    }
    fields.iter().find_map(|(name, value)| {
        find(value).map(|n| {
            format!(
                "field {:?} holds the number {}, beyond the range of a double (about 1.8e308)",
                &**name,
                shorten(n.as_str())
            )
        })
    })
}

fn out_of_range(n: &Number) -> bool {
    let text = n.as_str();
    // Plain digits up to 308 of them are in range: no parse needed.
    if text.len() <= 300 && !text.bytes().any(|b| b == b'e' || b == b'E') {
        return false;
    }
    !text.parse::<f64>().is_ok_and(f64::is_finite)
}

/// A number's text cut to 60 bytes for a reason.
pub fn shorten(text: &str) -> String {
    if text.len() <= 60 {
        text.to_string()
    } else {
        format!("{}...", &text[..57])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(text: &str) -> Number {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn canonical_keeps_every_digit_a_double_would_lose() {
        assert_eq!(
            canonical(&num("18446744073709551617")),
            "18446744073709551617"
        );
        assert_eq!(
            canonical(&num("18446744073709551616")),
            "18446744073709551616"
        );
        assert_eq!(
            canonical(&num("123456789012345678901234567890")),
            "123456789012345678901234567890"
        );
        assert_eq!(canonical(&num("9007199254740993")), "9007199254740993");
        assert_eq!(
            canonical(&num("0.1000000000000000055511151231257827")),
            "0.1000000000000000055511151231257827"
        );
        assert_eq!(
            canonical(&num("1.00000000000000000001e-30")),
            "1.00000000000000000001e-30"
        );
    }

    #[test]
    fn canonical_is_one_text_per_value() {
        for (a, b) in [
            ("7", "7.0"),
            ("7", "7e0"),
            ("100", "1e2"),
            ("0.5", "5e-1"),
            ("18446744073709551617", "18446744073709551617.000"),
            ("18446744073709551617", "1.8446744073709551617e19"),
            ("0", "-0"),
            (
                "0.1000000000000000055511151231257827",
                "1000000000000000055511151231257827e-34",
            ),
        ] {
            assert_eq!(canonical(&num(a)), canonical(&num(b)), "{a} and {b}");
        }
        assert_ne!(
            canonical(&num("18446744073709551617")),
            canonical(&num("18446744073709551616"))
        );
    }

    #[test]
    fn values_a_double_holds_are_written_as_jcs_writes_them() {
        for text in [
            "0.1", "1.5", "1e21", "1e30", "-2.5e-7", "1e-6", "123.456", "4.5e15",
        ] {
            let n = num(text);
            assert!(exact_f64(&n).is_some(), "{text}");
            assert_eq!(
                canonical(&n),
                canonical_json(&Value::Number(n.clone())),
                "{text}"
            );
        }
        let ordinary = json!({"b": [1, 2.5, {"z": "é", "a": null}], "a": 1e21, "é": "\u{1}"});
        assert_eq!(exact_json(&ordinary), canonical_json(&ordinary));
    }

    #[test]
    fn exact_json_keeps_nested_numbers() {
        let v: Value =
            serde_json::from_str(r#"{"info":{"b":1.50,"a":9007199254740993},"é":1,"e":2}"#)
                .unwrap();
        assert_eq!(
            exact_json(&v),
            r#"{"e":2,"info":{"a":9007199254740993,"b":1.5},"é":1}"#
        );
    }

    #[test]
    fn the_short_way_agrees_with_the_long_way() {
        for text in [
            "0.1",
            "123456789012345",
            "0.000000000000001",
            "-99.5",
            "0.30000000000000004",
        ] {
            let f: f64 = text.parse().unwrap();
            let long = Decimal::parse(&format!("{f:e}")) == Decimal::parse(text);
            assert_eq!(same_value(&format!("{f:e}"), text), long, "{text}");
            assert_eq!(few_digits(text), few_digits(text) && long, "{text}");
            assert_eq!(exact_f64(&num(text)).is_some(), long, "{text}");
        }
        assert!(same_value("1.5e3", "1500.000"));
        assert!(same_value("0.0015", "15e-4"));
        assert!(!same_value("0.0015", "0.015"));
        assert!(!same_value("-1", "1"));
        assert!(!few_digits("1234567890123456"));
        assert!(!few_digits("1e5"));
    }

    #[test]
    fn whole_numbers_fit_i64_exactly_or_not_at_all() {
        assert_eq!(exact_i64(&num("7.0")), Some(7));
        assert_eq!(exact_i64(&num("7e3")), Some(7000));
        assert_eq!(exact_i64(&num("7.0000000000000000001")), None);
        assert_eq!(exact_i64(&num("9223372036854775808")), None);
        assert_eq!(exact_i64(&num("-9223372036854775808")), Some(i64::MIN));
    }

    #[test]
    fn plain_pads_to_a_scale() {
        let d = Decimal::parse("18446744073709551616").unwrap();
        assert_eq!(d.plain(2), "18446744073709551616.00");
        let d = Decimal::parse("-1.5e-3").unwrap();
        assert_eq!(d.plain(0), "-0.0015");
        assert_eq!((d.integer_digits(), d.fraction_digits()), (0, 4));
    }
}
