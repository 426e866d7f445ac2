"""Random operation sequences against an in-memory model: writes (partial,
multi-cluster, compressed), zeroing with and without unmap, discard, over a
backing file or not, v2 and v3; the result must equal the model and pass
qemu-img check."""
import json
import random

import pytest

from qcow2_util import (assert_clean, have_tools, lamina_dump, qemu_img, qemu_io, tool)

pytestmark = pytest.mark.skipif(not have_tools(), reason="qcow2-tool or QEMU missing")

SIZE = 4 << 20


def random_ops(rng, cs, model, backing, v2):
    ops = []
    for _ in range(60):
        kind = rng.choice(["w", "w", "w", "wc", "z", "zu", "d"])
        if kind == "wc":
            c = rng.randrange(SIZE // cs)
            n = rng.randint(1, 3)
            off, ln = c * cs, min(n * cs, SIZE - c * cs)
        else:
            off = rng.randrange(SIZE - 1)
            ln = rng.randint(1, min(SIZE - off, rng.choice([512, cs, 3 * cs + 7, 200000])))
        pat = rng.randrange(1, 256)
        if kind in ("w", "wc"):
            ops.append(f"{'wc' if kind == 'wc' else 'write'}:{off}:{ln}:{pat}")
            model[off:off + ln] = bytes([pat]) * ln
        elif kind in ("z", "zu"):
            ops.append(f"zero:{off}:{ln}" + (":unmap" if kind == "zu" else ""))
            model[off:off + ln] = bytes(ln)
        else:
            # discard: whole clusters inside the range; content afterwards
            # is either zero or the backing data (v2) - both accepted by
            # the caller, which tracks the range as "undefined".
            ops.append(f"discard:{off}:{ln}")
            a = -(-off // cs) * cs
            b = (off + ln) // cs * cs if off + ln < SIZE else SIZE
            if b > a:
                for i in range(a, b):
                    model[i] = -1 if (v2 and backing) else 0
    return ops


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cs,v2,backing,cache", [(512, False, False, None),
                                                 (4096, False, True, None),
                                                 (65536, False, True, None),
                                                 (65536, True, True, None),
                                                 (4096, True, False, None),
                                                 (512, False, True, 2048),
                                                 (4096, False, False, 16384)])
def test_random(tmp_path, seed, cs, v2, backing, cache):
    rng = random.Random(seed * 1000 + cs)
    img = str(tmp_path / "r.qcow2")
    base_data = bytearray(SIZE)
    opts = {"cluster-size": cs}
    if v2:
        opts["version"] = "v2"
    if backing:
        base = str(tmp_path / "base.qcow2")
        qemu_img("create", "-f", "qcow2", base, str(SIZE))
        qemu_io(base, "write -P 0xb1 0 1M", "write -P 0xb2 2M 1536k")
        base_data[0:1 << 20] = b"\xb1" * (1 << 20)
        base_data[2 << 20:(2 << 20) + 1536 * 1024] = b"\xb2" * (1536 * 1024)
        opts["backing-file"] = "base.qcow2"
        opts["backing-fmt"] = "qcow2"
    tool("create", img, SIZE, json.dumps(opts))
    model = [b for b in base_data]
    ops = random_ops(rng, cs, model, backing, v2)
    # run in a few batches so reopen paths are exercised too
    # cache: a tiny L2/refcount cache (4 tables) forces evictions of dirty
    # tables in the middle of requests
    extra = ["-o", json.dumps({"l2-cache-size": cache, "refcount-cache-size": cache})] if cache else []
    for i in range(0, len(ops), 20):
        tool(*extra, img, *ops[i:i + 20])
    assert_clean(img)
    out = str(tmp_path / "out.raw")
    lamina_dump(img, out)
    ref = str(tmp_path / "q.raw")
    qemu_img("convert", "-O", "raw", img, ref)
    with open(out, "rb") as f:
        got = f.read()
    with open(ref, "rb") as f:
        qgot = f.read()
    assert got == qgot, "lamina and qemu read different data"
    for i, m in enumerate(model):
        if m == -1:
            assert got[i] in (0, base_data[i]), i
        elif got[i] != m:
            pytest.fail(f"byte {i}: got {got[i]:#x}, want {m:#x} (ops: {ops})")
