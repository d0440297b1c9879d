//! Keeping secrets out of what is printed: URLs with their password and
//! secret query parameters replaced by `***`.

/// An URL with its password (and `password=` parameters) replaced by `***`.
pub fn redact(url: &str) -> String {
    let mut out = match url::Url::parse(url) {
        // The url crate finds the password as a client would; only a URL
        // that has one is written back (so nothing else is re-normalised).
        Ok(mut parsed) if parsed.password().is_some() => match parsed.set_password(Some("***")) {
            Ok(()) => parsed.to_string(),
            Err(()) => redact_userinfo(url),
        },
        Ok(_) => url.to_string(),
        Err(_) => redact_userinfo(url),
    };
    for param in ["password=", "pass=", "token=", "secret=", "key="] {
        let mut search = 0;
        while let Some(pos) = out[search..].to_ascii_lowercase().find(param) {
            let start = search + pos + param.len();
            let end = out[start..]
                .find(['&', '#'])
                .map_or(out.len(), |i| start + i);
            out.replace_range(start..end, "***");
            search = start + 3;
        }
    }
    out
}

/// The password of a string the url crate cannot parse (a libpq-style URL
/// with an unusual host), replaced by hand.
fn redact_userinfo(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                out.replace_range(start..rest_start + at, "***");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords_and_tokens() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("mysql://h/db?password=x&a=1"),
            "mysql://h/db?password=***&a=1"
        );
        assert_eq!(redact("sqlite://data/w.db"), "sqlite://data/w.db");
        assert_eq!(
            redact("postgres://u:p%40ss:w@%2Fvar%2Frun%2Fpostgresql/db?sslmode=disable"),
            "postgres://u:***@%2Fvar%2Frun%2Fpostgresql/db?sslmode=disable"
        );
        assert_eq!(redact("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
    }
}
