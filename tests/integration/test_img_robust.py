"""Damaged qcow2 images: every lamina-img command ends with an error or a
result, never a crash or a hang."""
import os
import random

import pytest

from conftest import LAMINA_IMG, run
from img_util import mixed_qcow2, need_qcow2


@pytest.mark.parametrize("seed", range(12))
def test_random_damage(tmp_path, seed):
    need_qcow2()
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    data = bytearray(open(src, "rb").read())
    r = random.Random(seed)
    # Header, L1/refcount tables and first tables live in the first clusters.
    for _ in range(r.randint(1, 8)):
        end = r.choice([104, 0x40000, len(data)])
        data[r.randrange(0, min(end, len(data)))] = r.randrange(256)
    f = str(tmp_path / "bad.qcow2")
    with open(f, "wb") as fh:
        fh.write(data)
    cmds = [["info", "--output=json", f], ["map", "--output=json", f],
            ["check", f], ["compare", f, src],
            ["convert", "-W", "-O", "raw", f, str(tmp_path / "o.raw")],
            ["convert", "-O", "qcow2", f, str(tmp_path / "o.qcow2")],
            ["measure", "-O", "qcow2", f],
            ["rebase", "-u", "-b", "", f],
            ["check", "-r", "all", f]]
    for cmd in cmds:
        p = run([LAMINA_IMG] + cmd, check=False, timeout=60)
        assert p.returncode >= 0, (cmd, p.stderr)
        assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr
        assert p.returncode in (0, 1, 2, 3, 63), (cmd, p.returncode, p.stderr)
        for o in ("o.raw", "o.qcow2"):
            if os.path.exists(tmp_path / o):
                os.unlink(tmp_path / o)
