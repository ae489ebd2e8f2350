//! Renewing a machine's session credentials (an AWS role's) while its agent runs: the node
//! writes them into a file inside the machine (`RenewableCredentials::machine_path`, mode
//! 0600, owned by the machine's user), replaced whole by a rename so that a reader never sees
//! half a file, and rewrites it with new credentials before the current ones expire. A failed
//! renewal is told to watchers at once and recorded as a log event with the next turn; the
//! machine keeps the current credentials until they expire, and the renewal is tried again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_raft::{AgentId, NodeId, Replica};
use flotilla_sandbox::ExecRequest;

use crate::machine::RunningMachine;
use crate::mesh::Mesh;
use crate::run::RunNotes;
use crate::secrets::{CredentialsFile, Redactor, RenewableCredentials, SecretValues, SharedRedactor};

/// After a failed renewal, the next try comes this long after (or sooner, at the expiry).
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Writing the file in the machine.
const WRITE_TIMEOUT_MS: u64 = 10_000;
/// The variable that carries the file's text into the writing command (never its arguments,
/// which other processes can read).
const TEXT_VARIABLE: &str = "FLOTILLA_CREDENTIALS_TEXT";
const PATH_VARIABLE: &str = "FLOTILLA_CREDENTIALS_PATH";

pub(super) struct Renewal {
    pub agent: AgentId,
    pub node: NodeId,
    pub replica: Replica,
    pub mesh: Mesh,
    pub machine: Arc<RunningMachine>,
    /// What the machine got at the start: with the current credentials, what is redacted.
    pub secrets: SecretValues,
    pub redactor: SharedRedactor,
    pub notes: RunNotes,
}

impl Renewal {
    /// Writes the first generation; a failure is reported (the variables still hold it).
    pub async fn write_initial(&self, renewable: &RenewableCredentials) {
        if let Err(error) = write_file(&self.machine, &renewable.machine_path, &renewable.current.text).await {
            self.report(format!(
                "the credentials file {} could not be written in the machine: {error}",
                renewable.machine_path
            ));
        }
    }

    /// Renews before each expiry for as long as the task lives (the agent actor aborts it).
    pub async fn run(self, renewable: RenewableCredentials) {
        let RenewableCredentials {
            machine_path,
            mut current,
            renewer,
        } = renewable;
        let mut next_try = current.renew_at;
        loop {
            tokio::time::sleep(until(next_try)).await;
            let renewed = match renewer.renew().await {
                Ok(renewed) => renewed,
                Err(error) => {
                    self.report(format!(
                        "renewing the credentials of {} failed: {error}; the machine keeps the current ones, which expire in {} s",
                        renewer.describe(),
                        until(current.expires_at).as_secs()
                    ));
                    next_try =
                        SystemTime::now() + RETRY_AFTER.min(until(current.expires_at)).max(Duration::from_secs(1));
                    continue;
                }
            };
            // New values are redacted before the machine can print them.
            self.redactor.replace(self.redactor_for(&current, &renewed));
            if let Err(error) = write_file(&self.machine, &machine_path, &renewed.text).await {
                self.report(format!(
                    "the renewed credentials of {} could not be written to {machine_path}: {error}",
                    renewer.describe()
                ));
                next_try = SystemTime::now() + RETRY_AFTER;
                continue;
            }
            tracing::info!(agent = %self.agent, path = %machine_path, "renewed the machine's session credentials");
            next_try = renewed.renew_at;
            current = renewed;
        }
    }

    /// The machine's secrets with the previous and the new credentials (the previous ones stay
    /// valid until they expire, and a process may still print them).
    fn redactor_for(&self, previous: &CredentialsFile, renewed: &CredentialsFile) -> Redactor {
        let pairs = self
            .secrets
            .values
            .iter()
            .chain(&self.secrets.also_redacted)
            .chain(&renewed.secret_values)
            .chain(&previous.secret_values);
        Redactor::new(pairs.map(|(name, value)| (name.as_str(), value.as_str())))
    }

    /// Tells watchers now and records a log event with the next turn.
    fn report(&self, text: String) {
        tracing::warn!(agent = %self.agent, "{text}");
        let text = self.redactor.redact(&text).into_owned();
        let sequence = self
            .replica
            .reader()
            .read(|state| state.agents.get(&self.agent).map(|agent| agent.last_sequence))
            .unwrap_or(0);
        self.mesh.publish(
            &self.agent.to_string(),
            super::live_log_event(self.agent, self.node, sequence, text.clone()),
        );
        self.notes.push(text);
    }
}

fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Writes `text` to `path` inside the machine, as the machine's user: a temporary file made
/// with mode 0600 in the same directory, then renamed over the old one.
async fn write_file(machine: &RunningMachine, path: &str, text: &str) -> Result<(), String> {
    let mut request = ExecRequest::new(format!(
        "umask 077 && mkdir -p \"$(dirname \"${PATH_VARIABLE}\")\" && printf '%s' \"${TEXT_VARIABLE}\" > \"${PATH_VARIABLE}.new\" && mv -f \"${PATH_VARIABLE}.new\" \"${PATH_VARIABLE}\""
    ))
    .with_timeout_ms(WRITE_TIMEOUT_MS);
    request.env = vec![
        (PATH_VARIABLE.to_string(), path.to_string()),
        (TEXT_VARIABLE.to_string(), text.to_string()),
    ];
    let output = machine.exec(request).await.map_err(|error| error.to_string())?;
    if output.success() {
        Ok(())
    } else {
        Err(format!("the write ended with {}", output.stderr_text().trim()))
    }
}
