//! The local admin socket (`runnervisor status|drain|undrain|vm destroy`): a Unix socket,
//! mode 0600 (root) or 0660 with `admin.group`. One JSON request line, one JSON reply line.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc::UnboundedSender, oneshot};
use tokio_util::sync::CancellationToken;

pub mod proto;

pub use proto::{PoolStatus, Reply, Request, Status, VmStatus};

use crate::scheduler::{AdminCommand, Event};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("admin group {0:?} not found (getgrnam)")]
    NoGroup(String),
    #[error(
        "cannot give the admin socket to group {group:?}: {source} (the service user must be a member of it; the package's sysusers entry makes it one of \"runnervisor-admin\")"
    )]
    Chgrp {
        group: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the agent at {path} (is it running? are you root or in the admin group?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("admin socket {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// Through NSS (files, sssd, LDAP, ...), not only /etc/group.
fn group_id(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name).ok().flatten().map(|g| g.gid.as_raw())
}

/// Binds the socket (replacing a stale one) with restrictive permissions.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, AdminError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| AdminError::Bind { path: path.into(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        // A live agent answers; a stale socket file is removed.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(io::Error::new(io::ErrorKind::AddrInUse, "another agent is listening on it")));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let gid = match group {
        Some(g) => Some(group_id(g).ok_or_else(|| AdminError::NoGroup(g.into()))?),
        None => None,
    };
    let listener = UnixListener::bind(path).map_err(err)?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    if let (Some(gid), Some(group)) = (gid, group) {
        // Without CAP_CHOWN this works only for a group the process is a member of.
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|source| AdminError::Chgrp { group: group.into(), source })?;
    }
    Ok(listener)
}

/// Admin connections served at once; more wait in the socket's backlog.
const MAX_CONNECTIONS: usize = 16;

/// How long a connection may take to send its request, and to take its reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves admin requests until `shutdown`: [`MAX_CONNECTIONS`] at once (each held
/// [`IO_TIMEOUT`] at most per read and per write), so that a client holding many open
/// cannot use up the agent's file descriptors; a failed accept (EMFILE) is logged once per
/// 10 s and waited out, not retried in a tight loop.
pub async fn serve(listener: UnixListener, events: UnboundedSender<Event>, shutdown: CancellationToken) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let accept_errors = crate::logging::Throttle::new(Duration::from_secs(10));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    if let Some(suppressed) = accept_errors.check() {
                        tracing::warn!(error = %e, suppressed, "admin socket accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, events).await {
                tracing::debug!(error = %e, "admin request failed");
            }
            drop(permit);
        });
    }
}

/// One request line (the JSON protocol) into the scheduler's command.
pub fn parse_request(line: &str) -> Result<AdminCommand, String> {
    let req: Request = serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))?;
    Ok(match req {
        Request::Status => AdminCommand::Status,
        Request::Drain => AdminCommand::Drain(true),
        Request::Undrain => AdminCommand::Drain(false),
        Request::Destroy { vm } => AdminCommand::DestroyVm(vm),
        Request::Timeline => AdminCommand::Timeline,
    })
}

/// One reply line, as the CLI reads it.
pub fn parse_reply(line: &str) -> Result<Reply, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad reply: {e}"))
}

async fn handle(stream: UnixStream, events: UnboundedSender<Event>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(64 * 1024);
    tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line)).await.map_err(|_| io::ErrorKind::TimedOut)??;
    let reply = match parse_request(&line) {
        Err(e) => Reply::Error(e),
        Ok(cmd) => {
            tracing::info!(request = ?line.trim(), "admin request");
            let (tx, rx) = oneshot::channel();
            if events.send(Event::Admin(cmd, tx)).is_err() {
                Reply::Error("the scheduler is shutting down".into())
            } else {
                rx.await.unwrap_or_else(|_| Reply::Error("the scheduler is shutting down".into()))
            }
        }
    };
    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    let written = async {
        write.write_all(&out).await?;
        write.shutdown().await
    };
    tokio::time::timeout(IO_TIMEOUT, written).await.map_err(|_| io::ErrorKind::TimedOut)?
}

/// Client side: sends one request, returns the reply.
pub async fn request(path: &Path, req: &Request) -> Result<Reply, AdminError> {
    let stream = UnixStream::connect(path).await.map_err(|source| AdminError::Connect { path: path.into(), source })?;
    let proto = |m: String| AdminError::Protocol { path: path.into(), message: m };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| proto(e.to_string()))?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(|e| proto(e.to_string()))?;
    let mut reply = String::new();
    let mut reader = BufReader::new(read);
    tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut reply))
        .await
        .map_err(|_| proto("no answer within 30 s".into()))?
        .map_err(|e| proto(e.to_string()))?;
    if reply.is_empty() {
        return Err(proto(
            "the agent closed the connection without an answer (it may have stopped while doing it: see `runnervisor status` once it runs, and its journal)".into(),
        ));
    }
    parse_reply(&reply).map_err(proto)
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// The human-readable form of `runnervisor status`.
pub fn render_status(s: &Status) -> String {
    let hypervisor = match (&s.hypervisor_problem, s.libvirt_connected) {
        (Some(problem), _) => format!("hypervisor NOT READY: {problem}"),
        (None, true) => "libvirt connected".into(),
        (None, false) => "libvirt not answered yet".into(),
    };
    let mut out = format!(
        "runnervisor: {}; {hypervisor}\n\n",
        if s.draining { "DRAINING (no new jobs)" } else { "taking jobs" },
    );
    let pools: Vec<Vec<String>> = s
        .pools
        .iter()
        .map(|p| {
            let warm = if p.warm == 0 { "-".into() } else { format!("{}/{} waiting", p.warm_waiting, p.warm) };
            let slots = if p.slots == 0 { "-".into() } else { format!("{}/{} ready", p.slots_ready, p.slots) };
            let name = if p.retiring { format!("{} (removed: draining)", p.name) } else { p.name.clone() };
            vec![name, format!("{}/{}", p.vms, p.max_vms), p.queued.to_string(), warm, slots]
        })
        .collect();
    out.push_str(&table(&["POOL", "VMS", "QUEUED", "WARM", "SLOTS"], &pools));
    for p in &s.pools {
        if let Some(set) = &p.scale_set {
            let id = set.id.map(|i| format!("id {i}")).unwrap_or_else(|| "not found or made yet".into());
            let session = if set.session { "session open" } else { "NO SESSION (not taking jobs)" };
            out.push_str(&format!(
                "pool {} is scale set {:?} ({id}): {session}, capacity {} (what its polls announce)\n",
                p.name, set.name, set.capacity
            ));
        }
    }
    out.push('\n');
    if s.queued.is_empty() {
        out.push_str("no queued jobs\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .queued
            .iter()
            .map(|q| vec![q.job_id.to_string(), q.pool.clone(), q.repository.clone(), age(q.age_secs)])
            .collect();
        out.push_str(&table(&["QUEUED JOB", "POOL", "REPOSITORY", "AGE"], &rows));
    }
    out.push('\n');
    if s.vms.is_empty() {
        out.push_str("no VMs\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .vms
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.pool.clone(),
                    match &v.going {
                        Some(reason) => format!("{} (goes: {reason})", v.state),
                        None => v.state.clone(),
                    },
                    warm_column(v),
                    age(v.age_secs),
                    v.took_job.map(|j| j.to_string()).unwrap_or_else(|| "-".into()),
                    v.runner_id.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                    v.repository.clone(),
                ]
            })
            .collect();
        out.push_str(&table(&["VM", "POOL", "STATE", "START", "AGE", "RUNNING JOB", "RUNNER ID", "MADE FOR"], &rows));
    }
    if let Some(f) = &s.fleet {
        out.push('\n');
        out.push_str(&format!("fleet: this member is {}, holding {} job claims\n", f.host_id, f.held));
        let rows: Vec<Vec<String>> = f
            .members
            .iter()
            .map(|m| {
                vec![
                    if m.host_id == f.host_id { format!("{} (this)", m.host_id) } else { m.host_id.clone() },
                    // The tail of its warm VMs' and slots' numbers.
                    m.number.map_or("-".into(), |n| format!("{n:03}")),
                    format!("{}/{}", m.vms, m.max_vms),
                    m.warm_waiting.to_string(),
                    m.held.to_string(),
                    m.version.clone(),
                    format!("{} ago", age(m.seen_secs_ago)),
                ]
            })
            .collect();
        out.push_str(&table(&["MEMBER", "NUMBER", "VMS", "WARM WAITING", "CLAIMS", "VERSION", "LAST HEARD"], &rows));
    }
    out
}

/// How the VM came to its job: `cold` (booted for it), `restored` (from a snapshot slot),
/// or warm and `waiting`, `binding` or `bound` (booting: not waiting yet); a VM booted to
/// be saved as a slot is `slot: booting` or `slot: saving`.
fn warm_column(v: &VmStatus) -> String {
    if v.for_slot {
        return if v.state == "saving" { "slot: saving" } else { "slot: booting" }.into();
    }
    if let Some(slot) = &v.slot {
        return format!("restored ({slot})");
    }
    if !v.warm {
        return "cold".into();
    }
    match v.state.as_str() {
        "provisioning" | "warming" => "warm: booting",
        "waiting" => "warm: waiting",
        "binding" => "warm: binding",
        _ => "warm: bound",
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client holding many connections open takes at most [`MAX_CONNECTIONS`]: a request
    /// beyond them waits in the backlog until an idle one is closed (its read deadline),
    /// then is answered. (tokio's paused clock: the deadlines pass as soon as all waits.)
    #[tokio::test(start_paused = true)]
    async fn a_client_holding_connections_open_takes_at_most_the_cap() {
        let dir = crate::test_support::tempdir();
        let path = dir.join("admin.sock");
        let listener = bind(&path, None).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, tx, stop.clone()));
        tokio::spawn(async move {
            while let Some(Event::Admin(_, reply)) = rx.recv().await {
                let _ = reply.send(Reply::Ok("done".into()));
            }
        });
        let started = tokio::time::Instant::now();
        let reply = request(&path, &Request::Drain).await.unwrap();
        assert!(matches!(reply, Reply::Ok(_)) && started.elapsed() < IO_TIMEOUT, "answered at once: {reply:?}");
        let mut idle = Vec::new();
        for _ in 0..24 {
            idle.push(UnixStream::connect(&path).await.unwrap());
        }
        let started = tokio::time::Instant::now();
        let reply = request(&path, &Request::Drain).await.unwrap();
        assert!(matches!(reply, Reply::Ok(_)), "{reply:?}");
        assert!(started.elapsed() >= IO_TIMEOUT, "served beyond the cap, after {:?}", started.elapsed());
        stop.cancel();
    }

    #[test]
    fn status_names_what_keeps_the_hypervisor_from_making_vms() {
        let status = |connected, problem: Option<&str>| Status {
            draining: false,
            libvirt_connected: connected,
            hypervisor_problem: problem.map(str::to_string),
            pools: vec![],
            queued: vec![],
            vms: vec![],
            fleet: None,
        };
        let first = |s: &Status| render_status(s).lines().next().unwrap().to_string();
        assert_eq!(first(&status(true, None)), "runnervisor: taking jobs; libvirt connected");
        let pool = first(&status(false, Some("storage pool \"runnervisor\" not found or not active")));
        assert!(pool.contains("NOT READY: storage pool \"runnervisor\""), "{pool}");
        assert!(!pool.contains("NOT CONNECTED"), "libvirt itself answers: {pool}");
    }

    #[test]
    fn status_shows_warm_vms_and_how_each_vm_got_its_job() {
        let vm = |name: &str, state: &str, warm: bool| VmStatus {
            name: name.into(),
            pool: "p".into(),
            state: state.into(),
            age_secs: 5,
            job_id: 0,
            took_job: None,
            runner_id: None,
            repository: String::new(),
            warm,
            slot: None,
            for_slot: false,
            going: None,
        };
        let s = Status {
            draining: false,
            libvirt_connected: true,
            hypervisor_problem: None,
            pools: vec![PoolStatus {
                name: "p".into(),
                vms: 4,
                max_vms: 4,
                queued: 0,
                warm: 2,
                warm_waiting: 1,
                retiring: false,
                slots: 2,
                slots_ready: 1,
                scale_set: Some(proto::ScaleSetStatus { name: "rv-p".into(), id: Some(4), session: true, capacity: 4 }),
            }],
            queued: vec![],
            vms: vec![
                VmStatus { slot: Some("rv-p-s1".into()), ..vm("rv-p-8", "busy", false) },
                VmStatus { for_slot: true, ..vm("rv-p-s0", "saving", true) },
                vm("rv-p-w1", "waiting", true),
                vm("rv-p-w2", "warming", true),
                vm("rv-p-w3", "binding", true),
                vm("rv-p-w4", "busy", true),
                vm("rv-p-7", "busy", false),
                VmStatus { going: Some("provision_timeout".into()), ..vm("rv-p-9", "provisioning", false) },
            ],
            fleet: Some(proto::FleetStatus {
                host_id: "hv-a".into(),
                held: 3,
                members: [("hv-a", 0), ("hv-b", 17)]
                    .map(|(h, number)| crate::fleet::claims::MemberInfo {
                        host_id: h.into(),
                        max_vms: 4,
                        vms: 2,
                        warm_waiting: 1,
                        warm_target: 1,
                        held: 3,
                        version: "0.1.0".into(),
                        seen_secs_ago: 7,
                        addresses: vec![],
                        number: Some(number),
                        scale_sets: Default::default(),
                    })
                    .into(),
            }),
        };
        let text = render_status(&s);
        assert!(line_of(&text, "rv-p-9").contains("provisioning (goes: provision_timeout)"), "{text}");
        assert!(text.contains("fleet: this member is hv-a, holding 3 job claims"), "{text}");
        assert!(line_of(&text, "hv-a (this)").contains("2/4"), "{text}");
        assert!(line_of(&text, "hv-b").contains("7s ago") && line_of(&text, "hv-b").contains(" 017 "), "{text}");
        let line = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap().to_string();
        assert!(line("p ").contains("1/2 waiting"), "{text}");
        assert!(line("rv-p-w1").contains("warm: waiting"), "{text}");
        assert!(line("rv-p-w2").contains("warm: booting"), "{text}");
        assert!(line("rv-p-w3").contains("warm: binding"), "{text}");
        assert!(line("rv-p-w4").contains("warm: bound"), "{text}");
        assert!(line("rv-p-7").contains("cold"), "{text}");
        assert!(line("rv-p-8").contains("restored (rv-p-s1)"), "{text}");
        assert!(line("rv-p-s0").contains("slot: saving"), "{text}");
        assert!(line("p ").contains("1/2 ready"), "{text}");
        assert!(
            text.contains("pool p is scale set \"rv-p\" (id 4): session open, capacity 4 (what its polls announce)"),
            "{text}"
        );
    }

    fn line_of(text: &str, start: &str) -> String {
        text.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("{start}: {text}")).to_string()
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_files_are_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::test_support::tempdir();
        let path = dir.join("admin.sock");
        std::fs::write(&path, "").unwrap();
        let listener = bind(&path, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(bind(&path, None).is_err(), "a live socket is not replaced");
        drop(listener);
        assert!(matches!(bind(&dir.join("b.sock"), Some("no-such-group-xyz")), Err(AdminError::NoGroup(_))));
    }

    /// An agent that goes away while it does a command leaves the operator told so, with
    /// where to look: not a JSON parser's complaint about an empty line.
    #[tokio::test]
    async fn a_command_the_agent_never_answers_says_so() {
        let dir = crate::test_support::tempdir();
        let path = dir.join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).await.unwrap();
        });
        let err = request(&path, &Request::Drain).await.unwrap_err().to_string();
        assert!(err.contains("closed the connection without an answer") && err.contains("runnervisor status"), "{err}");
    }
}
