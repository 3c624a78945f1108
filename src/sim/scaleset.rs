//! The simulator's Actions service for the scale-set pools: sets, one session per set, its
//! message queue, `acquirejobs` and JIT configs, on the simulated GitHub's jobs and
//! runners ([`super::github::Hub`]), as `github-sim`'s service plays them: a job a set's
//! labels cover is offered to it (`JobAvailable`, again 15 s later while not acquired),
//! acquired within the capacity the last poll announced (`JobAssigned`), run by any runner
//! of the set (`JobStarted`), and ends (`JobCompleted`); one acquired and not started
//! within a minute is given up on for the set and offered again under a new request
//! (failed after three). A session nobody polls for [`SESSION_IDLE`] is let go (another
//! create is refused while it lasts); its queue token lasts an hour (401, then a refresh;
//! a session gone answers 401 too). The API's faults (5xx, timeouts, rate limits) are the
//! simulated GitHub's, but for the REST API's rate limit, which holds back its own calls.

use std::time::Duration;

use super::github::{Kind, Set, SetSession, SimGitHub};
use crate::github::scaleset::{Message, ScaleSetInfo, ScaleSetSpec, ScaleSets, Session, SsError};
use crate::github::{Deleted, GhError, JitRunner};
use crate::secret::Secret;

/// How long the service keeps a session nobody polls.
pub const SESSION_IDLE: Duration = Duration::from_secs(120);

/// How long a message queue's token lasts.
const QUEUE_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// How long a poll waits for a message.
const POLL_WINDOW: Duration = Duration::from_secs(50);

/// How long a job not acquired waits before it is offered again (github-sim's: a quarter
/// of the time after which a job acquired and not started is offered again).
const REOFFER: Duration = Duration::from_secs(15);

/// Job messages in one message at most.
const MAX_BATCH: usize = 50;

pub struct SimScaleSets {
    pub gh: SimGitHub,
}

fn status(path: &str, status: u16, type_name: &str) -> SsError {
    SsError::Status {
        method: "X".into(),
        path: path.into(),
        status,
        type_name: type_name.into(),
        message: "simulated".into(),
    }
}

fn info(set: &Set) -> ScaleSetInfo {
    ScaleSetInfo { id: set.id, name: set.name.clone(), runner_group_id: 1, labels: set.labels.clone() }
}

fn session_of(set: &Set, statistics: crate::github::scaleset::Statistics) -> Option<Session> {
    let s = set.session.as_ref()?;
    Some(Session { id: s.id.clone(), queue_url: String::new(), queue_token: Secret::new(s.token.clone()), statistics })
}

/// A new session (or a refreshed one: another queue token) of `id`, heard of now.
fn new_session(hub: &mut super::github::Hub, id: String) -> SetSession {
    hub.next_session += 1;
    let now = hub.time.now();
    SetSession { id, seen: now, token: format!("mq-{}", hub.next_session), expires: now + QUEUE_TOKEN_TTL }
}

impl SimScaleSets {
    /// A call to the service: the simulated GitHub's faults, and its calls counted.
    async fn enter(&self, path: &str) -> Result<std::sync::MutexGuard<'_, super::github::Hub>, SsError> {
        // The service's answers as its client reads them.
        self.gh.enter_as(path, false).await.map_err(|e| match e {
            GhError::Status { method, path, status, message } => {
                SsError::Status { method, path, status, type_name: String::new(), message }
            }
            GhError::RateLimited { method, path, wait } => SsError::Status {
                method,
                path,
                status: 429,
                type_name: String::new(),
                message: format!("rate limited for {}s more", crate::github::whole_secs(wait)),
            },
            GhError::Transport { method, path, message } => SsError::Transport { method, path, message },
            other => SsError::GitHub(other),
        })
    }
}

/// The set whose live session is `session` (a session unpolled for [`SESSION_IDLE`] is
/// gone).
fn set_of_session(hub: &mut super::github::Hub, session: &str) -> Option<u64> {
    let now = hub.time.now();
    let set = hub.sets.values_mut().find(|s| s.session.as_ref().is_some_and(|x| x.id == session))?;
    if set.session.as_ref().is_some_and(|x| x.seen + SESSION_IDLE <= now) {
        set.session = None;
        return None;
    }
    Some(set.id)
}

/// The set of the message queue `session`'s token opens: as the service answers 401 to a
/// token expired or of a session gone, [`SsError::QueueToken`] otherwise (a refresh then
/// tells which).
fn set_of_queue(hub: &mut super::github::Hub, session: &Session) -> Result<u64, SsError> {
    let set = set_of_session(hub, &session.id).ok_or(SsError::QueueToken)?;
    let now = hub.time.now();
    let s = hub.sets[&set].session.as_ref();
    let live = s.is_some_and(|s| s.token == session.queue_token.expose() && now < s.expires);
    live.then_some(set).ok_or(SsError::QueueToken)
}

impl ScaleSets for SimScaleSets {
    async fn ensure(&self, spec: &ScaleSetSpec) -> Result<ScaleSetInfo, SsError> {
        let mut hub = self.enter("scale sets").await?;
        let labels = crate::model::label_set(&[spec.labels.as_slice(), std::slice::from_ref(&spec.name)].concat());
        if let Some(set) = hub.sets.values_mut().find(|s| s.name.eq_ignore_ascii_case(&spec.name)) {
            set.labels = labels;
            return Ok(info(set));
        }
        hub.next_set += 1;
        let id = hub.next_set;
        let set = Set { id, name: spec.name.clone(), labels, session: None, messages: Default::default(), capacity: 0 };
        hub.sets.insert(id, set);
        // The queued jobs it covers become its own.
        let queued: Vec<u64> = hub.jobs.keys().copied().collect();
        for job in queued {
            hub.route(job);
        }
        Ok(info(&hub.sets[&id]))
    }

    async fn find(&self, spec: &ScaleSetSpec) -> Result<Option<ScaleSetInfo>, SsError> {
        let hub = self.enter("scale sets").await?;
        Ok(hub.sets.values().find(|s| s.name.eq_ignore_ascii_case(&spec.name)).map(info))
    }

    async fn delete(&self, set_id: u64) -> Result<(), SsError> {
        let mut hub = self.enter("scale set delete").await?;
        hub.sets.remove(&set_id);
        Ok(())
    }

    async fn create_session(&self, set_id: u64, _owner: &str) -> Result<Session, SsError> {
        let mut hub = self.enter("session create").await?;
        let Some(set) = hub.sets.get(&set_id) else {
            return Err(status("sessions", 404, "RunnerScaleSetNotFoundException"));
        };
        if let Some(live) = set.session.clone()
            && set_of_session(&mut hub, &live.id).is_some()
        {
            return Err(SsError::Conflict(format!("the scale set {set_id} has an active session")));
        }
        let id = format!("session-{}", hub.next_session + 1);
        let session = new_session(&mut hub, id);
        let statistics = hub.statistics(set_id);
        let set = hub.sets.get_mut(&set_id).expect("found");
        set.session = Some(session);
        Ok(session_of(set, statistics).expect("made"))
    }

    async fn refresh_session(&self, set_id: u64, session_id: &str) -> Result<Session, SsError> {
        let mut hub = self.enter("session refresh").await?;
        if set_of_session(&mut hub, session_id) != Some(set_id) {
            return Err(SsError::SessionGone(format!("session {session_id}")));
        }
        let session = new_session(&mut hub, session_id.to_string());
        let statistics = hub.statistics(set_id);
        let set = hub.sets.get_mut(&set_id).expect("found");
        set.session = Some(session);
        Ok(session_of(set, statistics).expect("live"))
    }

    async fn delete_session(&self, set_id: u64, session_id: &str) -> Result<(), SsError> {
        let mut hub = self.enter("session delete").await?;
        if let Some(set) = hub.sets.get_mut(&set_id)
            && set.session.as_ref().is_some_and(|s| s.id == session_id)
        {
            set.session = None;
        }
        Ok(())
    }

    async fn poll(&self, session: &Session, last: u64, capacity: u64) -> Result<Option<Message>, SsError> {
        drop(self.enter("message poll").await?);
        let deadline = self.gh.lock().time.now() + POLL_WINDOW;
        loop {
            {
                let mut hub = self.gh.lock();
                let set = set_of_queue(&mut hub, session)?;
                hub.reassign_stale(set);
                hub.reoffer(set, REOFFER);
                let now = hub.time.now();
                let statistics = hub.statistics(set);
                let s = hub.sets.get_mut(&set).expect("found");
                s.capacity = capacity;
                if let Some(x) = s.session.as_mut() {
                    x.seen = now;
                }
                let batch: Vec<(u64, _)> =
                    s.messages.range(last + 1..).take(MAX_BATCH).map(|(id, m)| (*id, m.clone())).collect();
                if let Some((id, _)) = batch.last() {
                    let id = *id;
                    let jobs = batch.into_iter().map(|(_, m)| m).collect();
                    return Ok(Some(Message { id, statistics: Some(statistics), jobs, unreadable: None }));
                }
                if now >= deadline {
                    return Ok(None);
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.gh.disk.dead() {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn ack(&self, session: &Session, message_id: u64) -> Result<(), SsError> {
        let mut hub = self.enter("message delete").await?;
        let set = set_of_queue(&mut hub, session)?;
        let s = hub.sets.get_mut(&set).expect("found");
        let gone: Vec<u64> = s.messages.range(..=message_id).map(|(id, _)| *id).collect();
        let mut acked = Vec::new();
        for id in gone {
            if let Some(m) = s.messages.remove(&id) {
                acked.push(m);
            }
        }
        // A job the set acquired is the agent's once a message about it is acknowledged
        // (the agent writes what a message says before it acknowledges it).
        for m in acked {
            let job = job_of(&m);
            if hub.jobs.get(&job).and_then(|j| j.routed.as_ref()).is_some_and(|r| r.acquired()) {
                hub.heard.insert(job);
            }
        }
        Ok(())
    }

    async fn acquire(&self, set_id: u64, session: &Session, requests: &[u64]) -> Result<Vec<u64>, SsError> {
        let mut hub = self.enter("acquire jobs").await?;
        if set_of_queue(&mut hub, session)? != set_id {
            return Err(SsError::QueueToken);
        }
        let now = hub.time.now();
        let capacity = hub.sets.get(&set_id).map(|s| s.capacity).unwrap_or(0);
        let mut room = capacity.saturating_sub(hub.statistics(set_id).assigned);
        let mut acquired = Vec::new();
        for &request in requests {
            if room == 0 {
                break;
            }
            let job = hub.jobs.values_mut().find(|j| {
                j.status == super::github::Status::Queued
                    && j.routed.as_ref().is_some_and(|r| r.set == set_id && r.request == request && !r.acquired())
            });
            let Some(job) = job else { continue };
            job.routed.as_mut().expect("routed").acquired_at = Some(now);
            let id = job.id;
            acquired.push(request);
            room -= 1;
            hub.post(id, Kind::Assigned);
            hub.nudge = true;
        }
        Ok(acquired)
    }

    async fn generate_jit_config(&self, set_id: u64, name: &str) -> Result<JitRunner, SsError> {
        let mut hub = self.enter("jit").await?;
        let Some(labels) = hub.sets.get(&set_id).map(|s| s.labels.clone()) else {
            return Err(status("generatejitconfig", 404, "RunnerScaleSetNotFoundException"));
        };
        if hub.runner_named(name).is_some() {
            return Err(status("generatejitconfig", 409, "AgentExistsException"));
        }
        hub.next_runner += 1;
        let id = hub.next_runner;
        hub.runners.insert(
            id,
            super::github::Runner {
                id,
                name: name.into(),
                labels,
                online: false,
                job: None,
                by_token: false,
                scale_set: Some(set_id),
            },
        );
        Ok(JitRunner { runner_id: id, encoded: Secret::new(crate::github::fake::encoded_jit_config(id, name)) })
    }

    async fn delete_runner(&self, runner_id: u64) -> Result<Deleted, SsError> {
        Ok(self.enter("delete runner").await?.delete_runner(runner_id))
    }
}

/// The job a message is about.
fn job_of(m: &crate::github::scaleset::JobMessage) -> u64 {
    use crate::github::scaleset::JobMessage;
    let job = match m {
        JobMessage::Available(j) | JobMessage::Assigned(j) => j,
        JobMessage::Started { job, .. } | JobMessage::Completed { job, .. } => job,
    };
    job.job_id.parse().unwrap_or_default()
}
