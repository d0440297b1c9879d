//! What a request carries: its `Idempotency-Key` and its records.
//!
//! The key is a structured-field string as the IETF draft writes it
//! (`"8e03978e-…"`, with `\"` and `\\` escapes), or a bare token as Stripe
//! sends it. The body is one JSON object, a JSON array of objects, or
//! NDJSON; a line or element that is not an object becomes a reject with
//! its index, never a failed request (guarantee 5).

use crate::record::{Item, Name};
use crate::request::record_ref;

/// Longest key accepted.
pub const MAX_KEY: usize = 255;

/// The key of an `Idempotency-Key` header value, or why it is not one.
pub fn idempotency_key(value: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(value)
        .map_err(|_| "the Idempotency-Key header is not ASCII".to_string())?
        .trim();
    let key = match text.strip_prefix('"') {
        Some(rest) => {
            let mut key = String::with_capacity(rest.len());
            let mut chars = rest.chars();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\')) => key.push(c),
                        _ => return Err("the Idempotency-Key string has a bad escape (only \\\" and \\\\ are allowed)".into()),
                    },
                    Some('"') => break,
                    Some(c) if (' '..='~').contains(&c) => key.push(c),
                    Some(_) => return Err("the Idempotency-Key string holds a character outside printable ASCII".into()),
                    None => return Err("the Idempotency-Key string has no closing quote".into()),
                }
            }
            if !chars.as_str().trim().is_empty() {
                return Err("the Idempotency-Key header has text after its closing quote".into());
            }
            key
        }
        None => {
            if text
                .chars()
                .any(|c| !('!'..='~').contains(&c) || matches!(c, '"' | ',' | ';' | '\\'))
            {
                return Err(
                    "the Idempotency-Key header is neither a quoted string nor a token".into(),
                );
            }
            text.to_string()
        }
    };
    if key.is_empty() {
        return Err("the Idempotency-Key header is empty".into());
    }
    if key.len() > MAX_KEY {
        return Err(format!(
            "the Idempotency-Key is longer than {MAX_KEY} characters"
        ));
    }
    Ok(key)
}

/// The records of a body, each named by its index (0-based); `Err` when
/// the body holds nothing to read.
pub fn records(body: &[u8], key: &str) -> Result<Vec<Item>, String> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Err("the body is empty: send a JSON object, a JSON array or NDJSON".into());
    }
    if trimmed.starts_with(b"[") {
        let values: Vec<serde_json::Value> = serde_json::from_slice(trimmed)
            .map_err(|e| format!("the body starts as a JSON array but is not one: {e}"))?;
        return Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                crate::source::file::into_record(v, record_ref(key, i as u64), usize::MAX)
            })
            .collect());
    }
    let mut shape: Vec<Name> = Vec::new();
    if trimmed.starts_with(b"{") {
        // One object (possibly pretty-printed over several lines).
        if let Item::Record(r) =
            crate::source::file::parse_json_record(trimmed, record_ref(key, 0), &mut shape, None)
        {
            return Ok(vec![Item::Record(r)]);
        }
    }
    Ok(trimmed
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.trim_ascii().is_empty())
        .enumerate()
        .map(|(i, line)| {
            crate::source::file::parse_json_record(
                line,
                record_ref(key, i as u64),
                &mut shape,
                None,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_structured_strings_or_bare_tokens() {
        assert_eq!(
            idempotency_key(b"\"8e03978e-40d5\"").unwrap(),
            "8e03978e-40d5"
        );
        assert_eq!(idempotency_key(b"\"a \\\"b\\\" c\"").unwrap(), "a \"b\" c");
        assert_eq!(idempotency_key(b"key_123").unwrap(), "key_123");
        assert!(idempotency_key(b"").is_err());
        assert!(idempotency_key(b"\"\"").is_err());
        assert!(idempotency_key(b"\"open").is_err());
        assert!(idempotency_key(b"two words").is_err());
        assert!(idempotency_key("\"é\"".as_bytes()).is_err());
        assert!(idempotency_key("x".repeat(300).as_bytes()).is_err());
    }

    fn indexes(items: &[Item]) -> Vec<(bool, String)> {
        items
            .iter()
            .map(|i| match i {
                Item::Record(r) => (true, r.source.to_string()),
                Item::Reject(r) => (false, r.source.to_string()),
                Item::Skipped | Item::FileLoaded(_) | Item::FileSkipped => (false, String::new()),
            })
            .collect()
    }

    #[test]
    fn bodies_are_an_object_an_array_or_ndjson() {
        let one = records(b" {\n \"id\": 1\n}\n", "k").unwrap();
        assert_eq!(indexes(&one), vec![(true, "request k:1".into())]);
        let array = records(b"[{\"id\": 1}, 7, {\"id\": 2}]", "k").unwrap();
        assert_eq!(
            indexes(&array),
            vec![
                (true, "request k:1".into()),
                (false, "request k:2".into()),
                (true, "request k:3".into())
            ]
        );
        let nd = records(b"{\"id\": 1}\r\n\n{\"id\": oops}\n{\"id\": 3}", "k").unwrap();
        assert_eq!(
            indexes(&nd),
            vec![
                (true, "request k:1".into()),
                (false, "request k:2".into()),
                (true, "request k:3".into())
            ]
        );
        assert!(records(b"  \n", "k").is_err());
        assert!(records(b"[{\"id\": 1}", "k").is_err());
    }
}
