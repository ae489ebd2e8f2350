//! Loopback etcd clusters for `flotilla-bench compare`: `etcd` processes (Debian package
//! `etcd-server`) in a temporary directory, one data directory each, stopped and removed again
//! whatever way the bench ends. They run etcd's default durability: the WAL is fsynced before a
//! write is acknowledged.
//!
//! With [`EtcdTransport::Tls`] the members speak TLS as Flotilla's nodes do: to clients with a
//! server certificate (clients check it against the CA; a Flotilla client authenticates with
//! a bearer token, not a certificate), and to each other with mutual TLS. The bench makes a CA
//! and one certificate for loopback in the cluster's directory.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::local_cluster::{log_tail, signal_process_group};

/// Time for a loopback etcd cluster to start and elect a leader.
const CLUSTER_READY_TIMEOUT_MS: u64 = 60_000;
const READINESS_POLL_INTERVAL_MS: u64 = 100;
/// A readiness probe (connect and status) slower than this counts as "not ready yet".
const PROBE_TIMEOUT_MS: u64 = 2_000;
/// After SIGTERM a member gets this long to exit before its process group is killed.
const MEMBER_SHUTDOWN_GRACE_MS: u64 = 5_000;

/// How clients reach the members and the members reach each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EtcdTransport {
    /// TLS to clients (server certificate) and between members (mutual), as Flotilla does.
    Tls,
    /// Plaintext everywhere.
    Plaintext,
}

impl EtcdTransport {
    pub fn name(self) -> &'static str {
        match self {
            EtcdTransport::Tls => "TLS",
            EtcdTransport::Plaintext => "plaintext",
        }
    }
}

/// The files of a TLS cluster: the CA clients trust, and the members' certificate and key.
struct TlsFiles {
    ca_pem: String,
    ca: PathBuf,
    certificate: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    /// A new CA and a certificate it signed for 127.0.0.1 and localhost, usable by a server
    /// and a client (members present it to each other), written into `directory`.
    fn create(directory: &Path) -> anyhow::Result<TlsFiles> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().context("generating the etcd CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "flotilla-bench etcd CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_certificate = ca_params.self_signed(&ca_key).context("signing the etcd CA")?;
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .context("naming the etcd members' certificate")?;
        params
            .distinguished_name
            .push(DnType::CommonName, "flotilla-bench etcd member");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().context("generating the etcd members' key")?;
        let certificate = params
            .signed_by(&key, &Issuer::new(ca_params, &ca_key))
            .context("signing the etcd members' certificate")?;
        let files = TlsFiles {
            ca_pem: ca_certificate.pem(),
            ca: directory.join("ca.pem"),
            certificate: directory.join("member.pem"),
            key: directory.join("member.key"),
        };
        for (path, contents) in [
            (&files.ca, files.ca_pem.as_str()),
            (&files.certificate, &certificate.pem()),
            (&files.key, &key.serialize_pem()),
        ] {
            std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(files)
    }
}

/// An `etcd` process started by the bench.
struct EtcdMember {
    name: String,
    client_url: String,
    log_path: PathBuf,
    child: Child,
}

/// etcd members on loopback in a temporary directory. Dropping it stops every member and
/// removes the directory, so no path out of the bench (error, panic, Ctrl-C) leaves processes
/// or data behind.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    tls: Option<TlsFiles>,
    // Declared last so that it is removed after the members are stopped.
    directory: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `member_count` members of `etcd_binary` as one new cluster and waits until every
    /// member answers and sees the same leader.
    pub async fn start(etcd_binary: &Path, member_count: usize, transport: EtcdTransport) -> anyhow::Result<Self> {
        let directory = tempfile::Builder::new()
            .prefix("flotilla-bench-etcd-")
            .tempdir()
            .context("creating a temporary directory for the etcd cluster")?;
        let tls = match transport {
            EtcdTransport::Tls => Some(TlsFiles::create(directory.path())?),
            EtcdTransport::Plaintext => None,
        };
        let mut cluster = EtcdCluster {
            members: Vec::with_capacity(member_count),
            tls,
            directory,
        };
        let ports = free_ports(member_count * 2)?;
        let (client_ports, peer_ports) = ports.split_at(member_count);
        let scheme = cluster.scheme();
        let peer_url = |index: usize| format!("{scheme}://127.0.0.1:{}", peer_ports[index]);
        let initial_cluster: Vec<String> = (0..member_count)
            .map(|index| format!("m{}={}", index + 1, peer_url(index)))
            .collect();
        let initial_cluster = initial_cluster.join(",");
        // A fresh token per run, so that members of an earlier run can never talk to this one.
        let cluster_token = format!("flotilla-bench-{:08x}", rand::random::<u32>());
        for (index, &client_port) in client_ports.iter().enumerate() {
            cluster.spawn_member(
                etcd_binary,
                index + 1,
                client_port,
                &peer_url(index),
                &initial_cluster,
                &cluster_token,
            )?;
        }
        cluster.wait_until_healthy().await?;
        Ok(cluster)
    }

    pub fn directory(&self) -> &Path {
        self.directory.path()
    }

    /// The members' process ids, for reading their CPU time under /proc.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|member| member.child.id()).collect()
    }

    /// The members' client URLs (`http://127.0.0.1:PORT`, or `https://`), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|member| member.client_url.clone()).collect()
    }

    /// The URL scheme of the members' client and peer URLs.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Options for a client of this cluster: the CA to check the members against, with TLS.
    pub fn connect_options(&self, connect_timeout: Duration) -> etcd_client::ConnectOptions {
        let options = etcd_client::ConnectOptions::new().with_connect_timeout(connect_timeout);
        match &self.tls {
            Some(tls) => options.with_tls(
                etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem)),
            ),
            None => options,
        }
    }

    fn spawn_member(
        &mut self,
        etcd_binary: &Path,
        number: usize,
        client_port: u16,
        peer_url: &str,
        initial_cluster: &str,
        cluster_token: &str,
    ) -> anyhow::Result<()> {
        let name = format!("m{number}");
        let data_dir = self.directory().join(&name);
        let log_path = self.directory().join(format!("{name}.log"));
        let log = File::create(&log_path).with_context(|| format!("creating the log file {}", log_path.display()))?;
        let log_for_stderr = log.try_clone().context("duplicating the etcd log handle")?;
        let client_url = format!("{}://127.0.0.1:{client_port}", self.scheme());
        let mut command = Command::new(etcd_binary);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.certificate)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--peer-cert-file")
                .arg(&tls.certificate)
                .arg("--peer-key-file")
                .arg(&tls.key)
                .arg("--peer-trusted-ca-file")
                .arg(&tls.ca)
                .arg("--peer-client-cert-auth");
        }
        command
            .args(["--name", &name])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", peer_url])
            .args(["--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-token", cluster_token])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            // Its own process group, so that the terminal's Ctrl-C reaches the bench, which
            // stops the member through Drop.
            .process_group(0);
        let child = command.spawn().with_context(|| {
            format!(
                "starting {} (etcd comes with the Debian package etcd-server; scripts/setup installs it, or pass --etcd-binary)",
                etcd_binary.display()
            )
        })?;
        self.members.push(EtcdMember {
            name,
            client_url,
            log_path,
            child,
        });
        Ok(())
    }

    /// Fails with the member's log tail if any member has exited.
    fn ensure_all_running(&mut self) -> anyhow::Result<()> {
        for member in &mut self.members {
            if let Some(status) = member.child.try_wait().context("checking an etcd member")? {
                bail!(
                    "etcd member {} exited early ({status}); last lines of {}:\n{}",
                    member.name,
                    member.log_path.display(),
                    log_tail(&member.log_path)
                );
            }
        }
        Ok(())
    }

    /// Polls every member's status until all of them name the same leader.
    async fn wait_until_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(CLUSTER_READY_TIMEOUT_MS);
        loop {
            self.ensure_all_running()?;
            let mut leaders = Vec::with_capacity(self.members.len());
            let mut last_observation = String::new();
            for member in &self.members {
                match member_leader(
                    &member.client_url,
                    self.connect_options(Duration::from_millis(PROBE_TIMEOUT_MS)),
                )
                .await
                {
                    Ok(leader) if leader != 0 => leaders.push(leader),
                    Ok(_) => last_observation = format!("{} knows no leader yet", member.name),
                    Err(error) => last_observation = format!("{}: {error:#}", member.name),
                }
            }
            if leaders.len() == self.members.len() && leaders.windows(2).all(|pair| pair[0] == pair[1]) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|member| format!("--- {}:\n{}", member.log_path.display(), log_tail(&member.log_path)))
                    .collect();
                bail!(
                    "timed out after {CLUSTER_READY_TIMEOUT_MS} ms waiting for the etcd members to agree on a leader; last: {last_observation}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(READINESS_POLL_INTERVAL_MS)).await;
        }
    }
}

/// The leader member id one member reports (0: none).
async fn member_leader(client_url: &str, options: etcd_client::ConnectOptions) -> anyhow::Result<u64> {
    let probe = async {
        let mut client = etcd_client::Client::connect([client_url], Some(options)).await?;
        let status = client.status().await?;
        Ok::<u64, etcd_client::Error>(status.leader())
    };
    match tokio::time::timeout(Duration::from_millis(PROBE_TIMEOUT_MS), probe).await {
        Ok(answer) => answer.with_context(|| format!("asking {client_url} for its status")),
        Err(_elapsed) => bail!("no status from {client_url} within {PROBE_TIMEOUT_MS} ms"),
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // This may block a runtime thread for up to the grace period; it happens once, at the
        // end of a run or on the way out of an error.
        for member in &self.members {
            signal_process_group(&member.child, libc::SIGTERM);
        }
        let grace_deadline = Instant::now() + Duration::from_millis(MEMBER_SHUTDOWN_GRACE_MS);
        for member in &mut self.members {
            loop {
                match member.child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < grace_deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        // Still running, so its process group id cannot have been reused.
                        signal_process_group(&member.child, libc::SIGKILL);
                        let _ = member.child.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// `count` distinct free loopback ports. All are held open until every one is chosen, then
/// released before the members bind them: a small race that a bench can live with.
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).context("binding a loopback port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr().context("reading a bound port")?.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(6).unwrap();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6);
    }

    /// A real three-member cluster, in plaintext and with TLS: a write through one member is
    /// read back through another, a plaintext client is refused by a TLS cluster, and dropping
    /// the cluster stops every member and removes its directory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_started_cluster_replicates_and_is_gone_after_drop() {
        for transport in [EtcdTransport::Plaintext, EtcdTransport::Tls] {
            let cluster = EtcdCluster::start(Path::new("etcd"), 3, transport)
                .await
                .expect("etcd (Debian package etcd-server) starts a 3-member cluster");
            let endpoints = cluster.endpoints();
            assert_eq!(endpoints.len(), 3);
            let scheme = if transport == EtcdTransport::Tls {
                "https://"
            } else {
                "http://"
            };
            assert!(
                endpoints.iter().all(|endpoint| endpoint.starts_with(scheme)),
                "{endpoints:?}"
            );
            let options = || Some(cluster.connect_options(Duration::from_secs(5)));
            let mut writer = etcd_client::Client::connect([&endpoints[1]], options()).await.unwrap();
            writer.put("bench-probe", "written", None).await.unwrap();
            let mut reader = etcd_client::Client::connect([&endpoints[2]], options()).await.unwrap();
            let answer = reader.get("bench-probe", None).await.unwrap();
            assert_eq!(answer.kvs()[0].value(), b"written", "{transport:?}");
            if transport == EtcdTransport::Tls {
                let plaintext = endpoints[0].replace("https://", "http://");
                let refused = async {
                    let mut client = etcd_client::Client::connect([&plaintext], None).await?;
                    client.get("bench-probe", None).await
                };
                let refused = tokio::time::timeout(Duration::from_secs(3), refused).await;
                assert!(!matches!(refused, Ok(Ok(_))), "a TLS member answered a plaintext read");
            }

            let directory = cluster.directory().to_path_buf();
            let pids: Vec<u32> = cluster.members.iter().map(|member| member.child.id()).collect();
            drop(cluster);
            assert!(!directory.exists(), "{} is left behind", directory.display());
            for pid in pids {
                assert!(
                    !Path::new(&format!("/proc/{pid}")).exists(),
                    "etcd member {pid} still runs"
                );
            }
        }
    }
}
