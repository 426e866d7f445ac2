"""Where events fall relative to the reply of the command that caused them,
on the wire, checked against qemu-storage-daemon: an export without
clients is gone before the reply, so BLOCK_EXPORT_DELETED precedes it."""
import json
import shutil

import pytest

from jobs_util import add_file, make_file
from qmp_util import Daemon

FLAVORS = ["laminad"] + (["qsd"] if shutil.which("qemu-storage-daemon") else [])


def messages_until_reply(c, obj):
    """Sends obj; returns the names of every message up to and including
    its reply ("reply")."""
    c.send_raw(json.dumps(obj))
    out = []
    while True:
        m = c._read_msg(10)
        assert m is not None
        if "QMP" in m:
            continue
        out.append(m)
        if "return" in m or "error" in m:
            break
    return [m["event"] if "event" in m else "reply" for m in out]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_export_deleted_before_reply(flavor, tmp_path):
    img = str(tmp_path / "a.raw")
    make_file(img, 1 << 20)
    with Daemon([], tmp_path, flavor=flavor) as d:
        q = d.qmp
        sock = str(tmp_path / "nbd.sock")
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        add_file(q, "a", img)
        q.cmd("block-export-add", type="nbd", id="e0", node_name="a")
        q.events()
        seq = messages_until_reply(q, {"execute": "block-export-del",
                                       "arguments": {"id": "e0"}})
        assert seq == ["BLOCK_EXPORT_DELETED", "reply"]
        q.cmd("block-export-add", type="nbd", id="e1", node_name="a")
        seq = messages_until_reply(q, {"execute": "nbd-server-stop"})
        assert seq == ["BLOCK_EXPORT_DELETED", "reply"]
