//! Pure builders of libvirt XML (domain, volumes) and the parser of runnervisor's domain
//! metadata. Every text and attribute value goes through [`Xml`], which escapes it.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::config::{DomainType, NetworkConfig};

/// runnervisor's XML namespace for `<metadata>` (see `virsh metadata NAME --uri ...`).
pub const METADATA_NS: &str = "https://runnervisor.dev/xmlns/domain/1";
pub const METADATA_PREFIX: &str = "runnervisor";

/// The virtio-serial port of a warm VM (`/dev/virtio-ports/NAME` in the guest), on which
/// the host delivers a job's runner command (see `images/guest/runnervisor-warm`).
pub const BIND_CHANNEL: &str = "dev.runnervisor.bind.0";

/// A tiny XML writer that escapes every value it is given.
#[derive(Default)]
pub struct Xml {
    out: String,
    open: Vec<&'static str>,
}

/// Whether XML 1.0 can carry `c` at all, escaped or not (its `Char` production): not the
/// control characters below U+0020 but tab, newline and return, and not U+FFFE or U+FFFF,
/// which libxml2 (libvirt's parser) refuses too. (A `char` is never a surrogate.)
pub fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FFFD}' | '\u{10000}'..)
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // XML 1.0 forbids them even when escaped: dropped.
            c if !xml_char(c) => {}
            c => o.push(c),
        }
    }
    o
}

impl Xml {
    fn indent(&mut self) {
        for _ in 0..self.open.len() {
            self.out.push_str("  ");
        }
    }
    fn start(&mut self, tag: &str, attrs: &[(&str, &str)]) {
        self.indent();
        let _ = write!(self.out, "<{tag}");
        for (k, v) in attrs {
            let _ = write!(self.out, " {k}=\"{}\"", escape(v));
        }
    }
    pub fn open(&mut self, tag: &'static str, attrs: &[(&str, &str)]) -> &mut Self {
        self.start(tag, attrs);
        self.out.push_str(">\n");
        self.open.push(tag);
        self
    }
    pub fn close(&mut self) -> &mut Self {
        let tag = self.open.pop().expect("close without open");
        self.indent();
        let _ = writeln!(self.out, "</{tag}>");
        self
    }
    pub fn empty(&mut self, tag: &str, attrs: &[(&str, &str)]) -> &mut Self {
        self.start(tag, attrs);
        self.out.push_str("/>\n");
        self
    }
    pub fn text(&mut self, tag: &str, attrs: &[(&str, &str)], text: &str) -> &mut Self {
        self.start(tag, attrs);
        let _ = writeln!(self.out, ">{}</{tag}>", escape(text));
        self
    }
    pub fn finish(self) -> String {
        assert!(self.open.is_empty(), "unclosed elements: {:?}", self.open);
        self.out
    }
}

/// What runnervisor records about a VM inside its domain (`<metadata>`), so a restarted
/// agent can recognize and re-adopt it, and an operator can read it with virsh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmMetadata {
    pub job_id: u64,
    pub run_id: u64,
    pub repository: String,
    pub pool: String,
    pub runner_name: String,
    pub created: SystemTime,
    pub console_log: PathBuf,
    pub job_url: String,
    /// A warm VM no job's credential was delivered into (yet).
    pub warm: bool,
    /// Fleet mode: the member that made it (each member touches only its own VMs).
    pub host: Option<String>,
    /// A VM booted to be saved as a snapshot slot: what it was made from
    /// (`scheduler::slots::made_from`), so that a saved slot found without a record can be
    /// told right or stale from its saved state alone.
    pub made_from: Option<String>,
}

/// Everything the domain XML is made from.
#[derive(Debug, Clone)]
pub struct DomainSpec<'a> {
    pub name: &'a str,
    pub domain_type: DomainType,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub overlay_path: &'a Path,
    pub seed_path: &'a Path,
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    pub cmdline: Option<&'a str>,
    pub network: &'a NetworkConfig,
    /// The libvirt network's own address, the only DHCP server trusted (fenced modes).
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The VM's fixed place on the libvirt network (its MAC and address); `None` on a
    /// bridge or slirp, where the address is learned.
    pub address: Option<&'a super::network::Reservation>,
    pub title: &'a str,
    pub description: &'a str,
    pub metadata: &'a VmMetadata,
}

pub fn domain(spec: &DomainSpec<'_>) -> String {
    let mut x = Xml::default();
    x.open("domain", &[("type", spec.domain_type.as_str())]);
    x.text("name", &[], spec.name);
    // A VM generation ID (ACPI vmgenid), which libvirt generates anew at each restore from
    // a saved state: a guest kernel with the vmgenid driver reseeds its RNG when it changes
    // (the bind message's entropy does it in any case; with the test image's kernel, two
    // restores without it drew different bytes in 2 of 3 runs: not a reseed to count on).
    x.empty("genid", &[]);
    x.text("title", &[], spec.title);
    x.text("description", &[], spec.description);
    x.open("metadata", &[]);
    metadata_element(&mut x, spec.metadata, true);
    x.close();
    x.text("memory", &[("unit", "MiB")], &spec.memory_mib.to_string());
    x.text("vcpu", &[], &spec.vcpus.to_string());
    x.open("os", &[]);
    x.text("type", &[("arch", "x86_64"), ("machine", "q35")], "hvm");
    if let Some(k) = spec.kernel {
        x.text("kernel", &[], &k.to_string_lossy());
        if let Some(i) = spec.initrd {
            x.text("initrd", &[], &i.to_string_lossy());
        }
        x.text("cmdline", &[], spec.cmdline.unwrap_or("root=LABEL=root rw console=ttyS0 quiet"));
    } else {
        x.empty("boot", &[("dev", "hd")]);
    }
    x.close();
    x.open("features", &[]).empty("acpi", &[]).close();
    // KVM: the host CPU. TCG: QEMU's default model, which every x86-64 guest runs on.
    if spec.domain_type == DomainType::Kvm {
        x.empty("cpu", &[("mode", "host-passthrough"), ("check", "none")]);
    }
    x.empty("clock", &[("offset", "utc")]);
    x.text("on_poweroff", &[], "destroy");
    x.text("on_reboot", &[], "destroy");
    x.text("on_crash", &[], "destroy");
    x.open("devices", &[]);
    x.open("disk", &[("type", "file"), ("device", "disk")]);
    x.empty("driver", &[("name", "qemu"), ("type", "qcow2"), ("discard", "unmap")]);
    x.empty("source", &[("file", &spec.overlay_path.to_string_lossy())]);
    x.empty("target", &[("dev", "vda"), ("bus", "virtio")]);
    x.close();
    x.open("disk", &[("type", "file"), ("device", "disk")]);
    x.empty("driver", &[("name", "qemu"), ("type", "raw")]);
    x.empty("source", &[("file", &spec.seed_path.to_string_lossy())]);
    x.empty("target", &[("dev", "vdb"), ("bus", "virtio")]);
    x.empty("readonly", &[]);
    x.close();
    match spec.network {
        NetworkConfig::User { .. } => x.open("interface", &[("type", "user")]),
        NetworkConfig::Network { name, .. } => {
            x.open("interface", &[("type", "network")]).empty("source", &[("network", name)])
        }
        NetworkConfig::Bridge { name, .. } => {
            x.open("interface", &[("type", "bridge")]).empty("source", &[("bridge", name)])
        }
    };
    if let Some(a) = spec.address {
        x.empty("mac", &[("address", &a.mac)]);
    }
    x.empty("model", &[("type", "virtio")]);
    if let Some((filter, _)) = spec.network.fence() {
        // The guest's address: the one the agent reserved for it, known before its first
        // packet; on a bridge, learned from the DHCP server's answer only (trusting the
        // network's own server when known), never from what the guest itself sends.
        x.open("filterref", &[("filter", &crate::fence::vm_filter(filter, spec.address.is_some()))]);
        match spec.address {
            Some(a) => x.empty("parameter", &[("name", "IP"), ("value", &a.ip.to_string())]),
            None => x.empty("parameter", &[("name", "CTRL_IP_LEARNING"), ("value", "dhcp")]),
        };
        if let Some(gw) = spec.gateway {
            x.empty("parameter", &[("name", "DHCPSERVER"), ("value", &gw.to_string())]);
        }
        x.close();
        x.empty("port", &[("isolated", "yes")]);
    }
    x.close();
    x.open("serial", &[("type", "file")]);
    x.empty("source", &[("path", &spec.metadata.console_log.to_string_lossy()), ("append", "off")]);
    x.open("target", &[("port", "0")]).close();
    x.close();
    x.open("console", &[("type", "file")]);
    x.empty("source", &[("path", &spec.metadata.console_log.to_string_lossy()), ("append", "off")]);
    x.empty("target", &[("type", "serial"), ("port", "0")]);
    x.close();
    // Every VM's runner credential comes over this port (never through cloud-init). libvirt
    // makes the socket and connects to it for `virDomainOpenChannel`; nothing on the host
    // needs a path to it, and no network path leads from the guest.
    x.open("channel", &[("type", "unix")]);
    x.empty("source", &[("mode", "bind")]);
    x.empty("target", &[("type", "virtio"), ("name", BIND_CHANNEL)]);
    x.close();
    x.open("rng", &[("model", "virtio")]);
    x.text("backend", &[("model", "random")], "/dev/urandom");
    x.close();
    x.open("video", &[]).empty("model", &[("type", "none")]).close();
    x.empty("memballoon", &[("model", "none")]);
    x.close();
    x.close();
    x.finish()
}

/// `<runnervisor:vm xmlns:runnervisor=..>` inside a domain definition, or (`prefixed`
/// false) a plain `<vm>`, as `virDomainSetMetadata` wants it: libvirt puts it into the
/// namespace named by its key and URI arguments itself.
fn metadata_element(x: &mut Xml, m: &VmMetadata, prefixed: bool) {
    let tag = |name: &str| if prefixed { format!("{METADATA_PREFIX}:{name}") } else { name.to_string() };
    if prefixed {
        x.open("runnervisor:vm", &[("xmlns:runnervisor", METADATA_NS)]);
    } else {
        x.open("vm", &[]);
    }
    x.text(&tag("job-id"), &[], &m.job_id.to_string());
    x.text(&tag("run-id"), &[], &m.run_id.to_string());
    x.text(&tag("repository"), &[], &m.repository);
    x.text(&tag("pool"), &[], &m.pool);
    x.text(&tag("runner-name"), &[], &m.runner_name);
    x.text(&tag("created"), &[], &humantime::format_rfc3339_seconds(m.created).to_string());
    x.text(&tag("console-log"), &[], &m.console_log.to_string_lossy());
    x.text(&tag("job-url"), &[], &m.job_url);
    if m.warm {
        x.text(&tag("warm"), &[], "true");
    }
    if let Some(host) = &m.host {
        x.text(&tag("host"), &[], host);
    }
    if let Some(made_from) = &m.made_from {
        x.text(&tag("made-from"), &[], made_from);
    }
    x.close();
}

/// The metadata element alone, unprefixed (for `virDomainSetMetadata` with
/// [`METADATA_PREFIX`] and [`METADATA_NS`]).
pub fn metadata_xml(m: &VmMetadata) -> String {
    let mut x = Xml::default();
    metadata_element(&mut x, m, false);
    x.finish()
}

/// Whether the guest has the port `channel` open, as libvirt's live domain XML says
/// (`<target type='virtio' name=.. state='connected'/>`); `None` if there is no such port.
pub fn channel_connected(domain_xml: &str, channel: &str) -> Option<bool> {
    let doc = roxmltree::Document::parse(domain_xml).ok()?;
    let target = doc
        .descendants()
        .filter(|n| n.has_tag_name("channel"))
        .find_map(|c| c.children().find(|t| t.has_tag_name("target") && t.attribute("name") == Some(channel)))?;
    Some(target.attribute("state") == Some("connected"))
}

/// Parses the element libvirt returns for `metadata(ELEMENT, METADATA_NS)`.
pub fn parse_metadata(xml: &str) -> Option<VmMetadata> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let root = doc.root_element();
    // libvirt hands the element back without its namespace (it was selected by URI);
    // the whole domain XML keeps it. Any other namespace is not ours.
    if root.tag_name().name() != "vm" || root.tag_name().namespace().is_some_and(|ns| ns != METADATA_NS) {
        return None;
    }
    let get = |name: &str| {
        root.children()
            .find(|n| n.is_element() && n.tag_name().name() == name)
            .map(|n| n.text().unwrap_or("").to_string())
    };
    Some(VmMetadata {
        job_id: get("job-id")?.parse().ok()?,
        run_id: get("run-id")?.parse().ok()?,
        repository: get("repository")?,
        pool: get("pool")?,
        runner_name: get("runner-name")?,
        created: humantime::parse_rfc3339(&get("created")?).ok()?,
        console_log: get("console-log")?.into(),
        job_url: get("job-url").unwrap_or_default(),
        warm: get("warm").is_some_and(|w| w == "true"),
        host: get("host").filter(|h| !h.is_empty()),
        made_from: get("made-from"),
    })
}

/// The runnervisor metadata of a whole domain XML (a saved state's, say).
pub fn metadata_of_domain(xml: &str) -> Option<VmMetadata> {
    metadata_of_doc(&roxmltree::Document::parse(xml).ok()?, xml)
}

/// [`metadata_of_domain`] of a domain XML already parsed (`doc`, of `xml`).
pub fn metadata_of_doc(doc: &roxmltree::Document, xml: &str) -> Option<VmMetadata> {
    let md = doc.descendants().find(|n| n.tag_name().namespace() == Some(METADATA_NS) && n.has_tag_name("vm"))?;
    parse_metadata(&xml[md.range()])
}

/// `xml` (a domain's) with its runnervisor metadata replaced by `m`, as
/// `virDomainSetMetadata` replaces it (the fake hypervisor's `describe`); `None` if it has
/// none (libvirt would add it: every domain of ours is defined with it) or does not parse.
pub fn with_metadata(xml: &str, m: &VmMetadata) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let md = doc.descendants().find(|n| n.tag_name().namespace() == Some(METADATA_NS) && n.has_tag_name("vm"))?;
    let mut x = Xml::default();
    metadata_element(&mut x, m, true);
    let range = md.range();
    Some(format!("{}{}{}", &xml[..range.start], x.finish().trim_end(), &xml[range.end..]))
}

/// `xml` (a libvirt object definition) with `<uuid>` as its root's first child, so that
/// it redefines the existing object of that UUID.
pub fn with_uuid(xml: &str, uuid: &str) -> String {
    let Some(end) = xml.find('>') else { return xml.to_string() };
    let mut x = Xml::default();
    x.text("uuid", &[], uuid);
    let uuid = x.finish();
    let open = &xml[..=end];
    match open.strip_suffix("/>") {
        // `<filter .../>`: open it, so that the uuid has a place.
        Some(head) => {
            let tag = head.trim_start_matches('<').split_whitespace().next().unwrap_or_default();
            format!("{}>\n{uuid}</{tag}>\n", head.trim_end())
        }
        None => format!("{open}\n{uuid}{}", xml[end + 1..].trim_start_matches('\n')),
    }
}

/// A saved domain's XML (`virDomainSaveImageGetXMLDesc`) with the disk whose source file
/// is `from` at `to` instead, and when `console_log` is given, the serial console's log
/// file (a host path, no part of the guest's ABI) at `console_log`, so that a VM restored
/// has a console log of its own, not the saved VM's (which each restore would truncate).
/// libvirt restores a saved domain onto other host paths and refuses any other change
/// (name, UUID, MAC, devices). Only those attributes' values are replaced, escaped, so the
/// rest stays byte for byte what libvirt wrote. `None` when no disk has that source.
pub fn for_restore(xml: &str, from: &Path, to: &Path, console_log: Option<&Path>) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let from = from.to_str()?;
    let disk = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .filter_map(|d| d.children().find(|c| c.has_tag_name("source")))
        .find_map(|src| src.attributes().find(|a| a.name() == "file" && a.value() == from))?;
    let mut edits = vec![(disk.range_value(), escape(to.to_str()?))];
    if let Some(log) = console_log {
        let log = escape(log.to_str()?);
        for dev in doc.descendants().filter(|n| n.has_tag_name("serial") || n.has_tag_name("console")) {
            if dev.attribute("type") != Some("file") {
                continue;
            }
            let paths = dev
                .children()
                .filter(|c| c.has_tag_name("source"))
                .filter_map(|s| s.attributes().find(|a| a.name() == "path").map(|a| a.range_value()));
            edits.extend(paths.map(|r| (r, log.clone())));
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    edits.dedup_by_key(|(r, _)| r.start);
    let mut out = xml.to_string();
    for (range, value) in edits {
        out.replace_range(range, &value);
    }
    Some(out)
}

/// Whether the domain of `xml` runs the VM `vm`: one of its disks is `vm`'s overlay. A
/// VM's own domain always does; a snapshot slot's domain runs each VM restored into it on
/// that VM's overlay ([`for_restore`]), under the slot's name.
pub fn runs_vm(xml: &str, vm: &str) -> bool {
    let Ok(doc) = roxmltree::Document::parse(xml) else { return false };
    disks_hold_vm(&disk_files(&doc), vm)
}

/// The file names of a parsed domain XML's disks (`<disk><source file=…>`, the name
/// without its directory): what [`runs_vm`] looks for `vm`'s overlay in.
pub fn disk_files(doc: &roxmltree::Document) -> Vec<String> {
    doc.descendants()
        .filter(|n| n.has_tag_name("disk"))
        .filter_map(|d| d.children().find(|c| c.has_tag_name("source")))
        .filter_map(|src| src.attribute("file"))
        .filter_map(|file| Path::new(file).file_name()?.to_str().map(str::to_string))
        .collect()
}

/// Whether a domain whose disks are `files` ([`disk_files`]) runs the VM `vm`.
pub fn disks_hold_vm(files: &[String], vm: &str) -> bool {
    let overlay = super::overlay_volume_name(vm);
    files.contains(&overlay)
}

/// The host's security models from libvirt's capabilities (`<host><secmodel><model>`).
pub fn security_models(capabilities_xml: &str) -> Vec<String> {
    let Ok(doc) = roxmltree::Document::parse(capabilities_xml) else { return Vec::new() };
    doc.descendants()
        .filter(|n| n.has_tag_name("secmodel"))
        .filter_map(|s| s.children().find(|c| c.has_tag_name("model"))?.text().map(str::to_string))
        .filter(|m| m != "none")
        .collect()
}

/// A qcow2 overlay backed by the golden image.
pub fn overlay_volume(name: &str, capacity_bytes: u64, backing: &Path) -> String {
    let mut x = Xml::default();
    x.open("volume", &[]);
    x.text("name", &[], name);
    x.text("capacity", &[("unit", "bytes")], &capacity_bytes.to_string());
    x.open("target", &[]);
    x.empty("format", &[("type", "qcow2")]);
    x.open("permissions", &[]).text("mode", &[], "0600").close();
    x.close();
    x.open("backingStore", &[]);
    x.text("path", &[], &backing.to_string_lossy());
    x.empty("format", &[("type", "qcow2")]);
    x.close();
    x.close();
    x.finish()
}

/// A raw volume for the NoCloud seed, readable by its owner only.
pub fn raw_volume(name: &str, capacity_bytes: u64) -> String {
    let mut x = Xml::default();
    x.open("volume", &[]);
    x.text("name", &[], name);
    x.text("capacity", &[("unit", "bytes")], &capacity_bytes.to_string());
    x.text("allocation", &[("unit", "bytes")], &capacity_bytes.to_string());
    x.open("target", &[]);
    x.empty("format", &[("type", "raw")]);
    x.open("permissions", &[]).text("mode", &[], "0600").close();
    x.close();
    x.close();
    x.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NASTY: &str = "a<b>&c'd\"e]]>\u{1}\u{FFFE}\u{FFFF}";

    fn meta() -> VmMetadata {
        VmMetadata {
            job_id: 30_000_000_001,
            run_id: 20_000_000_001,
            repository: format!("octo-org/{NASTY}"),
            pool: "small".into(),
            runner_name: "rv-small-30000000001".into(),
            created: humantime::parse_rfc3339("2026-11-29T12:00:00Z").unwrap(),
            console_log: "/var/log/runnervisor/console/rv-small-30000000001.log".into(),
            job_url: format!("https://github.com/octo-org/x/actions/runs/1/job/2?{NASTY}"),
            warm: false,
            host: Some(format!("hv-{NASTY}")),
            made_from: Some(format!("image /i ({NASTY})")),
        }
    }

    fn spec<'a>(m: &'a VmMetadata, net: &'a NetworkConfig, kernel: Option<&'a Path>) -> DomainSpec<'a> {
        DomainSpec {
            name: "rv-small-30000000001",
            domain_type: DomainType::Qemu,
            vcpus: 2,
            memory_mib: 512,
            overlay_path: Path::new("/pool/rv-small-30000000001.qcow2"),
            seed_path: Path::new("/pool/rv-small-30000000001-seed.img"),
            kernel,
            initrd: kernel.map(|_| Path::new("/img/initrd.img")),
            cmdline: None,
            network: net,
            gateway: None,
            address: None,
            title: NASTY,
            description: NASTY,
            metadata: m,
        }
    }

    #[test]
    fn domain_xml_is_well_formed_and_escaped() {
        let m = meta();
        let xml = domain(&spec(&m, &NetworkConfig::User { accept_unfenced: true }, Some(Path::new("/img/vmlinuz"))));
        let doc = roxmltree::Document::parse(&xml).expect("well-formed");
        let root = doc.root_element();
        assert_eq!(root.attribute("type"), Some("qemu"));
        let text =
            |tag: &str| root.descendants().find(|n| n.has_tag_name(tag)).and_then(|n| n.text()).map(str::to_string);
        assert_eq!(text("name").as_deref(), Some("rv-small-30000000001"));
        assert!(root.children().any(|n| n.has_tag_name("genid") && n.text().is_none()), "libvirt makes the genid");
        assert_eq!(text("title").as_deref(), Some("a<b>&c'd\"e]]>"), "what XML cannot carry dropped, the rest exact");
        assert_eq!(text("kernel").as_deref(), Some("/img/vmlinuz"));
        assert_eq!(text("cmdline").as_deref(), Some("root=LABEL=root rw console=ttyS0 quiet"));
        assert_eq!(text("on_poweroff").as_deref(), Some("destroy"));
        let disks: Vec<_> = root.descendants().filter(|n| n.has_tag_name("disk")).collect();
        assert_eq!(disks.len(), 2);
        assert!(disks[1].children().any(|n| n.has_tag_name("readonly")));
        assert!(root.descendants().any(|n| n.has_tag_name("interface") && n.attribute("type") == Some("user")));
        assert!(!root.descendants().any(|n| n.has_tag_name("filterref")), "slirp has no fence");
        // The metadata element round-trips through the parser.
        let md = root.descendants().find(|n| n.tag_name().namespace() == Some(METADATA_NS)).unwrap();
        let mut expected = m.clone();
        let carried = |s: &str| s.replace(|c| !xml_char(c), "");
        expected.repository = carried(&expected.repository);
        expected.job_url = carried(&expected.job_url);
        expected.made_from = expected.made_from.as_deref().map(carried);
        expected.host = expected.host.as_deref().map(carried);
        assert_eq!(parse_metadata(&xml[md.range()]), Some(expected.clone()));
        assert_eq!(metadata_of_domain(&xml), Some(expected), "found in the whole domain XML");
        assert!(!root.descendants().any(|n| n.has_tag_name("cpu")), "TCG uses QEMU's default CPU");
        assert_ne!(channel_connected(&xml, BIND_CHANNEL), Some(true), "not connected in a definition");
    }

    #[test]
    fn every_vm_has_the_bind_port_and_a_warm_one_says_it_is_warm() {
        let mut m = meta();
        m.warm = true;
        let s = spec(&m, &NetworkConfig::User { accept_unfenced: true }, None);
        let xml = domain(&s);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let channel = doc.descendants().find(|n| n.has_tag_name("channel")).unwrap();
        assert_eq!(channel.attribute("type"), Some("unix"));
        let target = channel.children().find(|n| n.has_tag_name("target")).unwrap();
        assert_eq!((target.attribute("type"), target.attribute("name")), (Some("virtio"), Some(BIND_CHANNEL)));
        let md = doc.descendants().find(|n| n.tag_name().namespace() == Some(METADATA_NS)).unwrap();
        assert!(parse_metadata(&xml[md.range()]).unwrap().warm);
        // Standalone metadata (set when a job is bound): unprefixed, as libvirt wants it
        // (it adds the namespace), and it round-trips too.
        m.warm = false;
        m.job_id = 42;
        let standalone = metadata_xml(&m);
        assert!(
            standalone.starts_with("<vm>") && !standalone.contains("xmlns") && !standalone.contains("runnervisor:")
        );
        let parsed = parse_metadata(&standalone).unwrap();
        assert_eq!((parsed.warm, parsed.job_id), (false, 42));
        // libvirt's live XML tells whether the guest opened the port.
        let live = |state: &str| {
            format!(
                "<domain><devices><channel type='unix'><source mode='bind' path='/x'/><target type='virtio' name='{BIND_CHANNEL}'{state}/></channel></devices></domain>"
            )
        };
        assert_eq!(channel_connected(&live(" state='connected'"), BIND_CHANNEL), Some(true));
        assert_eq!(channel_connected(&live(" state='disconnected'"), BIND_CHANNEL), Some(false));
        assert_eq!(channel_connected(&live(""), BIND_CHANNEL), Some(false));
        assert_eq!(channel_connected(&live(" state='connected'"), "other"), None);
    }

    #[test]
    fn kvm_without_kernel_boots_from_disk_on_a_bridge() {
        let m = meta();
        let net = NetworkConfig::Bridge { name: "br0".into(), filter: "runnervisor-fence".into(), allow: vec![] };
        let mut s = spec(&m, &net, None);
        s.domain_type = DomainType::Kvm;
        let xml = domain(&s);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("type"), Some("kvm"));
        assert!(root.descendants().any(|n| n.has_tag_name("boot") && n.attribute("dev") == Some("hd")));
        assert!(!root.descendants().any(|n| n.has_tag_name("kernel")));
        assert!(root.descendants().any(|n| n.has_tag_name("source") && n.attribute("bridge") == Some("br0")));
        assert!(root.descendants().any(|n| n.has_tag_name("filterref")), "a bridge is fenced too");
        assert!(root.descendants().any(|n| n.has_tag_name("port") && n.attribute("isolated") == Some("yes")));
        assert!(root.descendants().any(|n| n.has_tag_name("cpu") && n.attribute("mode") == Some("host-passthrough")));
    }

    #[test]
    fn the_default_network_is_fenced() {
        let m = meta();
        let net = NetworkConfig::default();
        let mut s = spec(&m, &net, None);
        s.gateway = Some("198.51.100.1".parse().unwrap());
        let xml = domain(&s);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let iface = doc.descendants().find(|n| n.has_tag_name("interface")).unwrap();
        assert_eq!(iface.attribute("type"), Some("network"));
        let child = |tag: &str| iface.children().find(|n| n.has_tag_name(tag)).unwrap();
        assert_eq!(child("source").attribute("network"), Some("runnervisor"));
        assert_eq!(child("port").attribute("isolated"), Some("yes"));
        let fref = child("filterref");
        assert_eq!(fref.attribute("filter"), Some("runnervisor-fence"));
        assert_eq!(filter_params(fref), [("CTRL_IP_LEARNING", "dhcp"), ("DHCPSERVER", "198.51.100.1")]);
        // With its reserved address: its MAC, and the fence knows the address from the start.
        let r = crate::hypervisor::network::Reservation {
            vm: "rv-small-30000000001".into(),
            mac: "52:54:00:33:64:0a".into(),
            ip: "198.51.100.10".parse().unwrap(),
        };
        s.address = Some(&r);
        let xml = domain(&s);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let iface = doc.descendants().find(|n| n.has_tag_name("interface")).unwrap();
        let mac = iface.children().find(|n| n.has_tag_name("mac")).unwrap();
        assert_eq!(mac.attribute("address"), Some("52:54:00:33:64:0a"));
        let fref = iface.children().find(|n| n.has_tag_name("filterref")).unwrap();
        assert_eq!(fref.attribute("filter"), Some("runnervisor-fence-fixed"), "the fence without DHCP");
        assert_eq!(filter_params(fref), [("IP", "198.51.100.10"), ("DHCPSERVER", "198.51.100.1")]);
    }

    /// A `<filterref>`'s parameters, (name, value) in order.
    fn filter_params<'a>(fref: roxmltree::Node<'a, '_>) -> Vec<(&'a str, &'a str)> {
        fref.children()
            .filter(|n| n.has_tag_name("parameter"))
            .map(|p| (p.attribute("name").unwrap(), p.attribute("value").unwrap()))
            .collect()
    }

    #[test]
    fn a_saved_domain_is_restored_onto_another_disk_and_console_log_and_nothing_else_changes() {
        let saved = "<domain type='qemu'><name>rv-slot-1</name><devices>\n\
                     <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                     <source file='/pool/rv-slot-1-overlay.qcow2' index='2'/><target dev='vda' bus='virtio'/></disk>\n\
                     <disk type='file' device='disk'><source file='/pool/rv-slot-1-seed.img'/></disk>\
                     <serial type='file'><source path='/log/rv-slot-1.log' append='off'/><target port='0'/></serial>\
                     <console type='file'><source path='/log/rv-slot-1.log' append='off'/><target type='serial'/></console>\
                     <channel type='unix'><source mode='bind' path='/run/x.sock'/></channel>\
                     </devices></domain>";
        let (disk, to) = (Path::new("/pool/rv-slot-1-overlay.qcow2"), Path::new("/pool/a&b'.qcow2"));
        let out = for_restore(saved, disk, to, None).unwrap();
        assert_eq!(out, saved.replace(disk.to_str().unwrap(), "/pool/a&amp;b&apos;.qcow2"), "one attribute, escaped");
        let doc = roxmltree::Document::parse(&out).unwrap();
        let sources: Vec<_> =
            doc.descendants().filter(|n| n.has_tag_name("source")).filter_map(|n| n.attribute("file")).collect();
        assert_eq!(sources, ["/pool/a&b'.qcow2", "/pool/rv-slot-1-seed.img"]);
        let out = for_restore(saved, disk, Path::new("/pool/j.qcow2"), Some(Path::new("/log/rv-p-7.log"))).unwrap();
        assert_eq!(
            out,
            saved.replace(disk.to_str().unwrap(), "/pool/j.qcow2").replace("/log/rv-slot-1.log", "/log/rv-p-7.log"),
            "the console's log (serial and console) too, nothing else"
        );
        assert_eq!(for_restore(saved, Path::new("/pool/other.qcow2"), Path::new("/x"), None), None);
        assert_eq!(for_restore("not xml", Path::new("/a"), Path::new("/b"), None), None);
    }

    #[test]
    fn a_domain_runs_the_vm_whose_overlay_is_its_disk() {
        let slot = |disk: &str| {
            format!(
                "<domain><name>rv-p-s1</name><devices>\
                 <disk type='file' device='disk'><source file='{disk}'/></disk>\
                 <disk type='file' device='cdrom'><source file='/pool/rv-p-s1-seed.img'/></disk>\
                 </devices></domain>"
            )
        };
        let cases = [
            (slot("/pool/rv-p-1022.qcow2"), "rv-p-1022", true),
            (slot("/pool/rv-p-1022.qcow2"), "rv-p-1018", false),
            // Another VM's name that only begins like it, or its seed, is not its overlay.
            (slot("/pool/rv-p-10220.qcow2"), "rv-p-1022", false),
            (slot("/pool/rv-p-1022-seed.img"), "rv-p-1022", false),
            (slot("/pool/rv-p-s1.qcow2"), "rv-p-s1", true),
            // A restored VM's overlay is backed by the slot's disk (libvirt's live XML nests
            // it in `<backingStore>`): the domain runs the VM, not the slot's VM.
            (
                "<domain><name>rv-p-s1</name><devices><disk type='file' device='disk'>\
                 <source file='/pool/rv-p-1022.qcow2' index='2'/><backingStore type='file' index='3'>\
                 <format type='qcow2'/><source file='/pool/rv-p-s1.qcow2'/></backingStore></disk>\
                 </devices></domain>"
                    .to_string(),
                "rv-p-s1",
                false,
            ),
            ("not xml".to_string(), "rv-p-1022", false),
            ("<domain><name>rv-p-1022</name></domain>".to_string(), "rv-p-1022", false),
        ];
        for (xml, vm, want) in cases {
            assert_eq!(runs_vm(&xml, vm), want, "{vm} in {xml}");
        }
    }

    #[test]
    fn uuid_goes_first_inside_the_root() {
        let x = with_uuid("<filter name=\"f\" chain=\"root\">\n  <rule/>\n</filter>\n", "4c93696b-2c94");
        let doc = roxmltree::Document::parse(&x).unwrap();
        let first = doc.root_element().children().find(|n| n.is_element()).unwrap();
        assert_eq!((first.tag_name().name(), first.text()), ("uuid", Some("4c93696b-2c94")));
        assert_eq!(doc.root_element().children().filter(|n| n.is_element()).count(), 2);
        let x = with_uuid("<filter name='f' chain='root'/>", "u-1");
        let doc = roxmltree::Document::parse(&x).unwrap();
        assert_eq!(doc.root_element().attribute("name"), Some("f"));
        assert_eq!(doc.root_element().children().find(|n| n.is_element()).unwrap().text(), Some("u-1"));
    }

    #[test]
    fn security_models_from_capabilities() {
        let caps = "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>\
                    <secmodel><model>dac</model><doi>0</doi></secmodel></host></capabilities>";
        assert_eq!(security_models(caps), ["dac"]);
        let caps = "<capabilities><host><secmodel><model>apparmor</model></secmodel></host></capabilities>";
        assert_eq!(security_models(caps), ["apparmor"]);
    }

    /// A warm VM given a job is described anew: its domain's metadata says the job's VM,
    /// and nothing else of the domain changes.
    #[test]
    fn metadata_is_replaced_in_place() {
        let warm = VmMetadata { warm: true, job_id: 0, ..meta() };
        let xml = domain(&spec(&warm, &NetworkConfig::User { accept_unfenced: true }, None));
        let bound =
            VmMetadata { job_id: 77, runner_name: "rv-p-77".into(), warm: false, repository: "o/<r>".into(), ..meta() };
        let described = with_metadata(&xml, &bound).expect("it has metadata");
        // As a domain defined with it says it (XML drops the control character).
        let defined = domain(&spec(&bound, &NetworkConfig::User { accept_unfenced: true }, None));
        assert_eq!(metadata_of_domain(&described), metadata_of_domain(&defined));
        assert_eq!(metadata_of_domain(&described).map(|m| m.runner_name), Some("rv-p-77".into()));
        let strip = |x: &str| {
            let doc = roxmltree::Document::parse(x).unwrap();
            let md = doc.descendants().find(|n| n.has_tag_name((METADATA_NS, "vm"))).unwrap().range();
            format!("{}{}", &x[..md.start], &x[md.end..])
        };
        assert_eq!(strip(&described), strip(&xml), "only the metadata changed");
        assert_eq!(with_metadata("<domain><name>x</name></domain>", &bound), None);
        assert_eq!(with_metadata("not xml", &bound), None);
    }

    #[test]
    fn metadata_as_libvirt_returns_it() {
        let xml = "<vm>\n  <job-id>7</job-id>\n  <run-id>8</run-id>\n  <repository>o/r</repository>\n  <pool>p</pool>\n  <runner-name>rv-p-7</runner-name>\n  <created>2026-11-29T12:40:36Z</created>\n  <console-log>/x.log</console-log>\n  <job-url/>\n</vm>";
        let m = parse_metadata(xml).unwrap();
        assert_eq!((m.job_id, m.run_id, m.pool.as_str(), m.job_url.as_str()), (7, 8, "p", ""));
    }

    #[test]
    fn metadata_from_another_namespace_is_not_ours() {
        assert_eq!(parse_metadata("<vm xmlns=\"urn:other\"><job-id>1</job-id></vm>"), None);
        assert_eq!(parse_metadata("not xml"), None);
    }

    #[test]
    fn volume_xml() {
        let v = overlay_volume("rv-a-1.qcow2", 10 << 30, Path::new("/img/golden & co.qcow2"));
        let doc = roxmltree::Document::parse(&v).unwrap();
        let path = doc.descendants().find(|n| n.has_tag_name("path")).unwrap();
        assert_eq!(path.text(), Some("/img/golden & co.qcow2"));
        assert!(v.contains("<mode>0600</mode>"));
        let r = raw_volume("rv-a-1-seed.img", 1 << 20);
        assert!(roxmltree::Document::parse(&r).is_ok());
    }
}
