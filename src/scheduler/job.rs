//! A job's life as a pure state machine, tested from a table. Jobs only move forward
//! (queued → in progress → completed), so duplicated, redelivered and reordered
//! deliveries change nothing once a later state is known.

use crate::model::{JobAction, JobInfo, JobState};

/// The job's next state after an event, or `None` when the event changes nothing.
/// `current` is `None` for a job not seen before. `scale_set`: the event is a scale set's
/// (its messages come in order): a request the set gave up on, `cancelled` with no runner,
/// and assigned to it again (GitHub may offer it again under the same request) is queued
/// again; but one cancelled after a runner took it is done (its `JobAssigned` seen again,
/// in a message the service groups anew after a crash, is old news). A webhook's `queued`
/// after its `completed` is one reordered, and changes nothing.
pub fn next(current: Option<&JobState>, action: JobAction, info: &JobInfo, scale_set: bool) -> Option<JobState> {
    use JobAction as A;
    use JobState as S;
    let in_progress = || S::InProgress { runner: info.runner_name.clone() };
    // The runner its completion names, or else the one it started on.
    let completed = || {
        let started = match current {
            Some(S::InProgress { runner }) => runner.clone(),
            _ => None,
        };
        S::Completed { conclusion: info.conclusion.clone(), runner: info.runner_name.clone().or(started) }
    };
    match (current, action) {
        // `waiting` (environment approval) is followed by `queued` when the job may run.
        (_, A::Waiting) => None,
        (None, A::Queued) => Some(S::Queued),
        (None, A::InProgress) => Some(in_progress()),
        (None, A::Completed) => Some(completed()),
        (Some(S::Queued), A::InProgress) => Some(in_progress()),
        (Some(S::InProgress { runner: None }), A::InProgress) if info.runner_name.is_some() => Some(in_progress()),
        (Some(S::Queued | S::InProgress { .. } | S::Abandoned { .. }), A::Completed) => Some(completed()),
        (Some(S::Completed { conclusion: Some(c), runner: None }), A::Queued) if scale_set && c == "cancelled" => {
            Some(S::Queued)
        }
        // Anything else is a duplicate, or news older than what is known.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobAction::*;

    fn info(runner: Option<&str>, conclusion: Option<&str>) -> JobInfo {
        JobInfo {
            id: 1,
            run_id: 1,
            run_attempt: 1,
            name: String::new(),
            workflow_name: String::new(),
            labels: vec![],
            repository: "o/r".into(),
            html_url: String::new(),
            runner_name: runner.map(str::to_string),
            conclusion: conclusion.map(str::to_string),
            scale_set: None,
        }
    }

    #[test]
    fn transition_table() {
        let q = JobState::Queued;
        let ip = |r: Option<&str>| JobState::InProgress { runner: r.map(str::to_string) };
        let done = |c: &str| JobState::Completed { conclusion: Some(c.into()), runner: None };
        let ran = |c: &str, r: &str| JobState::Completed { conclusion: Some(c.into()), runner: Some(r.into()) };
        let gave_up = JobState::Abandoned { reason: "x".into() };
        let r = Some("rv-p-1");
        #[rustfmt::skip]
        let table: Vec<(Option<JobState>, JobAction, JobInfo, Option<JobState>)> = vec![
            (None, Queued, info(None, None), Some(q.clone())),
            (None, Waiting, info(None, None), None),
            (None, InProgress, info(r, None), Some(ip(r))),
            (None, Completed, info(None, Some("cancelled")), Some(done("cancelled"))),
            (Some(q.clone()), Queued, info(None, None), None),
            (Some(q.clone()), Waiting, info(None, None), None),
            (Some(q.clone()), InProgress, info(r, None), Some(ip(r))),
            (Some(q.clone()), Completed, info(None, Some("cancelled")), Some(done("cancelled"))),
            (Some(ip(r)), Queued, info(None, None), None),
            (Some(ip(r)), InProgress, info(r, None), None),
            (Some(ip(None)), InProgress, info(r, None), Some(ip(r))),
            (Some(ip(r)), Completed, info(r, Some("success")), Some(ran("success", "rv-p-1"))),
            (Some(ip(r)), Completed, info(None, Some("cancelled")), Some(ran("cancelled", "rv-p-1"))),
            (Some(ip(None)), Completed, info(None, Some("cancelled")), Some(done("cancelled"))),
            (Some(q.clone()), Completed, info(r, Some("cancelled")), Some(ran("cancelled", "rv-p-1"))),
            (Some(done("success")), Queued, info(None, None), None),
            (Some(done("success")), InProgress, info(r, None), None),
            (Some(done("success")), Completed, info(r, Some("failure")), None),
            (Some(gave_up.clone()), Queued, info(None, None), None),
            (Some(gave_up.clone()), InProgress, info(r, None), None),
            (Some(gave_up), Completed, info(None, Some("cancelled")), Some(done("cancelled"))),
        ];
        for (current, action, info, want) in table {
            assert_eq!(next(current.as_ref(), action, &info, false), want, "{current:?} + {action:?}");
        }
    }

    /// A scale set's request it gave up on (`cancelled`, no runner) and assigned to it again
    /// is queued again; a webhook's `queued` after `completed` is reordered news; a request
    /// that ran, or was cancelled once a runner took it, is never queued again (its
    /// `JobAssigned` seen again under another message id after a crash: helper-64's F1).
    #[test]
    fn a_scale_sets_request_given_up_and_assigned_again_is_queued_again() {
        let done = |c: &str, r: Option<&str>| JobState::Completed {
            conclusion: Some(c.into()),
            runner: r.map(str::to_string),
        };
        let (q, none) = (Some(JobState::Queued), info(None, None));
        assert_eq!(next(Some(&done("cancelled", None)), Queued, &none, true), q);
        assert_eq!(next(Some(&done("cancelled", None)), Queued, &none, false), None, "a webhook's, reordered");
        assert_eq!(next(Some(&done("success", None)), Queued, &none, true), None);
        assert_eq!(next(Some(&done("cancelled", Some("rv-p-1"))), Queued, &none, true), None, "it ran");
        assert_eq!(next(Some(&JobState::Queued), Queued, &none, true), None);
        // Its life as a crash replays it: assigned, started, cancelled (the completion names
        // no runner), then its assignment again in a message grouped anew.
        let r = Some("rv-p-1");
        let started = next(q.as_ref(), InProgress, &info(r, None), true);
        let cancelled = next(started.as_ref(), Completed, &info(None, Some("cancelled")), true);
        assert_eq!(cancelled, Some(done("cancelled", r)));
        assert_eq!(next(cancelled.as_ref(), Queued, &none, true), None);
    }

    /// A store written before the runner was kept reads as none.
    #[test]
    fn a_completed_job_stored_without_its_runner_reads_as_none() {
        let old: JobState = serde_json::from_str(r#"{"state":"completed","conclusion":"success"}"#).unwrap();
        assert_eq!(old, JobState::Completed { conclusion: Some("success".into()), runner: None });
        let none = JobState::Completed { conclusion: None, runner: None };
        assert_eq!(serde_json::to_string(&none).unwrap(), r#"{"state":"completed","conclusion":null}"#);
    }
}
