//! Fixed addresses on a real libvirt network, fast and without VMs: a /28 network of
//! libvirt's (its own dnsmasq, defined as `runnervisor-network` defines the real one), and
//! a "VM" that is a network namespace on a veth plugged into its bridge, asking the real
//! DHCP server for an address (`tests/isolation/dhcp.py`) with the MAC the agent gave it.
//! More VMs than the network has addresses come and go in sequence: each gets the address
//! reserved for it at once (the MAC follows the address, so an old lease never blocks
//! it); a client that is not reserved, or forges another hardware address, gets nothing;
//! and a forged decline disables a VM's address (the control for the fence's DHCP drop).

mod common;

use std::process::Command;

use common::*;
use runnervisor::hypervisor::Hypervisor;
use runnervisor::hypervisor::network;

const DHCP_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/isolation/dhcp.py");

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A /28 libvirt network with no uplink (nothing leaves it), removed when dropped.
struct TestNetwork {
    name: String,
    bridge: String,
}

impl TestNetwork {
    fn define(name: &str, bridge: &str) -> TestNetwork {
        let xml = format!(
            "<network xmlns:dnsmasq='{}'><name>{name}</name><bridge name='{bridge}' stp='off'/>\
             <ip address='198.18.9.1' netmask='255.255.255.240'><dhcp><range start='198.18.9.2' end='198.18.9.14'/></dhcp></ip>\
             <dnsmasq:options><dnsmasq:option value='{}'/></dnsmasq:options></network>",
            network::DNSMASQ_NS,
            network::IGNORE_UNKNOWN
        );
        let file = std::env::temp_dir().join(format!("{name}.xml"));
        std::fs::write(&file, xml).unwrap();
        let net = TestNetwork { name: name.into(), bridge: bridge.into() };
        // Persistent, as the real one: reservations go into its definition too.
        sh(&["virsh", "-c", URI, "net-define", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(file);
        sh(&["virsh", "-c", URI, "net-start", name]);
        net
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("virsh").args(["-c", URI, "net-destroy", &self.name]).output();
        let _ = Command::new("virsh").args(["-c", URI, "net-undefine", &self.name]).output();
    }
}

/// A network namespace with one interface on the test network's bridge.
struct Client {
    ns: String,
    iface: &'static str,
}

impl Client {
    fn plug(ns: &str, bridge: &str) -> Client {
        let host_end = format!("{ns}h");
        sh(&["ip", "netns", "add", ns]);
        let c = Client { ns: ns.into(), iface: "eth0" };
        sh(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", ns]);
        sh(&["ip", "link", "set", &host_end, "master", bridge, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        c
    }

    fn set_mac(&self, mac: &str) {
        sh(&["ip", "-n", &self.ns, "link", "set", self.iface, "down"]);
        sh(&["ip", "-n", &self.ns, "link", "set", self.iface, "address", mac, "up"]);
    }

    fn dhcp(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.ns, "python3", DHCP_CLIENT];
        all.extend_from_slice(args);
        let out = Command::new("ip").args(&all).output().unwrap();
        assert!(out.status.success(), "dhcp.py: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// With the interface's MAC `mac`, asks for an address for `mac` as the client `who`
    /// (a DHCP client identifier: every VM's differs): what was acknowledged.
    fn lease(&self, mac: &str, who: &str) -> Option<String> {
        self.set_mac(mac);
        let v: serde_json::Value =
            serde_json::from_str(self.dhcp(&[self.iface, &format!("{mac},{who}")]).trim()).unwrap();
        v["acked"].as_str().map(str::to_string)
    }

    /// Asks for addresses in the name of all `chaddrs` at once (`requested` in a direct
    /// request too): the chaddrs the server answered.
    fn flood(&self, requested: &str, chaddrs: &[&str]) -> Vec<String> {
        let mut args = vec!["--flood", self.iface, requested];
        args.extend_from_slice(chaddrs);
        let v: serde_json::Value = serde_json::from_str(self.dhcp(&args).trim()).unwrap();
        v["answered"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[test]
fn more_vms_than_addresses_come_and_go_and_each_gets_its_own_at_once() {
    let (hv, _) = libvirt();
    let id = unique() % 100_000;
    let net = TestNetwork::define(&format!("rv-t-addr-{id}"), &format!("rv-ta{id}"));
    let client = Client::plug(&format!("rvta{id}"), &net.bridge);

    // 24 VMs, one after another with up to 6 alive at once, on 13 addresses: each gets the
    // one reserved for it at once, though the VM that held it last still has its lease
    // (another client: every VM has its own client identifier; the MAC follows the address).
    let mut given = Vec::new();
    let mut alive = std::collections::VecDeque::new();
    for i in 0..24 {
        let vm = format!("rv-churn-{i}");
        let r = hv.reserve_address(&net.name, &vm).unwrap();
        assert_eq!(r.mac, network::mac_for(r.ip));
        assert_eq!(hv.reserve_address(&net.name, &vm).unwrap(), r, "asked again: the same");
        assert_eq!(client.lease(&r.mac, &vm), Some(r.ip.to_string()), "{vm} did not get its address {}", r.ip);
        given.push(r.ip.octets()[3]);
        alive.push_back(vm);
        if alive.len() == 6 {
            // The oldest goes; its address comes round again later.
            hv.release_address(&net.name, &alive.pop_front().unwrap()).unwrap();
        }
    }
    eprintln!("24 VMs on a /28, last octets in order: {given:?}");
    assert!(given.iter().filter(|o| **o == given[0]).count() > 1, "addresses were given again: {given:?}");
    for vm in alive.drain(..) {
        hv.release_address(&net.name, &vm).unwrap();
    }
    assert!(hv.network_dhcp(&net.name).unwrap().hosts.is_empty(), "every address released");

    // The control: an address given to another MAC while the last holder's lease lasts is
    // refused by the DHCP server. This is what a MAC that follows the address avoids.
    let last = given.last().copied().unwrap();
    let ip = std::net::Ipv4Addr::new(198, 18, 9, last);
    let other = "52:54:00:ee:ee:ee";
    let r = network::Reservation { vm: "rv-control".into(), mac: other.into(), ip };
    sh(&["virsh", "-c", URI, "net-update", &net.name, "add", "ip-dhcp-host", &network::host_xml(&r), "--live"]);
    assert_eq!(client.lease(other, "control"), None, "an address still leased to another MAC is not given");
    sh(&["virsh", "-c", URI, "net-update", &net.name, "delete", "ip-dhcp-host", &network::host_xml(&r), "--live"]);

    // So an address another MAC still holds a lease on (a client of before the network
    // served reserved clients only) is not given to a VM while that lease lasts.
    // (The addresses the churn used are held, so that the one leased away is the lowest free.)
    let holding: Vec<_> = given.iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for (i, _) in holding.iter().enumerate() {
        hv.reserve_address(&net.name, &format!("rv-hold-{i}")).unwrap();
    }
    let next = std::net::Ipv4Addr::new(198, 18, 9, **holding.last().unwrap() + 1);
    let foreign = network::Reservation { vm: "rv-foreign".into(), mac: "52:54:00:ee:ee:01".into(), ip: next };
    sh(&["virsh", "-c", URI, "net-update", &net.name, "add", "ip-dhcp-host", &network::host_xml(&foreign), "--live"]);
    assert_eq!(client.lease(&foreign.mac, "foreign"), Some(next.to_string()));
    sh(&[
        "virsh",
        "-c",
        URI,
        "net-update",
        &net.name,
        "delete",
        "ip-dhcp-host",
        &network::host_xml(&foreign),
        "--live",
    ]);
    let after = hv.reserve_address(&net.name, "rv-after").unwrap();
    assert_ne!(after.ip, next, "an address leased to another MAC is skipped");
    assert_eq!(client.lease(&after.mac, "rv-after"), Some(after.ip.to_string()));
    hv.release_address(&net.name, "rv-after").unwrap();
    for i in 0..holding.len() {
        hv.release_address(&net.name, &format!("rv-hold-{i}")).unwrap();
    }

    // A client with no reservation, and made-up hardware addresses, get nothing; the
    // network's addresses run out only for VMs, and say so.
    let forged: Vec<String> = (1..=30).map(|i| format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256)).collect();
    let forged: Vec<&str> = forged.iter().map(String::as_str).collect();
    client.set_mac("02:00:00:00:ff:01");
    let answered = client.flood("198.18.9.5", &forged);
    assert!(answered.is_empty(), "forged clients were answered: {answered:?}");
    assert_eq!(client.lease("02:00:00:00:ff:01", "nobody"), None, "a client with no reservation gets nothing");
    let foreign: Vec<String> = network_leases(&net.name).into_iter().filter(|m| m.starts_with("02:")).collect();
    assert!(foreign.is_empty(), "the DHCP server holds leases for clients it does not know: {foreign:?}");
    // One address is still leased to the foreign MAC: 12 are left for VMs.
    let held: Vec<_> = (0..12).map(|i| hv.reserve_address(&net.name, &format!("rv-full-{i}")).unwrap()).collect();
    let mut ips: Vec<_> = held.iter().map(|r| r.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 12, "12 distinct addresses");
    let e = hv.reserve_address(&net.name, "rv-full-12").unwrap_err().to_string();
    assert!(e.contains("no free address") && e.contains(&net.name), "{e}");
    for i in 0..=12 {
        hv.release_address(&net.name, &format!("rv-full-{i}")).unwrap();
    }

    // Why VMs get their address from their seed and the fence drops their DHCP: the server
    // believes the client hardware address a message names. A DHCPDECLINE in a VM's name
    // (its MAC follows from its address), sent from another MAC, disables the VM's
    // reserved address for 10 minutes. This control fails if dnsmasq stops doing so.
    let victim = hv.reserve_address(&net.name, "rv-victim").unwrap();
    assert_eq!(client.lease(&victim.mac, "rv-victim"), Some(victim.ip.to_string()));
    client.set_mac("02:00:00:00:ff:02");
    let gateway = "198.18.9.1";
    client.dhcp(&["--decline", client.iface, &victim.mac, &victim.ip.to_string(), gateway]);
    assert_eq!(client.lease(&victim.mac, "rv-victim"), None, "a forged decline disabled the VM's address");
    hv.release_address(&net.name, "rv-victim").unwrap();
}

/// One DNS query (A, over UDP) from `ns` to `server`: `Some((rcode, answer records))`, `None`
/// without an answer within 3 s.
fn dns_query(ns: &str, server: &str, name: &str) -> Option<(u8, u16)> {
    const QUERY: &str = r#"
import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(q, (server, 53))
try:
    r, _ = s.recvfrom(512)
except socket.timeout:
    print("none"); sys.exit()
print(r[3] & 15, struct.unpack(">H", r[6:8])[0])
"#;
    let out = Command::new("ip").args(["netns", "exec", ns, "python3", "-c", QUERY, name, server]).output().unwrap();
    assert!(out.status.success(), "dns query: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    match (words.next()?.parse().ok(), words.next().and_then(|w| w.parse().ok())) {
        (Some(rcode), Some(answers)) => Some((rcode, answers)),
        _ => None,
    }
}

/// The network `runnervisor-network` defines answers the jobs' DNS with its own names and
/// forwards the rest, but never from this host's `/etc/hosts` (dnsmasq reads it unless told
/// `no-hosts`; a reader found it, and measured here: every name in it answered, as itself
/// and as `NAME.<domain>`, with the host's addresses). Its `<forward>` is left out: nothing
/// routes out of this one (the forwarder it names is an address no one holds).
#[test]
fn the_network_answers_no_name_from_this_hosts_hosts_file() {
    let (_hv, _) = libvirt();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/runnervisor-network");
    let out = Command::new(script)
        .args(["--print", "--name", "rvdnstest", "--address", "198.18.10.1/24", "--dns-forwarder", "198.18.10.2"])
        .args(["--domain", "rv-test", "--dns-host", "198.18.10.3=probe.rv-test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let xml: String = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim_start().starts_with("<forward "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(xml.contains("no-hosts") && xml.contains("<forwarder addr='198.18.10.2'/>"), "{xml}");
    let file = std::env::temp_dir().join("rvdnstest.xml");
    std::fs::write(&file, &xml).unwrap();
    let _ = Command::new("virsh").args(["-c", URI, "net-destroy", "rvdnstest"]).output();
    let _ = Command::new("virsh").args(["-c", URI, "net-undefine", "rvdnstest"]).output();
    sh(&["virsh", "-c", URI, "net-define", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(file);
    let _net = TestNetwork { name: "rvdnstest".into(), bridge: "rv-rvdnstest".into() };
    sh(&["virsh", "-c", URI, "net-start", "rvdnstest"]);
    let client = Client::plug("rvdnsq", "rv-rvdnstest");
    sh(&["ip", "-n", &client.ns, "addr", "add", "198.18.10.77/24", "dev", client.iface]);
    sh(&["ip", "-n", &client.ns, "link", "set", client.iface, "up"]);
    // The control: the network's own name is answered (dnsmasq may take a moment to listen).
    let started = std::time::Instant::now();
    let own = loop {
        match dns_query(&client.ns, "198.18.10.1", "probe.rv-test") {
            Some(answer) => break answer,
            None if started.elapsed() < std::time::Duration::from_secs(30) => continue,
            None => panic!("the network's DNS server never answered"),
        }
    };
    assert_eq!(own, (0, 1), "its own name answered");
    // Every name of this host's /etc/hosts (localhost at least), as the network's domain
    // expands it: unknown; and as written: not answered (forwarded, where no one answers).
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut names: Vec<&str> =
        hosts.lines().filter_map(|l| l.split('#').next()).flat_map(|l| l.split_whitespace().skip(1)).collect();
    names.sort();
    names.dedup();
    assert!(!names.is_empty(), "/etc/hosts names nothing, not even localhost");
    for name in &names {
        if !name.contains('.') {
            let expanded = dns_query(&client.ns, "198.18.10.1", &format!("{name}.rv-test"));
            assert_eq!(expanded, Some((3, 0)), "{name}.rv-test, from /etc/hosts: (rcode, answers)");
        }
        let written = dns_query(&client.ns, "198.18.10.1", name);
        assert!(
            written.is_none_or(|(_, answers)| answers == 0),
            "{name}, from /etc/hosts: (rcode, answers) {written:?}"
        );
    }
    eprintln!("{} names of /etc/hosts asked, none answered; the network's own answered", names.len());
}
