//! Fixed addresses on the fenced libvirt network (pure: parsing the network's XML,
//! choosing an address, the host entry's XML).
//!
//! Every VM's address is decided by the agent, not learned: a DHCP host entry per VM (its
//! MAC → its address, named after the VM) is added to the network when the VM is
//! provisioned and removed at teardown, and the network's DHCP server answers known
//! clients only (`dhcp-ignore=tag:!known`, [`IGNORE_UNKNOWN`]), so that no job can lease
//! the network's addresses away by asking in the name of made-up clients.
//!
//! A VM's MAC is derived from its address ([`mac_for`]): the next VM given a freed address
//! has the MAC of the VM that held it before, and the DHCP server hands it the address at
//! once even while the old lease lasts (it refuses an address leased to another MAC).
//!
//! The VM does not ask DHCP for it either: its seed carries the address ([`crate::cloudinit::network_config`])
//! and the fence drops every DHCP message of a VM, since the server trusts the client
//! hardware address a message names, which a job with root chooses (a forged DECLINE in
//! another VM's name disables that VM's address for 10 minutes: `tests/addresses.rs`).
//! The host entries stay: they are the network's record of whose address is whose,
//! shared by every process on the host, and what a client of the network gets if it asks.

use std::net::Ipv4Addr;

use super::domain_xml::Xml;

/// The dnsmasq option (in the network's `<dnsmasq:options>`) that makes its DHCP server
/// ignore clients without a host entry.
pub const IGNORE_UNKNOWN: &str = "dhcp-ignore=tag:!known";

/// A VM's place on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The VM it is for (the host entry's `name`).
    pub vm: String,
    pub mac: String,
    pub ip: Ipv4Addr,
}

/// A network's own IPv4 address (its gateway for the VMs) and prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// The subnet's network address (the gateway with the host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        prefix_network(self.gateway, self.prefix)
    }

    /// Whether `addr` is in the subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        prefix_network(addr, self.prefix) == self.network()
    }
}

/// The netmask of an IPv4 prefix length (0–32).
pub fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) }
}

/// `addr` with the host bits of a `/prefix` cleared.
pub fn prefix_network(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(addr) & mask(prefix))
}

/// What a network's XML says about its IPv4 subnet and DHCP service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dhcp {
    /// Its IPv4 address and prefix, if it has one.
    pub subnet: Option<Subnet>,
    /// The (first) DHCP range of its IPv4 address, if it has one.
    pub range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Its host entries (those without a name or MAC too: their addresses are taken).
    pub hosts: Vec<Reservation>,
    /// Whether its DHCP server ignores clients without a host entry.
    pub known_only: bool,
    /// Whether its DNS server leaves this host's `/etc/hosts` out of its answers
    /// (dnsmasq's `no-hosts`, [`NO_HOSTS`]).
    pub no_hosts: bool,
}

impl Dhcp {
    /// Whether the agent fixes the VMs' addresses on this network (its DHCP server serves
    /// known clients only: the seed carries the address, the fence drops DHCP), or why the
    /// network cannot take VMs at all.
    pub fn fixes_addresses(&self) -> Result<bool, &'static str> {
        match (self.known_only, self.subnet) {
            (true, None) => {
                Err("it serves reserved clients only but has no IPv4 address with a prefix: VMs get no address")
            }
            (known_only, _) => Ok(known_only),
        }
    }
}

/// The MAC of the VM at `ip`: QEMU's prefix and the address's low 24 bits (unique within
/// any network of up to a /8).
pub fn mac_for(ip: Ipv4Addr) -> String {
    let [_, b, c, d] = ip.octets();
    format!("52:54:00:{b:02x}:{c:02x}:{d:02x}")
}

/// Parses a network's XML (`virsh net-dumpxml`).
pub fn dhcp(network_xml: &str) -> Dhcp {
    let mut out = Dhcp { subnet: None, range: None, hosts: Vec::new(), known_only: false, no_hosts: false };
    let Ok(doc) = roxmltree::Document::parse(network_xml) else { return out };
    let root = doc.root_element();
    let ipv4 = root.children().find(|n| n.has_tag_name("ip") && n.attribute("family").is_none_or(|f| f == "ipv4"));
    out.subnet = ipv4.and_then(|ip| {
        let gateway: Ipv4Addr = ip.attribute("address")?.parse().ok()?;
        let prefix = match (ip.attribute("prefix"), ip.attribute("netmask")) {
            (Some(p), _) => p.parse().ok().filter(|p| *p <= 32)?,
            (None, Some(m)) => {
                let m = u32::from(m.parse::<Ipv4Addr>().ok()?);
                (m.leading_ones() == m.count_ones()).then_some(m.count_ones() as u8)?
            }
            // As libvirt: the address's class decides.
            (None, None) => match gateway.octets()[0] {
                0..=127 => 8,
                128..=191 => 16,
                192..=223 => 24,
                _ => return None,
            },
        };
        Some(Subnet { gateway, prefix })
    });
    if let Some(dhcp) = ipv4.and_then(|ip| ip.children().find(|n| n.has_tag_name("dhcp"))) {
        let addr = |n: roxmltree::Node<'_, '_>, a: &str| n.attribute(a).and_then(|v| v.parse::<Ipv4Addr>().ok());
        out.range = dhcp
            .children()
            .filter(|n| n.has_tag_name("range"))
            .find_map(|r| Some((addr(r, "start")?, addr(r, "end")?)));
        out.hosts = dhcp
            .children()
            .filter(|n| n.has_tag_name("host"))
            .filter_map(|h| {
                Some(Reservation {
                    vm: h.attribute("name").unwrap_or_default().to_string(),
                    mac: h.attribute("mac").unwrap_or_default().to_ascii_lowercase(),
                    ip: addr(h, "ip")?,
                })
            })
            .collect();
    }
    let option = |want: &str| {
        root.descendants()
            .filter(|n| n.has_tag_name("option") && n.tag_name().namespace() == Some(DNSMASQ_NS))
            .any(|n| n.attribute("value").is_some_and(|v| v.trim() == want))
    };
    out.known_only = option(IGNORE_UNKNOWN);
    out.no_hosts = option(NO_HOSTS);
    out
}

/// The dnsmasq option that keeps this host's `/etc/hosts` out of the network's DNS answers.
pub const NO_HOSTS: &str = "no-hosts";

/// libvirt's namespace for dnsmasq options in a network's XML.
pub const DNSMASQ_NS: &str = "http://libvirt.org/schemas/network/dnsmasq/1.0";

/// The lowest address of the DHCP range that no host entry holds, skipping `avoid` (the
/// network's own address; addresses leased to MACs other than the one the address's VM
/// would have).
pub fn pick(dhcp: &Dhcp, avoid: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let (start, end) = dhcp.range?;
    (u32::from(start)..=u32::from(end))
        .map(Ipv4Addr::from)
        .find(|ip| !dhcp.hosts.iter().any(|h| h.ip == *ip) && !avoid.contains(ip))
}

/// The `<host>` element that reserves `r` (for `virNetworkUpdate`, section ip-dhcp-host).
pub fn host_xml(r: &Reservation) -> String {
    let ip = r.ip.to_string();
    let mut x = Xml::default();
    x.empty("host", &[("mac", &r.mac), ("name", &r.vm), ("ip", &ip)]);
    x.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: &str = r#"<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'>
  <name>runnervisor</name>
  <ip address='198.51.100.1' netmask='255.255.255.240'>
    <dhcp>
      <range start='198.51.100.2' end='198.51.100.6'/>
      <host mac='52:54:00:33:64:02' name='rv-p-7' ip='198.51.100.2'/>
      <host mac='52:54:00:AA:BB:CC' ip='198.51.100.4'/>
    </dhcp>
  </ip>
  <dnsmasq:options>
    <dnsmasq:option value='dhcp-ignore=tag:!known'/>
  </dnsmasq:options>
</network>"#;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_network_says_its_range_hosts_and_whether_it_serves_known_clients_only() {
        let d = dhcp(NET);
        assert_eq!(d.range, Some((ip("198.51.100.2"), ip("198.51.100.6"))));
        assert_eq!(
            d.hosts,
            [
                Reservation { vm: "rv-p-7".into(), mac: "52:54:00:33:64:02".into(), ip: ip("198.51.100.2") },
                Reservation { vm: String::new(), mac: "52:54:00:aa:bb:cc".into(), ip: ip("198.51.100.4") },
            ]
        );
        assert!(d.known_only);
        let open = NET.replace("dhcp-ignore=tag:!known", "dhcp-lease-max=10");
        assert!(!dhcp(&open).known_only, "another option is not the one");
        assert!(!d.no_hosts);
        let private = NET.replace("</dnsmasq:options>", "<dnsmasq:option value='no-hosts'/></dnsmasq:options>");
        assert!(dhcp(&private).no_hosts && dhcp(&private).known_only);
        assert_eq!(d.subnet, Some(Subnet { gateway: ip("198.51.100.1"), prefix: 28 }));
        assert_eq!(d.subnet.unwrap().network(), ip("198.51.100.0"));
        let bare = "<network><ip address='10.0.0.1' netmask='255.255.255.0'/></network>";
        let subnet = Some(Subnet { gateway: ip("10.0.0.1"), prefix: 24 });
        assert_eq!(dhcp(bare), Dhcp { subnet, range: None, hosts: vec![], known_only: false, no_hosts: false });
        for (ip_attrs, want) in [
            ("address='10.1.2.3' prefix='16'", Some(16)),
            ("address='10.1.2.3'", Some(8)),
            ("address='172.16.2.3'", Some(16)),
            ("address='198.51.100.1'", Some(24)),
            ("address='10.1.2.3' netmask='255.0.255.0'", None),
            ("address='10.1.2.3' prefix='33'", None),
            ("family='ipv6' address='fd00::1' prefix='64'", None),
            ("family='ipv6' address='fd00::1' prefix='64'/><ip address='10.1.2.3' netmask='255.255.255.128'", Some(25)),
        ] {
            let xml = format!("<network><forward mode='nat'/><ip {ip_attrs}/></network>");
            assert_eq!(dhcp(&xml).subnet.map(|s| s.prefix), want, "{ip_attrs}");
        }
        let wide = Subnet { gateway: ip("10.213.7.1"), prefix: 12 };
        assert_eq!(wide.network(), ip("10.208.0.0"));
    }

    #[test]
    fn addresses_are_the_lowest_free_in_the_range_and_run_out() {
        let mut d = dhcp(NET);
        assert_eq!(pick(&d, &[]), Some(ip("198.51.100.3")));
        assert_eq!(pick(&d, &[ip("198.51.100.3")]), Some(ip("198.51.100.5")));
        for last in [3, 5, 6] {
            let a = ip(&format!("198.51.100.{last}"));
            d.hosts.push(Reservation { vm: format!("rv-p-{last}"), mac: mac_for(a), ip: a });
        }
        assert_eq!(pick(&d, &[]), None, "the range is full");
        d.hosts.retain(|h| h.vm != "rv-p-7");
        assert_eq!(pick(&d, &[]), Some(ip("198.51.100.2")), "a freed address is given again");
        assert_eq!(
            pick(&Dhcp { subnet: None, range: None, hosts: vec![], known_only: true, no_hosts: false }, &[]),
            None
        );
    }

    #[test]
    fn a_vms_mac_follows_from_its_address() {
        assert_eq!(mac_for(ip("198.51.100.2")), "52:54:00:33:64:02");
        assert_eq!(mac_for(ip("10.213.7.250")), "52:54:00:d5:07:fa");
        assert_ne!(mac_for(ip("10.1.2.3")), mac_for(ip("10.1.2.4")));
    }

    #[test]
    fn host_entries_are_escaped() {
        let r = Reservation { vm: "rv-a'<b>".into(), mac: "52:54:00:33:64:02".into(), ip: ip("198.51.100.2") };
        let x = host_xml(&r);
        let doc = roxmltree::Document::parse(&x).unwrap();
        let h = doc.root_element();
        assert_eq!((h.attribute("name"), h.attribute("ip")), (Some("rv-a'<b>"), Some("198.51.100.2")));
        assert_eq!(dhcp(&format!("<network><ip address='198.51.100.1'><dhcp>{x}</dhcp></ip></network>")).hosts, [r]);
    }
}
