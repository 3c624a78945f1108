//! What the scheduler reacts to, and the one way to spawn a task that reports back.

use std::future::Future;
use std::time::SystemTime;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinError, JoinHandle};

use super::provision::{BindError, BindTimes, ProvisionError, Provisioned, TeardownOutcome};
use crate::admin::proto::Reply;
use crate::github::{GhError, JobStatus, RunnerInfo};
use crate::hypervisor::{HvError, HvEvent, VmInfo};
use crate::model::JobEvent;

/// The hypervisor as one sweep found it.
#[derive(Debug)]
pub struct Sweep {
    pub vms: Result<Vec<VmInfo>, HvError>,
    pub volumes: Result<Vec<String>, HvError>,
    pub pool: Result<(), HvError>,
    /// The VMs holding an address on the libvirt network (none on a bridge or slirp).
    pub addresses: Result<Vec<String>, HvError>,
}

/// Everything the scheduler reacts to.
pub enum Event {
    Hv(HvEvent),
    RunnerCreated {
        vm: String,
        runner_id: u64,
    },
    Provisioned {
        vm: String,
        result: Result<Provisioned, ProvisionError>,
    },
    TornDown {
        vm: String,
        outcome: TeardownOutcome,
    },
    /// A VM's guest waits on its bind port, or the watch for it gave up.
    GuestWaiting {
        vm: String,
        result: Result<(), String>,
    },
    /// A VM's binding to its job (credential and delivery) finished.
    Bound {
        vm: String,
        result: Result<BindTimes, BindError>,
    },
    /// A VM made for a snapshot slot was saved (its fixed address, if any), or not.
    Saved {
        vm: String,
        result: Result<Option<std::net::Ipv4Addr>, HvError>,
    },
    /// A saved slot found on the storage pool without a record: the metadata its saved
    /// state carries and the address the network holds for it.
    SlotFound {
        slot: String,
        result: Result<(Option<crate::hypervisor::VmMetadata>, Option<std::net::Ipv4Addr>), HvError>,
    },
    /// The sweep's destroy of a snapshot slot's domain that no VM record held ended (its
    /// error, if any).
    SlotDomainDestroyed {
        slot: String,
        result: Result<(), String>,
    },
    /// What the periodic sweep found (boxed: the largest event by far).
    Swept(Box<Sweep>),
    GitHubSynced {
        /// When the runner list was requested (on the monotonic clock): VMs made later
        /// cannot be in it.
        started: tokio::time::Instant,
        runners: Result<Vec<RunnerInfo>, GhError>,
        /// Each job asked about: what GitHub said, and why it was asked.
        jobs: Vec<(u64, JobStatus, super::sync::Ask)>,
        found: Vec<JobEvent>,
        /// How far back the hook's delivery log has been handled, when it was read.
        deliveries_checked: Option<SystemTime>,
        /// Fleet mode, the lead: what it pruned (`None`: it did not).
        pruned: Option<crate::fleet::claims::Pruned>,
    },
    GroupResolved(Result<u64, GhError>),
    /// Fleet mode: a claim's outcome (the jobs asked for, those won).
    Claimed {
        asked: Vec<u64>,
        /// When the claim was sent: its lease runs from then, for this member.
        sent: tokio::time::Instant,
        result: Result<Vec<crate::fleet::claims::Claimed>, crate::fleet::FleetError>,
    },
    /// Fleet mode: the claims renewed (of those asked for).
    Renewed {
        /// (job, attempt)
        asked: Vec<(u64, u32)>,
        /// When the renewal was sent: the leases it renewed run from then, for this member.
        sent: tokio::time::Instant,
        result: Result<Vec<(u64, u32)>, crate::fleet::FleetError>,
    },
    /// Fleet mode: this member's heartbeat written; the fleet's members as read back.
    /// The fleet's members (this one's heartbeat written), and the addresses its database
    /// is reached at (the fence drops both).
    Heartbeat {
        members: Result<Vec<crate::fleet::claims::MemberInfo>, crate::fleet::FleetError>,
        database: Vec<std::net::Ipv4Addr>,
    },
    /// Fleet mode: the job rows this member read (see `fleet::claims::Claims::read`).
    FleetRead(Result<Vec<crate::fleet::claims::JobRow>, crate::fleet::FleetError>),
    /// Fleet mode: the database's `NOTIFY` (a job left to claim): read again now.
    FleetWake,
    /// Fleet mode: a delivery this member's intake wrote and claimed in one transaction.
    ClaimedOnWrite(crate::fleet::intake::ClaimedOnWrite),
    /// Fleet mode: a job taken over from a member that went away, as GitHub knows it.
    TakeoverChecked {
        job: u64,
        status: Result<Option<JobStatus>, GhError>,
    },
    Admin(AdminCommand, oneshot::Sender<Reply>),
    /// A reloaded, valid configuration: apply what can change live, answer what changed.
    Reload(std::sync::Arc<crate::config::Config>, oneshot::Sender<crate::config::ReloadReport>),
}

/// What the admin socket asks of the scheduler (its wire form is [`crate::admin::proto`]).
pub enum AdminCommand {
    Status,
    Drain(bool),
    DestroyVm(String),
    Timeline,
}

impl Event {
    /// Whether handling it only reads the scheduler (status, timeline): nothing for a turn
    /// of planning to act on.
    pub fn only_reads(&self) -> bool {
        matches!(self, Event::Admin(AdminCommand::Status | AdminCommand::Timeline, _))
    }
}

/// Spawns `work`, whose result is an event for the scheduler. If the task panics or is
/// aborted, `failed` makes the event instead: whoever waits for the report always gets one.
/// Returns a handle to abort the work (a deadline passed).
pub fn spawn_reporting<F>(
    events: &UnboundedSender<Event>,
    work: F,
    failed: impl FnOnce(String) -> Event + Send + 'static,
) -> AbortHandle
where
    F: Future<Output = Event> + Send + 'static,
{
    report(events, tokio::spawn(work), failed)
}

/// [`spawn_reporting`] for blocking work (hypervisor calls) on tokio's blocking pool.
pub fn spawn_blocking_reporting<F>(
    events: &UnboundedSender<Event>,
    work: F,
    failed: impl FnOnce(String) -> Event + Send + 'static,
) where
    F: FnOnce() -> Event + Send + 'static,
{
    report(events, crate::offload::spawn(work), failed);
}

fn report(
    events: &UnboundedSender<Event>,
    task: JoinHandle<Event>,
    failed: impl FnOnce(String) -> Event + Send + 'static,
) -> AbortHandle {
    let abort = task.abort_handle();
    let events = events.clone();
    tokio::spawn(async move {
        let event = task.await.unwrap_or_else(|e| failed(task_failure(e)));
        let _ = events.send(event);
    });
    abort
}

/// "panicked: MESSAGE" or "aborted".
pub fn task_failure(e: JoinError) -> String {
    if !e.is_panic() {
        return "task aborted".into();
    }
    let payload = e.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    format!("task panicked: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_or_aborted_task_still_reports() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let failed = |m: String| Event::GuestWaiting { vm: "v".into(), result: Err(m) };
        spawn_reporting(&tx, async { panic!("boom") }, failed);
        let Some(Event::GuestWaiting { result: Err(m), .. }) = rx.recv().await else { panic!("no report") };
        assert_eq!(m, "task panicked: boom");

        spawn_blocking_reporting(&tx, || panic!("{}", "blocking boom"), failed);
        let Some(Event::GuestWaiting { result: Err(m), .. }) = rx.recv().await else { panic!("no report") };
        assert_eq!(m, "task panicked: blocking boom");

        let abort = spawn_reporting(&tx, std::future::pending(), failed);
        abort.abort();
        let Some(Event::GuestWaiting { result: Err(m), .. }) = rx.recv().await else { panic!("no report") };
        assert_eq!(m, "task aborted");

        spawn_reporting(&tx, async { Event::GuestWaiting { vm: "v".into(), result: Ok(()) } }, failed);
        assert!(matches!(rx.recv().await, Some(Event::GuestWaiting { result: Ok(()), .. })));
    }
}
