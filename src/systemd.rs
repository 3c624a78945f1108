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

/// The service's unit.
pub const UNIT: &str = "runnervisor.service";

/// Where systemd finds system units, most important first.
pub const UNIT_DIRS: [&str; 5] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

/// Where `LoadCredential=ID` (no path, or a relative one) is looked for.
const CREDSTORES: [&str; 3] = ["/etc/credstore", "/run/credstore", "/usr/lib/credstore"];

/// The files `unit`'s `LoadCredential=` lines load, by credential name, as systemd reads
/// them: its unit file in the first of `dirs` that has one (returned too: `None` if none
/// does), then its drop-ins (`UNIT.d/*.conf` of every dir, in the order of their file
/// names; one in an earlier dir hides a later one of the same name). For `check` run from
/// a shell, which has no `$CREDENTIALS_DIRECTORY`. (`LoadCredentialEncrypted=` and
/// `SetCredential=` are not read: such a credential shows as not loaded.)
pub fn unit_credentials(
    dirs: &[&std::path::Path],
    unit: &str,
) -> Option<(std::path::PathBuf, std::collections::BTreeMap<String, std::path::PathBuf>)> {
    let main = dirs.iter().map(|d| d.join(unit)).find(|p| p.is_file())?;
    let mut dropins = std::collections::BTreeMap::new();
    for dir in dirs.iter().rev() {
        let Ok(entries) = std::fs::read_dir(dir.join(format!("{unit}.d"))) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".conf") {
                dropins.insert(name, e.path());
            }
        }
    }
    let mut files = std::collections::BTreeMap::new();
    for path in std::iter::once(&main).chain(dropins.values()) {
        if let Ok(text) = std::fs::read_to_string(path) {
            load_credentials(&text, &mut files, &|name| {
                let stores = CREDSTORES.map(|s| std::path::Path::new(s).join(name));
                stores.iter().find(|p| p.exists()).unwrap_or(&stores[0]).clone()
            });
        }
    }
    Some((main, files))
}

/// Applies one unit file's `LoadCredential=` lines of `[Service]` to `files`: `ID:PATH`
/// adds (a later one of the same ID replaces it), an empty one clears the list; a path that
/// is not absolute, or none, is `credstore`'s.
fn load_credentials(
    text: &str,
    files: &mut std::collections::BTreeMap<String, std::path::PathBuf>,
    credstore: &dyn Fn(&str) -> std::path::PathBuf,
) {
    let mut service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            service = line == "[Service]";
            continue;
        }
        if !service || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        if key.trim() != "LoadCredential" {
            continue;
        }
        let value = value.trim();
        if value.is_empty() {
            files.clear();
            continue;
        }
        let (id, path) = value.split_once(':').unwrap_or((value, ""));
        let path = match path {
            p if p.starts_with('/') => std::path::PathBuf::from(p),
            "" => credstore(id),
            p => credstore(p),
        };
        files.insert(id.to_string(), path);
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// `LoadCredential=` as systemd reads it: in `[Service]` only, comments skipped, a later
    /// one of an ID replaces it, an empty one clears them, no path or a relative one is the
    /// credential store's.
    #[test]
    fn the_credentials_a_unit_loads() {
        let text = "[Unit]\nLoadCredential=unit-section:/nope\n[Service]\nUser=runnervisor\n\
                    LoadCredential=webhook-secret:/etc/runnervisor/webhook-secret\n\
                    # LoadCredential=commented:/nope\n; LoadCredential=also:/nope\n\
                    LoadCredential = github-pat:/etc/runnervisor/pat-old\n\
                    LoadCredential=github-pat:/etc/runnervisor/github-pat\n\
                    LoadCredential=postgres-password\nLoadCredential=key:keys/app.pem\n[Install]\n\
                    LoadCredential=install-section:/nope\n";
        let mut files = std::collections::BTreeMap::new();
        super::load_credentials(text, &mut files, &|name| Path::new("/etc/credstore").join(name));
        let want: Vec<(&str, &str)> = vec![
            ("github-pat", "/etc/runnervisor/github-pat"),
            ("key", "/etc/credstore/keys/app.pem"),
            ("postgres-password", "/etc/credstore/postgres-password"),
            ("webhook-secret", "/etc/runnervisor/webhook-secret"),
        ];
        let got: Vec<(&str, &str)> = files.iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(got, want);
        super::load_credentials("[Service]\nLoadCredential=\nLoadCredential=a:/x\n", &mut files, &|n| PathBuf::from(n));
        assert_eq!(files, [("a".to_string(), PathBuf::from("/x"))].into());
    }

    /// The unit file of the first directory that has one, then the drop-ins of every
    /// directory in file-name order, one in /etc hiding the package's of the same name.
    #[test]
    fn a_units_drop_ins_change_its_credentials() {
        let root = crate::test_support::tempdir();
        let (etc, lib) = (root.join("etc"), root.join("lib"));
        for d in [etc.join("runnervisor.service.d"), lib.join("runnervisor.service.d")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let unit = "[Service]\nLoadCredential=webhook-secret:/etc/runnervisor/webhook-secret\n\
                    LoadCredential=github-pat:/etc/runnervisor/github-pat\n";
        std::fs::write(lib.join("runnervisor.service"), unit).unwrap();
        let dirs = [etc.as_path(), lib.as_path()];
        assert!(super::unit_credentials(&dirs, "other.service").is_none());
        let write = |dir: &Path, name: &str, text: &str| {
            std::fs::write(dir.join("runnervisor.service.d").join(name), text).unwrap()
        };
        write(&lib, "10-app.conf", "[Service]\nLoadCredential=github-app-key:/etc/runnervisor/app.pem\n");
        write(&lib, "20-pg.conf", "[Service]\nLoadCredential=postgres-password:/lib/pg\n");
        write(&etc, "20-pg.conf", "[Service]\nLoadCredential=postgres-password:/etc/pg\n");
        write(&etc, "README", "[Service]\nLoadCredential=ignored:/nope\n");
        let (main, files) = super::unit_credentials(&dirs, "runnervisor.service").unwrap();
        assert_eq!(main, lib.join("runnervisor.service"));
        let names: Vec<(&str, &str)> = files.iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(
            names,
            [
                ("github-app-key", "/etc/runnervisor/app.pem"),
                ("github-pat", "/etc/runnervisor/github-pat"),
                ("postgres-password", "/etc/pg"),
                ("webhook-secret", "/etc/runnervisor/webhook-secret"),
            ]
        );
        // A unit of the operator's own in /etc replaces the package's.
        std::fs::write(etc.join("runnervisor.service"), "[Service]\nLoadCredential=only:/x\n").unwrap();
        let (main, files) = super::unit_credentials(&dirs, "runnervisor.service").unwrap();
        assert_eq!(main, etc.join("runnervisor.service"));
        assert!(files.contains_key("only") && !files.contains_key("github-pat"), "{files:?}");
    }

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
