//! Where a run's text leaves it (live events, durable events, status writes), every secret
//! value its machine got is replaced by `[redacted:NAME]` (see [`crate::secrets::redact`]).

use flotilla_proto::v1;
use flotilla_proto::v1::agent_event::Kind;
use flotilla_raft::EventKind;

use crate::secrets::SharedRedactor as Redactor;

/// A live event with its text redacted.
pub(super) fn redact_live(redactor: &Redactor, mut kind: Kind) -> Kind {
    if redactor.is_empty() {
        return kind;
    }
    let texts: Vec<&mut String> = match &mut kind {
        Kind::StatusChanged(v1::StatusChanged { reason, .. }) => vec![reason],
        Kind::FollowUpAccepted(v1::FollowUpAccepted { text, .. })
        | Kind::Log(v1::LogLine { text })
        | Kind::AssistantDelta(v1::AssistantDelta { text })
        | Kind::AssistantMessage(v1::AssistantMessage { text, .. })
        | Kind::Summary(v1::Summary { text }) => vec![text],
        Kind::ToolCallStarted(started) => vec![&mut started.arguments],
        Kind::ToolCallFinished(finished) => vec![&mut finished.output],
        Kind::PushFailed(failed) => vec![&mut failed.error],
        Kind::PullRequestFailed(failed) => vec![&mut failed.error],
        Kind::CommitPushed(_) | Kind::TurnFinished(_) | Kind::PullRequestOpened(_) => Vec::new(),
    };
    for text in texts {
        redactor.redact_in_place(text);
    }
    kind
}

/// A durable event with its text redacted.
pub(super) fn redact_event(redactor: &Redactor, event: &mut EventKind) {
    if redactor.is_empty() {
        return;
    }
    let texts: Vec<&mut String> = match event {
        EventKind::StatusChanged { reason, .. } => vec![reason],
        EventKind::FollowUpAccepted { text, .. }
        | EventKind::Log { text }
        | EventKind::AssistantMessage { text, .. }
        | EventKind::Summary { text } => vec![text],
        EventKind::ToolCallFinished { arguments, output, .. } => vec![arguments, output],
        EventKind::PushFailed { error, .. } | EventKind::PullRequestFailed { error, .. } => vec![error],
        EventKind::CommitPushed { .. }
        | EventKind::TurnFinished { .. }
        | EventKind::PullRequestOpened { .. }
        | EventKind::CommitDisplaced { .. } => Vec::new(),
    };
    for text in texts {
        redactor.redact_in_place(text);
    }
}

/// Optional text redacted.
pub(super) fn redact_option(redactor: &Redactor, text: Option<String>) -> Option<String> {
    text.map(|text| redactor.redact(&text).into_owned())
}
