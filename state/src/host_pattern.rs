//! Host patterns: how an egress allowlist, a plugin's granted hosts and the node's config name
//! the hosts something may reach. Parsed by one function so that every place agrees on the
//! same port rule.
