"""laminad with no arguments: the embedded default setup.

Creates ./lamina-data/disk0.qcow2 (10 GiB), serves it writable over NBD on
127.0.0.1:10809 as 'disk0', QMP on ./lamina-data/qmp.sock, prints how to
connect, and shuts down cleanly on SIGTERM (image clean, socket gone)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from qmp_util import LAMINAD, QMPClient

PORT = 10809


def port_busy():
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", PORT))
        return False
    except OSError:
        return True
    finally:
        s.close()


def start(cwd):
    p = subprocess.Popen([LAMINAD], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    sock = os.path.join(cwd, "lamina-data", "qmp.sock")
    for _ in range(2000):
        if p.poll() is not None:
            out, err = p.communicate()
            if ("does not accept value 'qcow2'" in err or "not built in" in err
                    or "Unknown file format 'qcow2'" in err):
                pytest.skip("qcow2 or NBD not in this build: " + err.strip())
            pytest.fail(f"laminad exited {p.returncode}: {out} {err}")
        if os.path.exists(sock):
            try:
                return p, QMPClient(sock, negotiate=True)
            except (ConnectionRefusedError, FileNotFoundError):
                pass
        time.sleep(0.01)
    p.kill()
    pytest.fail("QMP socket did not appear")


def stop(p, sig=signal.SIGTERM):
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


@pytest.fixture
def cwd(tmp_path):
    if port_busy():
        pytest.skip(f"127.0.0.1:{PORT} is in use")
    return str(tmp_path)


def test_default_mode(cwd):
    p, q = start(cwd)
    try:
        img = os.path.join(cwd, "lamina-data", "disk0.qcow2")
        assert os.path.exists(img)
        assert q.cmd("query-block-exports") == [
            {"type": "nbd", "id": "disk0", "node-name": "disk0", "shutting-down": False}]
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
        assert nodes["disk0"]["drv"] == "qcow2" and nodes["disk0"]["ro"] is False
        assert nodes["disk0"]["image"]["virtual-size"] == 10 << 30
        url = f"nbd://127.0.0.1:{PORT}/disk0"
        if shutil.which("nbdinfo"):
            r = subprocess.run(["nbdinfo", "--size", url], capture_output=True, text=True, timeout=30)
            assert r.stdout.strip() == str(10 << 30), r.stderr
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "wrote 65536" in r.stdout, r.stdout + r.stderr
        q.close()
    finally:
        rc, out, err = stop(p)
    assert rc == 0, err
    # What it printed: what it serves and how to connect.
    for line in ["Created lamina-data/disk0.qcow2",
                 f"qemu-io -f raw nbd://127.0.0.1:{PORT}/disk0",
                 f"nbdinfo nbd://127.0.0.1:{PORT}/disk0",
                 "socat - UNIX-CONNECT:lamina-data/qmp.sock",
                 "qmp_capabilities"]:
        assert line in out, out
    assert not os.path.exists(os.path.join(cwd, "lamina-data", "qmp.sock"))
    # Closed clean: check passes, not dirty, data is there.
    r = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", img],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 10 << 30 and info["format"] == "qcow2"
    assert info.get("dirty-flag", False) is False
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", img],
                       capture_output=True, text=True)
    assert "read 65536" in r.stdout and "Pattern verification failed" not in r.stdout


def test_default_mode_reuses_image(cwd):
    p, q = start(cwd)
    q.cmd("quit")
    assert p.wait(30) == 0
    p.communicate()
    img = os.path.join(cwd, "lamina-data", "disk0.qcow2")
    before = os.stat(img).st_mtime_ns
    p, q = start(cwd)
    q.close()
    rc, out, err = stop(p, signal.SIGINT)
    assert rc == 0
    assert "Created" not in out  # reused, not recreated
    assert "nbdinfo nbd://127.0.0.1:10809/disk0" in out
    assert subprocess.run(["qemu-img", "check", img], capture_output=True).returncode == 0
