"""The folder source reads only files inside its root, only regular files, at most hub_load.max_file_bytes of each:
a symlinked sidecar must not make a local secret a caption, a link to /dev/zero must not exhaust memory, and
every row in is a row out or a row rejected. Row ids do not depend on how the root is spelled."""
from __future__ import annotations

import json
import os
import resource
import subprocess

import fsspec
import numpy as np
import pytest

from cnpipe.ids import stable_id
from components.hub_load.stage import run

SECRET = b"ya29.service-account-token"


def reasons(manifest) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in manifest.rejected_table().to_pylist()}


def noise_png(images, seed: int) -> bytes:
    """A PNG that does not compress: its size is about 3 bytes per pixel."""
    from PIL import Image

    return images.encode(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 80, 3), dtype=np.uint8)), "PNG")


def test_links_out_of_the_folder_are_not_followed(tmp_path, images, make_config, dataset_rows):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "token.txt").write_bytes(SECRET)
    (outside / "photo.png").write_bytes(images.png(seed=9))
    seeds = tmp_path / "seeds"
    (seeds / "sub").mkdir(parents=True)
    (seeds / "good.jpg").write_bytes(images.jpeg(seed=1))
    os.symlink(outside / "token.txt", seeds / "good.txt")  # a caption sidecar linked to a secret
    (seeds / "sub" / "real.png").write_bytes(images.png(seed=2))
    os.symlink("sub/real.png", seeds / "inner.png")  # a link that stays inside: read
    os.symlink(outside / "photo.png", seeds / "stolen.png")
    os.symlink("sub/../../outside/photo.png", seeds / "dotdot.png")
    os.symlink("sub", seeds / "dir.png")
    os.symlink("nowhere.png", seeds / "dangling.png")
    os.symlink(outside, seeds / "linked_dir")  # a linked folder is not descended into

    manifest = run(make_config(kind="folder", source=str(seeds), rows_per_shard=3), {}, str(tmp_path / "out"))
    rows = dataset_rows(str(tmp_path / "out"))
    assert sorted(rows.column("origin").to_pylist()) == ["folder:good.jpg", "folder:inner.png", "folder:sub/real.png"]
    assert reasons(manifest) == {
        stable_id("folder", "stolen.png"): "outside_source", stable_id("folder", "dotdot.png"): "outside_source",
        stable_id("folder", "dir.png"): "not_a_regular_file", stable_id("folder", "dangling.png"): "not_a_regular_file",
    }
    assert manifest.rows_in == manifest.rows_out + manifest.rows_rejected == 7
    assert manifest.notes == {"caption_outside_source": 1}  # the caption is dropped, the image kept
    assert rows.column("source_caption").to_pylist() == [None, None, None]
    assert not any(SECRET in (v if isinstance(v, bytes) else str(v).encode())
                   for row in rows.to_pylist() for v in row.values() if v is not None)
    details = {r["id"]: r["detail"] for r in manifest.rejected_table().to_pylist()}
    assert details[stable_id("folder", "stolen.png")].startswith("folder:stolen.png: ")
    assert "outside the source root" in details[stable_id("folder", "stolen.png")]


def test_every_file_read_is_capped(tmp_path, images, make_config, dataset_rows):
    small, big = images.png(seed=1), noise_png(images, seed=2)
    cap = len(small) + 10
    assert len(big) > cap
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "big.png").write_bytes(big)
    (seeds / "small.png").write_bytes(small)
    (seeds / "small.txt").write_bytes(b"long caption " * (cap // 10))
    (seeds / "exact.png").write_bytes(small + b"\0" * 10)  # exactly max_file_bytes: still read
    manifest = run(make_config(kind="folder", source=str(seeds), max_file_bytes=cap), {}, str(tmp_path / "out"))
    rows = dataset_rows(str(tmp_path / "out"))
    assert sorted(rows.column("origin").to_pylist()) == ["folder:exact.png", "folder:small.png"]
    assert reasons(manifest) == {stable_id("folder", "big.png"): "file_too_large"}
    assert manifest.notes == {"caption_file_too_large": 1}
    assert f"max_file_bytes = {cap}" in manifest.rejected_table().column("detail")[0].as_py()


def test_object_store_folders_are_capped_by_the_listing_size_and_keep_their_ids(tmp_path, images, make_config, dataset_rows):
    memory = fsspec.filesystem("memory")
    small, big = images.png(seed=1), noise_png(images, seed=2)
    memory.pipe("/seeds-cap/small.png", small)
    memory.pipe("/seeds-cap/sub/big.png", big)
    memory.pipe("/seeds-cap/small.txt", b"x" * (len(small) + 1))
    opened = []
    real_open = type(memory).open

    def spy(self, path, *args, **kwargs):
        opened.append(path)
        return real_open(self, path, *args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(memory), "open", spy)
            manifests = [run(make_config(kind="folder", source=root, max_file_bytes=len(small)), {}, str(tmp_path / f"out{i}"))
                         for i, root in enumerate(["memory://seeds-cap", "memory:///seeds-cap/"])]
    finally:
        memory.rm("/seeds-cap", recursive=True)
    for i, manifest in enumerate(manifests):
        assert dataset_rows(str(tmp_path / f"out{i}")).column("id").to_pylist() == [stable_id("folder", "small.png")]
        assert reasons(manifest) == {stable_id("folder", "sub/big.png"): "file_too_large"}
        assert manifest.notes == {"caption_file_too_large": 1}
    assert any(p.endswith("small.png") for p in opened), opened
    assert not any(p.endswith(("big.png", ".txt")) for p in opened), opened  # refused by size, never opened


def test_devices_and_fifos_are_never_read(tmp_path, images, make_config, cli):
    """Through the command line, memory-limited: reading /dev/zero whole would end in MemoryError, not hang a test."""
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a.jpg").write_bytes(images.jpeg(seed=1))
    os.symlink("/dev/zero", seeds / "a.txt")
    os.symlink("/dev/zero", seeds / "zero.jpg")
    os.mkfifo(seeds / "pipe.jpg")  # opening it for reading would block until a writer comes
    (seeds / "b.jpg").write_bytes(images.jpeg(seed=2))
    argv, env = cli
    out = tmp_path / "out"

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    done = subprocess.run(argv("hub_load", make_config(kind="folder", source=str(seeds)).to_json(), str(out)),
                          env=env, capture_output=True, text=True, timeout=120, preexec_fn=limit_memory)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["rows_in"], manifest["rows_out"]) == (4, 2)
    assert manifest["rejections"] == {"not_a_regular_file": 1, "outside_source": 1}
    assert manifest["notes"] == {"caption_outside_source": 1}


def test_ids_do_not_depend_on_how_the_root_is_spelled(tmp_path, images, make_config, dataset_rows, monkeypatch):
    seeds = tmp_path / "seeds"
    (seeds / "sub").mkdir(parents=True)
    (seeds / "a.jpg").write_bytes(images.jpeg(seed=1))
    (seeds / "sub" / "b.png").write_bytes(images.png(seed=2))
    monkeypatch.chdir(tmp_path)
    spellings = ["seeds", "./seeds/", str(seeds), f"{seeds}/", f"file://{seeds}"]
    results = []
    for i, root in enumerate(spellings):
        run(make_config(kind="folder", source=root), {}, str(tmp_path / f"out{i}"))
        rows = dataset_rows(str(tmp_path / f"out{i}"))
        results.append((rows.column("id").to_pylist(), rows.column("origin").to_pylist()))
    expected = ([stable_id("folder", "a.jpg"), stable_id("folder", "sub/b.png")], ["folder:a.jpg", "folder:sub/b.png"])
    assert results == [expected] * len(spellings)
