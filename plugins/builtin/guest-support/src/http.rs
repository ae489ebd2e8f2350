//! The HTTP requests a provider asks the host to send, before the host fills in the secret
//! placeholders, and what it needs to build their URLs and read their headers.

use serde_json::Value;

/// One request to the forge's API, before the host fills in placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl HttpRequest {
    /// A `POST` of `body` as JSON with `headers` (the content type is added here).
    pub fn post_json(url: String, mut headers: Vec<(String, String)>, body: &Value) -> HttpRequest {
        headers.push(("Content-Type".to_string(), "application/json".to_string()));
        HttpRequest {
            method: "POST".to_string(),
            url,
            headers,
            body: Some(body.to_string().into_bytes()),
        }
    }

    /// A `GET` of `url` with `headers` and no body.
    pub fn get(url: String, headers: Vec<(String, String)>) -> HttpRequest {
        HttpRequest {
            method: "GET".to_string(),
            url,
            headers,
            body: None,
        }
    }

    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// The forge's answer to an [`HttpRequest`], as far as a provider reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The value of the first header called `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(header_name, _)| header_name.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

/// `?key=value&...` with every key and value percent-encoded (RFC 3986 unreserved characters
/// are kept as they are).
pub fn query_string(pairs: &[(&str, &str)]) -> String {
    let joined: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{}={}", encode_path_component(key), encode_path_component(value)))
        .collect();
    format!("?{}", joined.join("&"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so that `group/sub/project`
/// becomes one path segment `group%2Fsub%2Fproject`.
pub fn encode_path_component(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_path_components_are_percent_encoded() {
        assert_eq!(
            query_string(&[("head", "acme:flotilla/x y"), ("state", "open")]),
            "?head=acme%3Aflotilla%2Fx%20y&state=open"
        );
        assert_eq!(
            encode_path_component("group/sub/my project"),
            "group%2Fsub%2Fmy%20project"
        );
        assert_eq!(encode_path_component("a-b_c.d~e"), "a-b_c.d~e");
    }

    #[test]
    fn headers_match_case_insensitively() {
        let headers = vec![("x-github-event".to_string(), "push".to_string())];
        assert_eq!(header(&headers, "X-GitHub-Event"), Some("push"));
        assert_eq!(header(&headers, "X-Gitlab-Event"), None);
    }
}
