use super::*;

fn pattern(text: &str) -> HostPattern {
    text.parse()
        .unwrap_or_else(|error| panic!("pattern {text:?} should parse: {error}"))
}

fn host(text: &str) -> Host {
    text.parse()
        .unwrap_or_else(|error| panic!("host {text:?} should parse: {error}"))
}

#[test]
fn host_patterns_parse_names_wildcards_addresses_and_ports() {
    assert_eq!(pattern("example.com").to_string(), "example.com");
    assert_eq!(pattern("Example.COM.").to_string(), "example.com");
    assert_eq!(pattern("*.example.com").to_string(), "*.example.com");
    assert_eq!(pattern("*.example.com:443").to_string(), "*.example.com:443");
    assert_eq!(pattern("127.0.0.1:8080").to_string(), "127.0.0.1:8080");
    assert_eq!(pattern("[::1]:443").to_string(), "[::1]:443");
    assert_eq!(pattern("[0:0::1]").to_string(), "[::1]");
    assert_eq!(pattern(" registry.npmjs.org ").to_string(), "registry.npmjs.org");
    assert_eq!(pattern("example.com:8080").port(), Some(8080));
    assert_eq!(pattern("example.com").port(), None);
}

#[test]
fn bad_host_patterns_are_refused_with_an_error_naming_them() {
    let bad_patterns = [
        "",
        "*",
        "*:443",
        "*.",
        "foo*.example.com",
        "example.*.com",
        "a.*.com",
        "*.*.example.com",
        "example.com:0",
        "example.com:65536",
        "example.com:http",
        "host:notaport",
        "example.com:",
        "exa mple.com",
        "example..com",
        "http://example.com",
        "example.com/path",
        "host/path",
        "user@host",
        "::1",
        "[::1",
        "[not-ipv6]:80",
        "127.1",
        "0x7f000001",
        "*.0.1",
        "ex@mple.com",
    ];
    for bad_pattern in bad_patterns {
        let error = bad_pattern
            .parse::<HostPattern>()
            .expect_err(&format!("pattern {bad_pattern:?} should be refused"));
        assert_eq!(error.pattern, bad_pattern);
        let message = error.to_string();
        assert!(
            message.contains(&format!("{bad_pattern:?}")),
            "error for {bad_pattern:?} should name it: {message}"
        );
    }
}

#[test]
fn errors_say_why() {
    let cases = [
        ("", "pattern is empty"),
        ("*", "a bare \"*\" would allow every host"),
        ("a.*.com", "'*' is only allowed as the whole first label"),
        ("*.", "after \"*.\": host is empty"),
        ("example.com:0", "port 0 is not between 1 and 65535"),
        ("example.com:http", "port \"http\" is not a number"),
        ("127.1", "neither a dotted-quad IPv4 address"),
        ("::1", "IPv6 addresses must be bracketed"),
    ];
    for (text, reason) in cases {
        let message = text.parse::<HostPattern>().unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("invalid host pattern {text:?}: ")) && message.contains(reason),
            "{text:?}: {message}"
        );
    }
}

#[test]
fn wildcard_matches_subdomains_at_any_depth_but_not_the_apex() {
    let wildcard = pattern("*.example.com");
    assert!(wildcard.matches("api.example.com", 443));
    assert!(wildcard.matches("a.b.example.com", 80));
    assert!(wildcard.matches("API.Example.Com.", 443));
    assert!(!wildcard.matches("example.com", 443));
    assert!(!wildcard.matches("badexample.com", 443));
    assert!(!wildcard.matches("example.com.evil.org", 443));
    assert!(!wildcard.matches("example.org", 443));
    assert!(!wildcard.matches("[::1]", 443));
}

#[test]
fn a_port_in_the_pattern_restricts_the_port_and_its_absence_allows_any() {
    let with_port = pattern("example.com:443");
    assert!(with_port.matches("example.com", 443));
    assert!(!with_port.matches("example.com", 22));
    let without_port = pattern("example.com");
    assert!(without_port.matches("example.com", 443));
    assert!(without_port.matches("example.com", 22));
    let wildcard_with_port = pattern("*.example.com:8443");
    assert!(wildcard_with_port.matches("api.example.com", 8443));
    assert!(!wildcard_with_port.matches("api.example.com", 443));
}

#[test]
fn a_default_port_stands_for_the_port_a_pattern_does_not_write() {
    let without_port = pattern("example.com");
    let example = host("example.com");
    assert!(without_port.matches_host_on_default_port(&example, 443, Some(443)));
    assert!(!without_port.matches_host_on_default_port(&example, 8443, Some(443)));
    // A written port wins over the default.
    let with_port = pattern("example.com:8443");
    assert!(with_port.matches_host_on_default_port(&example, 8443, Some(443)));
    assert!(!with_port.matches_host_on_default_port(&example, 443, Some(443)));
}

#[test]
fn addresses_match_as_addresses() {
    assert!(pattern("[::1]").matches("[0::1]", 1));
    assert!(pattern("127.0.0.1:8080").matches("127.0.0.1", 8080));
    assert!(!pattern("127.0.0.1:8080").matches("127.0.0.2", 8080));
    // Numeric shorthands a resolver would accept are not hosts at all.
    assert!(!pattern("127.0.0.1").matches("127.1", 8080));
    assert!(!pattern("127.0.0.1").matches("2130706433", 8080));
}

#[test]
fn hosts_and_ports_split_and_parse() {
    assert_eq!(split_host_port("example.com:80"), Ok(("example.com", Some("80"))));
    assert_eq!(split_host_port("[::1]"), Ok(("[::1]", None)));
    assert_eq!(split_host_port("[::1]:443"), Ok(("[::1]", Some("443"))));
    assert!(split_host_port("[::1]x").is_err());
    assert_eq!(parse_port("65535"), Ok(65535));
    assert!(parse_port("+1").is_err());
    assert_eq!(host("Example.COM.").to_string(), "example.com");
    assert_eq!(host("[0::1]").to_string(), "[::1]");
}
