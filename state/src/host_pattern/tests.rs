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
    assert_eq!(pattern("10.0.0.0/8").to_string(), "10.0.0.0/8");
    assert_eq!(pattern("10.0.0.0/8:8443").to_string(), "10.0.0.0/8:8443");
    assert_eq!(pattern("[fd00:0::/8]").to_string(), "[fd00::/8]");
    assert_eq!(pattern("[fd00::/8]:443").to_string(), "[fd00::/8]:443");
    assert_eq!(pattern("[fd00::1]:8443").to_string(), "[fd00::1]:8443");
    assert_eq!(pattern("10.1.2.3/32").to_string(), "10.1.2.3/32");
}

#[test]
fn networks_match_the_addresses_inside_them_only() {
    let private = pattern("10.0.0.0/8");
    assert!(private.matches("10.0.0.5", 443));
    assert!(private.matches("10.255.255.255", 443));
    assert!(!private.matches("11.0.0.1", 443));
    assert!(!private.matches("[::ffff:10.0.0.5]", 443));
    assert!(!private.matches("ten.example", 443));
    let unique_local = pattern("[fd00::/8]:8443");
    assert!(unique_local.matches("[fd12::1]", 8443));
    assert!(!unique_local.matches("[fe80::1]", 8443));
    assert!(!unique_local.matches("10.0.0.5", 8443));
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
        "10.0.0.0/33",
        "10.0.0.0/0",
        "10.0.0.0/",
        "10.0.0.0/x",
        "10.1.0.0/8",
        "10.0/8",
        "example.com/8",
        "fd00::/8",
        "[fd00::]/8",
        "[fd00::/129]",
        "[fd00::1/8]",
        "[fd00::/8",
        "10.0.0.0/8:0",
        "10.0.0.0/8:65536",
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
        ("example.com:65536", "port 65536 is not between 1 and 65535"),
        ("   ", "pattern is empty"),
        (
            "10.0.0.0/33",
            "prefix length /33 is longer than the 32 bits of the address",
        ),
        ("[fd00::/129]", "prefix length /129 is longer than the 128 bits"),
        ("10.0.0.0/x", "prefix length \"x\" is not a number"),
        ("10.0.0.0/0", "a /0 network would allow every address"),
        (
            "10.1.0.0/8",
            "10.1.0.0/8 has bits set after its prefix; the network is 10.0.0.0/8",
        ),
        ("[fd00::1/8]", "the network is [fd00::/8]"),
        (
            "example.com/8",
            "network address \"example.com\" is not a dotted-quad IPv4 address",
        ),
        ("10.0/8", "network address \"10.0\""),
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
    assert!(wildcard.matches("a.b.example.com", 443));
    assert!(wildcard.matches("API.Example.Com.", 443));
    assert!(!wildcard.matches("example.com", 443));
    assert!(!wildcard.matches("badexample.com", 443));
    assert!(!wildcard.matches("example.com.evil.org", 443));
    assert!(!wildcard.matches("example.org", 443));
    assert!(!wildcard.matches("[::1]", 443));
}

#[test]
fn a_pattern_without_a_port_admits_443_only() {
    let with_port = pattern("example.com:8443");
    assert!(with_port.matches("example.com", 8443));
    assert!(!with_port.matches("example.com", 443));
    let without_port = pattern("example.com");
    assert!(without_port.matches("example.com", 443));
    assert!(!without_port.matches("example.com", 80));
    assert!(!without_port.matches("example.com", 22));
    let plain_http = pattern("example.com:80");
    assert!(plain_http.matches("example.com", 80));
    assert!(!plain_http.matches("example.com", 443));
    let wildcard_with_port = pattern("*.example.com:8443");
    assert!(wildcard_with_port.matches("api.example.com", 8443));
    assert!(!wildcard_with_port.matches("api.example.com", 443));
    assert!(pattern("*.example.com").matches("api.example.com", 443));
    assert!(pattern("10.0.0.0/8").matches("10.1.2.3", 443));
    assert!(!pattern("10.0.0.0/8").matches("10.1.2.3", 80));
}

#[test]
fn addresses_match_as_addresses() {
    assert!(pattern("[::1]").matches("[0::1]", 443));
    assert!(!pattern("[::1]").matches("[::1]", 1));
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

// --- the address rule ---

fn ip(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|error| panic!("{text:?} is an address: {error}"))
}

fn reachable(patterns: &[&str], port: u16, resolved: &[&str]) -> Result<Vec<IpAddr>, AddressRefusal> {
    let patterns: Vec<HostPattern> = patterns.iter().map(|text| pattern(text)).collect();
    let resolved: Vec<IpAddr> = resolved.iter().map(|text| ip(text)).collect();
    reachable_addresses(&patterns, "example.internal", port, &resolved)
}

#[test]
fn non_public_addresses_are_classified_with_their_kind() {
    let cases = [
        ("127.0.0.1", AddressKind::Loopback),
        ("127.255.0.9", AddressKind::Loopback),
        ("::1", AddressKind::Loopback),
        ("169.254.169.254", AddressKind::LinkLocal),
        ("fe80::1", AddressKind::LinkLocal),
        ("febf::1", AddressKind::LinkLocal),
        ("10.0.0.5", AddressKind::Private),
        ("172.16.0.1", AddressKind::Private),
        ("172.31.255.255", AddressKind::Private),
        ("192.168.1.1", AddressKind::Private),
        ("fc00::1", AddressKind::Private),
        ("fdff::1", AddressKind::Private),
        ("fec0::1", AddressKind::Private),
        ("100.64.0.1", AddressKind::Shared),
        ("100.127.255.255", AddressKind::Shared),
        ("224.0.0.1", AddressKind::Multicast),
        ("239.255.255.250", AddressKind::Multicast),
        ("ff02::1", AddressKind::Multicast),
        ("0.0.0.0", AddressKind::Unspecified),
        ("0.1.2.3", AddressKind::Unspecified),
        ("::", AddressKind::Unspecified),
        ("255.255.255.255", AddressKind::Broadcast),
    ];
    for (text, kind) in cases {
        let found = classify(ip(text)).unwrap_or_else(|| panic!("{text} is not public"));
        assert_eq!(found.kind, kind, "{text}");
        assert_eq!(found.embedded, None, "{text}");
    }
    for text in [
        "1.1.1.1",
        "8.8.8.8",
        "172.15.255.255",
        "172.32.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "169.253.0.1",
        "192.169.0.1",
        "223.255.255.255",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
    ] {
        assert_eq!(classify(ip(text)), None, "{text} is public");
    }
}

#[test]
fn ipv6_forms_of_non_public_ipv4_addresses_are_refused_as_what_they_embed() {
    let cases = [
        (
            "::ffff:127.0.0.1",
            EmbeddedIpv4::Mapped(Ipv4Addr::LOCALHOST),
            AddressKind::Loopback,
        ),
        (
            "::ffff:169.254.169.254",
            EmbeddedIpv4::Mapped(Ipv4Addr::new(169, 254, 169, 254)),
            AddressKind::LinkLocal,
        ),
        (
            "::10.0.0.5",
            EmbeddedIpv4::Compatible(Ipv4Addr::new(10, 0, 0, 5)),
            AddressKind::Private,
        ),
        (
            "::0.0.0.2",
            EmbeddedIpv4::Compatible(Ipv4Addr::new(0, 0, 0, 2)),
            AddressKind::Unspecified,
        ),
        (
            "64:ff9b::7f00:1",
            EmbeddedIpv4::Nat64(Ipv4Addr::LOCALHOST),
            AddressKind::Loopback,
        ),
    ];
    for (text, embedded, kind) in cases {
        let found = classify(ip(text)).unwrap_or_else(|| panic!("{text} is not public"));
        assert_eq!(
            found,
            NonPublicAddress {
                kind,
                embedded: Some(embedded)
            },
            "{text}"
        );
    }
    assert_eq!(
        classify(ip("::ffff:127.0.0.1")).map(|why| why.to_string()),
        Some("an IPv4-mapped form of 127.0.0.1, a loopback address".to_owned())
    );
}

proptest::proptest! {
    #[test]
    fn every_ipv4_address_and_its_mapped_form_are_classified_alike(bits: u32) {
        let v4 = Ipv4Addr::from(bits);
        let plain = classify(IpAddr::V4(v4)).map(|why| why.kind);
        let mapped = classify(IpAddr::V6(v4.to_ipv6_mapped()));
        proptest::prop_assert_eq!(plain, mapped.map(|why| why.kind));
        proptest::prop_assert_eq!(
            mapped.map(|why| why.embedded),
            plain.map(|_| Some(EmbeddedIpv4::Mapped(v4)))
        );
        // The standard library agrees where it has a stable answer.
        let std_non_public = v4.is_loopback() || v4.is_private() || v4.is_link_local()
            || v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified();
        if std_non_public {
            proptest::prop_assert!(plain.is_some(), "{} should not be public", v4);
        }
    }

    #[test]
    fn every_ipv6_address_in_a_non_public_range_is_refused(bits: u128, range in 0usize..5) {
        let (network, prefix_bits, kind) = [
            ("fe80::", 10, AddressKind::LinkLocal),
            ("fc00::", 7, AddressKind::Private),
            ("fd00::", 8, AddressKind::Private),
            ("ff00::", 8, AddressKind::Multicast),
            ("fec0::", 10, AddressKind::Private),
        ][range];
        let network = u128::from(network.parse::<Ipv6Addr>().expect("network"));
        let address = Ipv6Addr::from(network | (bits >> prefix_bits));
        proptest::prop_assert_eq!(classify(IpAddr::V6(address)).map(|why| why.kind), Some(kind));
    }

    #[test]
    fn a_listed_network_admits_every_address_inside_it(bits: u32, host_bits: u32, prefix in 1u8..=32) {
        let network = ipnet::Ipv4Net::new(Ipv4Addr::from(bits), prefix).expect("prefix in range").trunc();
        let listed = pattern(&format!("{network}:8443"));
        let inside = Ipv4Addr::from(u32::from(network.network()) | (host_bits & !u32::from(network.netmask())));
        proptest::prop_assert!(listed.matches_host(&Host::Ip(IpAddr::V4(inside)), 8443));
        proptest::prop_assert!(!listed.matches_host(&Host::Ip(IpAddr::V4(inside)), 443));
        let outside = Ipv4Addr::from(u32::from(inside) ^ (1u32 << (32 - u32::from(prefix))));
        proptest::prop_assert!(!listed.matches_host(&Host::Ip(IpAddr::V4(outside)), 8443));
    }
}

#[test]
fn a_name_resolving_to_a_non_public_address_is_refused_with_the_address_and_the_reason() {
    let refusal = reachable(&["example.internal"], 443, &["10.0.0.5"]).expect_err("private");
    assert_eq!(
        refusal.to_string(),
        "example.internal resolves to 10.0.0.5, a private address; list the address or its network to allow it"
    );
    let refusal = reachable(&["example.internal"], 443, &["::1", "127.0.0.1", "::1"]).expect_err("loopback");
    assert_eq!(
        refusal.to_string(),
        "example.internal resolves to [::1], a loopback address; list the address or its network to allow it \
         (1 more address was refused too)"
    );
    for (resolved, why) in [
        ("169.254.169.254", "a link-local address"),
        (
            "::ffff:127.0.0.1",
            "an IPv4-mapped form of 127.0.0.1, a loopback address",
        ),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("0.0.0.0", "an unspecified address"),
    ] {
        let message = reachable(&[], 443, &[resolved]).expect_err(resolved).to_string();
        assert!(message.contains(why), "{resolved}: {message}");
    }
    assert_eq!(
        reachable(&[], 443, &[]),
        Err(AddressRefusal::NoAddresses {
            name: "example.internal".to_owned()
        })
    );
}

#[test]
fn a_listed_address_or_network_admits_a_non_public_address_on_its_port() {
    assert_eq!(
        reachable(&["127.0.0.1:8080"], 8080, &["127.0.0.1"]),
        Ok(vec![ip("127.0.0.1")])
    );
    assert!(reachable(&["127.0.0.1:8080"], 8081, &["127.0.0.1"]).is_err());
    assert!(reachable(&["127.0.0.1"], 8080, &["127.0.0.1"]).is_err());
    assert_eq!(reachable(&["10.0.0.0/8"], 443, &["10.9.8.7"]), Ok(vec![ip("10.9.8.7")]));
    assert!(reachable(&["10.0.0.0/8"], 80, &["10.9.8.7"]).is_err());
    assert_eq!(
        reachable(&["[fd00::/8]:8443"], 8443, &["fd00::1"]),
        Ok(vec![ip("fd00::1")])
    );
    // A listed address does not admit its IPv4-mapped form.
    assert!(reachable(&["127.0.0.1:8080"], 8080, &["::ffff:127.0.0.1"]).is_err());
}

#[test]
fn a_mixed_answer_keeps_only_the_admitted_addresses_in_order() {
    assert_eq!(
        reachable(
            &[],
            443,
            &["10.0.0.5", "93.184.216.34", "::1", "2606:2800::1", "93.184.216.34"]
        ),
        Ok(vec![ip("93.184.216.34"), ip("2606:2800::1")])
    );
    assert_eq!(
        reachable(&["127.0.0.1:443"], 443, &["::1", "127.0.0.1"]),
        Ok(vec![ip("127.0.0.1")])
    );
}
