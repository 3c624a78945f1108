# The isolation drill's host side: counts, on the lab network's bridge, the frames from
# job VMs (QEMU's MAC prefix, or the MAC the prober forges) that got past the fence (a
# socket on the bridge device sees what the bridge passes up to the host, in promiscuous
# mode also what it forwards elsewhere; the fence's ebtables rules act before), and
# answers UDP datagrams sent to its port (a service listening on every address, as a host
# may have). "IPv4 from VMs" is the control: the allowed probes' traffic must be seen.
#
#   python3 sniff.py BRIDGE FORGED_MAC GATEWAY
# Prints {"udp_port": P} at once; counts until its stdin closes, then prints the counts
# (one JSON line) and exits.
import json
import select
import socket
import struct
import sys

ETH_P_ALL = 0x0003


def main():
    bridge, forged, gateway = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), socket.inet_aton(sys.argv[3])
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    raw.bind((bridge, 0))
    mreq = struct.pack("iHH8s", socket.if_nametoindex(bridge), 1, 0, b"")  # PACKET_MR_PROMISC
    raw.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    udp.bind(("0.0.0.0", 0))
    port = udp.getsockname()[1]
    print(json.dumps({"udp_port": port}), flush=True)
    counts = {"forged MAC": 0, "IPv6": 0, "unknown ethertype": 0, "ARP claiming the gateway": 0,
              "DHCP to the server": 0, "UDP to the host's port": 0, "UDP answered": 0, "IPv4 from VMs": 0}
    while True:
        ready, _, _ = select.select([raw, udp, sys.stdin], [], [])
        if sys.stdin in ready and not sys.stdin.readline():
            break
        if udp in ready:
            data, (host, sport) = udp.recvfrom(65536)
            # Answer guests on the lab network only (nothing else is sent anywhere).
            if socket.inet_aton(host)[:3] == gateway[:3]:
                udp.sendto(data, (host, sport))
                counts["UDP answered"] += 1
        if raw not in ready:
            continue
        frame, addr = raw.recvfrom(65536)
        if addr[2] == socket.PACKET_OUTGOING or len(frame) < 14:
            continue
        src, ethertype = frame[6:12], struct.unpack("!H", frame[12:14])[0]
        if src == forged:
            counts["forged MAC"] += 1
        elif src[:3] != b"\x52\x54\x00":
            continue
        if ethertype == 0x86DD:
            counts["IPv6"] += 1
        elif ethertype in (0x88B5, 0x0835, 0x8035):
            counts["unknown ethertype"] += 1
        elif ethertype == 0x0806 and len(frame) >= 42 and frame[28:32] == gateway:
            counts["ARP claiming the gateway"] += 1
        elif ethertype == 0x0800:
            counts["IPv4 from VMs"] += 1
        if ethertype == 0x0800 and len(frame) >= 14 + 28 and frame[23] == 17:
            ihl = (frame[14] & 0x0F) * 4
            dport = struct.unpack("!H", frame[14 + ihl + 2:14 + ihl + 4])[0]
            if dport == 67:
                counts["DHCP to the server"] += 1
            elif dport == port:
                counts["UDP to the host's port"] += 1
    print(json.dumps(counts), flush=True)


main()
