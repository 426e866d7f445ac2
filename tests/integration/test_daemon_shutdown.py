"""Clean shutdown under load: an NBD client keeps writing while laminad is
told to stop (SIGTERM or quit).  Every write the client saw acknowledged
must be in the image afterwards, and the image must be clean."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from qmp_util import Daemon

nbd = pytest.importorskip("nbd")

BLOCK = 65536
NBLOCKS = 256  # 16 MiB image


def writer(sock, acked, stop):
    h = nbd.NBD()
    h.set_export_name("d")
    h.connect_unix(sock)
    i = 0
    try:
        while not stop.is_set():
            h.pwrite(bytes([i % 251 + 1]) * BLOCK, (i % NBLOCKS) * BLOCK)
            acked.append(i)
            i += 1
    except nbd.Error:
        pass  # disconnected by the shutdown


@pytest.mark.parametrize("how", ["sigterm", "quit"])
def test_shutdown_while_writing(tmp_path, how):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(BLOCK * NBLOCKS)],
                   check=True)
    sock = str(tmp_path / "nbd.sock")
    args = ["--nbd", f"unix:{sock}",
            "--blockdev", json.dumps({"driver": "qcow2", "node-name": "d",
                                      "file": {"driver": "file", "filename": str(img)}}),
            "--export", json.dumps({"type": "nbd", "id": "e", "node-name": "d", "writable": True})]
    try:
        d = Daemon(args, tmp_path)
    except RuntimeError as e:
        if "not built in" in str(e) or "does not accept value 'qcow2'" in str(e):
            pytest.skip("NBD or qcow2 not in this build")
        raise
    acked, stop = [], threading.Event()
    t = threading.Thread(target=writer, args=(sock, acked, stop))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while len(acked) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acked) >= 50, "writes did not get going"
        if how == "quit":
            d.qmp.cmd("quit")
            rc = d.proc.wait(30)
        else:
            rc = d.stop(signal.SIGTERM)
        assert rc == 0, d.output()
    finally:
        stop.set()
        t.join(30)
        d.stop()
    assert not os.path.exists(d.sock) and not os.path.exists(sock)
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    raw = tmp_path / "d.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
    data = raw.read_bytes()
    last = {}
    for i in acked:
        last[i % NBLOCKS] = i
    for blk, i in last.items():
        got = data[blk * BLOCK:(blk + 1) * BLOCK]
        want = i % 251 + 1
        # The one write in flight at shutdown may also have landed.
        ok = {want, (i + NBLOCKS) % 251 + 1}
        assert got[0] in ok and got == bytes([got[0]]) * BLOCK, f"block {blk}: acked write {i} lost"
