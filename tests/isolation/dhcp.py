# A minimal DHCP client (the standard library only) for runnervisor's tests: asks the
# network's DHCP server for an address in the name of any client hardware address, as a
# job with root could (its frames carry its own MAC; the chaddr field is what it chooses).
#
#   python3 dhcp.py IFACE CHADDR[,CLIENTID] ...  prints one JSON line per chaddr:
#                                                  {"chaddr": ..., "offered": IP|null, "acked": IP|null}
#   python3 dhcp.py --flood IFACE IP CHADDR ...    asks for all at once (a discover, and a
#                                                  request for IP, IP+1, ...): {"answered": [CHADDR...]}
#   python3 dhcp.py --decline IFACE CHADDR IP SERVER  declines IP in the name of CHADDR
# Also used by the isolation drill's prober (`lease`, `flood`).
import json
import os
import random
import select
import socket
import struct
import sys
import time

SO_BINDTODEVICE = 25


def _packet(kind, xid, chaddr, requested=None, server=None, client_id=None):
    mac = bytes.fromhex(chaddr.replace(":", ""))
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                       b"\0" * 4, mac.ljust(16, b"\0"), b"\0" * 64, b"\0" * 128)
    opts = b"\x63\x82\x53\x63" + bytes([53, 1, kind])
    if client_id:
        # As systemd-networkd sends one: a DUID (type 255 = "other", then the bytes).
        opts += bytes([61, len(client_id) + 1, 255]) + client_id.encode()
    if requested:
        opts += bytes([50, 4]) + socket.inet_aton(requested)
    if server:
        opts += bytes([54, 4]) + socket.inet_aton(server)
    opts += bytes([55, 2, 1, 3, 255])
    return head + opts


def _parse(data):
    """(xid, yiaddr, message type, server id) of a reply, or None."""
    if len(data) < 240 or data[0] != 2 or data[236:240] != b"\x63\x82\x53\x63":
        return None
    xid = struct.unpack("!I", data[4:8])[0]
    yiaddr = socket.inet_ntoa(data[16:20])
    kind, server, i = None, None, 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        code, length = data[i], data[i + 1]
        value = data[i + 2:i + 2 + length]
        if code == 53:
            kind = value[0]
        elif code == 54 and length == 4:
            server = socket.inet_ntoa(value)
        i += 2 + length
    return xid, yiaddr, kind, server


def _exchange(sock, packet, xid, want, timeout):
    """Sends `packet` (again every second, as clients do) until a reply of a `want`ed type."""
    deadline = time.monotonic() + timeout
    resend = 0.0
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None
        if now >= resend:
            sock.sendto(packet, ("255.255.255.255", 67))
            resend = now + 1.0
        ready, _, _ = select.select([sock], [], [], min(deadline, resend) - now)
        if not ready:
            continue
        reply = _parse(sock.recv(4096))
        if reply and reply[0] == xid and reply[2] in want:
            return reply


def _socket(iface):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, iface.encode())
    sock.bind(("0.0.0.0", 68))
    return sock


def _sniffer(iface):
    """A raw socket that sees every IPv4 frame on `iface`, also those sent to other MACs
    (the server may send its answer to the client hardware address asked for)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    sock.bind((iface, 0))
    mreq = struct.pack("iHH8s", socket.if_nametoindex(iface), 1, 0, b"")  # PACKET_MR_PROMISC
    sock.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP
    return sock


def _dhcp_of_frame(frame):
    """The DHCP payload of an Ethernet frame carrying UDP to port 68, or None."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != 17:
        return None
    udp = 14 + ihl
    if struct.unpack("!H", frame[udp + 2:udp + 4])[0] != 68:
        return None
    return frame[udp + 8:]


def flood(iface, chaddrs, first, timeout=3.0):
    """What a job with root does to take a network's addresses: in the name of each of
    `chaddrs`, all at once, a discover and a request for an address of its own (`first`,
    the next, ...); every offer seen on the wire (in promiscuous mode) is requested as a
    client would. The chaddrs the server answered (an offer or an ack) within `timeout`."""
    sock, sniff = _socket(iface), _sniffer(iface)
    try:
        xids = {}
        base = struct.unpack("!I", socket.inet_aton(first))[0]
        for i, c in enumerate(chaddrs):
            xid = random.getrandbits(32)
            xids[xid] = c
            requested = socket.inet_ntoa(struct.pack("!I", base + i))
            sock.sendto(_packet(1, xid, c), ("255.255.255.255", 67))
            sock.sendto(_packet(3, xid, c, requested), ("255.255.255.255", 67))
        answered, requested, deadline = set(), set(), time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return sorted(answered)
            ready, _, _ = select.select([sock, sniff], [], [], left)
            for s in ready:
                data = s.recv(65536)
                reply = _parse(_dhcp_of_frame(data) or b"") if s is sniff else _parse(data)
                if not reply or reply[0] not in xids or reply[2] not in (2, 5):
                    continue
                chaddr = xids[reply[0]]
                answered.add(chaddr)
                if reply[2] == 2 and chaddr not in requested:
                    requested.add(chaddr)
                    sock.sendto(_packet(3, reply[0], chaddr, reply[1], reply[3]), ("255.255.255.255", 67))
    finally:
        sock.close()
        sniff.close()


def lease(iface, chaddr, timeout=3.0, client_id=None):
    """Asks for an address for `chaddr` (with a client identifier, when given): {"chaddr",
    "offered", "acked"} (None where the server did not answer: an unknown client is
    ignored)."""
    sock = _socket(iface)
    try:
        xid = random.getrandbits(32)
        offer = _exchange(sock, _packet(1, xid, chaddr, client_id=client_id), xid, (2,), timeout)
        if not offer:
            return {"chaddr": chaddr, "offered": None, "acked": None}
        request = _packet(3, xid, chaddr, offer[1], offer[3], client_id)
        ack = _exchange(sock, request, xid, (5, 6), timeout)
        acked = ack[1] if ack and ack[2] == 5 else None
        return {"chaddr": chaddr, "offered": offer[1], "acked": acked}
    finally:
        sock.close()


def decline(iface, chaddr, address, server):
    """A DHCPDECLINE in the name of `chaddr` for `address` (the server being `server`): what
    a client sends when it finds its address in use, and a job with root can send for
    another VM (whose MAC it may guess). Nothing is answered to a decline."""
    sock = _socket(iface)
    try:
        packet = _packet(4, random.getrandbits(32), chaddr, address, server)
        for _ in range(3):
            sock.sendto(packet, ("255.255.255.255", 67))
            time.sleep(0.2)
    finally:
        sock.close()


if __name__ == "__main__":
    if sys.argv[1] == "--decline":
        decline(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
        print(json.dumps({"declined": sys.argv[4]}), flush=True)
    elif sys.argv[1] == "--flood":
        print(json.dumps({"answered": flood(sys.argv[2], sys.argv[4:], sys.argv[3])}), flush=True)
    else:
        for c in sys.argv[2:]:
            chaddr, _, client_id = c.partition(",")
            print(json.dumps(lease(sys.argv[1], chaddr, client_id=client_id or None)), flush=True)
