//! Small real clients and servers, run with `python3 -c` inside pods.

/// HTTP server answering every GET with its name. Args: NAME PORT.
pub const NAME_SERVER: &str = r#"
import http.server, socket, sys
name = sys.argv[1].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(name)))
        self.end_headers()
        self.wfile.write(name)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6  # dual stack: "::" takes IPv4 too
S(("::", int(sys.argv[2])), H).serve_forever()
"#;

/// Echo server. Args: PORT.
pub const ECHO_SERVER: &str = r#"
import socket, sys, threading
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
def serve(c):
    while True:
        b = c.recv(65536)
        if not b:
            break
        c.sendall(b)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// N connections to [`ECHO_SERVER`] made at the same instant (a barrier),
/// each echoing one line, all held open until every one has. Prints how
/// many echoed. Args: HOST PORT N.
pub const PARALLEL_ECHO: &str = r#"
import socket, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start, done = threading.Barrier(n), threading.Barrier(n)
ok = []
def one(i):
    start.wait()
    s = socket.create_connection((host, port), timeout=20)
    m = b"line %d\n" % i
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        got += s.recv(4096)
    if got == m:
        ok.append(i)
    done.wait()
    s.close()
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(ok))
"#;

/// Bulk server: greets with one byte `G` (the server speaks first, as in
/// SMTP or MySQL), reads until the client half-closes, answers the SHA-256 of
/// what it got (64 hex bytes) then MIB MiB of a known pattern. Args: PORT MIB.
///
/// The greeting makes the test deterministic about acceleration: the client
/// streams only once the agent relays, so every socket is in the sockhash
/// before its first byte. A sender that streams from its very first instant
/// without ever pausing may keep that direction on TCP (docs/architecture.md,
/// "No byte overtakes another").
///
/// Args: PORT MIB [DIR]: with DIR, each connection reads nothing until the
/// file DIR/read exists (a reader that has stopped), and closes only once
/// DIR/done exists (so what it sent stays on an open connection).
pub const BULK_SERVER: &str = r#"
import hashlib, os, socket, sys, threading, time
n = int(sys.argv[2]) << 20
down = hashlib.shake_256(b"trellis-down").digest(n)
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=16)
def serve(c):
    c.sendall(b"G")
    while len(sys.argv) > 3 and not os.path.exists(os.path.join(sys.argv[3], "read")):
        time.sleep(0.05)
    h = hashlib.sha256()
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        h.update(b)
    c.sendall(h.hexdigest().encode()); c.sendall(down)
    while len(sys.argv) > 3 and not os.path.exists(os.path.join(sys.argv[3], "done")):
        time.sleep(0.05)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Bulk client for [`BULK_SERVER`]: waits for the greeting, sends MIB MiB,
/// half-closes, checks both directions byte-exact; prints OK or what
/// differs. Args: HOST PORT MIB [DIR MODE], DIR and MODE for a test that
/// holds the client back: after the greeting it touches DIR/ready and waits
/// for DIR/go. MODE `up`: then sends as above. `down`: half-closes at once,
/// sending nothing, and reads the MIB MiB only after DIR/go, so they queue
/// at its socket meanwhile.
pub const BULK_CLIENT: &str = r#"
import hashlib, os, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
d, mode = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else (None, "up")
up = hashlib.shake_256(b"trellis-up").digest(n) if mode == "up" else b""
want_down = hashlib.sha256(hashlib.shake_256(b"trellis-down").digest(n)).hexdigest()
s = socket.create_connection((host, port), timeout=120)
if s.recv(1) != b"G":
    print("MISMATCH no greeting"); sys.exit()
if mode == "down":
    s.shutdown(socket.SHUT_WR)
if d:
    open(os.path.join(d, "ready"), "w").close()
    while not os.path.exists(os.path.join(d, "go")):
        time.sleep(0.05)
if mode == "up":
    s.sendall(up)
    s.shutdown(socket.SHUT_WR)
buf = bytearray()
while True:
    b = s.recv(1 << 20)
    if not b:
        break
    buf += b
got_up, down = buf[:64].decode(), bytes(buf[64:])
if got_up == hashlib.sha256(up).hexdigest() and len(down) == n and hashlib.sha256(down).hexdigest() == want_down:
    print("OK")
else:
    print("MISMATCH up_ok=%s down_len=%d" % (got_up == hashlib.sha256(up).hexdigest(), len(down)))
"#;

/// Answers each connection with the client's address as the server sees
/// it (one line, IPv4 unmapped), then closes. Args: PORT.
pub const WHOAMI_SERVER: &str = r#"
import socket, sys
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
while True:
    c, peer = srv.accept()
    ip = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
    c.sendall(ip.encode() + b"\n")
    c.close()
"#;

/// Prints `ip:port` of getpeername() after connecting. Args: HOST PORT.
pub const PEER_NAME: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("%s:%d" % s.getpeername()[:2])
"#;

/// Load for SECONDS: new-connection GETs to http://HOST:PORT/ every 20 ms,
/// and one long-lived echo connection to HOST:ECHO_PORT pinged every 100 ms.
/// Prints JSON: bodies seen (with counts), errors, echo round trips and echo errors.
/// Args: HOST PORT ECHO_HOST ECHO_PORT SECONDS.
pub const LOAD: &str = r#"
import http.client, json, socket, sys, time, threading
host, port, ehost, eport, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
out = {"bodies": {}, "errors": [], "echo_ok": 0, "echo_errors": []}
end = time.time() + secs
def echo():
    try:
        s = socket.create_connection((ehost, eport), timeout=5)
        i = 0
        while time.time() < end:
            msg = ("ping %d\n" % i).encode(); s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                b = s.recv(len(msg) - len(got))
                if not b:
                    raise IOError("echo connection closed")
                got += b
            if got != msg:
                raise IOError("echo mismatch")
            out["echo_ok"] += 1; i += 1; time.sleep(0.1)
    except Exception as e:
        out["echo_errors"].append(repr(e))
t = threading.Thread(target=echo); t.start()
while time.time() < end:
    try:
        c = http.client.HTTPConnection(host, port, timeout=5); c.request("GET", "/")
        body = c.getresponse().read().decode(); c.close()
        out["bodies"][body] = out["bodies"].get(body, 0) + 1
    except Exception as e:
        out["errors"].append(repr(e))
    time.sleep(0.02)
t.join()
print(json.dumps(out))
"#;

/// Two echo connections for SECONDS: "busy" pings every 200 ms, "quiet"
/// pings once and then only waits to see whether the proxy closes it.
/// Prints JSON {busy_ok, busy_errors, quiet: "closed" | "open" | error}.
/// Args: HOST PORT SECONDS.
pub const IDLE_PAIR: &str = r#"
import json, socket, sys, time, threading
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {"busy_ok": 0, "busy_errors": [], "quiet": "open"}
def ping(s, msg):
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        b = s.recv(len(msg) - len(got))
        if not b:
            raise IOError("closed")
        got += b
    if got != msg:
        raise IOError("mismatch")
def busy():
    try:
        s = socket.create_connection((host, port), timeout=5)
        end = time.time() + secs
        while time.time() < end:
            ping(s, b"busy\n"); out["busy_ok"] += 1; time.sleep(0.2)
    except Exception as e:
        out["busy_errors"].append(repr(e))
t = threading.Thread(target=busy); t.start()
q = socket.create_connection((host, port), timeout=secs + 5)
ping(q, b"quiet\n")
try:
    out["quiet"] = "closed" if q.recv(1) == b"" else "data"
except Exception as e:
    out["quiet"] = repr(e)
t.join()
print(json.dumps(out))
"#;

/// An independent HBONE client (Python's `h2` over `ssl`, no Trellis code),
/// run from another node against `IP:15008`. Prints JSON with the outcome of
/// each case. Args: POD_IP PORT CERT KEY CA_CERT OTHER_IP DENIED_CERT DENIED_KEY.
pub const HBONE_PEER: &str = r#"
import json, socket, ssl, sys, time
import h2.config, h2.connection, h2.events, h2.exceptions, h2.settings
ip, port, cert, key, ca, other_ip, denied_cert, denied_key = sys.argv[1:9]  # [silent seconds]
res = {}

def tls(certf, keyf, alpn=True):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE: a URI SAN, no DNS name
    ctx.load_verify_locations(ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certf, keyf)
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    return ctx.wrap_socket(socket.create_connection((ip, 15008), timeout=10))

def h2c(sock):
    # h2 4.1 asks for :path even on CONNECT: send what RFC 9113 says unchecked.
    cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8", validate_outbound_headers=False)
    c = h2.connection.H2Connection(cfg)
    c.initiate_connection()
    sock.sendall(c.data_to_send())
    return c

def connect(sock, c, authority):
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", authority.encode())])
    sock.sendall(c.data_to_send())
    return sid

def events(sock, c):
    data = sock.recv(65536)
    if not data:
        return None
    evs = c.receive_data(data)
    sock.sendall(c.data_to_send())
    return evs

def status(sock, c, sid):
    while True:
        evs = events(sock, c)
        if evs is None:
            return "closed"
        for ev in evs:
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                return dict(ev.headers)[":status"]

def echo(sock, c, sid, payload):
    c.send_data(sid, payload)
    sock.sendall(c.data_to_send())
    got = b""
    while len(got) < len(payload):
        for ev in events(sock, c) or []:
            if isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                got += ev.data
                c.acknowledge_received_data(ev.flow_controlled_length, sid)
        sock.sendall(c.data_to_send())
    return got.decode()

def closed_without_answer(sock):
    try:
        data = sock.recv(4096)
        return "closed" if not data else ("answered" if data.startswith(b"HTTP") else "closed")
    except (ConnectionResetError, ssl.SSLError, OSError):
        return "closed"

# A valid certificate: CONNECT honoured, bytes echoed.
s = tls(cert, key); c = h2c(s)
sid = connect(s, c, "%s:%s" % (ip, port))
res["valid"] = status(s, c, sid)
res["echo"] = echo(s, c, sid, b"hello through hbone") if res["valid"] == "200" else ""
# A destination that is not the dialled pod: 400.
sid = connect(s, c, "%s:%s" % (other_ip, port))
res["not_local"] = status(s, c, sid)
s.close()
# Denied by policy: 401.
s = tls(denied_cert, denied_key); c = h2c(s)
res["denied"] = status(s, c, connect(s, c, "%s:%s" % (ip, port)))
s.close()
# No ALPN: closed after the handshake.
s = tls(cert, key, alpn=False)
res["no_alpn"] = closed_without_answer(s)
# Garbage and plaintext HTTP/1 instead of TLS: closed, no answer.
for case, payload in [("garbage", bytes(range(256)) * 4), ("http1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")]:
    p = socket.create_connection((ip, 15008), timeout=10)
    p.sendall(payload)
    res[case] = closed_without_answer(p)
    p.close()
# 10,000 streams at once on one connection: the agent takes 100 at a time.
s = tls(cert, key); c = h2c(s)
opened = 0
ok = refused = 0
goaway = None
try:
    for i in range(10000):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", ("%s:%s" % (ip, port)).encode())])
        opened += 1
        if i % 200 == 0:
            s.sendall(c.data_to_send())
    s.sendall(c.data_to_send())
except h2.exceptions.TooManyStreamsError:
    pass
except OSError:
    goaway = "closed while sending"  # the server gave up on this connection
deadline = time.time() + 15
s.settimeout(2)
while time.time() < deadline and ok + refused < opened and goaway is None:
    try:
        evs = events(s, c)
    except socket.timeout:
        break
    except OSError:
        break
    if evs is None:
        break
    for ev in evs:
        if isinstance(ev, h2.events.ResponseReceived):
            ok += 1
        elif isinstance(ev, h2.events.StreamReset):
            refused += 1
        elif isinstance(ev, h2.events.ConnectionTerminated):
            goaway = str(ev.error_code)
res["flood"] = {"opened": opened, "ok": ok, "refused": refused, "goaway": goaway}
s.close()
# A client that stops reading: its stream stalls, nobody else's does.
stall = tls(cert, key); sc = h2c(stall)
sid = connect(stall, sc, "%s:%s" % (ip, port))
res["staller"] = status(stall, sc, sid)
sc.send_data(sid, b"x" * 60000)
stall.sendall(sc.data_to_send())
# ...never read again; meanwhile a fresh connection works.
s = tls(cert, key); c = h2c(s)
sid = connect(s, c, "%s:%s" % (ip, port))
res["after"] = status(s, c, sid)
res["after_echo"] = echo(s, c, sid, b"still fine") if res["after"] == "200" else ""
s.close(); stall.close()
# With a keepalive of a second or so (argv 9: how long to stay silent): a
# client that never answers the agent's pings is closed; one that answers
# keeps its connection.
if len(sys.argv) > 9:
    silent = float(sys.argv[9])
    q = tls(cert, key); qc = h2c(q)
    sid = connect(q, qc, "%s:%s" % (ip, port))
    res["silent_open"] = status(q, qc, sid)
    time.sleep(silent)  # reads nothing: the pings wait, unanswered
    q.settimeout(5)
    try:
        while q.recv(65536):
            pass
        res["silent"] = "closed"
    except socket.timeout:
        res["silent"] = "open"
    except (ConnectionResetError, ssl.SSLError, OSError):
        res["silent"] = "closed"
    s = tls(cert, key); c = h2c(s)
    sid = connect(s, c, "%s:%s" % (ip, port))
    res["answering"] = status(s, c, sid)
    s.settimeout(0.3)
    deadline = time.time() + silent
    while time.time() < deadline:
        try:
            events(s, c)  # h2 answers each PING as it reads it
        except socket.timeout:
            pass
    s.settimeout(10)
    res["answering_echo"] = echo(s, c, sid, b"still here")
    s.close()
print(json.dumps(res))
"#;

/// The network-policy suite's server: answers its NAME on TCP 80 and 81
/// (then closes) and on UDP 80 and 81 (to each datagram). Args: NAME.
pub const NETPOL_SERVER: &str = r#"
import socket, sys, threading
name = sys.argv[1].encode()
def tcp(port):
    s = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(name)
        except OSError:
            pass
        c.close()
def udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        d, a = s.recvfrom(2048)
        try:
            s.sendto(name, a)
        except OSError:
            pass
for p in (80, 81):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
    threading.Thread(target=udp, args=(p,), daemon=True).start()
threading.Event().wait()
"#;

/// The network-policy suite's prober: probes every target at once and
/// prints `LABEL OK|EPERM|FAIL` per target, sorted. OK means the named
/// server answered (for ICMP: an echo reply came back to a raw socket's
/// request); EPERM that connect() or sendto() was refused at once. IPv4
/// or IPv6 by the address. Args: TIMEOUT_SECONDS then
/// LABEL,IP,PORT,TCP|UDP|ICMP,EXPECTED_NAME...
pub const NETPOL_PROBE: &str = r#"
import os, socket, struct, sys, threading, time, zlib
timeout = float(sys.argv[1])
out = {}
def family(ip):
    return socket.AF_INET6 if ":" in ip else socket.AF_INET
def tcp(label, ip, port, want):
    s = socket.create_connection((ip, port), timeout=timeout)
    s.settimeout(timeout)
    got = b""
    while True:
        b = s.recv(256)
        if not b:
            break
        got += b
    return "OK" if got == want else "FAIL"
def udp(label, ip, port, want):
    s = socket.socket(family(ip), socket.SOCK_DGRAM)
    s.settimeout(timeout / 3)
    for _ in range(3):
        s.sendto(b"?", (ip, port))
        try:
            d, _ = s.recvfrom(256)
            return "OK" if d == want else "FAIL"
        except socket.timeout:
            pass
    return "FAIL"
def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s & 0xffff) + (s >> 16)
    return ~(s + (s >> 16)) & 0xffff
# A raw socket's echo request: no connect(), no sendmsg hook on its way.
def icmp(label, ip, port, want):
    v6 = ":" in ip
    ident = (zlib.crc32(label.encode()) + os.getpid()) & 0xffff
    s = socket.socket(family(ip), socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    msg = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + b"trellis"
    if not v6:
        msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
    s.sendto(msg, (ip, 0))
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s.settimeout(max(0.01, end - time.monotonic()))
        try:
            d = s.recv(2048)
        except socket.timeout:
            break
        if not v6:
            d = d[(d[0] & 0x0f) * 4:]
        if len(d) >= 8 and d[0] == (129 if v6 else 0) and struct.unpack("!H", d[4:6])[0] == ident:
            return "OK"
    return "FAIL"
# EPERM: refused at once by connect() or sendto(); any other error: FAIL.
def probe(f, label, ip, port, want):
    try:
        out[label] = f(label, ip, port, want)
    except PermissionError:
        out[label] = "EPERM"
    except OSError:
        out[label] = "FAIL"
threads = []
for arg in sys.argv[2:]:
    label, ip, port, proto, want = arg.split(",")
    f = {"TCP": tcp, "UDP": udp, "ICMP": icmp}[proto]
    t = threading.Thread(target=probe, args=(f, label, ip, int(port), want.encode()))
    t.start()
    threads.append(t)
for t in threads:
    t.join()
for k in sorted(out):
    print(k, out[k])
"#;

/// A long conversation: one byte out, its echo back, every 20 ms, on one
/// connection; writes `COUNT STATE` to PATH as it goes (`flowing`, then
/// `stalled` after a second without an answer, `closed`, or `error:ERRNO`).
/// Args: IP PORT PATH.
pub const STREAM_CLIENT: &str = r#"
import os, socket, sys, time
ip, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n = 0
def put(state):
    with open(path + ".tmp", "w") as f:
        f.write(f"{n} {state}")
    os.replace(path + ".tmp", path)
s = socket.create_connection((ip, port), timeout=5)
s.settimeout(1.0)
while True:
    try:
        s.sendall(b"x")
        if not s.recv(1):
            put("closed")
            break
        n += 1
        put("flowing")
        time.sleep(0.02)
    except socket.timeout:
        put("stalled")
    except OSError as e:
        put(f"error:{e.errno}")
        break
"#;

/// gRPC server (grpcio, generic handlers on raw bytes, so no generated code)
/// for service `trellis.test.Echo`: `Say` (unary; a request `fail:CODE:MSG`
/// aborts with that status), `Count` (server streaming: N messages),
/// `Sum` (client streaming: the count and total length), `Chat` (bidi: each
/// message echoed). Every answer names the server, and sets trailing
/// metadata `x-served-by`. Args: NAME PORT.
pub const GRPC_SERVER: &str = r#"
import grpc, sys
from concurrent import futures
name = sys.argv[1]
def tail(ctx):
    ctx.set_trailing_metadata((("x-served-by", name),))
def say(req, ctx):
    tail(ctx)
    if req.startswith(b"fail:"):
        _, code, msg = req.decode().split(":", 2)
        ctx.abort(grpc.StatusCode[code], msg)
    return name.encode() + b" " + req
def count(req, ctx):
    tail(ctx)
    for i in range(int(req)):
        yield b"%s %d" % (name.encode(), i)
def sum_(reqs, ctx):
    tail(ctx)
    n = total = 0
    for r in reqs:
        n += 1
        total += len(r)
    return b"%s %d %d" % (name.encode(), n, total)
def chat(reqs, ctx):
    tail(ctx)
    for r in reqs:
        yield name.encode() + b" " + r
h = grpc.method_handlers_generic_handler("trellis.test.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Sum": grpc.stream_unary_rpc_method_handler(sum_),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
})
s = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("[::]:%s" % sys.argv[2])
s.start()
s.wait_for_termination()
"#;

/// gRPC client for [`GRPC_SERVER`]: every kind of call, ROUNDS times each
/// on one channel (plus an unrecorded call a round), and a failing call. Prints JSON: per kind the list of
/// results (`[server, ok, detail]`), and the failing call's code, message
/// and trailers. Args: TARGET ROUNDS.
pub const GRPC_CLIENT: &str = r#"
import grpc, json, sys
target, rounds = sys.argv[1], int(sys.argv[2])
ch = grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)])
grpc.channel_ready_future(ch).result(timeout=20)
m = lambda k, f: f("/trellis.test.Echo/" + k)
say = m("Say", ch.unary_unary)
count = m("Count", ch.unary_stream)
sum_ = m("Sum", ch.stream_unary)
chat = m("Chat", ch.stream_stream)
out = {"say": [], "count": [], "sum": [], "chat": []}
def server_of(trailers):
    return dict(trailers or ()).get("x-served-by", "?")
for i in range(rounds):
    resp, call = say.with_call(b"hello %d" % i, timeout=10)
    who = server_of(call.trailing_metadata())
    out["say"].append([who, resp == b"%s hello %d" % (who.encode(), i), resp.decode()])
    it = count(b"5", timeout=10)
    msgs = [x.decode() for x in it]
    who = server_of(it.trailing_metadata())
    out["count"].append([who, msgs == ["%s %d" % (who, j) for j in range(5)], msgs])
    resp, call = sum_.with_call(iter([b"a" * k for k in range(1, 11)]), timeout=10)
    who = server_of(call.trailing_metadata())
    out["sum"].append([who, resp == b"%s 10 55" % who.encode(), resp.decode()])
    it = chat(iter([b"m%d" % k for k in range(20)]), timeout=10)
    msgs = [x.decode() for x in it]
    who = server_of(it.trailing_metadata())
    out["chat"].append([who, msgs == ["%s m%d" % (who, k) for k in range(20)], len(msgs)])
    say(b"tick", timeout=10)  # five calls a round, so round robin shifts
try:
    say(b"fail:NOT_FOUND:no such thing", timeout=10)
    out["fail"] = ["OK"]
except grpc.RpcError as e:
    out["fail"] = [e.code().name, e.details(), server_of(e.trailing_metadata())]
print(json.dumps(out))
"#;

/// HTTP server whose answers a test steers by path, counting the requests
/// it serves (not `/count`, `/control/*` or `/healthz`):
/// `/fail-first/N/KEY` 503 for the first N requests with that KEY, then 200;
/// `/slow-first/MS/KEY` the first request with KEY waits MS ms; `/status/C`
/// answers C; `/slow/MS` waits MS ms; `/trickle/MS` sends its head and
/// part of its body, then the rest MS ms later; `/control/bad` and `/control/good`
/// make every other request 500 or not; `/count` gives the count. Bodies:
/// `NAME attempt N` (N per KEY) or `NAME`. Args: NAME PORT.
pub const STEERED_SERVER: &str = r#"
import http.server, socket, sys, threading, time
name = sys.argv[1]
lock = threading.Lock()
state = {"count": 0, "bad": False, "keys": {}}
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self, code, body):
        body = body.encode()
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "count":
            return self.answer(200, str(state["count"]))
        if parts[0] == "healthz":
            return self.answer(200, "ok")
        if parts[0] == "control":
            state["bad"] = parts[1] == "bad"
            return self.answer(200, "ok")
        with lock:
            state["count"] += 1
            n = 0
            if len(parts) == 3:
                n = state["keys"][parts[2]] = state["keys"].get(parts[2], 0) + 1
        if state["bad"]:
            return self.answer(500, name)
        if parts[0] == "fail-first" and n <= int(parts[1]):
            return self.answer(503, "%s attempt %d" % (name, n))
        if parts[0] == "slow-first" and n == 1:
            time.sleep(int(parts[1]) / 1000)
        if parts[0] == "slow":
            time.sleep(int(parts[1]) / 1000)
        if parts[0] == "status":
            return self.answer(int(parts[1]), name)
        if parts[0] == "trickle":
            body = ("%s-trickle" % name).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:4])
            self.wfile.flush()
            time.sleep(int(parts[1]) / 1000)
            self.wfile.write(body[4:])
            return
        self.answer(200, "%s attempt %d" % (name, n) if n else name)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
S(("::", int(sys.argv[2])), H).serve_forever()
"#;

/// HTTP load: THREADS threads (started together) each sending EACH GETs to
/// URL on one keep-alive connection, with HEADERS (JSON object). Prints
/// JSON: counts by status, by body, by `x-trellis-reason`, the
/// `retry-after` values seen, `set-cookie` values, and how many requests
/// took at least SLOW_MS. Args: URL THREADS EACH HEADERS SLOW_MS.
pub const HTTP_LOAD: &str = r#"
import http.client, json, sys, threading, time, urllib.parse
url, threads, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
headers, slow_ms = json.loads(sys.argv[4]), int(sys.argv[5])
u = urllib.parse.urlsplit(url)
path = u.path + ("?" + u.query if u.query else "")
out = {"status": {}, "body": {}, "reason": {}, "retry_after": [], "cookies": [], "slow": 0, "errors": 0}
lock = threading.Lock()
start = threading.Barrier(threads)
def bump(d, k):
    d[k] = d.get(k, 0) + 1
def one():
    start.wait()
    c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=20)
    for _ in range(each):
        t = time.monotonic()
        try:
            c.request("GET", path, headers=headers)
            r = c.getresponse()
            body = r.read().decode(errors="replace").strip()
        except Exception:
            with lock:
                out["errors"] += 1
            c.close()
            c = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=20)
            continue
        ms = (time.monotonic() - t) * 1000
        with lock:
            bump(out["status"], str(r.status))
            bump(out["body"], body if r.status == 200 else "%d %s" % (r.status, body.split(":")[0]))
            if r.getheader("x-trellis-reason"):
                bump(out["reason"], r.getheader("x-trellis-reason"))
            if r.getheader("retry-after"):
                out["retry_after"].append(r.getheader("retry-after"))
            if r.getheader("set-cookie"):
                out["cookies"].append(r.getheader("set-cookie"))
            if ms >= slow_ms:
                out["slow"] += 1
ts = [threading.Thread(target=one) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(out))
"#;

/// HTTP/1.1 server that upgrades a request with `Upgrade: echo` (101), then
/// echoes raw bytes, as a WebSocket server would carry frames. Args: PORT.
pub const UPGRADE_SERVER: &str = r#"
import socket, sys, threading
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
def serve(c):
    head = b""
    while b"\r\n\r\n" not in head:
        b = c.recv(4096)
        if not b:
            return
        head += b
    head, rest = head.split(b"\r\n\r\n", 1)
    if b"upgrade: echo" not in head.lower():
        c.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        return
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
    if rest:
        c.sendall(rest)
    while True:
        b = c.recv(65536)
        if not b:
            break
        c.sendall(b)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Asks HOST:PORT to upgrade to `echo`, then sends lines and reads their
/// echoes on the upgraded connection. Prints the status line, then `echoed
/// N`. Args: HOST PORT.
pub const UPGRADE_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET /chat HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
head = b""
while b"\r\n\r\n" not in head:
    b = s.recv(4096)
    if not b:
        break
    head += b
print(head.split(b"\r\n")[0].decode())
ok = 0
for i in range(50):
    m = b"frame %d\n" % i
    s.sendall(m)
    got = b""
    while len(got) < len(m):
        b = s.recv(4096)
        if not b:
            break
        got += b
    ok += got == m
print("echoed", ok)
"#;

/// Bad HTTP/1.1 clients against HOST:PORT, each on its own connection:
/// a good request, its answer, then a malformed request line; a slowloris
/// sending a header byte a second; a request with two Host headers, then a
/// good one; a request smuggling attempt (Content-Length and chunked
/// Transfer-Encoding, a second request hidden where the length says the
/// body is). Prints one line each: the status codes seen, for the
/// slowloris `closed after N s` or `open`, for the smuggler whether the
/// connection was closed. Args: HOST PORT.
pub const BAD_HTTP_CLIENT: &str = r#"
import re, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def conn():
    return socket.create_connection((host, port), timeout=30)
def answers(s):
    data, closed = b"", False
    s.settimeout(5)
    try:
        while True:
            b = s.recv(65536)
            if not b:
                closed = True
                break
            data += b
    except socket.timeout:
        pass
    return re.findall(rb"HTTP/1.1 (\d\d\d)", data), closed
def statuses(s):
    return answers(s)[0]
s = conn()
s.sendall(b"GET /only-v1 HTTP/1.1\r\nhost: x\r\n\r\n")
first = s.recv(65536)
s.sendall(b"GARBAGE\x01 LINE\r\n\r\n")
print("malformed", b" ".join(re.findall(rb"HTTP/1.1 (\d\d\d)", first) + statuses(s)).decode())
s = conn()
s.sendall(b"GET /only-v1 HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\n\r\nGET /only-v1 HTTP/1.1\r\nhost: x\r\n\r\n")
print("oversized", b" ".join(statuses(s)).decode())
s = conn()
s.sendall(b"GET /only-v1 HTTP/1.1\r\nhost: x\r\nx-slow: ")
start = time.monotonic()
s.settimeout(1)
state = "open"
while time.monotonic() - start < 25:
    try:
        s.sendall(b"a")
        b = s.recv(4096)
        if not b or b.startswith(b"HTTP/1.1 408"):
            state = "closed after %d s" % (time.monotonic() - start)
            break
    except socket.timeout:
        continue
    except OSError:
        state = "closed after %d s" % (time.monotonic() - start)
        break
print("slowloris", state)
s = conn()
s.sendall(b"GET /only-v1 HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\nGET /only-v1 HTTP/1.1\r\nhost: x\r\n\r\n")
print("hosts", b" ".join(statuses(s)).decode())
s = conn()
hidden = b"GET /elsewhere HTTP/1.1\r\nhost: x\r\n\r\n"
s.sendall(b"GET /only-v1 HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(hidden)) + hidden)
got, closed = answers(s)
print("smuggled", b" ".join(got).decode(), "closed" if closed else "open")
"#;

/// gRPC calls to [`GRPC_SERVER`]'s Say (unary) and Count (server streaming)
/// on one channel; prints JSON: per method `[code, details]`. Args: TARGET.
pub const GRPC_PROBE: &str = r#"
import grpc, json, sys
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
grpc.channel_ready_future(ch).result(timeout=20)
out = {}
for name, kind in [("Say", ch.unary_unary), ("Count", ch.unary_stream), ("Say2", ch.unary_unary)]:
    call = kind("/trellis.test.Echo/" + name.rstrip("2"))
    try:
        r = call(b"3", timeout=10)
        if name == "Count":
            r = list(r)
        out[name] = ["OK", ""]
    except grpc.RpcError as e:
        out[name] = [e.code().name, e.details()]
print(json.dumps(out))
"#;

/// One line through an echo server, or `DENIED` when the connection is
/// reset or closed without it. Args: HOST PORT.
pub const ECHO_PROBE: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    s.sendall(b"not http at all\n")
    got = s.recv(100)
    print(got.decode().strip() or "DENIED")
except (ConnectionResetError, BrokenPipeError):
    print("DENIED")
"#;

/// HTTP server answering any GET or POST with JSON `{name, path, host,
/// body, tag, rid, authz}` (the path with its query, the body's length, the
/// `x-tag`, `x-request-id` and `authorization` headers) and keeping a log of
/// them, which `GET /__log` returns (not logged). Paths under `/hop` are
/// answered with hop-by-hop headers (`Connection: close, x-hop`,
/// `Keep-Alive`, `x-hop`). Args: NAME PORT.
pub const REQUEST_ECHO_SERVER: &str = r#"
import http.server, json, socket, sys, threading
name = sys.argv[1]
log, lock = [], threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.path == "/__log":
            with lock:
                out = json.dumps(log).encode()
        else:
            rec = {"name": name, "method": self.command, "path": self.path, "host": self.headers.get("host"), "body": len(body), "tag": self.headers.get("x-tag"), "rid": self.headers.get("x-request-id"), "authz": self.headers.get("authorization")}
            with lock:
                log.append(rec)
            out = json.dumps(rec).encode()
        self.send_response(200)
        if self.path.startswith("/hop"):
            # Headers for the agent's hop alone (RFC 9110 7.6.1).
            self.send_header("connection", "close, x-hop")
            self.send_header("keep-alive", "timeout=5")
            self.send_header("x-hop", "1")
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = answer
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
S(("::", int(sys.argv[2])), H).serve_forever()
"#;

/// HTTP/1.1 server keeping connections alive, answering every GET with
/// JSON `{"peer": <the client's port>}`: one port per connection. Args: PORT.
pub const PEER_PORT_SERVER: &str = r#"
import http.server, json, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"peer": self.client_address[1]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
S(("::", int(sys.argv[1])), H).serve_forever()
"#;

/// HTTP server answering every GET with one file as it is then, as JSON
/// (an identity provider's key set). Args: FILE PORT.
pub const FILE_SERVER: &str = r#"
import http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = open(sys.argv[1], "rb").read()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
S(("::", int(sys.argv[2])), H).serve_forever()
"#;

/// An authorization service speaking Envoy's HTTP `ext_authz` protocol, as
/// oauth2-proxy or OPA would: `Authorization: Bearer alice` is allowed
/// (200 with `x-auth-user: alice`, `x-tag: authz-alice` and `x-noise`),
/// `Bearer crash` answered 500, `Bearer <other>` refused with 403 and
/// `not you`, none with 401,
/// `www-authenticate: Bearer` and `who are you`. `/__last` answers the last
/// check it got: method, path, header names and body as JSON. Args: PORT.
pub const AUTHZ_SERVER: &str = r#"
import http.server, json, socket, sys, threading
last, lock = {}, threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        if self.path == "/__last":
            with lock:
                out = json.dumps(last).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n).decode(errors="replace") if n else ""
        with lock:
            last.clear()
            last.update({"method": self.command, "path": self.path, "headers": sorted(k.lower() for k in self.headers.keys()), "body": body})
        auth = self.headers.get("authorization") or ""
        if auth == "Bearer alice":
            self.send_response(200)
            self.send_header("x-auth-user", "alice")
            self.send_header("x-tag", "authz-alice")
            self.send_header("x-noise", "1")
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body, status = (b"not you", 403) if auth else (b"who are you", 401)
        if auth == "Bearer crash":
            body, status = b"boom", 500
        self.send_response(status)
        if not auth:
            self.send_header("www-authenticate", "Bearer")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_DELETE = answer
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
S(("::", int(sys.argv[1])), H).serve_forever()
"#;

/// Where `cargo xtask setup` puts Envoy's generated Python messages
/// (`xds-protos`), apart from the other packages (xtask/src/setup.rs).
pub const ENVOY_PROTOS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/tools/python/xds-protos-1.85.0"
);

/// An authorization service speaking Envoy's gRPC `ext_authz` protocol
/// (`envoy.service.auth.v3.Authorization/Check`, with Envoy's own generated
/// messages), as OPA's Envoy plugin would: `Bearer alice` is allowed with
/// `x-tag: authz-alice` set on the request, `x-authz: grpc` on the answer,
/// the query's `user` set to alice and its `token` taken off; `Bearer bob`
/// is allowed with `x-tag` taken off; `Bearer crash` fails the call
/// (INTERNAL); another user is denied 403 `not you` with
/// `x-denied-by: grpc-authz`; none gets 401, `www-authenticate: Bearer` and
/// `who are you`. A connection's check (no request, as Envoy's network
/// filter sends) is allowed for service account `a1` only. `GET /` on the
/// HTTP port answers the last check's attributes as JSON. Args:
/// ENVOY_PROTOS GRPC_PORT HTTP_PORT.
pub const GRPC_AUTHZ_SERVER: &str = r#"
import grpc, http.server, json, socket, sys, threading
from concurrent import futures
sys.path.append(sys.argv[1])
from envoy.service.auth.v3 import external_auth_pb2 as ext, external_auth_pb2_grpc as ext_grpc
from envoy.config.core.v3 import base_pb2 as base
from envoy.type.v3 import http_status_pb2 as http_status
from google.rpc import status_pb2
last, lock = {}, threading.Lock()
def header(k, v):
    return base.HeaderValueOption(header=base.HeaderValue(key=k, value=v))
def denied(code, status, body, headers):
    return ext.CheckResponse(status=status_pb2.Status(code=code), denied_response=ext.DeniedHttpResponse(
        status=http_status.HttpStatus(code=status), body=body, headers=headers))
class Authz(ext_grpc.AuthorizationServicer):
    def Check(self, request, context):
        a = request.attributes
        h = a.request.http
        d = a.destination.address.socket_address
        with lock:
            last.clear()
            last.update({"id": h.id, "method": h.method, "path": h.path, "host": h.host, "scheme": h.scheme,
                         "protocol": h.protocol, "size": h.size, "headers": dict(h.headers), "body": h.body,
                         "raw_body": h.raw_body.hex(), "principal": a.source.principal,
                         "source": a.source.address.socket_address.address,
                         "destination": a.destination.service, "time": a.request.time.seconds,
                         "destination_address": "%s:%d" % (d.address, d.port_value) if d.address else "",
                         "destination_principal": a.destination.principal})
        if not h.method:
            # A connection (Envoy's network check): a1 may connect.
            if a.source.principal.endswith("/sa/a1"):
                return ext.CheckResponse(status=status_pb2.Status(code=0))
            return ext.CheckResponse(status=status_pb2.Status(code=7))
        auth = h.headers.get("authorization", "")
        if auth == "Bearer crash":
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        if auth == "Bearer alice":
            return ext.CheckResponse(status=status_pb2.Status(code=0), ok_response=ext.OkHttpResponse(
                headers=[header("x-tag", "authz-alice")],
                response_headers_to_add=[header("x-authz", "grpc")],
                query_parameters_to_set=[base.QueryParameter(key="user", value="alice")],
                query_parameters_to_remove=["token"]))
        if auth == "Bearer bob":
            return ext.CheckResponse(status=status_pb2.Status(code=0), ok_response=ext.OkHttpResponse(headers_to_remove=["x-tag"]))
        if auth:
            return denied(7, 403, "not you", [header("x-denied-by", "grpc-authz")])
        return denied(16, 401, "who are you", [header("www-authenticate", "Bearer")])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            out = json.dumps(last).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
web = S(("::", int(sys.argv[3])), H)
threading.Thread(target=web.serve_forever, daemon=True).start()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
ext_grpc.add_AuthorizationServicer_to_server(Authz(), server)
server.add_insecure_port("[::]:" + sys.argv[2])
server.start()
server.wait_for_termination()
"#;

/// gRPC Say calls to [`GRPC_SERVER`]s and an unknown method: prints JSON,
/// per call `[code, served-by]`. Args: TARGET.
pub const GRPC_WHO: &str = r#"
import grpc, json, sys
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
grpc.channel_ready_future(ch).result(timeout=20)
out = {}
for name, kind in [("Say", ch.unary_unary), ("Count", ch.unary_stream)]:
    call = kind("/trellis.test.Echo/" + name)
    try:
        if name == "Count":
            it = call(b"2", timeout=10)
            list(it)
            md = it.trailing_metadata()
        else:
            _, c = call.with_call(b"hi", timeout=10)
            md = c.trailing_metadata()
        out[name] = ["OK", dict(md or ()).get("x-served-by", "?")]
    except grpc.RpcError as e:
        out[name] = [e.code().name, e.details()]
print(json.dumps(out))
"#;

/// Say calls to a [`GRPC_SERVER`], one per token given, each with
/// `authorization: Bearer <token>`: prints JSON, per call `[code, details]`.
/// Args: TARGET TOKEN...
pub const GRPC_BEARER: &str = r#"
import grpc, json, sys
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
grpc.channel_ready_future(ch).result(timeout=20)
say = ch.unary_unary("/trellis.test.Echo/Say")
out = []
for token in sys.argv[2:]:
    try:
        say(b"hi", timeout=10, metadata=[("authorization", "Bearer " + token)])
        out.append(["OK", ""])
    except grpc.RpcError as e:
        out.append([e.code().name, e.details()])
print(json.dumps(out))
"#;

/// A backend that misbehaves on purpose: `/reset-before` resets the
/// connection without an answer, `/reset-mid` sends the head and 1,000 of
/// the 100,000 body bytes it announced, then resets; `/keep` gets `kept`
/// on a connection kept open, which closes unanswered at the next request
/// it carries (a keep-alive timeout racing that request, every time);
/// anything else gets `ok` and a clean close. Args: PORT.
pub const RESET_SERVER: &str = r#"
import socket, struct, sys, threading, time
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
def serve(c):
    data, served = b"", False
    while True:
        while b"\r\n\r\n" not in data:
            b = c.recv(65536)
            if not b:
                c.close()
                return
            data += b
        head, _, data = data.partition(b"\r\n\r\n")
        if served:
            # A keep-alive timeout racing this request, made certain.
            c.close()
            return
        served = True
        path = head.split(b" ")[1]
        if path != b"/keep":
            break
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nkept")
    if path == b"/reset-mid":
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.2)
    elif path != b"/reset-before":
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        c.close()
        return
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// An HTTP/2 server (cleartext, prior knowledge) that goes away as
/// servers do in a rolling restart or at gRPC's MaxConnectionAge, and sheds
/// streams. Each connection answers `conn<N>` (N counts connections).
/// `/slow` answers its head and a first chunk, then a GOAWAY naming that
/// stream as the last it takes, and ends the answer 1.5 s later. `/refused`
/// on a connection that has answered anything is reset with
/// REFUSED_STREAM. The connection closes when the client closes it. Args:
/// PORT.
pub const GOAWAY_SERVER: &str = r#"
import socket, struct, sys, threading, time
import h2.config, h2.connection, h2.errors, h2.events
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
lock, count = threading.Lock(), [0]
def serve(sock):
    with lock:
        count[0] += 1
        n = count[0]
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    c.initiate_connection()
    sock.sendall(c.data_to_send())
    sock.settimeout(0.05)
    served, slow = 0, None
    while True:
        if slow and time.monotonic() >= slow[1]:
            c.send_data(slow[0], b"done", end_stream=True)
            sock.sendall(c.data_to_send())
            slow = None
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if not data:
            break
        for ev in c.receive_data(data):
            if not isinstance(ev, h2.events.RequestReceived):
                continue
            sid, path = ev.stream_id, dict(ev.headers)[":path"]
            if path == "/refused" and served:
                c.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                continue
            served += 1
            c.send_headers(sid, [(":status", "200")])
            if path == "/slow":
                c.send_data(sid, b"slow ")
                # GOAWAY(last stream = this one, NO_ERROR), written by hand:
                # the library sends nothing more after its own GOAWAY.
                goaway = struct.pack(">I", 8)[1:] + bytes([7, 0]) + struct.pack(">III", 0, sid, 0)
                sock.sendall(c.data_to_send() + goaway)
                slow = (sid, time.monotonic() + 1.5)
            else:
                c.send_data(sid, f"conn{n}".encode(), end_stream=True)
        try:
            sock.sendall(c.data_to_send())
        except OSError:
            break
    sock.close()
while True:
    s, _ = srv.accept()
    threading.Thread(target=serve, args=(s,), daemon=True).start()
"#;

/// An HTTP/1.1 client keeping its connection: a GET, a pause of PAUSE
/// seconds, a GET on the same connection. Prints each answer's status, or
/// `closed` when the connection was gone. Args: HOST PORT PAUSE.
pub const KEEPALIVE_CLIENT: &str = r#"
import re, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
def get():
    try:
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            b = s.recv(65536)
            if not b:
                return "closed"
            data += b
        head, _, body = data.partition(b"\r\n\r\n")
        n = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < n:
            body += s.recv(65536)
        return head.split(b" ")[1].decode()
    except OSError:
        return "closed"
first = get()
time.sleep(float(sys.argv[3]))
print(first, get())
"#;

/// An HTTP/2 client (cleartext, prior knowledge) that keeps its
/// connection: a GET, another a second later, then it waits (up to 20 s)
/// for the peer to end the connection. Prints both statuses and `goaway`
/// (a GOAWAY came), `closed` (the connection closed without one) or `open`.
/// Args: HOST PORT.
pub const H2_IDLE_CLIENT: &str = r#"
import socket, sys, time
import h2.config, h2.connection, h2.events, h2.exceptions
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
c.initiate_connection()
s.sendall(c.data_to_send())
def get():
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")], end_stream=True)
    s.sendall(c.data_to_send())
    status = None
    while True:
        data = s.recv(65536)
        if not data:
            return "closed"
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                status = dict(ev.headers)[":status"]
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                s.sendall(c.data_to_send())
                return status
            elif isinstance(ev, h2.events.ConnectionTerminated):
                return "goaway"
        s.sendall(c.data_to_send())
first = get()
time.sleep(1)
second = get()
end, deadline = "open", time.monotonic() + 20
try:
    while time.monotonic() < deadline:
        data = s.recv(65536)
        if not data:
            end = "closed" if end == "open" else end
            break
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                end = "goaway"
        s.sendall(c.data_to_send())
except h2.exceptions.ProtocolError:
    # The library takes no frame after a GOAWAY (the PING that follows
    # hyper's), and loses that batch's events as it raises.
    if c.state_machine.state == h2.connection.ConnectionState.CLOSED:
        end = "goaway"
except OSError:
    pass
print(first, second, end)
"#;

/// An HTTP/2 client that breaks the protocol: after the preface and its
/// SETTINGS, a DATA frame on stream 0. Prints `goaway CODE` for the
/// GOAWAY the peer answers with, or `closed` / `nothing`. Args: HOST PORT.
pub const BAD_H2_CLIENT: &str = r#"
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
frame = lambda t, f, sid, payload: struct.pack(">I", len(payload))[1:] + bytes([t, f]) + struct.pack(">I", sid) + payload
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(0, 0, 0, b"oops"))
buf, out = b"", "nothing"
try:
    while True:
        b = s.recv(65536)
        if not b:
            out = out if out != "nothing" else "closed"
            break
        buf += b
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            t, payload = buf[3], buf[9:9 + n]
            buf = buf[9 + n:]
            if t == 7:
                out = "goaway %d" % struct.unpack(">I", payload[4:8])[0]
except OSError:
    out = out if out != "nothing" else "closed"
print(out)
"#;

/// Scrapes URL and parses it with `prometheus_client`'s OpenMetrics parser
/// (strict: a malformed exposition raises). Prints JSON: a list of
/// `[name, labels, value]` samples. Args: URL.
pub const SCRAPE: &str = r#"
import json, sys, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
resp = urllib.request.urlopen(sys.argv[1], timeout=10)
assert resp.headers["content-type"].startswith("application/openmetrics-text"), resp.headers["content-type"]
text = resp.read().decode()
out = []
for family in text_string_to_metric_families(text):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// K connections to an echo server, each sending N bytes and reading them
/// back. Prints the bytes echoed in all. Args: HOST PORT K N.
pub const ECHO_CONNECTIONS: &str = r#"
import socket, sys
host, port, k, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
total = 0
for _ in range(k):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"x" * n)
    got = 0
    while got < n:
        b = s.recv(65536)
        if not b:
            break
        got += len(b)
    s.close()
    total += got
print(total)
"#;

/// A test OTLP collector: the gRPC `TraceService/Export` and HTTP
/// `POST /v1/traces` (protobuf), each request decoded with
/// opentelemetry-proto's own types (so a malformed one fails the parse);
/// `GET /spans` on the HTTP port lists every span received as JSON. Args:
/// GRPC_PORT HTTP_PORT.
pub const OTLP_COLLECTOR: &str = r#"
import grpc, http.server, json, sys, threading
from concurrent import futures
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts, trace_service_pb2_grpc as tsg
spans, lock = [], threading.Lock()
def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None
def keep(req, via):
    got = []
    for rs in req.resource_spans:
        resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                got.append({"via": via, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent": s.parent_span_id.hex(), "trace_state": s.trace_state, "name": s.name,
                    "kind": s.kind, "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                    "attributes": {kv.key: value(kv.value) for kv in s.attributes},
                    "status": s.status.code, "status_message": s.status.message,
                    "flags": s.flags, "resource": resource, "scope": ss.scope.name})
    with lock:
        spans.extend(got)
class Traces(tsg.TraceServiceServicer):
    def Export(self, request, context):
        keep(request, "grpc")
        return ts.ExportTraceServiceResponse()
server = grpc.server(futures.ThreadPoolExecutor(4))
tsg.add_TraceServiceServicer_to_server(Traces(), server)
server.add_insecure_port("0.0.0.0:" + sys.argv[1])
server.start()
class H(http.server.BaseHTTPRequestHandler):
    def reply(self, code, ctype, body):
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            return self.reply(400, "text/plain", b"want POST /v1/traces, application/x-protobuf")
        req = ts.ExportTraceServiceRequest()
        req.ParseFromString(body)
        keep(req, "http")
        self.reply(200, "application/x-protobuf", ts.ExportTraceServiceResponse().SerializeToString())
    def do_GET(self):
        with lock:
            out = json.dumps(spans).encode()
        self.reply(200, "application/json", out)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), H).serve_forever()
"#;

/// An HTTP server answering with the trace headers it received, as JSON;
/// `/fail` answers 503. Args: PORT.
pub const TRACE_ECHO: &str = r#"
import http.server, json, socket, sys
NAMES = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled"]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        out = json.dumps({n: self.headers.get(n) for n in NAMES if self.headers.get(n) is not None}).encode()
        self.send_response(503 if self.path == "/fail" else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
S(("::", int(sys.argv[1])), H).serve_forever()
"#;

/// A long paced transfer through an [`ECHO_SERVER`]: CHUNK bytes of a
/// known pattern every 50 ms for SECONDS (a writer thread), the echo read
/// back meanwhile and compared byte for byte; then a half-close and the
/// rest of the echo. Prints JSON {sent, received, exact, error}.
/// Args: HOST PORT SECONDS CHUNK.
pub const PACED_ECHO: &str = r#"
import hashlib, json, socket, sys, threading, time
host, port, seconds, chunk = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
def block(i):
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (chunk // len(seed) + 1))[:chunk]
s = socket.create_connection((host, port), timeout=10)
out = {"sent": 0, "received": 0, "exact": True, "error": None}
sent_hash = hashlib.sha256()
def write():
    end, i = time.time() + seconds, 0
    try:
        while time.time() < end:
            b = block(i)
            s.sendall(b)
            sent_hash.update(b)
            out["sent"] += len(b)
            i += 1
            time.sleep(0.05)
        s.shutdown(socket.SHUT_WR)
    except OSError as e:
        out["error"] = "write: %s" % e
writer = threading.Thread(target=write)
writer.start()
got_hash, expect, pos = hashlib.sha256(), b"", 0
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        got_hash.update(b)
        out["received"] += len(b)
except OSError as e:
    out["error"] = out["error"] or "read: %s" % e
writer.join()
out["exact"] = out["received"] == out["sent"] and got_hash.digest() == sent_hash.digest()
print(json.dumps(out))
"#;

/// A gRPC server (Python h2, no gRPC library) that ignores deadlines, as a
/// server with none of its own would: `.../Stall` never answers, `.../Stream`
/// sends its head and one message and then nothing. It records each call's
/// `grpc-timeout` and each stream reset it gets; `.../Log` answers that
/// record as JSON in one message. Args: PORT.
pub const DEADLINE_SERVER: &str = r#"
import json, socket, sys, threading
import h2.config, h2.connection, h2.events
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=64)
lock = threading.Lock()
seen = {"timeouts": [], "resets": 0}
def message(b):
    return b"\x00" + len(b).to_bytes(4, "big") + b
def serve(sock):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    c.initiate_connection()
    sock.sendall(c.data_to_send())
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.StreamReset):
                with lock:
                    seen["resets"] += 1
            elif isinstance(ev, h2.events.DataReceived):
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.RequestReceived):
                h = dict(ev.headers)
                head = [(":status", "200"), ("content-type", "application/grpc")]
                if h[":path"].endswith("/Log"):
                    with lock:
                        body = json.dumps(seen).encode()
                    c.send_headers(ev.stream_id, head)
                    c.send_data(ev.stream_id, message(body))
                    c.send_headers(ev.stream_id, [("grpc-status", "0")], end_stream=True)
                    continue
                with lock:
                    seen["timeouts"].append(h.get("grpc-timeout", ""))
                if h[":path"].endswith("/Stream"):
                    c.send_headers(ev.stream_id, head)
                    c.send_data(ev.stream_id, message(b"first"))
        try:
            sock.sendall(c.data_to_send())
        except OSError:
            break
    sock.close()
while True:
    s, _ = srv.accept()
    threading.Thread(target=serve, args=(s,), daemon=True).start()
"#;

/// One gRPC call by hand (Python h2), so no client library enforces the
/// deadline it sends: POST PATH with `grpc-timeout: TIMEOUT` (none for
/// `-`) and a one-message body; reads until the stream ends (at most 20 s).
/// Prints JSON: the answer's head, its messages' text, its trailers,
/// whether the stream was reset. Args: HOST PORT PATH TIMEOUT
/// [CONTENT-TYPE, default application/grpc].
pub const DEADLINE_CLIENT: &str = r#"
import json, socket, sys
import h2.config, h2.connection, h2.events
host, port, path, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
content_type = sys.argv[5] if len(sys.argv) > 5 else "application/grpc"
s = socket.create_connection((host, port), timeout=20)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
c.initiate_connection()
head = [(":method", "POST"), (":scheme", "http"), (":authority", host), (":path", path),
        ("content-type", content_type), ("te", "trailers")]
if timeout != "-":
    head.append(("grpc-timeout", timeout))
c.send_headers(1, head)
c.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
s.sendall(c.data_to_send())
out = {"head": {}, "data": "", "trailers": {}, "reset": False}
done = False
while not done:
    data = s.recv(65536)
    if not data:
        break
    for ev in c.receive_data(data):
        if isinstance(ev, h2.events.ResponseReceived):
            out["head"] = dict(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            out["data"] += ev.data[5:].decode(errors="replace")
        elif isinstance(ev, h2.events.TrailersReceived):
            out["trailers"] = dict(ev.headers)
        elif isinstance(ev, h2.events.StreamReset):
            out["reset"] = done = True
        if isinstance(ev, h2.events.StreamEnded):
            done = True
    s.sendall(c.data_to_send())
print(json.dumps(out))
"#;
