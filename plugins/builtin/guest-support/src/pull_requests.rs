//! Reading a forge's answers about pull requests: the one a create opened, and the open one a
//! lookup found after the forge refused a second create.

use serde_json::Value;

use crate::error::{remote_failure, Failure};
use crate::json::{json_string, json_u64, parse_json, truncate_chars};
use crate::types::PullRequest;

/// Where a forge's pull request JSON holds its page and its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullRequestFields {
    /// JSON pointer of the pull request's web page: `/html_url`, `/links/html/href`.
    pub url_pointer: &'static str,
    /// JSON pointer of the number a person uses (GitLab's `iid`, not its global `id`).
    pub number_pointer: &'static str,
}

impl PullRequestFields {
    /// The pull request `value` describes, if it has both fields.
    fn read(self, value: &Value) -> Option<PullRequest> {
        Some(PullRequest {
            url: json_string(value, self.url_pointer)?,
            number: json_u64(value, self.number_pointer)?,
        })
    }
}

/// What a successful lookup of the open pull request of a head and base holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupAnswer {
    /// A list at this JSON pointer (`""` for a bare array) whose first item is the pull
    /// request; an empty list means none is open, and a 404 is the forge's error (the
    /// repository is missing).
    List { pointer: &'static str },
    /// The pull request itself; a 404 means there is none.
    Single,
}

/// How to read a lookup's answer: its shape, the pull request's fields, whether a pull request
/// the forge returned is still open (a forge that looks one up by branches may return a closed
/// one), and the forge's words in an error body.
#[derive(Clone, Copy)]
pub struct LookupReading {
    pub answer: LookupAnswer,
    pub fields: PullRequestFields,
    pub is_still_open: fn(&Value) -> bool,
    pub error_message: fn(&Value) -> Option<String>,
}

/// Reads a successful "create pull request" answer; a 2xx without the fields is a remote
/// error, since the pull request may or may not exist and the caller must not assume either.
pub fn created_pull_request(status: u16, body: &[u8], fields: PullRequestFields) -> Result<PullRequest, Failure> {
    match parse_json(body).and_then(|value| fields.read(&value)) {
        Some(pull_request) => Ok(pull_request),
        None => Err(remote_failure(
            status,
            Some(format!(
                "the forge answered {status} but the body has no {} and {}: {}",
                fields.url_pointer,
                fields.number_pointer,
                truncate_chars(String::from_utf8_lossy(body).trim(), 200)
            )),
            body,
        )),
    }
}

/// Reads the answer to a lookup of the open pull request of a head and base branch, sent when
/// the forge refused a create because one is already open (an earlier attempt opened it and its
/// answer was lost). Another status than 2xx (or a 404 for a single pull request) is the
/// forge's error, in its own words.
pub fn found_pull_request(status: u16, body: &[u8], reading: LookupReading) -> Result<Option<PullRequest>, Failure> {
    if status == 404 && reading.answer == LookupAnswer::Single {
        return Ok(None);
    }
    if !(200..300).contains(&status) {
        return Err(remote_failure(
            status,
            parse_json(body).and_then(|value| (reading.error_message)(&value)),
            body,
        ));
    }
    let Some(parsed) = parse_json(body) else {
        return Err(remote_failure(
            status,
            Some(format!(
                "the forge's answer to a pull request lookup is not JSON: {}",
                truncate_chars(String::from_utf8_lossy(body).trim(), 200)
            )),
            body,
        ));
    };
    let item = match reading.answer {
        LookupAnswer::Single => Some(&parsed),
        LookupAnswer::List { pointer } => match parsed.pointer(pointer).and_then(Value::as_array) {
            Some(items) => items.first(),
            None => {
                return Err(remote_failure(
                    status,
                    Some(format!(
                        "the forge's answer to a pull request lookup has no list at {pointer:?}"
                    )),
                    body,
                ))
            }
        },
    };
    let Some(item) = item.filter(|item| (reading.is_still_open)(item)) else {
        return Ok(None);
    };
    match reading.fields.read(item) {
        Some(pull_request) => Ok(Some(pull_request)),
        None => Err(remote_failure(
            status,
            Some(format!(
                "the forge's pull request has no {} and {}: {}",
                reading.fields.url_pointer,
                reading.fields.number_pointer,
                truncate_chars(&item.to_string(), 200)
            )),
            body,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTML_URL_AND_NUMBER: PullRequestFields = PullRequestFields {
        url_pointer: "/html_url",
        number_pointer: "/number",
    };

    fn reading(answer: LookupAnswer, fields: PullRequestFields) -> LookupReading {
        LookupReading {
            answer,
            fields,
            is_still_open: |_| true,
            error_message: |_| None,
        }
    }

    #[test]
    fn pull_request_lookups_read_lists_single_answers_and_not_found() {
        let bare_list = reading(LookupAnswer::List { pointer: "" }, HTML_URL_AND_NUMBER);
        let github = br#"[{"number": 7, "html_url": "https://github.com/acme/w/pull/7"}, {"number": 9}]"#;
        assert_eq!(
            found_pull_request(200, github, bare_list).unwrap(),
            Some(PullRequest {
                url: "https://github.com/acme/w/pull/7".to_string(),
                number: 7
            })
        );
        assert_eq!(found_pull_request(200, b"[]", bare_list).unwrap(), None);
        let bitbucket_fields = PullRequestFields {
            url_pointer: "/links/html/href",
            number_pointer: "/id",
        };
        let page = reading(LookupAnswer::List { pointer: "/values" }, bitbucket_fields);
        let bitbucket = br#"{"values": [{"id": 3, "links": {"html": {"href": "https://bitbucket.org/a/b/pull-requests/3"}}}], "page": 1}"#;
        assert_eq!(
            found_pull_request(200, bitbucket, page)
                .unwrap()
                .map(|found| found.number),
            Some(3)
        );
        let single = reading(LookupAnswer::Single, HTML_URL_AND_NUMBER);
        let gitea = br#"{"number": 4, "html_url": "http://h/a/b/pulls/4"}"#;
        assert_eq!(
            found_pull_request(200, gitea, single)
                .unwrap()
                .map(|found| found.number),
            Some(4)
        );
        assert_eq!(found_pull_request(404, b"{}", single).unwrap(), None);
        let closed = LookupReading {
            is_still_open: |item| item.get("state").is_none(),
            ..single
        };
        assert_eq!(
            found_pull_request(200, gitea, closed)
                .unwrap()
                .map(|found| found.number),
            Some(4)
        );
        let with_state = br#"{"number": 4, "html_url": "http://h/a/b/pulls/4", "state": "closed"}"#;
        assert_eq!(found_pull_request(200, with_state, closed).unwrap(), None);
    }

    #[test]
    fn malformed_lookup_answers_are_the_forges_errors() {
        let bare_list = reading(LookupAnswer::List { pointer: "" }, HTML_URL_AND_NUMBER);
        // A 404 on a list endpoint is the repository missing, not an empty list.
        assert!(matches!(
            found_pull_request(404, b"{}", bare_list),
            Err(Failure::Remote { status: 404, .. })
        ));
        let page = reading(LookupAnswer::List { pointer: "/values" }, HTML_URL_AND_NUMBER);
        assert!(matches!(
            found_pull_request(200, b"{\"values\": 1}", page),
            Err(Failure::Remote { .. })
        ));
        assert!(matches!(
            found_pull_request(200, b"[{\"number\": 1}]", bare_list),
            Err(Failure::Remote { .. })
        ));
        assert!(matches!(
            found_pull_request(200, b"<html>", bare_list),
            Err(Failure::Remote { .. })
        ));
    }

    #[test]
    fn a_created_answer_without_the_fields_is_an_error() {
        let body = br#"{"html_url":"https://x/1","number":1}"#;
        assert_eq!(
            created_pull_request(201, body, HTML_URL_AND_NUMBER),
            Ok(PullRequest {
                url: "https://x/1".to_string(),
                number: 1
            })
        );
        assert!(matches!(
            created_pull_request(201, b"{}", HTML_URL_AND_NUMBER),
            Err(Failure::Remote { status: 201, .. })
        ));
    }
}
