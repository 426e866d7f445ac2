"""Helpers for the NBD server tests.

`NbdServe(...)` runs one export (id exp0 of node node0).  It uses laminad
driven over QMP when built (set LAMINA_NBD_HARNESS=1 to force the
nbd-serve harness from tests/unit/nbd instead); both give the interface:
  uri, sock / port, delete(hard), add(), stop_server(), query(), events(),
  alive(), close().
`RawClient` speaks the NBD protocol over a plain socket for the
misbehaving-client tests.
"""
import json
import os
import queue
import select
import socket
import struct
import subprocess
import threading
import time

from conftest import BUILD, LAMINAD

NBD_SERVE = os.path.join(BUILD, "tests", "unit", "nbd", "nbd-serve")

INIT_MAGIC = 0x4E42444D41474943
OPTS_MAGIC = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST = 1, 2, 3
OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED = 5, 6, 7, 8
OPT_LIST_META, OPT_SET_META = 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 0x80000001, 0x80000002, 0x80000003
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = 0x80000006, 0x80000009
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 5, 6, 7
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 5, 22, 28, 75, 95


def NbdServe(image, **kw):
    if LAMINAD and not os.environ.get("LAMINA_NBD_HARNESS"):
        return DaemonServe(image, **kw)
    return HarnessServe(image, **kw)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class DaemonServe:
    """One NBD export of `image` served by laminad, set up over QMP."""
    kind = "laminad"

    def __init__(self, image, fmt="raw", writable=False, name="exp",
                 description=None, allocation_depth=False, max_conn=100,
                 tcp=False, writethrough=False, env=None, host="127.0.0.1"):
        from qmp_util import Daemon
        self.name = name
        self.tmpdir = os.path.dirname(os.path.abspath(image))
        self.sock = os.path.join(self.tmpdir, "nbd-%d.sock" % id(self))
        old = dict(os.environ)
        os.environ.update(env or {})
        try:
            self.d = Daemon([], self.tmpdir)
        finally:
            os.environ.clear()
            os.environ.update(old)
        self.qmp = self.d.qmp
        self._events = []
        try:
            self.qmp.cmd("blockdev-add", {"driver": fmt, "node-name": "node0",
                                          "file": {"driver": "file", "filename": image}})
            if tcp:
                self.port = free_port()
                addr = {"type": "inet", "data": {"host": host,
                                                 "port": str(self.port)}}
                uh = "[%s]" % host if ":" in host else host
                self.uri = "nbd://%s:%d/%s" % (uh, self.port, name)
            else:
                self.port = None
                addr = {"type": "unix", "data": {"path": self.sock}}
                self.uri = "nbd+unix:///%s?socket=%s" % (name, self.sock)
            self.qmp.cmd("nbd-server-start", addr=addr, max_connections=max_conn)
            self.export = {"type": "nbd", "id": "exp0", "node-name": "node0",
                           "name": name, "writable": writable,
                           "writethrough": writethrough,
                           "allocation-depth": allocation_depth}
            if description is not None:
                self.export["description"] = description
            self.qmp.cmd("block-export-add", self.export)
        except Exception:
            self.d.stop()
            raise

    def _try(self, name, args=None):
        from qmp_util import QMPError
        try:
            self.qmp.cmd(name, args)
            return None
        except QMPError as e:
            return e.desc

    def delete(self, hard=False):
        return self._try("block-export-del", {"id": "exp0",
                                              "mode": "hard" if hard else "safe"})

    def add(self):
        return self._try("block-export-add", self.export)

    def stop_server(self):
        return self._try("nbd-server-stop")

    def query(self):
        return self.qmp.cmd("query-block-exports")

    def events(self, wait=1.0):
        """Events so far as [name, compact JSON data]; waits up to `wait`
        seconds for one to arrive when none is queued."""
        for ev in self.qmp.events(timeout=wait):
            self._events.append([ev["event"], json.dumps(ev.get("data", {}),
                                                         separators=(",", ":"))])
        return list(self._events)

    def alive(self):
        return self.d.proc.poll() is None

    def close(self, timeout=30):
        if self.alive():
            self.events(wait=0)
            rc = self.d.stop(timeout=timeout)
            if rc != 0:
                raise AssertionError("laminad exited %s: %s" % (rc, self.d.output()))

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


class HarnessServe:
    """One NBD export of `image` served by the nbd-serve harness."""
    kind = "harness"

    def __init__(self, image, fmt="raw", writable=False, name="exp",
                 description=None, allocation_depth=False, max_conn=100,
                 tcp=False, writethrough=False, env=None):
        self.image = image
        self.name = name
        self.sockdir = os.path.dirname(os.path.abspath(image))
        self.sock = os.path.join(self.sockdir, "nbd-%d.sock" % id(self))
        addr = "127.0.0.1:0" if tcp else "unix:" + self.sock
        cmd = [NBD_SERVE, "-f", fmt, "-n", name, "-m", str(max_conn), "-a", addr]
        if writable:
            cmd.append("-w")
        if writethrough:
            cmd.append("-W")
        if description is not None:
            cmd += ["-d", description]
        if allocation_depth:
            cmd.append("-A")
        cmd.append(image)
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=e)
        self.lines = queue.Queue()
        self._events = []
        self._thr = threading.Thread(target=self._reader, daemon=True)
        self._thr.start()
        line = self._expect("listening ", 10)
        self.address = line.split(" ", 1)[1]
        if self.address.startswith("unix:"):
            self.uri = "nbd+unix:///%s?socket=%s" % (name, self.sock)
            self.port = None
        else:
            self.port = int(self.address.rsplit(":", 1)[1])
            self.uri = "nbd://127.0.0.1:%d/%s" % (self.port, name)

    def _reader(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("event "):
                self._events.append(line.split(" ", 2)[1:])
            self.lines.put(line)
        self.lines.put(None)

    def _expect(self, prefix, timeout=30):
        end = time.time() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                raise AssertionError("timeout waiting for %r" % prefix)
            if line is None:
                err = self.proc.stderr.read()
                raise AssertionError("server exited waiting for %r: %s" % (prefix, err))
            if line.startswith(prefix):
                return line

    def _cmd(self, cmd, prefix, timeout=30):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self._expect(prefix, timeout)
        return line

    def delete(self, hard=False):
        """Returns None on success, else the error message."""
        line = self._cmd("del hard" if hard else "del", ("ok del", "error del"))
        return None if line.startswith("ok") else line.split(": ", 1)[1]

    def add(self):
        line = self._cmd("add", ("ok add", "error add"))
        return None if line.startswith("ok") else line.split(": ", 1)[1]

    def stop_server(self):
        line = self._cmd("stop", ("ok stop", "error stop"))
        return None if line.startswith("ok") else line.split(": ", 1)[1]

    def query(self):
        import json
        return json.loads(self._cmd("query", "exports ").split(" ", 1)[1])

    def events(self, wait=0.5):
        end = time.time() + wait
        while not self._events and time.time() < end:
            time.sleep(0.02)
        return list(self._events)

    def alive(self):
        return self.proc.poll() is None

    def close(self, timeout=30):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server did not shut down in %ss" % timeout)
        rc = self.proc.returncode
        if rc != 0:
            raise AssertionError("server exited %d: %s" % (rc, self.proc.stderr.read()))

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def connect_socket(srv):
    if srv.port is None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.sock)
    else:
        s = socket.create_connection(("127.0.0.1", srv.port))
    s.settimeout(10)
    return s


class RawClient:
    """Minimal NBD client on a raw socket, for protocol abuse."""

    def __init__(self, srv, handshake=True):
        self.s = connect_socket(srv)
        self.structured = False
        if handshake:
            self.greet()

    def recvn(self, n):
        buf = b""
        while len(buf) < n:
            d = self.s.recv(n - len(buf))
            if not d:
                raise EOFError("server closed after %d/%d bytes" % (len(buf), n))
            buf += d
        return buf

    def greet(self, cflags=1):
        magic, opts, hflags = struct.unpack(">QQH", self.recvn(18))
        assert magic == INIT_MAGIC and opts == OPTS_MAGIC
        assert hflags & 1
        self.s.sendall(struct.pack(">I", cflags))

    def opt(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", OPTS_MAGIC, opt, len(data)) + data)

    def reply(self):
        magic, opt, typ, ln = struct.unpack(">QIII", self.recvn(20))
        assert magic == REP_MAGIC, hex(magic)
        return opt, typ, self.recvn(ln)

    def replies(self):
        """All replies up to the final ACK or error."""
        out = []
        while True:
            r = self.reply()
            out.append(r)
            if r[1] == REP_ACK or r[1] & 0x80000000:
                return out

    def structured_reply(self):
        self.opt(OPT_STRUCTURED)
        _, typ, _ = self.reply()
        assert typ == REP_ACK
        self.structured = True

    def set_meta(self, name, queries):
        data = struct.pack(">I", len(name)) + name.encode()
        data += struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q.encode()
        self.opt(OPT_SET_META, data)
        return self.replies()

    def go(self, name, infos=()):
        data = struct.pack(">I", len(name)) + name.encode()
        data += struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
        self.opt(OPT_GO, data)
        reps = self.replies()
        assert reps[-1][1] == REP_ACK, reps
        for _, typ, payload in reps:
            if typ == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                self.size, self.tflags = struct.unpack(">QH", payload[2:12])
        return reps

    def request(self, typ, offset=0, length=0, flags=0, cookie=1, data=b""):
        self.s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie,
                                   offset, length) + data)

    def simple_reply(self, length=0):
        magic, err, cookie = struct.unpack(">IIQ", self.recvn(16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        data = self.recvn(length) if err == 0 and length else b""
        return err, cookie, data

    def chunks(self):
        """Reads one structured reply: list of (flags, type, cookie, payload)."""
        out = []
        while True:
            magic = struct.unpack(">I", self.recvn(4))[0]
            if magic == SIMPLE_MAGIC:
                err, cookie = struct.unpack(">IQ", self.recvn(12))
                out.append((1, -1, cookie, struct.pack(">I", err)))
                return out
            assert magic == STRUCT_MAGIC, hex(magic)
            flags, typ, cookie, ln = struct.unpack(">HHQI", self.recvn(16))
            out.append((flags, typ, cookie, self.recvn(ln)))
            if flags & 1:
                return out

    def is_closed(self, timeout=5):
        """True once the server has closed the connection."""
        end = time.time() + timeout
        try:
            while time.time() < end:
                r, _, _ = select.select([self.s], [], [], max(0, end - time.time()))
                if r:
                    if not self.s.recv(65536):
                        return True
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.s.close()


def check_serves(srv, offset=0):
    """A fresh well-behaved client can still read (and the process lives)."""
    import nbd
    assert srv.alive()
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    data = h.pread(4096, offset)
    assert len(data) == 4096
    h.shutdown()
    return data
