//! The network fence around job VMs (they run untrusted code).
//!
//! A job VM may reach the internet and the endpoints the operator allows, nothing else:
//! - its interface is an isolated port (`<port isolated='yes'/>`: no guest↔guest traffic)
//!   with a `<filterref>` to runnervisor's nwfilter ([`filter_xml`], named by [`vm_filter`]);
//! - the filter includes libvirt's `clean-traffic` (no MAC/IP/ARP spoofing; every frame
//!   that is neither IPv4 nor ARP is dropped, so IPv6 is off entirely) with the two
//!   exceptions `clean-traffic` makes dropped too ([`NO_ANNOUNCE`]), and adds, in its
//!   own IPv4 chain between the anti-spoofing check and `clean-traffic`'s accept:
//!   the allow-list's single addresses first, then DNS to the network's gateway (and
//!   DHCP, where the VM learns its address), then a drop of the rest of the network's
//!   subnet (the gateway's other ports, its broadcast address, the other VMs) and of
//!   every other address of the host (and the fleet's other members, its database) and
//!   of the ranges no endpoint a job needs lives in (link-local and cloud metadata, cloud
//!   host endpoints in public space, loopback, multicast: [`BLOCKED`]), then the
//!   allow-list's ranges, then a drop of the private ranges ([`BLOCKED`] too);
//!   everything else (the internet) passes. A range in the allow-list thus opens private
//!   endpoints, never the host, the other VMs, the fleet or the cloud's metadata: only
//!   an entry naming that one address does.
//!
//! The rules are ebtables rules at the bridge port, so they hold for traffic to the
//! host itself as much as for forwarded traffic, and need no `br_netfilter`.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::hypervisor::domain_xml::Xml;
use crate::hypervisor::network::{Subnet, mask, prefix_network as network};

/// Ranges a job VM never reaches unless allow-listed, with why, and whether an entry of
/// the allow-list that is a range may open them (`false`: only one naming the address
/// does, as for this host's own: no endpoint a job needs lives there, and a range such as
/// `0.0.0.0/0:80` would otherwise open the cloud's metadata service).
pub const BLOCKED: &[(Ipv4Addr, u8, &str, bool)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this\" network", false),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private (RFC 1918)", true),
    (Ipv4Addr::new(100, 64, 0, 0), 10, "carrier-grade NAT", true),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback", false),
    // Azure's host endpoint (WireServer, the host agent plugin: the host's goal state,
    // extensions' settings and certificates), in public space; the Azure agent's own rule
    // for it filters this host's locally sent traffic, not a VM's that libvirt NATs.
    (Ipv4Addr::new(168, 63, 129, 16), 32, "cloud host endpoint (Azure WireServer)", false),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local, cloud metadata", false),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private (RFC 1918)", true),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private (RFC 1918)", true),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast", false),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved, broadcast", false),
];

/// One allow-list entry: `ADDRESS[/PREFIX]:PORT[-PORT]`, for TCP and UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowEntry {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub ports: (u16, u16),
}

impl FromStr for AllowEntry {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (net, ports) = s
            .rsplit_once(':')
            .ok_or("give ADDRESS[/PREFIX]:PORT[-PORT], e.g. \"10.20.0.5:443\" or \"192.168.10.0/24:3128\"")?;
        if net.contains(':') || net.starts_with('[') {
            return Err("IPv6 is not offered to job VMs (the fence drops all IPv6): give an IPv4 address".into());
        }
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| *p <= 32).ok_or("the prefix must be 0 to 32")?),
            None => (net, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        if prefix < 32 && u32::from(addr) & !mask(prefix) != 0 {
            return Err(format!(
                "{addr}/{prefix} has host bits set (the network is {}/{prefix})",
                network(addr, prefix)
            ));
        }
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(format!("{p:?} is not a port (1-65535)"));
        let ports = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(ports)?, port(ports)?),
        };
        if ports.0 > ports.1 {
            return Err(format!("port range {}-{} is reversed", ports.0, ports.1));
        }
        Ok(AllowEntry { addr, prefix, ports })
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.prefix < 32 {
            write!(f, "/{}", self.prefix)?;
        }
        if self.ports.0 == self.ports.1 {
            write!(f, ":{}", self.ports.0)
        } else {
            write!(f, ":{}-{}", self.ports.0, self.ports.1)
        }
    }
}

impl<'de> Deserialize<'de> for AllowEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| serde::de::Error::custom(format!("allow entry {s:?}: {e}")))
    }
}

/// What each range of `allow` covers that it does not open (see [`filter_xml`]): this
/// host's addresses in it, the VMs' network where they overlap, the ranges of [`BLOCKED`]
/// no range opens. One line per such entry, for `check` to say.
pub fn unopened(allow: &[AllowEntry], host_addrs: &[Ipv4Addr], subnet: Option<Subnet>) -> Vec<String> {
    let covers = |a: &AllowEntry, net: Ipv4Addr, prefix: u8| {
        network(net, a.prefix.min(prefix)) == network(a.addr, a.prefix.min(prefix))
    };
    let mut out = Vec::new();
    for a in allow.iter().filter(|a| a.prefix < 32) {
        let mut what: Vec<String> = Vec::new();
        let mut host: Vec<Ipv4Addr> = host_addrs.iter().copied().filter(|h| covers(a, *h, 32)).collect();
        host.sort();
        host.dedup();
        if !host.is_empty() {
            what.push(format!("this host's {}", host.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", ")));
        }
        if let Some(s) = subnet.filter(|s| covers(a, s.network(), s.prefix)) {
            what.push(format!("the VMs' network {}/{}", s.network(), s.prefix));
        }
        for (net, prefix, why, _) in BLOCKED.iter().filter(|b| !b.3 && covers(a, b.0, b.1)) {
            what.push(format!("{net}/{prefix} ({why})"));
        }
        if !what.is_empty() {
            out.push(format!("{a} does not open {} (only an entry naming one address does)", what.join(", ")));
        }
    }
    out
}

/// Which range of [`BLOCKED`] an address falls in, if any.
pub fn blocked_range(addr: Ipv4Addr) -> Option<&'static str> {
    BLOCKED.iter().find(|(net, prefix, _, _)| network(addr, *prefix) == *net).map(|(_, _, why, _)| *why)
}

/// What the filter is made of.
#[derive(Debug, Clone)]
pub struct FenceSpec<'a> {
    /// The nwfilter's name.
    pub filter: &'a str,
    /// The libvirt network's subnet: DNS is allowed to its address (the gateway), the rest
    /// of the subnet dropped (the gateway's other ports, the broadcast address, the other
    /// VMs). `None` on a bridge.
    pub subnet: Option<Subnet>,
    /// Whether a VM may talk DHCP (to the gateway and the broadcast address): on a bridge,
    /// and on a libvirt network that leases to any client (the VM learns its address).
    /// Never where the agent fixes the VMs' addresses: the DHCP server believes the client
    /// hardware address a message names, which a job with root chooses.
    pub dhcp: bool,
    /// Every IPv4 address of this host, and of the other hosts a job must not reach (the
    /// fleet's other members, its database): all blocked unless allow-listed.
    pub host_addrs: &'a [Ipv4Addr],
    pub allow: &'a [AllowEntry],
}

/// The chain and priority of the filter's own rules: after `no-ip-spoofing` (chain
/// `ipv4-ip`, -710), before `clean-traffic`'s accept of IPv4 (-650).
const CHAIN: &str = "ipv4-rvfence";
const CHAIN_PRIORITY: &str = "-690";

/// The nwfilter XML: `clean-traffic` plus the fence's own rules.
pub fn filter_xml(spec: &FenceSpec<'_>) -> String {
    let mut x = Xml::default();
    x.open("filter", &[("name", spec.filter), ("chain", CHAIN), ("priority", CHAIN_PRIORITY)]);
    x.empty("filterref", &[("filter", "clean-traffic")]);
    x.empty("filterref", &[("filter", NO_ANNOUNCE)]);
    // `return` hands the frame back to the root chain, where clean-traffic accepts it. A
    // single address first (what the operator named, a proxy on this host too); a range
    // after the drops of the subnet and of the host's addresses, which it may overlap
    // unawares (`10.0.0.0/8:8080` would open the agent's port on the gateway, and the other
    // VMs through the host's routing).
    for a in spec.allow {
        let priority = if a.prefix == 32 { "100" } else { "350" };
        for proto in ["tcp", "udp"] {
            rule(&mut x, "return", priority, a.addr, a.prefix, Some((proto, a.ports)));
        }
    }
    if let Some(s) = spec.subnet {
        if spec.dhcp {
            rule(&mut x, "return", "200", s.gateway, 32, Some(("udp", (67, 67))));
        }
        rule(&mut x, "return", "200", s.gateway, 32, Some(("udp", (53, 53))));
        rule(&mut x, "return", "200", s.gateway, 32, Some(("tcp", (53, 53))));
        rule(&mut x, "drop", "300", s.network(), s.prefix, None);
    }
    if spec.dhcp {
        // DHCP discovery and requests before an address is leased go to the broadcast address.
        rule(&mut x, "return", "200", Ipv4Addr::BROADCAST, 32, Some(("udp", (67, 67))));
    }
    let in_subnet = |a: &Ipv4Addr| spec.subnet.is_some_and(|s| s.contains(*a));
    let mut host: Vec<Ipv4Addr> = spec.host_addrs.iter().copied().filter(|a| !in_subnet(a)).collect();
    host.sort();
    host.dedup();
    for a in host {
        rule(&mut x, "drop", "300", a, 32, None);
    }
    for (net, prefix, _, ranges_open) in BLOCKED {
        rule(&mut x, "drop", if *ranges_open { "400" } else { "300" }, *net, *prefix, None);
    }
    x.close();
    x.finish()
}

fn rule(x: &mut Xml, action: &str, priority: &str, addr: Ipv4Addr, prefix: u8, l4: Option<(&str, (u16, u16))>) {
    let addr = addr.to_string();
    let prefix = prefix.to_string();
    let mut attrs: Vec<(&str, &str)> = vec![("dstipaddr", &addr), ("dstipmask", &prefix)];
    let (from, to);
    if let Some((proto, (a, b))) = l4 {
        (from, to) = (a.to_string(), b.to_string());
        attrs.extend([("protocol", proto), ("dstportstart", from.as_str()), ("dstportend", to.as_str())]);
    }
    x.open("rule", &[("action", action), ("direction", "out"), ("priority", priority)]);
    x.empty("ip", &attrs);
    x.close();
}

/// The filter every fence references besides `clean-traffic`: `clean-traffic` lets a guest
/// send two kinds of frame besides IPv4 and ARP, for QEMU's announcements after a migration
/// or a restore (its `qemu-announce-self`): every outgoing frame of ethertype 0x0835,
/// whatever it carries, and RARP requests (0x8035) of the VM's own MAC address, which QEMU
/// sends five times from every VM restored from a snapshot slot (the isolation drill on
/// restored VMs counted them on the bridge). This drops both first: a port's MAC address is
/// learnt from its first IPv4 or ARP frame anyway. Shared by every fence of the host.
pub const NO_ANNOUNCE: &str = "runnervisor-no-announce";

/// The ethertypes [`NO_ANNOUNCE`] drops, each with the priority of its rule in the root
/// chain: before `qemu-announce-self`'s accept of 0x0835 (500), and before the jump to the
/// `rarp` chain (-400), where `qemu-announce-self-rarp` accepts the announcements.
const ANNOUNCE_DROPS: [(&str, &str); 2] = [("0x835", "400"), ("0x8035", "-410")];

/// The XML of [`NO_ANNOUNCE`].
pub fn no_announce_xml() -> String {
    let mut x = Xml::default();
    x.open("filter", &[("name", NO_ANNOUNCE), ("chain", "root")]);
    for (ethertype, priority) in ANNOUNCE_DROPS {
        x.open("rule", &[("action", "drop"), ("direction", "out"), ("priority", priority)]);
        x.empty("mac", &[("protocolid", ethertype)]);
        x.close();
    }
    x.close();
    x.finish()
}

/// The nwfilter a VM's interface references: the configured `filter` where the VM learns
/// its address by DHCP, `<filter>-fixed` (no DHCP) where the agent fixed it. Two filters,
/// not one, so that VMs started by an agent that let them use DHCP keep renewing their
/// leases after an upgrade.
pub fn vm_filter(filter: &str, fixed: bool) -> String {
    if fixed { format!("{filter}-fixed") } else { filter.to_string() }
}

/// The nwfilters (name, XML), in the order they must be defined, that a fenced `network`
/// needs on this host now: [`NO_ANNOUNCE`], the DHCP one, and where the agent fixes
/// addresses (`fixed`) the one without DHCP ([`vm_filter`]); from its allow-list, the
/// network's `subnet`, and the addresses to drop: this host's current ones
/// ([`host_addresses`]) and the fleet's other members and its database. None for `user`
/// mode.
pub fn filters_for(
    network: &crate::config::NetworkConfig,
    subnet: Option<Subnet>,
    fixed: bool,
    host_addrs: &[Ipv4Addr],
) -> Vec<(String, String)> {
    let Some((filter, allow)) = network.fence() else { return Vec::new() };
    let mut out = vec![(NO_ANNOUNCE.to_string(), no_announce_xml())];
    // The DHCP one always (VMs that learn their address); the fixed one where addresses are.
    let kinds: &[bool] = if fixed { &[false, true] } else { &[false] };
    for fixed in kinds {
        let name = vm_filter(filter, *fixed);
        let spec = FenceSpec { filter: &name, subnet, dhcp: !fixed, host_addrs, allow };
        out.push((name.clone(), filter_xml(&spec)));
    }
    out
}

/// What else the fence drops besides this host's own addresses, kept up to date by the
/// scheduler (fleet mode: the other members' addresses from their heartbeats, the
/// database's from its name) and read by every provisioning.
#[derive(Debug, Default)]
pub struct Others(std::sync::RwLock<Vec<Ipv4Addr>>);

impl Others {
    pub fn get(&self) -> Vec<Ipv4Addr> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the list (sorted, without duplicates); whether it changed.
    pub fn set(&self, mut addrs: Vec<Ipv4Addr>) -> bool {
        addrs.sort();
        addrs.dedup();
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        let changed = *current != addrs;
        *current = addrs;
        changed
    }
}

/// Every IPv4 address configured on this host's interfaces, and the broadcast and network
/// addresses of their prefixes (the kernel takes a datagram to the broadcast address of
/// any of its prefixes as its own, whether or not the address has `brd` set, and hands it
/// to the services that listen on every address). An error (e.g. netlink sockets
/// forbidden) means no fence can be built: no VM is started then.
pub fn host_addresses() -> Result<Vec<Ipv4Addr>, std::io::Error> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    let v4 = |s: Option<nix::sys::socket::SockaddrStorage>| s.and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip()));
    let mut out = Vec::new();
    for a in addrs {
        let Some(addr) = v4(a.address) else { continue };
        out.push(addr);
        out.extend(v4(a.broadcast));
        if let Some(netmask) = v4(a.netmask).map(u32::from).filter(|m| m.count_ones() < 31) {
            out.push(Ipv4Addr::from(u32::from(addr) | !netmask));
            out.push(Ipv4Addr::from(u32::from(addr) & netmask));
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(std::io::Error::other("no IPv4 address found, not even 127.0.0.1"));
    }
    Ok(out)
}

/// Whether a host bridge of this name exists (bridge mode).
pub fn bridge_exists(name: &str) -> bool {
    !name.contains('/') && std::path::Path::new("/sys/class/net").join(name).join("bridge").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AllowEntry, String> {
        s.parse()
    }

    #[test]
    fn allow_entries_parse_and_print() {
        let table: &[(&str, (Ipv4Addr, u8, u16, u16))] = &[
            ("10.20.0.5:443", (Ipv4Addr::new(10, 20, 0, 5), 32, 443, 443)),
            ("192.168.10.0/24:3128", (Ipv4Addr::new(192, 168, 10, 0), 24, 3128, 3128)),
            ("172.16.0.0/12:8000-8100", (Ipv4Addr::new(172, 16, 0, 0), 12, 8000, 8100)),
            ("0.0.0.0/0:1-65535", (Ipv4Addr::new(0, 0, 0, 0), 0, 1, 65535)),
        ];
        for (text, (addr, prefix, a, b)) in table {
            let e = parse(text).unwrap_or_else(|err| panic!("{text}: {err}"));
            assert_eq!(e, AllowEntry { addr: *addr, prefix: *prefix, ports: (*a, *b) }, "{text}");
            assert_eq!(e.to_string(), *text);
        }
    }

    #[test]
    fn bad_allow_entries_say_what_is_wrong() {
        let table: &[(&str, &str)] = &[
            ("10.20.0.5", "ADDRESS[/PREFIX]:PORT"),
            ("10.20.0.5:0", "not a port"),
            ("10.20.0.5:https", "not a port"),
            ("10.20.0.5:70000", "not a port"),
            ("10.20.0.5:443-80", "reversed"),
            ("10.20.0/24:443", "not an IPv4 address"),
            ("example.com:443", "not an IPv4 address"),
            ("10.20.0.5/33:443", "prefix"),
            ("10.20.0.5/24:443", "host bits set (the network is 10.20.0.0/24)"),
            ("[fd00::1]:443", "IPv6"),
            ("fd00::1:443", "IPv6"),
        ];
        for (text, want) in table {
            let e = parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn blocked_ranges() {
        let table: &[(&str, Option<&str>)] = &[
            ("10.1.2.3", Some("private (RFC 1918)")),
            ("172.31.255.255", Some("private (RFC 1918)")),
            ("172.32.0.1", None),
            ("192.168.122.1", Some("private (RFC 1918)")),
            ("169.254.169.254", Some("link-local, cloud metadata")),
            ("100.100.100.100", Some("carrier-grade NAT")),
            ("127.0.0.53", Some("loopback")),
            ("224.0.0.251", Some("multicast")),
            ("255.255.255.255", Some("reserved, broadcast")),
            ("140.82.112.3", None),
            ("203.0.113.2", None),
            ("168.63.129.16", Some("cloud host endpoint (Azure WireServer)")),
            ("168.63.129.17", None),
        ];
        for (a, want) in table {
            assert_eq!(blocked_range(a.parse().unwrap()), *want, "{a}");
        }
    }

    /// The rules in the order nwfilter applies them (by priority, then as written).
    fn rules(xml: &str) -> Vec<(String, String, String)> {
        let doc = roxmltree::Document::parse(xml).unwrap();
        let mut out: Vec<(i32, usize, (String, String, String))> = Vec::new();
        for (i, r) in doc.descendants().filter(|n| n.has_tag_name("rule")).enumerate() {
            assert_eq!(r.attribute("direction"), Some("out"));
            let ip = r.children().find(|n| n.has_tag_name("ip")).unwrap();
            let dst = format!("{}/{}", ip.attribute("dstipaddr").unwrap(), ip.attribute("dstipmask").unwrap());
            let l4 = match ip.attribute("protocol") {
                Some(p) => {
                    format!("{p}:{}-{}", ip.attribute("dstportstart").unwrap(), ip.attribute("dstportend").unwrap())
                }
                None => "all".into(),
            };
            let prio: i32 = r.attribute("priority").unwrap().parse().unwrap();
            out.push((prio, i, (r.attribute("action").unwrap().into(), dst, l4)));
        }
        out.sort_by_key(|(p, i, _)| (*p, *i));
        out.into_iter().map(|(_, _, r)| r).collect()
    }

    fn r(action: &str, dst: &str, l4: &str) -> (String, String, String) {
        (action.into(), dst.into(), l4.into())
    }

    const LAB: Subnet = Subnet { gateway: Ipv4Addr::new(198, 51, 100, 1), prefix: 24 };

    #[test]
    fn the_filter_allows_first_then_gateway_services_then_drops() {
        let allow = [parse("10.20.0.5:443").unwrap(), parse("192.168.10.0/24:3128-3130").unwrap()];
        let host = [Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(198, 51, 100, 1), Ipv4Addr::new(192, 0, 2, 2)];
        let xml = filter_xml(&FenceSpec {
            filter: "runnervisor-fence",
            subnet: Some(LAB),
            dhcp: false,
            host_addrs: &host,
            allow: &allow,
        });
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("name"), Some("runnervisor-fence"));
        assert_eq!(root.attribute("chain"), Some("ipv4-rvfence"));
        let refs: Vec<_> = root.children().filter(|n| n.has_tag_name("filterref")).collect();
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[0].attribute("filter"), Some("clean-traffic"));
        let mut want = vec![
            // A single address: what the operator named.
            r("return", "10.20.0.5/32", "tcp:443-443"),
            r("return", "10.20.0.5/32", "udp:443-443"),
            // DNS at the gateway; no DHCP: the agent fixed the VM's address.
            r("return", "198.51.100.1/32", "udp:53-53"),
            r("return", "198.51.100.1/32", "tcp:53-53"),
            // The rest of the subnet: the gateway's other ports, the broadcast address, VMs.
            r("drop", "198.51.100.0/24", "all"),
            // The host's other address, once; the gateway is not repeated.
            r("drop", "192.0.2.2/32", "all"),
            // A range: after the host's and the VMs' drops, before the blocked ranges.
            r("return", "192.168.10.0/24", "tcp:3128-3130"),
            r("return", "192.168.10.0/24", "udp:3128-3130"),
        ];
        // The ranges no range of the allow-list opens go with the host's drops, before it.
        let at = want.len() - 2;
        for (net, prefix, _, _) in BLOCKED.iter().filter(|b| !b.3).rev() {
            want.insert(at, r("drop", &format!("{net}/{prefix}"), "all"));
        }
        for (net, prefix, _, _) in BLOCKED.iter().filter(|b| b.3) {
            want.push(r("drop", &format!("{net}/{prefix}"), "all"));
        }
        assert_eq!(rules(&xml), want);
    }

    /// A range in the allow-list that covers the VMs' network, this host's addresses or
    /// the fleet's opens none of them (a reader found `10.0.0.0/8:8080` opening the
    /// agent's own port on the gateway, and the other VMs through the host's routing);
    /// naming one address does.
    #[test]
    fn a_range_in_the_allow_list_opens_neither_the_host_nor_the_other_vms() {
        let allow = [parse("0.0.0.0/0:8080").unwrap(), parse("198.51.100.1:3128").unwrap()];
        let host = [Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(198, 51, 100, 1)];
        let xml =
            filter_xml(&FenceSpec { filter: "f", subnet: Some(LAB), dhcp: false, host_addrs: &host, allow: &allow });
        // What a destination meets first, in the order nwfilter applies the rules.
        let applied = rules(&xml);
        let first = |dst: Ipv4Addr, port: u16| -> String {
            applied
                .iter()
                .find(|(_, net, l4)| {
                    let (addr, prefix) = net.split_once('/').unwrap();
                    let (addr, prefix): (Ipv4Addr, u8) = (addr.parse().unwrap(), prefix.parse().unwrap());
                    let ports = l4.split_once(':').map(|(_, p)| p.split_once('-').unwrap());
                    network(dst, prefix) == addr
                        && ports.is_none_or(|(a, b)| (a.parse().unwrap()..=b.parse().unwrap()).contains(&port))
                })
                .map(|(action, _, _)| action.clone())
                .unwrap_or_else(|| "pass".into())
        };
        let table = [
            ("the gateway, the agent's port", "198.51.100.1", 8080, "drop"),
            ("another VM", "198.51.100.57", 8080, "drop"),
            ("the host's uplink", "10.1.2.3", 8080, "drop"),
            ("a private server", "10.9.9.9", 8080, "return"),
            ("the internet", "140.82.112.3", 8080, "return"),
            ("the proxy on the gateway, named", "198.51.100.1", 3128, "return"),
            ("the gateway, another port", "198.51.100.1", 22, "drop"),
            ("the cloud's metadata service", "169.254.169.254", 8080, "drop"),
            ("Azure's host endpoint", "168.63.129.16", 8080, "drop"),
            ("a private range", "192.168.10.7", 8080, "return"),
        ];
        for (what, dst, port, want) in table {
            assert_eq!(first(dst.parse().unwrap(), port), want, "{what}");
        }
    }

    #[test]
    fn check_says_what_a_range_of_the_allow_list_does_not_open() {
        let allow =
            [parse("10.0.0.0/8:3128").unwrap(), parse("192.168.10.0/24:443").unwrap(), parse("10.1.2.3:22").unwrap()];
        let host = [Ipv4Addr::new(10, 1, 2, 3), Ipv4Addr::new(198, 51, 100, 1)];
        assert_eq!(
            unopened(&allow, &host, Some(LAB)),
            ["10.0.0.0/8:3128 does not open this host's 10.1.2.3 (only an entry naming one address does)"]
        );
        let wide = [parse("0.0.0.0/0:80").unwrap()];
        let said = unopened(&wide, &host, Some(LAB));
        assert_eq!(said.len(), 1);
        for part in ["10.1.2.3, 198.51.100.1", "the VMs' network 198.51.100.0/24", "169.254.0.0/16", "168.63.129.16/32"]
        {
            assert!(said[0].contains(part), "{part}: {said:?}");
        }
        assert!(unopened(&[parse("192.168.10.0/24:443").unwrap()], &host, Some(LAB)).is_empty());
    }

    #[test]
    fn dhcp_is_allowed_only_where_the_vm_learns_its_address() {
        let spec = FenceSpec { filter: "f", subnet: Some(LAB), dhcp: true, host_addrs: &[], allow: &[] };
        let rs = rules(&filter_xml(&spec));
        assert_eq!(
            rs[..5],
            [
                r("return", "198.51.100.1/32", "udp:67-67"),
                r("return", "198.51.100.1/32", "udp:53-53"),
                r("return", "198.51.100.1/32", "tcp:53-53"),
                r("return", "255.255.255.255/32", "udp:67-67"),
                r("drop", "198.51.100.0/24", "all"),
            ]
        );
        let fixed = rules(&filter_xml(&FenceSpec { dhcp: false, ..spec }));
        assert!(!fixed.iter().any(|(_, _, l4)| l4 == "udp:67-67"), "{fixed:?}");
    }

    #[test]
    fn other_hosts_of_the_fleet_are_dropped_like_this_one() {
        let net = crate::config::NetworkConfig::default();
        let (_, xml) = filters_for(&net, Some(LAB), true, &[Ipv4Addr::new(203, 0, 113, 7)]).pop().unwrap();
        assert!(rules(&xml).contains(&r("drop", "203.0.113.7/32", "all")), "{xml}");
        let (_, without) = filters_for(&net, Some(LAB), true, &[]).pop().unwrap();
        assert!(!without.contains("203.0.113.7"));
        let others = Others::default();
        assert!(others.set(vec![Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(1, 2, 3, 4)]));
        assert!(!others.set(vec![Ipv4Addr::new(1, 2, 3, 4)]), "unchanged");
        assert_eq!(others.get(), [Ipv4Addr::new(1, 2, 3, 4)]);
    }

    #[test]
    fn on_a_bridge_there_is_no_gateway_exception() {
        let xml = filter_xml(&FenceSpec { filter: "f", subnet: None, dhcp: true, host_addrs: &[], allow: &[] });
        let rs = rules(&xml);
        assert_eq!(rs[0], r("return", "255.255.255.255/32", "udp:67-67"));
        assert_eq!(rs.len(), 1 + BLOCKED.len());
        assert!(rs[1..].iter().all(|(a, _, l4)| a == "drop" && l4 == "all"));
    }

    #[test]
    fn names_in_the_filter_are_escaped() {
        let xml = filter_xml(&FenceSpec { filter: "a'<b", subnet: None, dhcp: true, host_addrs: &[], allow: &[] });
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(doc.root_element().attribute("name"), Some("a'<b"));
    }

    #[test]
    fn this_host_has_addresses_and_broadcast_addresses() {
        let mine = host_addresses().unwrap();
        assert!(mine.contains(&Ipv4Addr::LOCALHOST));
        // Every broadcast route of the kernel's local table (`brd` set or not).
        let out = std::process::Command::new("ip").args(["route", "show", "table", "local"]).output().expect("ip runs");
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| l.starts_with("broadcast ")) {
            let brd: Ipv4Addr = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert!(mine.contains(&brd), "broadcast address {brd} missing from {mine:?}");
        }
    }

    #[test]
    fn filters_where_addresses_are_fixed_and_where_they_are_learned() {
        let net = crate::config::NetworkConfig::default();
        let (base, _) = net.fence().unwrap();
        let names = |fixed| filters_for(&net, Some(LAB), fixed, &[]).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        // The DHCP one stays defined for VMs of before (their leases renew); new VMs use -fixed.
        assert_eq!(names(true), [NO_ANNOUNCE.to_string(), base.to_string(), format!("{base}-fixed")]);
        assert_eq!(names(false), [NO_ANNOUNCE.to_string(), base.to_string()]);
        assert_eq!(vm_filter(base, true), format!("{base}-fixed"));
        assert_eq!(vm_filter(base, false), base);
        let all = filters_for(&net, Some(LAB), true, &[]);
        let dhcp = |xml: &str| rules(xml).iter().any(|(_, _, l4)| l4 == "udp:67-67");
        assert!(dhcp(&all[1].1) && !dhcp(&all[2].1));
        for (_, xml) in &all[1..] {
            let doc = roxmltree::Document::parse(xml).unwrap();
            let refs: Vec<_> = doc.descendants().filter_map(|n| n.attribute("filter")).collect();
            assert_eq!(refs, ["clean-traffic", NO_ANNOUNCE]);
        }
        let user = crate::config::NetworkConfig::User { accept_unfenced: true };
        assert!(filters_for(&user, None, false, &[]).is_empty());
    }

    #[test]
    fn the_announce_ethertypes_are_dropped_before_clean_traffic_accepts_them() {
        let xml = no_announce_xml();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!((root.attribute("name"), root.attribute("chain")), (Some(NO_ANNOUNCE), Some("root")));
        let drops: Vec<(String, i32)> = root
            .children()
            .filter(|n| n.has_tag_name("rule"))
            .map(|rule| {
                assert_eq!((rule.attribute("action"), rule.attribute("direction")), (Some("drop"), Some("out")));
                let mac = rule.children().find(|n| n.has_tag_name("mac")).unwrap();
                (mac.attribute("protocolid").unwrap().to_string(), rule.attribute("priority").unwrap().parse().unwrap())
            })
            .collect();
        assert_eq!(drops.len(), 2, "{xml}");
        for (ethertype, priority) in drops {
            // qemu-announce-self accepts 0x0835 at 500 in the root chain; its RARP
            // announcements are accepted in the `rarp` chain, jumped to at -400.
            let accepted_at = match ethertype.as_str() {
                "0x835" => 500,
                "0x8035" => -400,
                other => panic!("unexpected ethertype {other}"),
            };
            assert!(priority < accepted_at, "{ethertype} dropped at {priority}, accepted at {accepted_at}");
        }
    }
}
