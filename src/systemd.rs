//! The bits of systemd integration that need no library: `sd_notify` over
//! `$NOTIFY_SOCKET` (READY, STOPPING, WATCHDOG, STATUS) and journald detection.

use std::os::unix::net::UnixDatagram;

fn notify(state: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        notify_to(&path, state);
    }
}

/// Sends `state` to the notify socket at `path` (`@name`: an abstract socket).
fn notify_to(path: &std::ffi::OsStr, state: &str) {
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), path)
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The service is up: listener bound, libvirt connected, first sweep done.
pub fn ready() {
    notify("READY=1\nSTATUS=taking jobs");
}

/// A reload (SIGHUP) begins; `ready` ends it.
pub fn reloading() {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0);
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS=reloading the configuration"));
}

pub fn stopping() {
    notify("STOPPING=1\nSTATUS=stopping: finishing in-flight provisioning");
}

/// Pinged by the scheduling loop; a hung loop stops pinging and systemd restarts us.
pub fn watchdog() {
    notify("WATCHDOG=1");
}

/// Whether stderr is connected to the journal (systemd sets `JOURNAL_STREAM`).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(meta.dev()) && ino.parse::<u64>().ok() == Some(meta.ino())
}

#[cfg(test)]
mod tests {
    #[test]
    fn notify_reaches_the_socket() {
        let dir = crate::test_support::tempdir();
        let path = dir.join("notify.sock");
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // The path is passed in: no test changes the process's environment.
        super::notify_to(path.as_os_str(), "READY=1\nSTATUS=taking jobs");
        let mut buf = [0u8; 128];
        let n = server.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("READY=1"));
        // An abstract socket, as systemd may hand out.
        let name = format!("runnervisor-test-{}", std::process::id());
        let addr =
            <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(&name).unwrap();
        let server = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        super::notify_to(std::ffi::OsStr::new(&format!("@{name}")), "WATCHDOG=1");
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
