//! Logging: human-readable lines on stderr, or — under systemd (`JOURNAL_STREAM` names our
//! stderr) — native journald entries whose fields operators can filter on:
//! `journalctl -u runnervisor JOB_ID=123`, `POOL=linux`, `VM_NAME=rv-linux-123`, ...
//!
//! Field names: `job_id`→`JOB_ID`, `run_id`→`RUN_ID`, `repository`→`REPOSITORY`,
//! `pool`→`POOL`, `vm`→`VM_NAME`, `runner_name`→`RUNNER_NAME`; any other field is
//! upper-cased. The message is `MESSAGE` and carries the fields as `key=value` too.
//! An entry too large for one datagram goes through a sealed memfd, as journald expects.
//!
//! Why not `tracing-journald`: it writes only to the fixed `/run/systemd/journal/socket`
//! (the operator tests capture entries on a socket of their own, and hosts without
//! systemd as PID 1 have none), prefixes or keeps field names as written (operators filter
//! on `VM_NAME`), and leaves the fields out of `MESSAGE`, which is all `journalctl`'s
//! default output shows. The native protocol is small; this module is the whole of it.

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The journald field a tracing field is logged as.
pub fn journal_field(name: &str) -> String {
    match name {
        "vm" => "VM_NAME".into(),
        other => other
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
            .collect::<String>()
            .trim_start_matches('_')
            .to_string(),
    }
}

fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        _ => "7",
    }
}

/// Appends one field in journald's native format (binary-safe form for multi-line values).
pub fn encode_field(buf: &mut Vec<u8>, key: &str, value: &str) {
    if value.contains('\n') {
        buf.extend_from_slice(key.as_bytes());
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'\n');
    } else {
        buf.extend_from_slice(key.as_bytes());
        buf.push(b'=');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'\n');
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = visible(value, true);
        } else {
            self.pairs.push((field.name().to_string(), visible(value, false)));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        if field.name() == "message" {
            self.message = visible(&v, true);
        } else {
            self.pairs.push((field.name().to_string(), visible(&v, false)));
        }
    }
}

/// `s` with its control characters written out (`\u{1b}`, `\n`), but for the message
/// (`lines`) its newlines and tabs. A field's value may be a job's (its workflow's name,
/// chosen by whoever pushes a workflow): an escape in it would hide the entry
/// (`journalctl` shows it as `[blob data]`) or reach the operator's terminal
/// (`journalctl -a`), a newline fake a line of its own.
fn visible(s: &str, lines: bool) -> String {
    // And the characters that reorder or break what a terminal shows (bidirectional
    // overrides and isolates, line and paragraph separators), though not controls.
    let reorders =
        |c: char| matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    let hidden = |c: char| (c.is_control() && !(lines && matches!(c, '\n' | '\t'))) || reorders(c);
    if !s.chars().any(hidden) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hidden(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

pub struct JournaldLayer {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournaldLayer {
    pub fn new(path: &Path) -> std::io::Result<Self> {
        Ok(JournaldLayer { socket: UnixDatagram::unbound()?, path: path.to_path_buf() })
    }
}

impl<S: Subscriber> Layer<S> for JournaldLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let mut message = fields.message.clone();
        for (k, v) in &fields.pairs {
            let _ = write!(message, " {k}={v}");
        }
        let mut buf = Vec::with_capacity(256);
        encode_field(&mut buf, "MESSAGE", &message);
        encode_field(&mut buf, "PRIORITY", priority(meta.level()));
        encode_field(&mut buf, "SYSLOG_IDENTIFIER", "runnervisor");
        encode_field(&mut buf, "TARGET", meta.target());
        for (k, v) in &fields.pairs {
            let key = journal_field(k);
            if !key.is_empty() {
                encode_field(&mut buf, &key, v);
            }
        }
        let sent = match self.socket.send_to(&buf, &self.path) {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => send_as_memfd(&self.socket, &self.path, &buf),
            other => other.map(drop),
        };
        if sent.is_err() {
            // The journal is gone: do not lose the line.
            eprintln!("{} {message}", meta.level());
        }
    }
}

/// An entry too large for a datagram: written to a memfd, sealed, and its descriptor sent
/// alone (journald's protocol for large entries).
fn send_as_memfd(socket: &UnixDatagram, path: &Path, entry: &[u8]) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    use std::io::Write as _;
    use std::os::fd::{AsFd, AsRawFd};
    let fd = memfd_create(c"runnervisor-journal", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(entry)?;
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    let addr = UnixAddr::new(path)?;
    let fds = [file.as_raw_fd()];
    sendmsg(socket.as_raw_fd(), &[], &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), Some(&addr))?;
    Ok(())
}

/// Where logs go.
pub enum Target {
    Stderr,
    Journald(PathBuf),
}

/// journald when stderr is the journal (or `RUNNERVISOR_JOURNAL_SOCKET` names a socket),
/// else stderr.
pub fn detect() -> Target {
    if let Some(p) = std::env::var_os("RUNNERVISOR_JOURNAL_SOCKET") {
        return Target::Journald(p.into());
    }
    if crate::systemd::stderr_is_journal() && Path::new(JOURNAL_SOCKET).exists() {
        return Target::Journald(JOURNAL_SOCKET.into());
    }
    Target::Stderr
}

/// The running agent's log filter, which a reload may change.
pub struct LogLevel {
    handle: tracing_subscriber::reload::Handle<Targets, tracing_subscriber::Registry>,
}

/// The filter `log_level` names: a level (`info`), or a default level and levels per
/// target (`warn,runnervisor=debug`). Unlike `RUST_LOG`, a bare word must be a level (a
/// misspelt level would otherwise name a target, and the agent would log nothing else).
pub fn filter(level: &str) -> Result<Targets, String> {
    const HINT: &str =
        "a level (error, warn, info, debug, trace, off), or levels per target as in \"warn,runnervisor=debug\"";
    let bare = level.split(',').map(str::trim).find(|d| !d.contains('=') && d.parse::<LevelFilter>().is_err());
    if let Some(d) = bare {
        return Err(format!("{d:?} is not a level; {HINT}"));
    }
    level.parse::<Targets>().map_err(|e| format!("{e}; {HINT}"))
}

impl LogLevel {
    /// Sets the filter to `level` (a reload's `log_level`), unless `RUST_LOG` overrides
    /// the configuration: then it stays, and the error says so.
    pub fn set(&self, level: &str) -> Result<(), String> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Err("RUST_LOG is set and overrides log_level".into());
        }
        let filter = filter(level).map_err(|e| format!("log_level = {level:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `level` (validated with the
/// config); a `RUST_LOG` that is not a filter is said on stderr and ignored.
pub fn init(level: &str, target: Target) -> LogLevel {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().map_err(|e| eprintln!("runnervisor: RUST_LOG = {v:?} ignored: {e}")).ok());
    let filter = from_env.or_else(|| filter(level).ok()).unwrap_or_else(|| Targets::new().with_default(Level::INFO));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let journald = match target {
        Target::Journald(path) => match JournaldLayer::new(&path) {
            Ok(layer) => Some(layer),
            Err(e) => {
                eprintln!("runnervisor: journald logging unavailable ({e}); logging to stderr");
                None
            }
        },
        Target::Stderr => None,
    };
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_target(false),
            )
            .init(),
    }
    LogLevel { handle }
}

/// Parses datagrams in journald's native format (for tests and tools).
pub fn decode(datagram: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
            break;
        };
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            out.push((String::from_utf8_lossy(&line[..eq]).into(), String::from_utf8_lossy(&line[eq + 1..]).into()));
            rest = &rest[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let len_bytes: [u8; 8] = match rest.get(nl + 1..nl + 9).and_then(|b| b.try_into().ok()) {
                Some(b) => b,
                None => break,
            };
            let len = u64::from_le_bytes(len_bytes) as usize;
            let start = nl + 9;
            let Some(value) = rest.get(start..start + len) else {
                break;
            };
            out.push((key, String::from_utf8_lossy(value).into()));
            rest = rest.get(start + len + 1..).unwrap_or(&[]);
        }
    }
    out
}

/// A log line that may be written at most once per period, however often its event
/// happens (requests an attacker sends at will): [`Throttle::check`] says whether to write
/// it now and how many were left out since the last one.
pub struct Throttle {
    every: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Throttle {
        Throttle { every, state: std::sync::Mutex::new((None, 0)) }
    }

    /// `Some(left out since the last line)` when a line is due now.
    pub fn check(&self) -> Option<u64> {
        self.check_at(std::time::Instant::now())
    }

    pub fn check_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.0 {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let left_out = s.1;
                *s = (Some(now), 0);
                Some(left_out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names() {
        assert_eq!(journal_field("job_id"), "JOB_ID");
        assert_eq!(journal_field("vm"), "VM_NAME");
        assert_eq!(journal_field("runner_name"), "RUNNER_NAME");
        assert_eq!(journal_field("repository"), "REPOSITORY");
        assert_eq!(journal_field("_odd-name"), "ODD_NAME");
    }

    #[test]
    fn native_protocol_round_trips() {
        let mut buf = Vec::new();
        encode_field(&mut buf, "MESSAGE", "two\nlines");
        encode_field(&mut buf, "JOB_ID", "30000000001");
        let fields = decode(&buf);
        assert_eq!(fields, vec![("MESSAGE".into(), "two\nlines".into()), ("JOB_ID".into(), "30000000001".into())]);
    }

    /// An entry larger than a datagram may be arrives whole, through a memfd.
    #[test]
    fn a_large_entry_goes_through_a_memfd() {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        use std::io::Read as _;
        use std::os::fd::{AsRawFd, FromRawFd};
        let dir = crate::test_support::tempdir();
        let path = dir.join("journal.sock");
        let sink = UnixDatagram::bind(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(JournaldLayer::new(&path).unwrap());
        let big = "x".repeat(4 << 20);
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(job_id = 8u64, output = %big, "step failed");
        });
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(sink.as_raw_fd(), &mut [], Some(&mut cmsg), MsgFlags::empty()).unwrap();
        let fd = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .expect("a descriptor, not a datagram");
        let mut entry = Vec::new();
        // SAFETY: the descriptor was just received and is owned by nothing else.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        // The sender's writes moved the shared offset: read from the start, as journald does.
        std::io::Seek::rewind(&mut file).unwrap();
        file.read_to_end(&mut entry).unwrap();
        let fields = decode(&entry);
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        assert_eq!(get("JOB_ID").as_deref(), Some("8"));
        assert_eq!(get("OUTPUT").map(|v| v.len()), Some(big.len()));
    }

    /// The first `n` entries what `log` logs sends to a journal socket, decoded (each a
    /// datagram: small entries).
    fn journal_entries(n: usize, log: impl FnOnce()) -> Vec<Vec<(String, String)>> {
        let dir = crate::test_support::tempdir();
        let path = dir.join("journal.sock");
        let sink = UnixDatagram::bind(&path).unwrap();
        let subscriber = tracing_subscriber::registry().with(JournaldLayer::new(&path).unwrap());
        tracing::subscriber::with_default(subscriber, log);
        let mut buf = vec![0u8; 4096];
        (0..n)
            .map(|_| {
                let len = sink.recv(&mut buf).unwrap();
                decode(&buf[..len])
            })
            .collect()
    }

    #[test]
    fn events_reach_a_journal_socket_with_fields() {
        let fields = journal_entries(1, || {
            tracing::warn!(job_id = 7u64, vm = "rv-p-7", pool = "p", "vm started");
        })
        .remove(0);
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        assert_eq!(get("JOB_ID").as_deref(), Some("7"));
        assert_eq!(get("VM_NAME").as_deref(), Some("rv-p-7"));
        assert_eq!(get("POOL").as_deref(), Some("p"));
        assert_eq!(get("PRIORITY").as_deref(), Some("4"));
        assert!(get("MESSAGE").unwrap().starts_with("vm started"));
    }

    /// A job's strings (its workflow's name) reach no terminal and hide no entry: control
    /// characters are written out, in the message and in each field.
    #[test]
    fn control_characters_from_a_job_are_written_out() {
        let workflow = "x\u{1b}]0;pwn\u{7}\nERROR fake\r\u{202e}";
        let entries = journal_entries(2, || {
            tracing::info!(job_id = 9u64, workflow = %workflow, "job queued");
            tracing::warn!(error = %"first line\nsecond line\u{1b}[31m", "two lines");
        });
        let wanted = [r"workflow=x\u{1b}]0;pwn\u{7}\nERROR fake\r\u{202e}", "second line\\u{1b}[31m"];
        for (want, fields) in wanted.into_iter().zip(entries) {
            let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone()).unwrap_or_default();
            let message = get("MESSAGE");
            assert!(message.contains(want), "{message:?}");
            assert!(!message.chars().any(|c| c.is_control() && c != '\n'), "{message:?}");
            assert!(fields.iter().all(|(_, v)| !v.contains('\u{1b}')), "{fields:?}");
        }
    }

    #[test]
    fn a_throttled_line_is_written_once_per_period_with_what_was_left_out() {
        let t = Throttle::new(std::time::Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        assert_eq!(t.check_at(at(0)), Some(0));
        assert_eq!(t.check_at(at(1)), None);
        assert_eq!(t.check_at(at(9)), None);
        assert_eq!(t.check_at(at(10)), Some(2));
        assert_eq!(t.check_at(at(11)), None);
        assert_eq!(t.check_at(at(100)), Some(1));
        assert_eq!(t.check_at(at(200)), Some(0));
    }
}
