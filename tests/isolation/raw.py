# Layer-2 probes of the isolation drill, run as root inside a job VM (AF_PACKET: the
# frames a job with root can put on its interface, whatever the guest's own stack allows).
#
#   python3 raw.py IFACE KIND GATEWAY MARKER
#     ipv6       ICMPv6 echo requests from the interface's link-local address to all nodes
#                (ff02::1) and to the gateway's MAC; prints "answered" if any echo reply
#                came back within 3 s, else "timeout"
#     ethertype  frames carrying MARKER of an unassigned ethertype (0x88b5, "local
#                experimental"), of QEMU's announcement ethertype (0x0835, which libvirt's
#                clean-traffic accepts), a RARP request not of QEMU's form and one of QEMU's
#                form (its announcement after a restore, which clean-traffic accepts too),
#                broadcast and to the gateway's MAC: "timeout" (nothing answers them)
#     garp       gratuitous ARP (a request and a reply) saying the gateway's address is at
#                this VM's MAC: "timeout"
# The host side (tests/isolation/sniff.py on the bridge) counts what got through.
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5
BROADCAST = b"\xff" * 6


def mac_of(iface):
    with open("/sys/class/net/%s/address" % iface) as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def neighbour_mac(ip):
    """The MAC of `ip` from the ARP cache (the prober talked to the gateway already)."""
    with open("/proc/net/arp") as f:
        for line in f.readlines()[1:]:
            w = line.split()
            if w[0] == ip and w[3] != "00:00:00:00:00:00":
                return bytes.fromhex(w[3].replace(":", ""))
    return BROADCAST


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def link_local(mac):
    eui = bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return b"\xfe\x80" + b"\0" * 6 + eui


def icmpv6_echo(src_mac, dst_mac, marker):
    src, dst = link_local(src_mac), socket.inet_pton(socket.AF_INET6, "ff02::1")
    body = struct.pack("!BBHHH", 128, 0, 0, 0x5253, 1) + marker
    pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + src + dst
    return dst_mac + src_mac + struct.pack("!H", 0x86DD) + ip6 + body


def arp(op, mac, claimed_ip, eth_dst):
    ip = socket.inet_aton(claimed_ip)
    target_mac = b"\0" * 6 if op == 1 else BROADCAST
    payload = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + ip + target_mac + ip
    return eth_dst + mac + struct.pack("!H", 0x0806) + payload


def main():
    iface, kind, gateway, marker = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode()
    mac, gw_mac = mac_of(iface), neighbour_mac(gateway)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((iface, 0))
    if kind == "ipv6":
        frames = [icmpv6_echo(mac, b"\x33\x33\x00\x00\x00\x01", marker), icmpv6_echo(mac, gw_mac, marker)]
    elif kind == "ethertype":
        rarp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + socket.inet_aton(gateway) + mac + b"\0" * 4
        announce = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + b"\0" * 4 + mac + b"\0" * 4
        payloads = [(ETHERTYPE, marker.ljust(46, b"\0")), (0x0835, marker.ljust(46, b"\0")),
                    (0x8035, rarp.ljust(46, b"\0")), (0x8035, announce.ljust(46, b"\0"))]
        frames = [d + mac + struct.pack("!H", t) + p for d in (BROADCAST, gw_mac) for t, p in payloads]
    elif kind == "garp":
        frames = [arp(1, mac, gateway, BROADCAST), arp(2, mac, gateway, BROADCAST), arp(2, mac, gateway, gw_mac)]
    else:
        print("unknown kind %s" % kind)
        return
    for _ in range(3):
        for f in frames:
            sock.send(f)
        time.sleep(0.2)
    outcome, deadline = "timeout", time.monotonic() + 3
    while kind == "ipv6" and time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        data, addr = sock.recvfrom(65536)
        # An ICMPv6 echo reply (129) to us that is not our own frame going out.
        if addr[2] != socket.PACKET_OUTGOING and data[12:14] == b"\x86\xdd" and len(data) > 54 and data[54] == 129:
            outcome = "answered"
    print(outcome)


main()
