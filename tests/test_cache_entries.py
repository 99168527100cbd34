"""A cache entry's parts. The content digest that names entries and checks them: the same digest
as a plain ``Path.rglob`` walk (entries written before the scandir walk stay valid), for trees
with nested, hidden, excluded and symlinked names, and one that changes with any file's bytes or
name. The cores file: the cores read back exactly as written (stacked by shape and dtype), in
the asked dtype, files with one tensor per module too, and a file whose names do not match its
stacks refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from nora_serve.serving.cache.cores_file import read_cores, write_cores
from nora_serve.serving.cache.keys import content_digest


def _rglob_digest(src: Path, exclude: tuple[str, ...] = ()) -> str:
    """The definition, written the plain way: every file below ``src`` by ``rglob``, hidden
    parts and excluded top-level names left out, sorted as paths, sha256 of each file."""
    h = hashlib.sha256()
    files = sorted(p for p in src.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
                   and p.relative_to(src).parts[0] not in exclude)
    for p in files:
        h.update(str(p.relative_to(src)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def _tree(root: Path) -> Path:
    src = root / "adapter"
    for rel, data in {"adapter_config.json": b"{}", "a-b": b"1", "a/b": b"2", "a/c/d.safetensors": b"3",
                      "a.b/e": b"4", ".hidden": b"5", "a/.hidden/f": b"6", "nora-cache.json": b"7",
                      "z/y/x/w": b"8"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    outside = root / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "g").write_bytes(b"9")
    (outside / "file").write_bytes(b"10")
    os.symlink(outside, src / "linked_dir")  # listed by rglob, never entered
    os.symlink(outside / "file", src / "a" / "linked_file")  # followed
    os.symlink(root / "missing", src / "broken")
    return src


def test_content_digest_equals_the_rglob_definition(tmp_path):
    src = _tree(tmp_path)
    assert content_digest(src) == _rglob_digest(src)
    assert content_digest(src, exclude=("nora-cache.json", "a")) == _rglob_digest(src, ("nora-cache.json", "a"))
    assert content_digest(tmp_path / "absent") == _rglob_digest(tmp_path / "absent")


def test_content_digest_changes_with_a_files_bytes_or_name(tmp_path):
    src = _tree(tmp_path)
    before = content_digest(src)
    f = src / "a" / "c" / "d.safetensors"
    f.write_bytes(b"33")  # another size: the file digest memo (path, size, mtime) misses
    changed = content_digest(src)
    assert changed != before and changed == _rglob_digest(src)
    f.rename(src / "a" / "c" / "e.safetensors")
    assert content_digest(src) not in (before, changed)
    assert content_digest(src) == _rglob_digest(src)
    (src / ".more").write_bytes(b"hidden")  # hidden names never count
    assert content_digest(src) == _rglob_digest(src)


def _cores():
    g = torch.Generator().manual_seed(0)
    cores = {f"model.layers.{i}.self_attn.{p}": torch.randn(8, 8, generator=g) for i in range(3) for p in "qkvo"}
    cores["model.layers.0.mlp.down_proj"] = torch.randn(4, 4, generator=g)  # another shape
    cores["model.layers.1.mlp.down_proj"] = torch.randn(8, 8, generator=g).to(torch.bfloat16)  # another dtype
    return cores


def test_cores_read_back_as_written(tmp_path):
    from safetensors import safe_open

    cores = _cores()
    f = tmp_path / "cores.safetensors"
    write_cores(f, cores)
    with safe_open(str(f), framework="pt") as fh:
        assert len(list(fh.keys())) == 3  # one stack per (dtype, shape), not one tensor per module
    got = read_cores(f)
    assert got.keys() == cores.keys()
    for m, t in cores.items():
        assert got[m].dtype == t.dtype and torch.equal(got[m], t), m
    as_bf16 = read_cores(f, torch.bfloat16)
    for m, t in cores.items():
        assert as_bf16[m].dtype == torch.bfloat16 and torch.equal(as_bf16[m], t.to(torch.bfloat16)), m


def test_cores_sent_to_the_workers_arrive_as_written(tmp_path):
    """--nora-preload-store hands the workers each entry's stacks as plain values (vLLM's engine
    calls carry no tensors): every dtype, an empty stack and an old per-module file survive."""
    from safetensors.torch import save_file

    from nora_serve.serving.cache.cores_file import read_stacks, stacks_from_wire, stacks_to_wire, unstack

    cores = _cores()
    f = tmp_path / "cores.safetensors"
    write_cores(f, cores)
    wire = stacks_to_wire(read_stacks(f) + [(("empty",), torch.zeros(1, 0, 8))])
    assert all(type(v) in (list, str, bytes) for stack in wire for v in stack)
    got = unstack(stacks_from_wire(wire))
    assert got.pop("empty").shape == (0, 8)
    assert got.keys() == cores.keys()
    for m, t in cores.items():
        assert got[m].dtype == t.dtype and torch.equal(got[m], t), m
    old = tmp_path / "old.safetensors"
    save_file(cores, str(old))  # one tensor per module, as entries were first written
    got = unstack(stacks_from_wire(stacks_to_wire(read_stacks(old))), torch.float32)
    assert got.keys() == cores.keys() and all(torch.equal(got[m], t.float()) for m, t in cores.items())


def test_a_rewritten_marker_is_read_again(tmp_path):
    """Markers are read once per version of the file (loading reads one twice): a marker written
    anew is never answered from the first reading."""
    from nora_serve.serving.cache.keys import MARKER
    from nora_serve.serving.cache.trust import read_marker

    entry = tmp_path / "e"
    entry.mkdir()
    (entry / MARKER).write_text(json.dumps({"key": "a"}))
    first = read_marker(entry)
    assert first == {"key": "a"}
    first["key"] = "changed by the caller"  # a copy: the next reader sees the file's
    assert read_marker(entry) == {"key": "a"}
    tmp = entry / "new"
    tmp.write_text(json.dumps({"key": "b", "more": 1}))
    os.replace(tmp, entry / MARKER)
    assert read_marker(entry) == {"key": "b", "more": 1}
    (entry / MARKER).write_text("[1, 2]")  # not an object: no marker
    assert read_marker(entry) is None


def test_cores_written_per_module_read_too(tmp_path):
    from safetensors.torch import save_file

    cores = _cores()
    f = tmp_path / "cores.safetensors"
    save_file(cores, str(f))  # as entries were first written
    got = read_cores(f, torch.float32)
    assert got.keys() == cores.keys() and all(torch.equal(got[m], t.float()) for m, t in cores.items())


def test_cores_file_whose_names_do_not_match_its_stacks_is_refused(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "cores.safetensors"
    save_file({"stack.0": torch.zeros(3, 8, 8)}, str(f),
              metadata={"format": "nora-stacked-cores", "stack.0": '["a", "b"]'})
    with pytest.raises(ValueError, match="stack.0: 3 cores but 2 module names"):
        read_cores(f)


def test_reading_nested_in_one_thread_holds_the_lock_until_the_outer_one_ends(tmp_path, monkeypatch):
    """A bulk load holds the cache's shared lock once around thousands of loads, each of which
    asks for it again: the inner ones take nothing more and must not release it (an eviction
    could then remove an entry being read)."""
    import fcntl

    from nora_serve.serving.cache import bound
    from nora_serve.serving.cache.bound import reading

    taken = []
    lock = bound._dir_lock
    monkeypatch.setattr(bound, "_dir_lock", lambda d, shared: taken.append(shared) or lock(d, shared=shared))

    def exclusive_free() -> bool:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    assert exclusive_free()
    with reading(tmp_path):
        with reading(tmp_path):
            assert not exclusive_free()
        assert not exclusive_free()  # the inner one ended, the outer one still holds it
    assert exclusive_free() and taken == [True]
    with reading(tmp_path):  # a later one takes it again
        assert not exclusive_free()
    assert taken == [True, True]
