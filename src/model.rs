//! Records shared by intake, store and scheduler: job events, jobs and VMs.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// What a `workflow_job` delivery says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobAction {
    Queued,
    Waiting,
    InProgress,
    Completed,
}

/// The fields of `workflow_job` (plus the repository) runnervisor uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: u64,
    pub run_id: u64,
    pub run_attempt: u32,
    pub name: String,
    pub workflow_name: String,
    pub labels: Vec<String>,
    pub repository: String,
    pub html_url: String,
    pub runner_name: Option<String>,
    pub conclusion: Option<String>,
    /// The runner scale set GitHub assigned the job to (its name; its listener says so, and
    /// in a fleet the job's row carries it to every member): the pool whose set it is
    /// serves it. `None`: a webhook's job, for the pool whose labels are exactly its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_set: Option<String>,
}

impl JobInfo {
    /// What the fleet's queue files the job under (its row's label key, the room claimed
    /// on write): its labels, or for a scale set's job its set ([`scale_set_key`]).
    pub fn queue_labels(&self) -> Vec<String> {
        match &self.scale_set {
            Some(set) => scale_set_key(set),
            None => self.labels.clone(),
        }
    }
}

/// The label set a scale set's jobs are filed under in the fleet's queue: one label no
/// job's labels can be (GitHub's labels have no control characters), so that they never
/// match a webhook pool's, and a set's jobs, whatever their labels, are found by its set.
pub fn scale_set_key(set: &str) -> Vec<String> {
    vec![format!("\u{1}scale-set\u{1}{set}")]
}

/// Labels as pools are matched: lowercase, sorted, without duplicates.
pub fn label_set(labels: &[String]) -> Vec<String> {
    let mut set: Vec<String> = labels.iter().map(|l| l.to_lowercase()).collect();
    set.sort();
    set.dedup();
    set
}

/// One job event, from a webhook delivery or from polling GitHub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// `X-GitHub-Delivery`, or `poll-<job id>` for events found by the reconciler.
    pub delivery: String,
    pub action: JobAction,
    pub job: JobInfo,
    pub received_at: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum JobState {
    /// Waiting for a runner: counts towards the pool's demand.
    Queued,
    InProgress {
        runner: Option<String>,
    },
    Completed {
        conclusion: Option<String>,
        /// The runner that took it, as its completion (or before, its start) named it. A scale
        /// set's request `cancelled` with none was given up on, and may be assigned again; one
        /// a runner took never is ([`crate::scheduler::job::next`]). (Absent in stores written
        /// before it was kept: read as none.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runner: Option<String>,
    },
    /// Given up after too many failed VMs.
    Abandoned {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRec {
    pub info: JobInfo,
    /// The pool whose label set the job's labels equal; `None`: not ours (kept for dedup).
    pub pool: Option<String>,
    pub state: JobState,
    pub received_at: SystemTime,
    /// VMs provisioned on this job's account (names its next VM).
    pub vms_made: u32,
    /// VMs made for it that died or timed out before any runner took a job.
    pub failed_vms: u32,
    pub updated_at: SystemTime,
}

impl JobRec {
    pub fn is_unserved(&self) -> bool {
        self.state == JobState::Queued && self.pool.is_some()
    }
}

/// Where a VM is in its life. Transitions live in `scheduler::vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Credential, overlay, seed, domain being made.
    Provisioning,
    /// Started; its runner has not been seen online yet.
    Booting,
    /// Its runner is online without a job.
    Idle,
    /// Its runner runs a job.
    Busy,
    /// Its runner's job completed; the guest should power off shortly.
    Finishing,
    /// Being destroyed.
    TearingDown,
    /// A warm VM (no credential) started; its guest is not waiting for a job yet.
    Warming,
    /// A warm VM whose guest waits for a job's runner command.
    Waiting,
    /// A warm VM being given a job: its runner credential is made and delivered.
    Binding,
    /// A VM booted for a snapshot slot, waiting with no credential, being saved: its domain
    /// stops and goes, its disk and memory become the slot ([`SlotRec`]).
    Saving,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Provisioning => "provisioning",
            VmState::Booting => "booting",
            VmState::Idle => "idle",
            VmState::Busy => "busy",
            VmState::Finishing => "finishing",
            VmState::TearingDown => "tearing_down",
            VmState::Warming => "warming",
            VmState::Waiting => "waiting",
            VmState::Binding => "binding",
            VmState::Saving => "saving",
        }
    }
    /// Provisioning, booting or idle: may still take a job. (A warm VM becomes available
    /// when it is bound; see [`VmRec::is_unbound_warm`].)
    pub fn is_available(self) -> bool {
        matches!(self, VmState::Provisioning | VmState::Booting | VmState::Idle | VmState::Binding)
    }

    pub const ALL: [VmState; 10] = [
        VmState::Provisioning,
        VmState::Warming,
        VmState::Waiting,
        VmState::Binding,
        VmState::Saving,
        VmState::Booting,
        VmState::Idle,
        VmState::Busy,
        VmState::Finishing,
        VmState::TearingDown,
    ];
}

/// Why a VM is torn down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The domain stopped (the runner exited and the guest powered off).
    Stopped,
    RegistrationTimeout,
    MaxLifetime,
    /// More runners than unserved jobs for longer than the idle timeout.
    Surplus,
    /// `completed` arrived but the guest did not power off within the grace period.
    FinishGrace,
    ProvisionFailed,
    /// Provisioning took longer than `reconcile.provision_timeout` (a hung hypervisor or
    /// GitHub call): a fault of the host, not of the job.
    ProvisionTimeout,
    /// The agent restarted while the VM was being provisioned.
    Interrupted,
    /// Its runner registration vanished while it had no job.
    RunnerGone,
    /// Found on the hypervisor without a record, or not running at start.
    Orphan,
    Operator,
    /// QEMU paused the guest on a disk I/O error (its storage pool is full): a fault of the
    /// host, not of the job, so it is not counted against the job's attempts.
    DiskError,
    /// A warm VM did not acknowledge its job's runner command in time (`bind_timeout`).
    BindFailed,
    /// A warm VM waited longer than `warm_max_age`.
    WarmRecycled,
    /// A warm VM no longer wanted: the agent drains, or `warm` was lowered.
    WarmSurplus,
    /// A snapshot slot no longer wanted or no longer right (its pool's image or VM shape
    /// changed, `snapshot_slots` lowered, its restore failed): its saved state goes.
    SlotGone,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Stopped => "stopped",
            Reason::RegistrationTimeout => "registration_timeout",
            Reason::MaxLifetime => "max_lifetime",
            Reason::Surplus => "surplus",
            Reason::FinishGrace => "finish_grace",
            Reason::ProvisionFailed => "provision_failed",
            Reason::ProvisionTimeout => "provision_timeout",
            Reason::Interrupted => "interrupted",
            Reason::RunnerGone => "runner_gone",
            Reason::Orphan => "orphan",
            Reason::Operator => "operator",
            Reason::DiskError => "disk_error",
            Reason::BindFailed => "bind_failed",
            Reason::WarmRecycled => "warm_recycled",
            Reason::WarmSurplus => "warm_surplus",
            Reason::SlotGone => "slot_gone",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRec {
    pub name: String,
    pub pool: String,
    /// The job it was made for (any job its labels cover may end up on it).
    pub job_id: u64,
    pub run_id: u64,
    pub repository: String,
    pub job_url: String,
    pub runner_id: Option<u64>,
    pub state: VmState,
    pub created_at: SystemTime,
    pub state_since: SystemTime,
    /// The job its runner took, when known.
    pub took_job: Option<u64>,
    /// Set when teardown was requested (possibly while provisioning was still running).
    pub reap: Option<Reason>,
    /// Made warm (booted for no job, waiting for one). `job_id` is 0 until a job is bound
    /// to it. (Every VM boots without a credential; a cold one is made for its job.)
    #[serde(default)]
    pub warm: bool,
    /// A webhook said the job its runner took succeeded while the VM lived:
    /// GitHub removes an ephemeral runner itself then, so teardown does not ask it to (no
    /// `DELETE` answered 404). A runner that died with its VM (a crash, a full disk, its
    /// lifetime, seen or not yet) fails (or cancels) its job, and GitHub keeps its
    /// registration offline for a day: teardown asks after any job that did not succeed
    /// ("not found" when GitHub did remove it). Also
    /// set when its runner could not be made because a runner had its name (in a fleet,
    /// maybe another member's): teardown must not delete that one.
    #[serde(default)]
    pub runner_done: bool,
    /// How many bindings of it began (a second one follows a credential that failed, maybe
    /// after GitHub made its runner: a runner of its name is then its own).
    #[serde(default)]
    pub binds: u32,
    /// Restored from this snapshot slot's saved state: its domain has the slot's name (a
    /// restore keeps the saved domain's name, UUID and MAC) and its overlay is over the
    /// slot's disk. Everything else of it (runner, overlay, timeline) is named `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Booted to become snapshot slot `name` (never a runner): saved once its guest waits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub for_slot: bool,
    /// The libvirt network its address is reserved on, as the config said when it was
    /// made: its teardown releases the address there, whatever the config says by then (a
    /// reload or restart that changed `libvirt.network` left its entry on the old one for
    /// good: helper-68). None: no address of its own (a bridge, a VM restored from a slot,
    /// whose address the slot keeps), or a record from before this was kept (the
    /// configured network is asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Its teardown counted a failed attempt for its job before asking GitHub about its
    /// runner: a runner found busy gives the attempt back (the VM is kept), and the job is
    /// not given up until GitHub says the runner is not busy (or the VM is gone).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub charged: bool,
}

impl VmRec {
    /// A new record, about to be provisioned; made for no job yet (the caller sets it).
    pub fn new(name: String, pool: &str, warm: bool, now: SystemTime) -> VmRec {
        VmRec {
            name,
            pool: pool.to_string(),
            job_id: 0,
            run_id: 0,
            repository: String::new(),
            job_url: String::new(),
            runner_id: None,
            state: VmState::Provisioning,
            created_at: now,
            state_since: now,
            took_job: None,
            reap: None,
            warm,
            runner_done: false,
            binds: 0,
            slot: None,
            for_slot: false,
            charged: false,
            network: None,
        }
    }

    /// The name of its libvirt domain: its slot's, for a VM restored from one.
    pub fn domain(&self) -> &str {
        self.slot.as_deref().unwrap_or(&self.name)
    }

    /// A runner for a job, now or soon: provisioning, booting or idle; a cold VM waiting
    /// for its guest, or being bound to its job; a warm VM being bound. (An unbound warm VM
    /// is no runner yet: see [`VmRec::is_unbound_warm`].)
    pub fn is_available(&self) -> bool {
        if self.for_slot {
            return false;
        }
        match self.state {
            VmState::Warming | VmState::Waiting => !self.warm,
            state => state.is_available(),
        }
    }

    /// Why it goes (its `reap` reason), for the log; "-" while it does not.
    pub fn why(&self) -> &'static str {
        self.reap.map_or("-", Reason::as_str)
    }

    /// Whether it has a runner registration of its own at GitHub to ask about or delete:
    /// not once GitHub removed it (`runner_done`), never for a slot's VM.
    pub fn has_runner(&self) -> bool {
        !self.runner_done && !self.for_slot
    }

    /// A warm VM no job's credential went into yet (provisioning, warming or waiting).
    pub fn is_unbound_warm(&self) -> bool {
        !self.for_slot && self.warm && matches!(self.state, VmState::Provisioning | VmState::Warming | VmState::Waiting)
    }

    /// Its runner is busy, GitHub says, with a job nothing named yet (most likely its own:
    /// see `Book::taken_unheard`).
    pub fn is_busy_unnamed(&self) -> bool {
        self.state == VmState::Busy && self.took_job.is_none()
    }
}

/// A snapshot slot: a VM of `pool` booted with no credential until its guest waited, then
/// saved. What exists of it: its saved state (`<name>.save`) and its disk (`<name>.qcow2`,
/// the read-only base of every overlay restored from it), its seed, and its address on the
/// network (the saved guest has it configured). A VM restored from it has `slot` set; at
/// most one at a time (libvirt keeps the saved domain's name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRec {
    pub name: String,
    pub pool: String,
    /// What the saved VM was made from (the image file, the VM's shape): a slot whose
    /// pool no longer matches it is re-made.
    pub made_from: String,
    /// Its fixed address on the libvirt network, when it has one.
    pub address: Option<std::net::Ipv4Addr>,
    pub saved_at: SystemTime,
    /// The libvirt network that address is on ([`VmRec::network`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}
