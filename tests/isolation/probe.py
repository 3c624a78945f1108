# The isolation drill's job, run by the fake runner inside a fenced job VM as the runner
# user (with sudo, as a job that gained root). CFG is JSON the test embeds (base64).
# role "peer": listens on a port and reports its address, so that the prober can try it.
# role "prober": gives itself a default route, tries every probe, reports the outcomes.
# Outcomes: connected / answered (got through), timeout (dropped on the way), refused
# (something answered with a reset: got through to a host), error:ERRNO. A DHCP flood is
# "timeout" when no made-up client got an offer; a credential search, when found nothing.
# Frames nothing answers (an unknown ethertype, gratuitous ARP, a DHCP decline) are
# "timeout" once sent: the host side (tests/isolation/sniff.py) counts what got through.
import base64, json, socket, struct, subprocess, sys, time, urllib.request

CFG = json.loads(base64.b64decode(sys.argv[1]))
SIM = CFG["sim"]


def post(obj):
    req = urllib.request.Request(SIM + "/_sim/reports", data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def reports():
    return json.loads(urllib.request.urlopen(SIM + "/_sim/reports", timeout=10).read())


def sh(*args):
    return subprocess.run(list(args), capture_output=True, text=True)


def my_address():
    words = sh("ip", "-4", "-o", "addr", "show", "scope", "global").stdout.split()
    i = words.index("inet")
    return words[i + 1].split("/")[0], words[1]


def tcp(host, port, source=None, timeout=4):
    s = socket.socket()
    s.settimeout(timeout)
    try:
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        return "connected"
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "error:%d" % e.errno
    finally:
        s.close()


def udp(datagrams, expect, timeout=4):
    """Sends `datagrams` ((payload, (host, port)) pairs) from one socket: "answered" if a reply
    came back that `expect` accepts, "garbled" if another, else "timeout" or "error:ERRNO"."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.settimeout(timeout)
    try:
        for payload, to in datagrams:
            s.sendto(payload, to)
        data, _ = s.recvfrom(512)
        return "answered" if expect(data) else "garbled"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return "error:%d" % e.errno
    finally:
        s.close()


def broadcast(addresses, port, marker):
    """UDP datagrams to broadcast `addresses`; "answered" if the host's echo came back."""
    m = marker.encode()
    return udp([(m, (a, port)) for a in addresses], lambda data: data == m, timeout=3)


def mac_changed(mac, host, port):
    """TCP to an allowed server with this VM's MAC changed to `mac`; the MAC, address and
    route restored after (the network service may drop what it configured for the old MAC)."""
    with open("/sys/class/net/%s/address" % dev) as f:
        own = f.read().strip()
    prefix = sh("ip", "-4", "-o", "addr", "show", "dev", dev).stdout.split()[3].split("/")[1]

    def set_mac(m):
        if sh("sudo", "ip", "link", "set", "dev", dev, "address", m).returncode != 0:
            sh("sudo", "ip", "link", "set", "dev", dev, "down")
            sh("sudo", "ip", "link", "set", "dev", dev, "address", m)
            sh("sudo", "ip", "link", "set", "dev", dev, "up")
        sh("sudo", "ip", "addr", "replace", "%s/%s" % (address, prefix), "dev", dev)
        sh("sudo", "ip", "route", "replace", "default", "via", CFG["gateway"])

    set_mac(mac)
    try:
        changed = open("/sys/class/net/%s/address" % dev).read().strip() == mac
        return tcp(host, port) if changed else "error:mac-unchanged"
    finally:
        set_mac(own)


def dns(server, name):
    query = struct.pack(">HHHHHH", 0x5253, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    return udp([(query, (server, 53))], lambda data: data[:2] == query[:2])


address, dev = my_address()

if CFG["role"] == "peer":
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", CFG["peer_port"]))
    srv.listen(16)
    srv.settimeout(1)
    post({"role": "peer", "ip": address})
    accepted, last, deadline = 0, 0.0, time.time() + CFG["wait"]
    while time.time() < deadline:
        try:
            conn, _ = srv.accept()
            accepted += 1
            conn.close()
        except socket.timeout:
            pass
        if time.time() - last > 3:
            last = time.time()
            if any(r.get("role") == "prober" for r in reports()):
                break
    post({"role": "peer-done", "ip": address, "accepted": accepted})
    sys.exit(0)

# The seed gives the VM a default route via the gateway; the prober makes sure of it, so
# that only the fence stands in the way.
sh("sudo", "ip", "route", "replace", "default", "via", CFG["gateway"])
peer, deadline = None, time.time() + CFG["wait"]
while peer is None and time.time() < deadline:
    peer = next((r["ip"] for r in reports() if r.get("role") == "peer"), None)
    if peer is None:
        time.sleep(2)
results = []
for p in CFG["probes"]:
    kind = p["kind"]
    if kind == "tcp":
        outcome = tcp(p["host"], p["port"])
    elif kind == "peer":
        outcome = tcp(peer, p["port"]) if peer else "no-peer"
    elif kind == "udp":
        outcome = dns(p["host"], p["query"])
    elif kind == "spoof":
        sh("sudo", "ip", "addr", "add", p["source"] + "/32", "dev", dev)
        outcome = tcp(p["host"], p["port"], source=p["source"])
        sh("sudo", "ip", "addr", "del", p["source"] + "/32", "dev", dev)
    elif kind == "dhcp-flood":
        # As root: a discover and a request in the name of made-up client hardware
        # addresses (the frames carry this VM's own MAC); answered = a lease offered.
        code = base64.b64decode(CFG["dhcp_code"]).decode()
        chaddrs = ["02:%02x:00:00:%02x:%02x" % (i % 256, (i >> 8) % 256, i % 256) for i in range(p["count"])]
        r = sh("sudo", "python3", "-c", code, "--flood", dev, p["request"], *chaddrs)
        try:
            answered = json.loads(r.stdout)["answered"]
            outcome = "timeout" if not answered else "answered:%d" % len(answered)
        except (ValueError, KeyError):
            outcome = "error:%s" % r.stderr.strip().splitlines()[-1:]
    elif kind == "mac-change":
        outcome = mac_changed(p["mac"], p["host"], p["port"])
    elif kind == "broadcast":
        # "subnet": this VM's subnet's broadcast address.
        net = sh("ip", "-4", "-o", "addr", "show", "dev", dev).stdout.split()
        brd = net[net.index("brd") + 1] if "brd" in net else "255.255.255.255"
        addresses = [brd if a == "subnet" else a for a in p["addresses"]]
        outcome = broadcast(addresses, CFG["udp_port"], p["marker"])
    elif kind in ("ipv6", "ethertype", "garp"):
        r = sh("sudo", "python3", "-c", base64.b64decode(CFG["raw_code"]).decode(), dev, kind, CFG["gateway"], p["marker"])
        outcome = r.stdout.strip() or "error:%s" % r.stderr.strip().splitlines()[-1:]
    elif kind == "dhcp-decline":
        # As root: the peer VM's address declined in its name (its MAC follows from its address).
        if not peer:
            outcome = "no-peer"
        else:
            o = [int(x) for x in peer.split(".")]
            mac = "52:54:00:%02x:%02x:%02x" % (o[1], o[2], o[3])
            code = base64.b64decode(CFG["dhcp_code"]).decode()
            r = sh("sudo", "python3", "-c", code, "--decline", dev, mac, peer, CFG["gateway"])
            outcome = "timeout" if r.returncode == 0 else "error:%s" % r.stderr.strip().splitlines()[-1:]
    elif kind == "credential":
        # As root: every file and process of this VM searched for its runner's credential.
        r = sh("sudo", "python3", "-c", base64.b64decode(CFG["search_code"]).decode(), CFG["search_cfg"])
        outcome = {0: "timeout", 1: "answered"}.get(r.returncode, "error:%d" % r.returncode)
    else:
        outcome = "unknown-kind"
    results.append({"name": p["name"], "expect": p["expect"], "outcome": outcome})
post({"role": "prober", "ip": address, "peer": peer, "results": results})
