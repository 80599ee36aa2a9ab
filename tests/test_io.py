"""noisynn/io/: nothing half-written looks finished, outputs are checked before the work, one writer
per run folder, a safetensors header is checked without torch, and the provenance says what ran."""

from __future__ import annotations

import json
import os
import struct
import subprocess

import pytest

from noisynn.errors import UserError
from noisynn.io.atomic import atomic_path, atomic_write_json, remove_stale_temp_files
from noisynn.io.guards import check_not_an_input, check_output_file, check_output_folder
from noisynn.io.locks import LOCK_NAME, run_lock
from noisynn.io.provenance import git_commit
from noisynn.io.safetensors_header import read_safetensors_header


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temp_file(tmp_path):
    final = tmp_path / "metrics.json"
    atomic_write_json(final, {"top1": 90.0})
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text('{"top1": 1')  # half a file
        raise RuntimeError("killed")
    assert json.loads(final.read_text()) == {"top1": 90.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_finished_write_gets_the_mode_a_plain_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", [1])
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_stale_temp_files_are_removed_by_name_and_nothing_else(tmp_path):
    (tmp_path / ".model.safetensors.abcd1234.tmp").write_text("half")
    (tmp_path / ".model.json.efgh5678.tmp").write_text("half")
    (tmp_path / ".hidden.tmp").write_text("not ours")  # not atomic_path's pattern
    (tmp_path / "model.safetensors").write_text("finished")
    removed = remove_stale_temp_files(tmp_path, ["model.safetensors"])
    assert [p.name for p in removed] == [".model.safetensors.abcd1234.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp", ".model.json.efgh5678.tmp", "model.safetensors"]
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [".model.json.efgh5678.tmp"]


def test_outputs_of_the_wrong_kind_are_refused_before_the_work(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a folder; expected the path of a file"):
        check_output_file(tmp_path / "folder", "--out")
    with pytest.raises(UserError, match="is an existing file; expected a folder"):
        check_output_folder(tmp_path / "file", "--out")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_file(tmp_path / "file" / "below.json", "--out")
    with pytest.raises(UserError, match="would destroy an input"):
        check_not_an_input(tmp_path / "x" / ".." / "file", "--out", {"the evaluation": tmp_path / "file"})
    check_output_file(tmp_path / "new" / "deeper" / "a.json", "--out")  # created later: fine
    assert not (tmp_path / "new").exists()  # and the check itself created nothing


def test_one_writer_per_run_folder_and_the_lock_goes_with_its_holder(tmp_path):
    with run_lock(tmp_path / "run", "--out") as lock:
        assert lock.name == LOCK_NAME and str(os.getpid()) in lock.read_text()
        with pytest.raises(UserError, match="is in use by another training"), run_lock(tmp_path / "run", "--out"):
            pass
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with run_lock(tmp_path / "run", "--out"):  # free again
        pass


def _safetensors(tensors: dict[str, tuple[str, list[int], int]]) -> bytes:
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def test_a_safetensors_header_is_read_and_a_damaged_file_named(tmp_path):
    good = tmp_path / "w.safetensors"
    good.write_bytes(_safetensors({"head.weight": ("F32", [10, 4], 160), "head.bias": ("BF16", [10], 20)}))
    assert read_safetensors_header(good, "weights") == {"head.weight": ("F32", (10, 4)), "head.bias": ("BF16", (10,))}
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(UserError, match="cut short or padded"):
        read_safetensors_header(cut, "weights")
    pickle = tmp_path / "p.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # a pickle's opening bytes
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_safetensors_header(pickle, "weights")
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(_safetensors({"w": ("F32", [10, 4], 8)}))  # 40 floats declared, 2 stored
    with pytest.raises(UserError, match="malformed entry"):
        read_safetensors_header(wrong, "weights")


def test_the_commit_is_dirty_for_changed_code_but_not_for_rewritten_results(tmp_path):
    assert git_commit(tmp_path) == "unknown"  # no repository
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "metrics.json").write_text("{}\n")
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "results" / "metrics.json").write_text('{"top1": 1}\n')
    assert git_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == head + "-dirty"
