//! Paginated lists (a repository's tags, the registry's catalog), read by
//! our own `GET`s instead of oci-client's.
//!
//! Why: oci-client hides the response headers and buffers a whole body
//! before it can be measured. The distribution spec says the next page is
//! where the `Link: <…>; rel="next"` header points, and registries differ
//! in what they put there: distribution and Docker Hub a `last=` tag name,
//! Quay an opaque `next_page=` cursor, ECR an opaque `last=` token. Asking
//! for `last=<last name seen>` instead, as before, read Quay's first page
//! again and stopped there, so a repository with more tags than one page
//! showed only that page.
//!
//! Contracts:
//! - Pages follow `Link` to the end; a page without one is the last. A
//!   link is followed only on the same scheme, host and port as the first
//!   request, so credentials never go anywhere else.
//! - Each body is capped while it streams ([`MAX_PAGE_BODY`]), and so is
//!   the whole list ([`MAX_LIST_BYTES`]) and its length in pages
//!   ([`MAX_PAGES`]): a hostile registry cannot grow the daemon's memory
//!   or keep it paging.
//! - Names keep the registry's order; a name seen on an earlier page is
//!   dropped, and a page that brings nothing new ends the list (a registry
//!   whose link leads back to where it was).

use reqwest::Url;
use reqwest::header::{HeaderMap, LINK};

/// Pages of one list followed before calling the registry hostile.
pub const MAX_PAGES: usize = 1000;
/// Largest body of one page (~500,000 tag names).
pub const MAX_PAGE_BODY: u64 = 16 << 20;
/// Largest sum of page bodies of one list.
pub const MAX_LIST_BYTES: u64 = 64 << 20;

/// Which list a page belongs to: the JSON field that holds its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// `GET /v2/<name>/tags/list` → `{"name": …, "tags": [...]}`.
    Tags,
    /// `GET /v2/_catalog` → `{"repositories": [...]}`.
    Catalog,
}

impl ListKind {
    fn field(self) -> &'static str {
        match self {
            ListKind::Tags => "tags",
            ListKind::Catalog => "repositories",
        }
    }
}

/// The names on one page. A `null` or missing list is an empty page (a
/// repository without tags answers `"tags": null`).
pub fn page_names(kind: ListKind, body: &[u8]) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("not a JSON {} list: {e}", kind.field()))?;
    match v.get(kind.field()) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|n| {
                n.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("a {} entry that is not a string: {n}", kind.field()))
            })
            .collect(),
        Some(other) => Err(format!("\"{}\" is not a list: {other}", kind.field())),
    }
}

/// The next page's address from the `Link` headers of the answer to
/// `base`: `None` on the last page. A link to another scheme, host or port
/// is an error (it would carry our credentials elsewhere).
pub fn next_link(headers: &HeaderMap, base: &Url) -> Result<Option<Url>, String> {
    for value in headers.get_all(LINK) {
        let value = value
            .to_str()
            .map_err(|_| "a Link header that is not text".to_string())?;
        for link in split_links(value) {
            let Some((target, params)) = parse_link(link) else {
                continue;
            };
            if !params.iter().any(|p| is_rel_next(p)) {
                continue;
            }
            let url = base
                .join(target)
                .map_err(|e| format!("a next-page link that is not a URL ({target:?}): {e}"))?;
            if url.origin() != base.origin() {
                return Err(format!(
                    "the next-page link leads to another server ({})",
                    url.origin().ascii_serialization()
                ));
            }
            return Ok(Some(url));
        }
    }
    Ok(None)
}

/// The links of one `Link` header value (`<a>; rel="next", <b>; …`),
/// split on commas outside `<…>` and quotes.
fn split_links(value: &str) -> Vec<&str> {
    let (mut out, mut start, mut in_url, mut in_quote) = (Vec::new(), 0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            '<' if !in_quote => in_url = true,
            '>' if !in_quote => in_url = false,
            '"' if !in_url => in_quote = !in_quote,
            ',' if !in_url && !in_quote => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out
}

/// `<target>; p1; p2` → the target and its parameters.
fn parse_link(link: &str) -> Option<(&str, Vec<&str>)> {
    let link = link.trim();
    let rest = link.strip_prefix('<')?;
    let end = rest.find('>')?;
    let params = rest[end + 1..]
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    Some((&rest[..end], params))
}

/// `rel="next"`, `rel=next`, or a `rel` naming several relations, one of
/// them `next` (RFC 8288: relation types are case-insensitive).
fn is_rel_next(param: &str) -> bool {
    let Some((k, v)) = param.split_once('=') else {
        return false;
    };
    k.trim().eq_ignore_ascii_case("rel")
        && v.trim()
            .trim_matches('"')
            .split_ascii_whitespace()
            .any(|r| r.eq_ignore_ascii_case("next"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn links(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(LINK, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn base() -> Url {
        Url::parse("https://quay.example:8443/v2/org/app/tags/list").unwrap()
    }

    #[test]
    fn next_links_resolve_against_the_request() {
        let cases = [
            // distribution and Docker Hub: a tag name in `last`.
            (
                r#"</v2/org/app/tags/list?last=v9&n=100>; rel="next""#,
                "https://quay.example:8443/v2/org/app/tags/list?last=v9&n=100",
            ),
            // Quay: an opaque cursor, with commas and `=` inside the URL.
            (
                r#"</v2/org/app/tags/list?n=50&next_page=gAAAA,Bx=%3D>; rel="next""#,
                "https://quay.example:8443/v2/org/app/tags/list?n=50&next_page=gAAAA,Bx=%3D",
            ),
            // Absolute on the same server; unquoted rel; more relations.
            (
                "<https://quay.example:8443/v2/org/app/tags/list?last=x>; rel=next",
                "https://quay.example:8443/v2/org/app/tags/list?last=x",
            ),
            (
                r#"</v2/first>; rel="first", </v2/org/app/tags/list?c=2>; rel="prefetch NEXT""#,
                "https://quay.example:8443/v2/org/app/tags/list?c=2",
            ),
        ];
        for (header, want) in cases {
            let got = next_link(&links(&[header]), &base()).unwrap();
            assert_eq!(got.as_ref().map(Url::as_str), Some(want), "{header}");
        }
        // One header per link works as well as one joined header.
        let got = next_link(
            &links(&[r#"</a>; rel="prev""#, r#"</b?c=1>; rel="next""#]),
            &base(),
        )
        .unwrap();
        assert_eq!(got.unwrap().as_str(), "https://quay.example:8443/b?c=1");
    }

    #[test]
    fn the_last_page_has_no_next_link() {
        assert_eq!(next_link(&HeaderMap::new(), &base()).unwrap(), None);
        assert_eq!(
            next_link(&links(&[r#"</v2/x>; rel="prev""#, "garbage"]), &base()).unwrap(),
            None
        );
    }

    #[test]
    fn a_link_to_another_server_is_refused() {
        for header in [
            r#"<https://evil.example/v2/org/app/tags/list?last=v9>; rel="next""#,
            r#"<http://quay.example:8443/v2/org/app/tags/list>; rel="next""#,
            r#"<https://quay.example/v2/org/app/tags/list>; rel="next""#,
            r#"<//evil.example/v2/x>; rel="next""#,
        ] {
            let e = next_link(&links(&[header]), &base()).unwrap_err();
            assert!(e.contains("another server"), "{header}: {e}");
        }
    }

    #[test]
    fn pages_are_parsed_by_kind() {
        let tags = br#"{"name":"org/app","tags":["a","b"]}"#;
        assert_eq!(page_names(ListKind::Tags, tags).unwrap(), ["a", "b"]);
        assert!(
            page_names(ListKind::Tags, br#"{"name":"x","tags":null}"#)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            page_names(ListKind::Catalog, br#"{"repositories":["x/y"]}"#).unwrap(),
            ["x/y"]
        );
        for bad in [&b"<html>"[..], br#"{"tags":"a"}"#, br#"{"tags":[1]}"#] {
            assert!(page_names(ListKind::Tags, bad).is_err());
        }
    }
}
