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

/// Bulk server: greets with one byte `G` (the server speaks first, as in
/// SMTP or MySQL), reads until the client half-closes, answers the SHA-256 of
/// what it got (64 hex bytes) then MIB MiB of a known pattern. Args: PORT MIB.
///
/// The greeting makes the test deterministic about acceleration: the client
/// streams only once the agent relays, so every socket is in the sockhash
/// before its first byte. A sender that streams from its very first instant
/// without ever pausing may keep that direction on TCP (docs/architecture.md,
/// "No byte overtakes another").
pub const BULK_SERVER: &str = r#"
import hashlib, socket, sys, threading
n = int(sys.argv[2]) << 20
down = hashlib.shake_256(b"trellis-down").digest(n)
srv = socket.create_server(("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True, backlog=16)
def serve(c):
    c.sendall(b"G")
    h = hashlib.sha256()
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        h.update(b)
    c.sendall(h.hexdigest().encode()); c.sendall(down); c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Bulk client for [`BULK_SERVER`]: waits for the greeting, sends MIB MiB,
/// half-closes, checks both
/// directions byte-exact; prints OK or what differs. Args: HOST PORT MIB.
pub const BULK_CLIENT: &str = r#"
import hashlib, socket, sys
n = int(sys.argv[3]) << 20
up = hashlib.shake_256(b"trellis-up").digest(n)
want_down = hashlib.sha256(hashlib.shake_256(b"trellis-down").digest(n)).hexdigest()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
if s.recv(1) != b"G":
    print("MISMATCH no greeting"); sys.exit()
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
