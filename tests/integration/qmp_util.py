"""A small QMP client and a daemon fixture, reusable by every area's tests.

    from qmp_util import Daemon, QMPError

    with Daemon(["--blockdev", json.dumps(opts)], tmpdir) as d:
        d.qmp.cmd("block-export-add", type="nbd", id="e0", node_name="n0")
        ev = d.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=5)
        c2 = d.connect()                  # a second, negotiated client

QMPClient
    .greeting             the greeting object the server sent
    .negotiate()          sends qmp_capabilities (Daemon does this for you)
    .cmd(name, args=None, **kw)
                          runs a command (name is positional-only, so name=
                          works as an argument); returns its "return" value or raises
                          QMPError(.cls, .desc, .reply).  Keyword names have
                          '_' turned into '-' (node_name= -> "node-name"); pass
                          args={...} for names that need an underscore.
    .execute(obj)         sends a dict (or raw bytes/str) and returns the next
                          reply (events that arrive meanwhile are queued)
    .send_raw(data) / .recv_reply()
                          lower level: write bytes; read the next non-event
    .events(timeout=0)    queued events, after waiting up to timeout seconds
                          for at least one to arrive
    .wait_event(name, timeout=10, match=None)
                          first event called name (data ⊇ match), or raises
    .close()

Daemon(args, tmpdir, flavor="laminad", negotiate=True, cwd=None)
    starts laminad (or flavor="qsd": qemu-storage-daemon, whose QMP socket is
    added with --chardev/--monitor; args are passed as given) with a QMP socket
    at tmpdir/qmp.sock, waits for it, connects .qmp.  .connect() opens another
    client, .stop(sig=SIGTERM, timeout=20) ends it and returns the exit status,
    .proc is the Popen (stdout/stderr go to tmpdir/daemon.out / daemon.err;
    .output() returns both).  A context manager; leaves no process behind.
"""
import json
import os
import select
import signal
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("LAMINA_BUILD", os.path.join(ROOT, "build"))
LAMINAD = os.path.join(BUILD, "src", "daemon", "laminad")
QSD = "qemu-storage-daemon"


class QMPError(Exception):
    def __init__(self, reply):
        err = reply.get("error", {})
        self.cls = err.get("class")
        self.desc = err.get("desc")
        self.reply = reply
        super().__init__(f"{self.cls}: {self.desc}")


class QMPClient:
    def __init__(self, path, timeout=30, negotiate=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.timeout = timeout
        self.buf = b""
        self.queue = []       # events not yet handed out
        self.raw_lines = []   # every line received, as bytes (for byte checks)
        self.greeting = self._read_msg(timeout)
        if negotiate:
            self.negotiate()

    # ---- low level ----
    def _read_msg(self, timeout):
        """Next message (event or reply) as a dict; None on EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no QMP message within %.1fs" % timeout)
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            d = self.sock.recv(65536)
            if not d:
                return None
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        self.raw_lines.append(line + b"\n")
        return json.loads(line)

    def send_raw(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv_reply(self, timeout=None):
        """Next reply (return or error); events are queued.  None on EOF."""
        timeout = self.timeout if timeout is None else timeout
        while True:
            m = self._read_msg(timeout)
            if m is not None and "QMP" in m:
                # A second greeting: QSD's socket monitor occasionally sends
                # one when a connection races its setup.  Never a reply.
                continue
            if m is None or "event" not in m:
                return m
            self.queue.append(m)

    def execute(self, obj, timeout=None):
        self.send_raw(obj if isinstance(obj, (bytes, str)) else json.dumps(obj))
        return self.recv_reply(timeout)

    # ---- commands ----
    def cmd(self, name, /, args=None, **kw):
        a = dict(args or {})
        for k, v in kw.items():
            a[k.replace("_", "-")] = v
        msg = {"execute": name}
        if a:
            msg["arguments"] = a
        r = self.execute(msg)
        if r is None:
            raise EOFError("connection closed during " + name)
        if "error" in r:
            raise QMPError(r)
        if "return" not in r:
            raise RuntimeError(f"unexpected reply to {name}: {r}")
        return r["return"]

    def negotiate(self):
        return self.cmd("qmp_capabilities")

    # ---- events ----
    def events(self, timeout=0):
        deadline = time.monotonic() + timeout
        while not self.queue:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                m = self._read_msg(left)
            except TimeoutError:
                break
            if m is None:
                break
            if "event" in m:
                self.queue.append(m)
        # Pick up whatever else is already buffered.
        while b"\n" in self.buf:
            m = self._read_msg(0.1)
            if m and "event" in m:
                self.queue.append(m)
        out, self.queue = self.queue, []
        return out

    def wait_event(self, name, timeout=10, match=None):
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.queue):
                data = ev.get("data", {})
                if ev["event"] == name and all(data.get(k) == v for k, v in (match or {}).items()):
                    del self.queue[i]
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"event {name} not seen; queued: {self.queue}")
            try:
                m = self._read_msg(left)
            except TimeoutError:
                continue
            if m is None:
                raise EOFError(f"connection closed waiting for {name}")
            if "event" in m:
                self.queue.append(m)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Daemon:
    def __init__(self, args, tmpdir, flavor="laminad", negotiate=True, cwd=None,
                 qmp=True, timeout=20):
        self.tmpdir = str(tmpdir)
        self.sock = os.path.join(self.tmpdir, "qmp.sock")
        self.flavor = flavor
        if flavor == "qsd":
            argv = [QSD]
            if qmp:
                argv += ["--chardev", f"socket,path={self.sock},server=on,wait=off,id=qmp0",
                         "--monitor", "chardev=qmp0"]
        else:
            argv = [os.environ.get("LAMINAD", LAMINAD)]
            if qmp:
                argv += ["--qmp", self.sock]
        argv += list(args)
        self.argv = argv
        self.out = open(os.path.join(self.tmpdir, "daemon.out"), "w+")
        self.err = open(os.path.join(self.tmpdir, "daemon.err"), "w+")
        self.proc = subprocess.Popen(argv, cwd=cwd or self.tmpdir, stdout=self.out,
                                     stderr=self.err, stdin=subprocess.DEVNULL)
        self.clients = []
        self.qmp = None
        if qmp:
            try:
                self._wait_socket(timeout)
                self.qmp = self.connect(negotiate)
            except Exception:
                self.stop(signal.SIGKILL)
                raise

    def _wait_socket(self, timeout):
        # Only wait for the file: a probe connection would occupy QSD's
        # single-client monitor.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited {self.proc.returncode}: {self.output()}")
            if os.path.exists(self.sock):
                return
            time.sleep(0.005)
        raise TimeoutError(f"{self.sock} did not appear")

    def connect(self, negotiate=True, timeout=20):
        # The socket file appears at bind(), a moment before listen().
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            try:
                c = QMPClient(self.sock, negotiate=False)
                if negotiate:
                    if self.flavor == "qsd":
                        # QSD 7.2's socket monitor, connected to while it
                        # is still setting up, can swallow the first
                        # command under load: retry on a new connection.
                        c.timeout = 5
                        try:
                            c.negotiate()
                        finally:
                            c.timeout = 30
                    else:
                        c.negotiate()
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.005)
            except TimeoutError:
                attempts += 1
                c.close()
                if self.flavor != "qsd" or attempts >= 3 or self.proc.poll() is not None:
                    raise
        self.clients.append(c)
        return c

    def output(self):
        self.out.flush()
        self.err.flush()
        with open(self.out.name) as o, open(self.err.name) as e:
            return o.read() + e.read()

    def stop(self, sig=signal.SIGTERM, timeout=20):
        for c in self.clients:
            c.close()
        self.clients = []
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # A hang is reported through the status (-9), which tests
                # that care about a clean exit assert on.
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()
        return False
