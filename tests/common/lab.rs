//! The isolation drill's lab: servers inside the lab namespace that `scripts/setup-host`
//! made (`rv-lab`, behind veth `rv-uplink`, the lab's "internet" 198.18.0.0/24) standing in
//! for a public server, a LAN server and a cloud metadata service, and listeners on this
//! host's own addresses. Every address here is one the test creates; the host gets /32
//! routes to the lab's "LAN" and "metadata" addresses through the veth, so that nothing but
//! the fence stands between a guest and them. Everything is removed on drop.

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::run;

pub const NS: &str = "rv-lab";
pub const UPLINK: &str = "rv-uplink";
/// This host's end of the lab veth, and the lab's end.
pub const HOST_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The broadcast address of the uplink's /24 (`scripts/setup-host`).
pub const HOST_UPLINK_BROADCAST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 255);
pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A "LAN" server on a private address, and a stand-in metadata service.
pub const LAN: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 10);
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

pub struct Lab {
    servers: Child,
    /// "KIND NAME PEER" for every connection/datagram the lab's servers saw.
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Lab {
    pub fn start() -> Lab {
        let ns_ok = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            String::from_utf8_lossy(&ns_ok.stdout).lines().any(|l| l.split_whitespace().next() == Some(NS)),
            "network namespace {NS} missing: run ./scripts/setup-host"
        );
        for addr in [LAN, METADATA] {
            run(Command::new("ip").args(["-n", NS, "addr", "replace", &format!("{addr}/32"), "dev", "lo"]));
            run(Command::new("ip").args([
                "route",
                "replace",
                &format!("{addr}/32"),
                "via",
                &PUBLIC.to_string(),
                "dev",
                UPLINK,
            ]));
        }
        let mut servers = Command::new("ip")
            .args(["netns", "exec", NS, "python3", "-u", "-c", include_str!("../isolation/lab_servers.py")])
            .args([
                format!("tcp,public,{PUBLIC},80"),
                format!("tcp,lan,{LAN},80"),
                format!("udp,lan-dns,{LAN},53"),
                format!("tcp,metadata,{METADATA},80"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(servers.stdout.take().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = seen.clone();
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { return };
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else {
                    s.lock().unwrap().push(line);
                }
            }
        });
        ready_rx.recv_timeout(std::time::Duration::from_secs(10)).expect("lab servers did not start");
        Lab { servers, seen }
    }

    /// Connections the lab server `name` accepted (or datagrams it answered).
    pub fn seen_by(&self, name: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|l| l.split_whitespace().nth(1) == Some(name)).count()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.servers.kill();
        let _ = self.servers.wait();
        for addr in [LAN, METADATA] {
            let _ = Command::new("ip").args(["route", "del", &format!("{addr}/32")]).status();
            let _ = Command::new("ip").args(["-n", NS, "addr", "del", &format!("{addr}/32"), "dev", "lo"]).status();
        }
    }
}

/// A listener on this host that counts the connections it accepts.
pub struct HostListener {
    pub port: u16,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HostListener {
    pub async fn bind(addr: Ipv4Addr) -> HostListener {
        let l = tokio::net::TcpListener::bind((addr, 0)).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        HostListener { port, accepted, task }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
