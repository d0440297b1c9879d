//! AWS shared credentials and config files (`~/.aws/credentials`,
//! `~/.aws/config`), by `AWS_PROFILE` (else `default`), for S3 URLs.
//!
//! The environment comes first: a profile fills in only what
//! `AWS_ACCESS_KEY_ID` / `AWS_REGION` leave unset, as the AWS CLI does. The
//! files' values go into the client and nowhere else.

use std::collections::HashMap;
use std::path::PathBuf;

use object_store::aws::AmazonS3Builder;

/// Sets the profile's keys on `builder` when the environment has none.
pub(super) fn apply(builder: AmazonS3Builder) -> AmazonS3Builder {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        return builder;
    }
    let file = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".aws/credentials")));
    let Some(values) = file.and_then(|f| section(&f, &profile())) else {
        return builder;
    };
    let mut builder = builder;
    if let Some(id) = values.get("aws_access_key_id") {
        builder = builder.with_access_key_id(id);
    }
    if let Some(secret) = values.get("aws_secret_access_key") {
        builder = builder.with_secret_access_key(secret);
    }
    if let Some(token) = values.get("aws_session_token") {
        builder = builder.with_token(token);
    }
    builder
}

/// The profile's region from the config file (`[profile NAME]`, or
/// `[default]`).
pub(super) fn region() -> Option<String> {
    let file = std::env::var_os("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".aws/config")))?;
    let name = profile();
    let header = if name == "default" {
        name
    } else {
        format!("profile {name}")
    };
    section(&file, &header)?.remove("region")
}

fn profile() -> String {
    std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into())
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The `key = value` lines of section `[name]` of an INI file.
fn section(file: &std::path::Path, name: &str) -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(file).ok()?;
    parse_section(&text, name)
}

fn parse_section(text: &str, name: &str) -> Option<HashMap<String, String>> {
    let mut found = None;
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            if inside {
                found.get_or_insert_with(HashMap::new);
            }
            continue;
        }
        if let (true, Some((key, value))) = (inside, line.split_once('=')) {
            found
                .get_or_insert_with(HashMap::new)
                .insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_section_is_read_and_others_are_not() {
        let text = "[default]\naws_access_key_id = A\n\n# note\n[profile dev]\nregion = eu-west-1\n[dev]\nAWS_ACCESS_KEY_ID=B\naws_secret_access_key = s=1\n";
        let dev = parse_section(text, "dev").unwrap();
        assert_eq!(dev["aws_access_key_id"], "B");
        assert_eq!(dev["aws_secret_access_key"], "s=1");
        assert_eq!(
            parse_section(text, "profile dev").unwrap()["region"],
            "eu-west-1"
        );
        assert_eq!(parse_section(text, "default").unwrap().len(), 1);
        assert!(parse_section(text, "prod").is_none());
    }
}
