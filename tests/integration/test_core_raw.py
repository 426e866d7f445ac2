"""Core behaviour seen through lamina-img, with qemu-img as the oracle."""
import json
import os

from conftest import run


def test_odd_size_raw_is_whole_sectors(tmp_path, lamina_img, qemu_img):
    f = tmp_path / "odd.raw"
    f.write_bytes(os.urandom(1000000))
    ours = json.loads(run([lamina_img, "info", "--output=json", "-f", "raw", str(f)]).stdout)
    theirs = json.loads(run([qemu_img, "info", "--output=json", "-f", "raw", str(f)]).stdout)
    assert ours["virtual-size"] == theirs["virtual-size"] == 1000448
    m1 = json.loads(run([lamina_img, "map", "--output=json", "-f", "raw", str(f)]).stdout)
    m2 = json.loads(run([qemu_img, "map", "--output=json", "-f", "raw", str(f)]).stdout)
    assert m1 == m2
