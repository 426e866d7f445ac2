"""lamina-img rebase: safe mode keeps content, unsafe changes the header."""
import os

from img_util import (assert_qemu_clean, assert_same_content, chain, jqimg, lam,
                      mixed_qcow2, qimg, qio)


def snapshot_raw(tmp_path, img, name):
    out = str(tmp_path / name)
    qimg("convert", "-O", "raw", img, out)
    return out


def test_safe_rebase_onto_other_base(tmp_path):
    base, mid, top = chain(str(tmp_path))
    before = snapshot_raw(tmp_path, top, "before.raw")
    nb = str(tmp_path / "new.qcow2")
    qimg("create", "-q", "-f", "qcow2", nb, "64M")
    qio(nb, "write -P 0xab 0 8M")
    lam("rebase", "-b", "new.qcow2", "-F", "qcow2", top)
    info = jqimg("info", "--output=json", top)
    assert info["backing-filename"] == "new.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert_qemu_clean(top)
    assert_same_content(top, before, "qcow2", "raw")


def test_safe_rebase_to_base_of_chain(tmp_path):
    base, mid, top = chain(str(tmp_path))
    before = snapshot_raw(tmp_path, top, "before.raw")
    lam("rebase", "-p", "-b", "base.qcow2", "-F", "qcow2", top)
    assert_same_content(top, before, "qcow2", "raw")
    assert jqimg("info", "--output=json", top)["backing-filename"] == "base.qcow2"


def test_remove_backing(tmp_path):
    base, mid, top = chain(str(tmp_path))
    before = snapshot_raw(tmp_path, top, "before.raw")
    lam("rebase", "-b", "", top)
    info = jqimg("info", "--output=json", top)
    assert "backing-filename" not in info
    assert_qemu_clean(top)
    assert_same_content(top, before, "qcow2", "raw")


def test_unsafe_changes_header_only(tmp_path):
    base, mid, top = chain(str(tmp_path))
    m_before = jqimg("map", "--output=json", "-f", "qcow2", "--image-opts",
                     f"driver=qcow2,file.filename={top},backing=") if False else None
    size_before = os.path.getsize(top)
    lam("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", top)
    assert jqimg("info", "--output=json", top)["backing-filename"] == "base.qcow2"
    assert os.path.getsize(top) == size_before
    assert_qemu_clean(top)
    # The mid layer's data is gone from the view.
    p = qimg("compare", top, mid, check=False)
    assert p.returncode == 1


def test_unsafe_without_format_is_error(tmp_path):
    base, mid, top = chain(str(tmp_path))
    p = lam("rebase", "-u", "-b", "base.qcow2", top, check=False)
    assert p.returncode == 1
    assert "backing format must be specified" in p.stderr


def test_unsafe_missing_old_backing(tmp_path):
    base, mid, top = chain(str(tmp_path))
    os.rename(mid, str(tmp_path / "moved.qcow2"))
    lam("rebase", "-u", "-b", "moved.qcow2", "-F", "qcow2", top)
    assert jqimg("info", "--output=json", top)["backing-filename"] == "moved.qcow2"
    assert_qemu_clean(top)


def test_safe_new_backing_missing(tmp_path):
    base, mid, top = chain(str(tmp_path))
    p = lam("rebase", "-b", "nope.qcow2", "-F", "qcow2", top, check=False)
    assert p.returncode == 1
    assert jqimg("info", "--output=json", top)["backing-filename"] == "mid.qcow2"


def test_add_backing_to_standalone_image(tmp_path):
    img = mixed_qcow2(str(tmp_path / "a.qcow2"))
    before = snapshot_raw(tmp_path, img, "before.raw")
    nb = str(tmp_path / "nb.qcow2")
    qimg("create", "-q", "-f", "qcow2", nb, "64M")
    qio(nb, "write -P 0xcd 0 64M")
    lam("rebase", "-b", "nb.qcow2", "-F", "qcow2", img)
    assert jqimg("info", "--output=json", img)["backing-filename"] == "nb.qcow2"
    assert_qemu_clean(img)
    assert_same_content(img, before, "qcow2", "raw")


def test_rebase_matches_qemu_allocation(tmp_path):
    # Same inputs through both tools: same content, and lamina-img does not
    # allocate more than qemu-img does.
    import shutil
    base, mid, top = chain(str(tmp_path))
    top2 = str(tmp_path / "top2.qcow2")
    shutil.copy(top, top2)
    lam("rebase", "-b", "base.qcow2", "-F", "qcow2", top)
    qimg("rebase", "-b", "base.qcow2", "-F", "qcow2", top2)
    assert_same_content(top, top2)

    def allocated(f):
        return sum(e["length"] for e in jqimg("map", "--output=json", f)
                   if e["depth"] == 0 and e["present"])
    assert allocated(top) <= allocated(top2)
