# Servers of the isolation drill's lab, run inside the lab network namespace:
# arguments KIND,NAME,ADDRESS,PORT (KIND tcp or udp). Every connection or datagram is
# printed as "KIND NAME PEER" so that the test sees, server side, what got through.
import socket, sys, threading


def tcp_serve(name, addr, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    while True:
        conn, peer = s.accept()
        print("tcp", name, peer[0], flush=True)
        try:
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + name.encode() + b"\n")
        except OSError:
            pass
        conn.close()


def udp_serve(name, addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    while True:
        data, peer = s.recvfrom(512)
        print("udp", name, peer[0], flush=True)
        s.sendto(data, peer)


for spec in sys.argv[1:]:
    kind, name, addr, port = spec.split(",")
    target = tcp_serve if kind == "tcp" else udp_serve
    threading.Thread(target=target, args=(name, addr, int(port)), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
