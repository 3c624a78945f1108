//! A job's life as a pure state machine, tested from a table. Jobs only move forward
//! (queued → in progress → completed), so duplicated, redelivered and reordered
//! deliveries change nothing once a later state is known.

use crate::model::{JobAction, JobInfo, JobState};

/// The job's next state after an event, or `None` when the event changes nothing.
/// `current` is `None` for a job not seen before. `scale_set`: the event is a scale set's
/// (its messages come in order): a request the set gave up on, `cancelled` with no runner,
/// and assigned to it again (GitHub may offer it again under the same request) is queued
/// again; a webhook's `queued` after its `completed` is one reordered, and changes nothing.
pub fn next(current: Option<&JobState>, action: JobAction, info: &JobInfo, scale_set: bool) -> Option<JobState> {
    use JobAction as A;
    use JobState as S;
    let in_progress = || S::InProgress { runner: info.runner_name.clone() };
    let completed = || S::Completed { conclusion: info.conclusion.clone() };
    match (current, action) {
        // `waiting` (environment approval) is followed by `queued` when the job may run.
        (_, A::Waiting) => None,
        (None, A::Queued) => Some(S::Queued),
        (None, A::InProgress) => Some(in_progress()),
        (None, A::Completed) => Some(completed()),
        (Some(S::Queued), A::InProgress) => Some(in_progress()),
        (Some(S::InProgress { runner: None }), A::InProgress) if info.runner_name.is_some() => Some(in_progress()),
        (Some(S::Queued | S::InProgress { .. } | S::Abandoned { .. }), A::Completed) => Some(completed()),
        (Some(S::Completed { conclusion: Some(c) }), A::Queued) if scale_set && c == "cancelled" => Some(S::Queued),
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
        let done = |c: &str| JobState::Completed { conclusion: Some(c.into()) };
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
            (Some(ip(r)), Completed, info(r, Some("success")), Some(done("success"))),
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
    /// that ran is never queued again.
    #[test]
    fn a_scale_sets_request_given_up_and_assigned_again_is_queued_again() {
        let done = |c: &str| JobState::Completed { conclusion: Some(c.into()) };
        let (q, none) = (Some(JobState::Queued), info(None, None));
        assert_eq!(next(Some(&done("cancelled")), Queued, &none, true), q);
        assert_eq!(next(Some(&done("cancelled")), Queued, &none, false), None, "a webhook's, reordered");
        assert_eq!(next(Some(&done("success")), Queued, &none, true), None);
        assert_eq!(next(Some(&JobState::Queued), Queued, &none, true), None);
    }
}
