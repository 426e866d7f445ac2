"""laminad's command line: options, graph setup from --blockdev/--export,
QMP sockets, signals, --daemonize and --pidfile."""
import json
import os
import signal
import stat
import subprocess
import time

import pytest

from qmp_util import LAMINAD, Daemon, QMPClient


def run(args, **kw):
    return subprocess.run([LAMINAD] + args, capture_output=True, text=True, timeout=30, **kw)


def test_help_and_version():
    p = run(["--help"])
    assert p.returncode == 0
    for opt in ["--qmp", "--nbd", "--blockdev", "--export", "--daemonize", "--pidfile", "--version"]:
        assert opt in p.stdout
    p = run(["--version"])
    assert p.returncode == 0 and "0.1.0" in p.stdout
    p = run(["-V"])
    assert p.returncode == 0


def test_bad_options():
    p = run(["--bogus"])
    assert p.returncode == 1 and "--help" in p.stderr
    p = run(["extra"])
    assert p.returncode == 1 and "unexpected argument 'extra'" in p.stderr


@pytest.mark.parametrize("arg,msg", [
    ('{"driver": "foo", "node-name": "x"}', "laminad: --blockdev: Parameter 'driver' does not accept value 'foo'"),
    ('{"driver": "null-co"}', "laminad: --blockdev: 'node-name' must be specified for the root node"),
    ('{"driver": ', "laminad: --blockdev: JSON parse error, expecting value"),
    ('[1]', "laminad: --blockdev: expected a JSON object"),
    ('{"driver": "file", "node-name": "f", "filename": "/nonexistent"}',
     "laminad: --blockdev: Could not open '/nonexistent': No such file or directory"),
])
def test_blockdev_errors(tmp_path, arg, msg):
    p = run(["--qmp", str(tmp_path / "q.sock"), "--blockdev", arg])
    assert p.returncode == 1
    assert msg in p.stderr
    assert not os.path.exists(tmp_path / "q.sock")


def test_export_without_server(tmp_path):
    p = run(["--blockdev", '{"driver": "null-co", "node-name": "n"}',
             "--export", '{"type": "nbd", "id": "e", "node-name": "n"}'])
    assert p.returncode == 1
    assert "laminad: --export: NBD server not running" in p.stderr


def test_graph_from_command_line(tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * 65536)
    args = ["--blockdev", json.dumps({"driver": "file", "node-name": "f", "filename": str(img)}),
            "--blockdev", json.dumps({"driver": "raw", "node-name": "r", "file": "f"}),
            "--blockdev", json.dumps({"driver": "null-co", "node-name": "n", "read-only": True})]
    with Daemon(args, tmp_path) as d:
        nodes = {n["node-name"]: n for n in d.qmp.cmd("query-named-block-nodes")}
        assert set(nodes) == {"f", "r", "n"}
        assert nodes["r"]["image"]["virtual-size"] == 65536
        assert nodes["n"]["ro"] is True
        assert d.stop() == 0


def test_export_from_command_line(tmp_path):
    sock = tmp_path / "nbd.sock"
    args = ["--nbd", f"unix:{sock}",
            "--blockdev", '{"driver": "null-co", "node-name": "n", "size": 1048576}',
            "--export", '{"type": "nbd", "id": "e0", "node-name": "n", "name": "disk"}']
    try:
        d = Daemon(args, tmp_path, timeout=10)
    except RuntimeError as e:
        if "not built in" in str(e):
            pytest.skip("NBD server not in this build")
        raise
    try:
        assert d.qmp.cmd("query-block-exports") == [
            {"type": "nbd", "id": "e0", "node-name": "n", "shutting-down": False}]
        assert os.path.exists(sock)
        assert d.stop() == 0
        assert not os.path.exists(sock)
    finally:
        d.stop()


def test_qmp_sockets(tmp_path):
    s2 = tmp_path / "second.sock"
    with Daemon(["--qmp", str(s2)], tmp_path) as d:
        for path in (d.sock, str(s2)):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode == 0o600, oct(mode)
        c = QMPClient(str(s2), negotiate=True)
        assert "qemu" in c.cmd("query-version")
        c.close()
        # A second daemon can't take over a live socket.
        p = run(["--qmp", d.sock])
        assert p.returncode == 1 and "Address already in use" in p.stderr
        assert d.stop() == 0
    assert not os.path.exists(d.sock) and not os.path.exists(s2)


def test_stale_socket_is_replaced(tmp_path):
    import socket as so
    path = tmp_path / "qmp.sock"
    s = so.socket(so.AF_UNIX)
    s.bind(str(path))
    s.close()  # leaves a dead socket file behind
    with Daemon([], tmp_path) as d:
        assert "qemu" in d.qmp.cmd("query-version")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_shut_down_cleanly(tmp_path, sig):
    with Daemon([], tmp_path) as d:
        assert d.stop(sig) == 0
        assert not os.path.exists(d.sock)


def test_quit(tmp_path):
    with Daemon([], tmp_path) as d:
        c2 = d.connect()
        d.qmp.cmd("quit")
        assert d.proc.wait(10) == 0
        assert c2._read_msg(5) is None
        assert not os.path.exists(d.sock)


def test_daemonize_pidfile(tmp_path):
    sock, pidf = tmp_path / "q.sock", tmp_path / "d.pid"
    t0 = time.monotonic()
    p = run(["--daemonize", "--pidfile", str(pidf), "--qmp", str(sock),
             "--blockdev", '{"driver": "null-co", "node-name": "n"}'])
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 10
    pid = int(pidf.read_text())
    try:
        os.kill(pid, 0)  # alive
        assert os.path.exists(sock)  # ready when the parent returned
        # The pid file is locked: a second daemon refuses it.
        p2 = run(["--pidfile", str(pidf), "--qmp", str(tmp_path / "other.sock")])
        assert p2.returncode == 1 and "Cannot lock pid file" in p2.stderr
        c = QMPClient(str(sock), negotiate=True)
        assert [n["node-name"] for n in c.cmd("query-named-block-nodes")] == ["n"]
        c.cmd("quit")
        c.close()
        for _ in range(500):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        else:
            pytest.fail("daemon did not exit")
        assert not pidf.exists() and not sock.exists()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_daemonize_reports_errors(tmp_path):
    p = run(["--daemonize", "--blockdev", '{"driver": "foo", "node-name": "x"}'])
    assert p.returncode == 1
    assert "Parameter 'driver' does not accept value 'foo'" in p.stderr
