//! The admin socket's wire protocol: one JSON request line, one JSON reply line. A
//! contract with the `runnervisor` CLI of possibly another version, so these types change
//! only by adding optional fields; the scheduler's internal commands are not part of it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Drain,
    Undrain,
    Destroy {
        vm: String,
    },
    /// Each VM's milestones (`runnervisor timeline`).
    Timeline,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Status(Status),
    Timeline(Vec<crate::timeline::Trace>),
    Ok(String),
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub draining: bool,
    /// libvirt answered the last sweep and the job storage pool is there: VMs can be made.
    pub libvirt_connected: bool,
    /// What keeps the hypervisor from making VMs, when something does (libvirt away, the
    /// storage pool missing, ...).
    #[serde(default)]
    pub hypervisor_problem: Option<String>,
    pub pools: Vec<PoolStatus>,
    pub queued: Vec<QueuedStatus>,
    pub vms: Vec<VmStatus>,
    /// Fleet mode: this member and the others.
    #[serde(default)]
    pub fleet: Option<FleetStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetStatus {
    pub host_id: String,
    /// Jobs this member holds claims on.
    pub held: usize,
    /// Every member heard from in the last hour (this one included), as of the last
    /// heartbeat.
    pub members: Vec<crate::fleet::claims::MemberInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    pub vms: usize,
    pub max_vms: usize,
    pub queued: usize,
    /// Warm VMs to keep (`warm`), and how many wait for a job now.
    #[serde(default)]
    pub warm: usize,
    #[serde(default)]
    pub warm_waiting: usize,
    /// Removed by a reload: its VMs finish, it takes no jobs.
    #[serde(default)]
    pub retiring: bool,
    /// Snapshot slots to keep (`snapshot_slots`), and how many are saved and free now.
    #[serde(default)]
    pub slots: usize,
    #[serde(default)]
    pub slots_ready: usize,
    /// The pool is a runner scale set (`intake = "scale_set"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_set: Option<ScaleSetStatus>,
}

/// A scale-set pool's set, as its listener knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScaleSetStatus {
    pub name: String,
    /// `None`: not found or made yet.
    pub id: Option<u64>,
    /// Its message session is open (the listener takes jobs).
    pub session: bool,
    /// What the last poll announced (`X-ScaleSetMaxCapacity`).
    pub capacity: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedStatus {
    pub job_id: u64,
    pub pool: String,
    pub repository: String,
    pub age_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub pool: String,
    pub state: String,
    pub age_secs: u64,
    pub job_id: u64,
    pub took_job: Option<u64>,
    pub runner_id: Option<u64>,
    pub repository: String,
    /// Made warm (booted without a credential); its state says whether it is bound yet.
    #[serde(default)]
    pub warm: bool,
    /// Restored from this snapshot slot (its libvirt domain has the slot's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Booted to be saved as the snapshot slot of its name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub for_slot: bool,
    /// Torn down for this reason once its provisioning reports (a reason of
    /// `runnervisor_teardowns_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub going: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Destroy { vm: "rv-a-1".into() }).unwrap(),
            r#"{"cmd":"destroy","vm":"rv-a-1"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"drain"}"#).unwrap(), Request::Drain);
        // A reply of an agent that predates `hypervisor_problem` still parses.
        let old = r#"{"Status":{"draining":false,"libvirt_connected":true,"pools":[],"queued":[],"vms":[]}}"#;
        assert!(
            matches!(serde_json::from_str::<Reply>(old).unwrap(), Reply::Status(s) if s.hypervisor_problem.is_none())
        );
    }
}
