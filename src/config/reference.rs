//! docs/reference.md lists every key the pipeline parser accepts: each
//! table's keys are read from the config structs themselves (the list serde
//! gives for an unknown key under `deny_unknown_fields`), so a key added to a
//! struct and not to the reference fails here.

use serde::de::DeserializeOwned;

use super::parse::parse_unknown;

const REFERENCE: &str = include_str!("../../docs/reference.md");

/// The keys `T` accepts, from serde's "unknown field" message.
fn keys_of<T: DeserializeOwned + std::fmt::Debug>(toml_text: &str) -> Vec<String> {
    let err = toml::from_str::<T>(toml_text).expect_err("the probe key is unknown");
    let (unknown, known) = parse_unknown(err.message(), "unknown field `")
        .unwrap_or_else(|| panic!("not an unknown-field error: {}", err.message()));
    assert_eq!(unknown, "zz_probe");
    assert!(!known.is_empty(), "{}", err.message());
    known
}

/// The variants serde accepts for a value, from its "unknown variant" message.
fn values_of<T: DeserializeOwned + std::fmt::Debug>(toml_text: &str) -> Vec<String> {
    let err = toml::from_str::<T>(toml_text).expect_err("the probe value is unknown");
    parse_unknown(err.message(), "unknown variant `")
        .unwrap_or_else(|| panic!("not an unknown-variant error: {}", err.message()))
        .1
}

/// The text under the heading that contains `heading`, up to the next heading.
fn section(heading: &str) -> &'static str {
    let start = REFERENCE
        .lines()
        .position(|l| l.starts_with('#') && l.contains(heading))
        .unwrap_or_else(|| panic!("docs/reference.md has no heading with {heading:?}"));
    let lines: Vec<&str> = REFERENCE.lines().collect();
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with('#'))
        .map_or(lines.len(), |i| start + 1 + i);
    let from = REFERENCE.find(lines[start]).unwrap_or(0);
    let to = if end < lines.len() {
        REFERENCE[from..]
            .find(lines[end])
            .map_or(REFERENCE.len(), |i| from + i)
    } else {
        REFERENCE.len()
    };
    &REFERENCE[from..to]
}

#[track_caller]
fn assert_documented(heading: &str, keys: &[String]) {
    let text = section(heading);
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !text.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/reference.md, section {heading:?}, does not list {missing:?}"
    );
}

#[test]
fn every_config_key_is_in_the_reference() {
    use crate::config::{LoadConfig, PipelineConfig, TableDestination};
    use crate::destination::http::config::{LookupTable, RequestTemplate};
    use crate::destination::http::HttpDestinationConfig;
    use crate::source::http::IncrementalConfig;
    use crate::source::pagination::PaginationConfig;
    use crate::source::retry::{RateLimitConfig, RetryConfig};
    use crate::source::{FileSourceConfig, HttpSourceConfig, SqlSourceConfig};
    use crate::trigger::emit::EmitConfig;
    use crate::trigger::TriggerConfig;

    let probe = "zz_probe = 1";
    assert_documented("Top level", &keys_of::<PipelineConfig>(probe));
    assert_documented(
        "`[source]` type = \"file\"",
        &keys_of::<FileSourceConfig>(probe),
    );
    assert_documented(
        "`[source]` type = \"http\"",
        &keys_of::<HttpSourceConfig>(probe),
    );
    assert_documented(
        "`[source]` type = \"sql\"",
        &keys_of::<SqlSourceConfig>(probe),
    );
    assert_documented("`[source.pagination]`", &keys_of::<PaginationConfig>(probe));
    assert_documented(
        "`[source.incremental]`",
        &keys_of::<IncrementalConfig>(probe),
    );
    assert_documented("`[source.retry]`", &keys_of::<RetryConfig>(probe));
    assert_documented("`[source.rate_limit]`", &keys_of::<RateLimitConfig>(probe));
    assert_documented(
        "`[destination]` (a database)",
        &keys_of::<TableDestination>(probe),
    );
    assert_documented(
        "`[destination]` type = \"http\"",
        &keys_of::<HttpDestinationConfig>(probe),
    );
    assert_documented("Request templates", &keys_of::<RequestTemplate>(probe));
    assert_documented("`lookup_table`", &keys_of::<LookupTable>(probe));
    assert_documented(
        "`rate_limit` (HTTP destination)",
        &keys_of::<crate::destination::http::config::RateLimit>(probe),
    );
    assert_documented("`[load]`", &keys_of::<LoadConfig>(probe));
    assert_documented("`[load]`", &values_of::<LoadConfig>("mode = \"zz_probe\""));
    assert_documented("`[trigger]`", &keys_of::<TriggerConfig>(probe));
    assert_documented("`[serve]`", &keys_of::<crate::serve::ServeConfig>(probe));
    for kind in ["webhook", "exec"] {
        assert_documented(
            "`[trigger.emit]`",
            &keys_of::<EmitConfig>(&format!("type = \"{kind}\"\n{probe}")),
        );
    }
}

#[test]
fn the_reference_section_finder_stops_at_the_next_heading() {
    let text = section("`[source.retry]`");
    assert!(text.contains("`attempts`"));
    assert!(!text.contains("`requests_per_second`"));
}
