//! Pagination of the HTTP source: which request comes next, and when to
//! stop.
//!
//! Every style stops on an empty page; page and offset also stop once a
//! declared total (`total_path`) is reached, cursor when the next token is
//! missing, link when there is no `Link: rel="next"`. No style stops on a
//! short page: an API that caps its page size below the asked `size` would
//! otherwise lose every page after the first. `max_pages` bounds a run
//! against an API that never says "done": reaching it is an error, never a
//! silent stop, so nothing is lost unnoticed.

use reqwest::header::{HeaderMap, LINK};
use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;

use super::origin::is_same_origin;

/// `[source.pagination]`. One table for every style, as in the spec; a key
/// that does not apply to the chosen `type` is ignored.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PaginationConfig {
    /// `page` | `offset` | `cursor` | `link` | `none` (the default: one request).
    #[serde(rename = "type", default)]
    pub style: PageStyle,
    /// page: parameter carrying the page number (default `page`).
    pub page_param: Option<String>,
    /// page: number of the first page, 1 unless the API counts from 0.
    pub first_page: Option<u64>,
    /// Parameter carrying the page size (default `per_page`; `limit` for offset).
    pub size_param: Option<String>,
    /// Records asked per page (offset: default 100; others: unset sends no
    /// size parameter).
    pub size: Option<u64>,
    /// offset: parameter carrying the offset, the records read so far
    /// (default `offset`).
    pub offset_param: Option<String>,
    /// cursor: dotted path of the next token in the body; missing, null or
    /// "" ends the paging.
    pub cursor_path: Option<String>,
    /// cursor: parameter that sends the token back.
    pub cursor_param: Option<String>,
    /// page and offset: dotted path of the total number of records in the
    /// body; reading stops once that many were read.
    pub total_path: Option<String>,
    /// Most pages a run reads (default 100000); an API that still has a next
    /// page then fails the run rather than being cut silently.
    pub max_pages: Option<u64>,
}

/// Pagination styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PageStyle {
    #[default]
    None,
    Page,
    Offset,
    Cursor,
    Link,
}

impl PaginationConfig {
    /// The style with its defaults filled in; a cursor style without its
    /// path or parameter is an error.
    pub fn resolve(&self) -> Result<Pagination, String> {
        let max_pages = self.max_pages.unwrap_or(100_000).max(1);
        let size_param = |default: &str| self.size_param.clone().unwrap_or_else(|| default.into());
        Ok(match self.style {
            PageStyle::None => Pagination::None,
            PageStyle::Page => Pagination::Page(PageConfig {
                page_param: self.page_param.clone().unwrap_or_else(|| "page".into()),
                first_page: self.first_page.unwrap_or(1),
                size_param: size_param("per_page"),
                size: self.size,
                total_path: self.total_path.clone(),
                max_pages,
            }),
            PageStyle::Offset => Pagination::Offset(OffsetConfig {
                offset_param: self.offset_param.clone().unwrap_or_else(|| "offset".into()),
                size_param: size_param("limit"),
                size: self.size.unwrap_or(100),
                total_path: self.total_path.clone(),
                max_pages,
            }),
            PageStyle::Cursor => Pagination::Cursor(CursorConfig {
                cursor_path: self.cursor_path.clone().ok_or(
                    "[source.pagination] type = \"cursor\" needs `cursor_path`, the dotted path of the next token in the body",
                )?,
                cursor_param: self.cursor_param.clone().ok_or(
                    "[source.pagination] type = \"cursor\" needs `cursor_param`, the parameter that sends the token back",
                )?,
                size_param: size_param("per_page"),
                size: self.size,
                max_pages,
            }),
            PageStyle::Link => Pagination::Link(LinkConfig {
                size_param: size_param("per_page"),
                size: self.size,
                max_pages,
            }),
        })
    }
}

/// A pagination style, resolved.
#[derive(Debug, Clone)]
pub enum Pagination {
    None,
    Page(PageConfig),
    Offset(OffsetConfig),
    Cursor(CursorConfig),
    Link(LinkConfig),
}

/// `type = "page"`.
#[derive(Debug, Clone)]
pub struct PageConfig {
    pub page_param: String,
    pub first_page: u64,
    pub size_param: String,
    pub size: Option<u64>,
    pub total_path: Option<String>,
    pub max_pages: u64,
}

/// `type = "offset"`.
#[derive(Debug, Clone)]
pub struct OffsetConfig {
    pub offset_param: String,
    pub size_param: String,
    pub size: u64,
    pub total_path: Option<String>,
    pub max_pages: u64,
}

/// `type = "cursor"`.
#[derive(Debug, Clone)]
pub struct CursorConfig {
    pub cursor_path: String,
    pub cursor_param: String,
    pub size_param: String,
    pub size: Option<u64>,
    pub max_pages: u64,
}

/// `type = "link"`.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub size_param: String,
    pub size: Option<u64>,
    pub max_pages: u64,
}

/// Where the paging stands.
#[derive(Debug)]
pub struct Paginator {
    config: Pagination,
    /// Pages fetched so far.
    pages: u64,
    /// Records read so far.
    records: u64,
}

/// What comes after a page.
#[derive(Debug, PartialEq)]
pub enum Next {
    Request(Url),
    Done,
    /// `max_pages` reached while the API still had more.
    TooManyPages(u64),
}

impl Paginator {
    pub fn new(config: Pagination) -> Paginator {
        Paginator {
            config,
            pages: 0,
            records: 0,
        }
    }

    /// The first request, from the base URL (params already applied).
    pub fn first(&self, base: &Url) -> Url {
        let mut url = base.clone();
        match &self.config {
            Pagination::None => {}
            Pagination::Page(p) => {
                let mut q = url.query_pairs_mut();
                q.append_pair(&p.page_param, &p.first_page.to_string());
                if let Some(size) = p.size {
                    q.append_pair(&p.size_param, &size.to_string());
                }
            }
            Pagination::Offset(o) => {
                url.query_pairs_mut()
                    .append_pair(&o.offset_param, "0")
                    .append_pair(&o.size_param, &o.size.to_string());
            }
            Pagination::Cursor(c) => {
                if let Some(size) = c.size {
                    url.query_pairs_mut()
                        .append_pair(&c.size_param, &size.to_string());
                }
            }
            Pagination::Link(l) => {
                if let Some(size) = l.size {
                    url.query_pairs_mut()
                        .append_pair(&l.size_param, &size.to_string());
                }
            }
        }
        url
    }

    /// The next request after a page of `count` records, fetched from
    /// `requested` with this body and these headers.
    pub fn advance(
        &mut self,
        base: &Url,
        requested: &Url,
        body: &Value,
        headers: &HeaderMap,
        count: usize,
    ) -> Result<Next, String> {
        self.pages += 1;
        self.records += count as u64;
        if count == 0 {
            return Ok(Next::Done);
        }
        let next = match &self.config {
            Pagination::None => return Ok(Next::Done),
            Pagination::Page(p) => {
                if total_reached(body, p.total_path.as_deref(), self.records)? {
                    return Ok(Next::Done);
                }
                let mut url = base.clone();
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair(&p.page_param, &(p.first_page + self.pages).to_string());
                    if let Some(size) = p.size {
                        q.append_pair(&p.size_param, &size.to_string());
                    }
                }
                url
            }
            Pagination::Offset(o) => {
                if total_reached(body, o.total_path.as_deref(), self.records)? {
                    return Ok(Next::Done);
                }
                let mut url = base.clone();
                url.query_pairs_mut()
                    .append_pair(&o.offset_param, &self.records.to_string())
                    .append_pair(&o.size_param, &o.size.to_string());
                url
            }
            Pagination::Cursor(c) => {
                let token = match lookup(body, &c.cursor_path) {
                    None | Some(Value::Null) => return Ok(Next::Done),
                    Some(Value::String(s)) if s.is_empty() => return Ok(Next::Done),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    Some(other) => {
                        return Err(format!(
                            "next-page token at {:?} is {}, expected a string or a number",
                            c.cursor_path,
                            kind(other)
                        ))
                    }
                };
                let mut url = base.clone();
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair(&c.cursor_param, &token);
                    if let Some(size) = c.size {
                        q.append_pair(&c.size_param, &size.to_string());
                    }
                }
                if url == *requested {
                    return Err(format!(
                        "the API sent back the same next-page token at {:?} as the one just used: paging would never end",
                        c.cursor_path
                    ));
                }
                url
            }
            Pagination::Link(_) => match next_link(headers, requested) {
                None => return Ok(Next::Done),
                Some(url) => {
                    if url == *requested {
                        return Err("the Link header's rel=\"next\" points at the page just read: paging would never end".into());
                    }
                    // The configured parameters (an API key, say) belong to
                    // the configured origin only.
                    if is_same_origin(&url, base) {
                        with_missing_params(url, base)
                    } else {
                        url
                    }
                }
            },
        };
        if self.pages >= self.max_pages() {
            return Ok(Next::TooManyPages(self.max_pages()));
        }
        Ok(Next::Request(next))
    }

    fn max_pages(&self) -> u64 {
        match &self.config {
            Pagination::None => 1,
            Pagination::Page(p) => p.max_pages,
            Pagination::Offset(o) => o.max_pages,
            Pagination::Cursor(c) => c.max_pages,
            Pagination::Link(l) => l.max_pages,
        }
    }
}

/// True when the body declares a total and that many records were read.
fn total_reached(body: &Value, path: Option<&str>, read: u64) -> Result<bool, String> {
    let Some(path) = path else { return Ok(false) };
    match lookup(body, path) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(total) => Ok(read >= total),
            None => Err(format!("total at {path:?} is {n}, not a count")),
        },
        Some(Value::String(s)) => match s.trim().parse::<u64>() {
            Ok(total) => Ok(read >= total),
            Err(_) => Err(format!("total at {path:?} is {s:?}, not a count")),
        },
        Some(other) => Err(format!("total at {path:?} is {}, not a count", kind(other))),
    }
}

/// The value at a dotted path (`data.items`, `pages.0.next`); "" is the body.
pub fn lookup<'a>(body: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(body);
    }
    let mut at = body;
    for part in path.split('.') {
        at = match at {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(at)
}

/// JSON kind names for messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The `rel="next"` target of the `Link` headers, resolved against the URL
/// of the page (RFC 8288; a header that does not parse is ignored).
pub fn next_link(headers: &HeaderMap, requested: &Url) -> Option<Url> {
    headers
        .get_all(LINK)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|text| http_link::parse_link_header(text, requested).ok())
        .flatten()
        .find(|link| link.rel.eq_ignore_ascii_case("next"))
        .map(|link| link.target)
}

/// Adds the base URL's parameters a next link left out (an API key sent as
/// a parameter, say).
fn with_missing_params(mut url: Url, base: &Url) -> Url {
    let present: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
    let missing: Vec<(String, String)> = base
        .query_pairs()
        .filter(|(k, _)| !present.iter().any(|p| p == k))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if !missing.is_empty() {
        let mut q = url.query_pairs_mut();
        for (k, v) in &missing {
            q.append_pair(k, v);
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use serde_json::json;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn link_header_next_is_found_among_others_and_resolved() {
        let mut h = HeaderMap::new();
        h.insert(
            LINK,
            HeaderValue::from_static(
                r#"<https://a.test/x?page=1>; rel="first", </x?page=3&q=a,b>; rel="next last""#,
            ),
        );
        let next = next_link(&h, &url("https://a.test/x?page=2")).unwrap();
        assert_eq!(next.as_str(), "https://a.test/x?page=3&q=a,b");
        h.insert(
            LINK,
            HeaderValue::from_static(r#"<https://a.test/x?page=1>; rel="prev""#),
        );
        assert_eq!(next_link(&h, &url("https://a.test/x?page=2")), None);
    }

    #[test]
    fn page_paging_stops_on_an_empty_page_or_the_total() {
        let base = url("http://h/x?a=1");
        let mut p = Paginator::new(Pagination::Page(PageConfig {
            page_param: "page".into(),
            first_page: 1,
            size_param: "per_page".into(),
            size: Some(2),
            total_path: Some("total".into()),
            max_pages: 10,
        }));
        let first = p.first(&base);
        assert_eq!(first.as_str(), "http://h/x?a=1&page=1&per_page=2");
        let h = HeaderMap::new();
        let body = json!({"total": 3});
        let Next::Request(second) = p.advance(&base, &first, &body, &h, 2).unwrap() else {
            panic!()
        };
        assert_eq!(second.as_str(), "http://h/x?a=1&page=2&per_page=2");
        assert_eq!(p.advance(&base, &second, &body, &h, 1).unwrap(), Next::Done);
    }

    #[test]
    fn cursor_paging_stops_when_the_token_is_missing_and_bounds_pages() {
        let base = url("http://h/x");
        let mut p = Paginator::new(Pagination::Cursor(CursorConfig {
            cursor_path: "paging.next".into(),
            cursor_param: "after".into(),
            size_param: "limit".into(),
            size: None,
            max_pages: 2,
        }));
        let h = HeaderMap::new();
        let first = p.first(&base);
        let next = p
            .advance(&base, &first, &json!({"paging": {"next": "t1"}}), &h, 5)
            .unwrap();
        assert_eq!(next, Next::Request(url("http://h/x?after=t1")));
        let next = p
            .advance(&base, &first, &json!({"paging": {"next": "t2"}}), &h, 5)
            .unwrap();
        assert_eq!(next, Next::TooManyPages(2));
        let mut p = Paginator::new(Pagination::Cursor(CursorConfig {
            cursor_path: "paging.next".into(),
            cursor_param: "after".into(),
            size_param: "limit".into(),
            size: None,
            max_pages: 2,
        }));
        let next = p
            .advance(&base, &first, &json!({"paging": {"next": null}}), &h, 5)
            .unwrap();
        assert_eq!(next, Next::Done);
    }

    #[test]
    fn lookup_walks_objects_and_arrays() {
        let body = json!({"data": {"items": [1, {"x": 2}]}});
        assert_eq!(lookup(&body, "data.items.1.x"), Some(&json!(2)));
        assert_eq!(lookup(&body, "data.nope"), None);
        assert_eq!(lookup(&body, ""), Some(&body));
    }
}
