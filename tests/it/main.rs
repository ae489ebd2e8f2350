//! Flotilla's integration tests: one binary, numbered modules, so the link happens once.
//! Modules whose tests start several nodes run one at a time: `.config/nextest.toml` names
//! them in its `multi-node` test group, so a new multi-node module is added there too.
// An integration-test crate: its helpers fail the test by panicking, as its tests do, and
// clippy's allow-unwrap-in-tests covers only `#[test]` functions and `#[cfg(test)]` items.
#![allow(clippy::unwrap_used)]

mod common;
mod t00_harness;
mod t01_readme_tour;
mod t03_deploy_files;
mod t05_fakes;
mod t07_providers;
mod t10_single_node;
mod t11_transport_security;
mod t12_repository_policy;
mod t13_pki;
mod t15_cli_and_drain;
mod t16_observability;
mod t17_traces;
mod t18_agent_runs;
mod t19_push_containment;
mod t20_three_nodes;
mod t25_membership;
mod t26_partitions;
mod t27_local_cluster;
mod t28_region_cut;
mod t30_failover;
mod t32_leader_pause;
mod t32_ready_and_handover;
mod t33_clean_stop;
mod t40_watch_across_nodes;
mod t42_reads_through_any_node;
mod t43_tokens_through_any_node;
mod t50_machines;
mod t52_machines_outlive_no_node;
mod t55_plugins;
mod t56_plugins_everywhere;
mod t57_provider_hot_add;
mod t58_burst;
mod t60_secrets;
mod t61_aws_role;
mod t65_agent_failover;
mod t70_teams;
mod t71_audit_limits;
mod t72_limits_across_nodes;
mod t73_settings_retention;
mod t74_revocation_across_nodes;
mod t75_backup_restore;
mod t76_rolling_restart;
mod t77_follower_commit;
mod t90_chaos;
