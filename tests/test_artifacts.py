"""Tests for dyninfer.core.artifacts: the on-disk dynamic model package."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import safetensors.torch
import torch

from dyninfer.core import artifacts
from dyninfer.core.artifact_paths import MANIFEST_NAME, artifact_exists
from dyninfer.core.artifacts import SCHEMA_VERSION, Artifact, BaseModelInfo
from dyninfer.core.errors import DyninferError

HASH = "a" * 64
OTHER_HASH = "b" * 64


def _info(content_hash: str = HASH) -> BaseModelInfo:
    return BaseModelInfo(
        spec="tiny-llama",
        content_hash=content_hash,
        architecture="LlamaForCausalLM",
        num_layers=4,
        hidden_size=16,
        vocab_size=32,
    )


def _artifact() -> Artifact:
    art = Artifact(base_model=_info(), tokenizer="tiny-tok")
    art.set_stage("probe", {"layers": [0, 1, 2, 3], "acc": 0.75, "nested": {"k": None}})
    art.set_stage("calibrate", {"threshold": 0.9, "never": float("inf")})
    g = torch.Generator().manual_seed(0)
    art.put_tensors(
        "exits",
        {
            "layer0.weight": torch.randn(16, 32, generator=g),
            "layer1.weight": torch.randn(16, 32, generator=g).to(torch.bfloat16),
        },
    )
    art.put_tensors(
        "masks",
        {"heads": torch.tensor([[True, False], [False, True]]), "idx": torch.arange(5, dtype=torch.int64)},
    )
    return art


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg and "\r" not in msg, msg
    return msg


def _leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".bak-" in p.name)


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    art = _artifact()
    out = art.save(tmp_path / "model.dyn")
    assert out == tmp_path / "model.dyn"
    assert artifact_exists(out)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "exits.safetensors", "masks.safetensors"]

    loaded = Artifact.load(out, expect_model_hash=HASH)
    assert loaded.base_model == _info()
    assert loaded.tokenizer == "tiny-tok"
    assert loaded.stages == art.stages
    assert loaded.stages["calibrate"]["never"] == float("inf")
    assert loaded.created_with == art.created_with
    assert set(loaded.created_with) == {"dyninfer", "torch", "transformers", "python"}
    assert set(loaded.tensors) == {"exits", "masks"}
    for group, tensors in art.tensors.items():
        assert set(loaded.tensors[group]) == set(tensors)
        for name, t in tensors.items():
            assert _same_bits(loaded.tensors[group][name], t), (group, name)

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert set(manifest["files"]) == {"exits.safetensors", "masks.safetensors"}
    assert all(len(v) == 64 for v in manifest["files"].values())


def test_round_trip_without_tensors_or_tokenizer(tmp_path):
    art = Artifact(base_model=_info())
    art.save(tmp_path / "a")
    loaded = Artifact.load(tmp_path / "a")
    assert loaded.tensors == {} and loaded.stages == {} and loaded.tokenizer is None
    assert os.listdir(tmp_path / "a") == [MANIFEST_NAME]


def test_shared_storage_noncontiguous_and_grad_tensors_are_saved(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    w = torch.randn(3, 3, requires_grad=True)
    art = Artifact(base_model=_info())
    art.put_tensors("steering", {"a": base, "b": base[1], "t": base.t(), "w": w})
    art.save(tmp_path / "a")
    got = Artifact.load(tmp_path / "a").tensors["steering"]
    assert torch.equal(got["a"], base)
    assert torch.equal(got["b"], base[1])
    assert torch.equal(got["t"], base.t())
    assert torch.equal(got["w"], w.detach())


def test_base_model_info_dict_round_trip_and_validation():
    info = _info()
    assert BaseModelInfo.from_dict(info.to_dict()) == info
    d = info.to_dict()
    del d["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        BaseModelInfo.from_dict(d)
    d = info.to_dict()
    d["num_layers"] = "4"
    with pytest.raises(ValueError, match="num_layers"):
        BaseModelInfo.from_dict(d)


def test_tool_versions_default():
    import platform

    import dyninfer

    art = Artifact(base_model=_info())
    assert art.created_with["dyninfer"] == dyninfer.__version__
    assert art.created_with["torch"] == str(torch.__version__)
    assert art.created_with["python"] == platform.python_version()
    assert "transformers" in art.created_with


# --------------------------------------------------------------------------- editing


def test_set_stage_rejects_non_json():
    art = Artifact(base_model=_info())
    with pytest.raises(TypeError):
        art.set_stage("probe", {"t": torch.tensor(1.0)})
    with pytest.raises(TypeError):
        art.set_stage("probe", {"s": {1, 2}})
    with pytest.raises(TypeError):
        art.set_stage("probe", ["not", "a", "dict"])
    assert "probe" not in art.stages


def test_set_stage_stores_json_normalised_copy():
    art = Artifact(base_model=_info())
    rec = {"pair": (1, 2), "inner": {"x": 1}}
    art.set_stage("probe", rec)
    rec["inner"]["x"] = 99
    assert art.stages["probe"] == {"pair": [1, 2], "inner": {"x": 1}}


def test_put_tensors_replaces_group_and_validates_name():
    art = Artifact(base_model=_info())
    art.put_tensors("exits", {"a": torch.zeros(2)})
    art.put_tensors("exits", {"b": torch.ones(2)})
    assert set(art.tensors["exits"]) == {"b"}
    for bad in ["Exits", "ex-its", "../x", "", "a.b"]:
        with pytest.raises(ValueError, match="tensor group name must be a simple name"):
            art.put_tensors(bad, {"a": torch.zeros(1)})
    with pytest.raises(TypeError):
        art.put_tensors("exits", {"a": [1, 2]})


# --------------------------------------------------------------------------- save


def test_resave_replaces_and_keeps_foreign_entries(tmp_path):
    target = tmp_path / "model.dyn"
    first = _artifact()
    first.save(target)
    (target / "probe").mkdir()
    (target / "probe" / "report.csv").write_text("layer,acc\n0,0.5\n")
    (target / "notes.txt").write_text("mine")

    second = Artifact(base_model=_info())
    second.set_stage("probe", {"acc": 0.1})
    second.put_tensors("steering", {"v": torch.full((4,), 2.0)})
    second.save(target)

    names = sorted(p.name for p in target.iterdir())
    # exits/masks were not in the new artifact: gone. Foreign entries: kept.
    assert names == sorted([MANIFEST_NAME, "steering.safetensors", "probe", "notes.txt"])
    assert (target / "probe" / "report.csv").read_text() == "layer,acc\n0,0.5\n"
    assert (target / "notes.txt").read_text() == "mine"
    loaded = Artifact.load(target)
    assert loaded.stages == {"probe": {"acc": 0.1}}
    assert set(loaded.tensors) == {"steering"}
    assert torch.equal(loaded.tensors["steering"]["v"], torch.full((4,), 2.0))
    assert _leftovers(tmp_path) == []


def test_load_modify_save_in_place(tmp_path):
    target = tmp_path / "m"
    _artifact().save(target)
    art = Artifact.load(target)
    art.set_stage("prune", {"kept": 3})
    art.save(target)
    again = Artifact.load(target)
    assert set(again.stages) == {"probe", "calibrate", "prune"}
    assert set(again.tensors) == {"exits", "masks"}
    assert _leftovers(tmp_path) == []


def test_failed_save_leaves_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "model.dyn"
    _artifact().save(target)
    (target / "probe").mkdir()
    (target / "probe" / "report.csv").write_text("x")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    real_save = safetensors.torch.save
    calls = []

    def flaky_save(tensors, metadata=None):
        calls.append(metadata)
        if len(calls) == 2:
            raise RuntimeError("simulated crash while writing the second group")
        return real_save(tensors, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save", flaky_save)
    new = Artifact(base_model=_info(OTHER_HASH))
    new.put_tensors("exits", {"a": torch.zeros(3)})
    new.put_tensors("masks", {"b": torch.ones(3)})
    with pytest.raises(RuntimeError, match="simulated crash"):
        new.save(target)
    assert len(calls) == 2

    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.dyn"]
    monkeypatch.undo()
    assert Artifact.load(target).base_model.content_hash == HASH


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "write_file", broken)  # the first file written: a tensor file
    art = _artifact()
    with pytest.raises(DyninferError) as ei:
        art.save(tmp_path / "new")
    msg = _assert_one_line(ei)
    assert "No space left" in msg
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_artifact_nonempty_dir(tmp_path):
    target = tmp_path / "userdata"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    with pytest.raises(DyninferError) as ei:
        _artifact().save(target)
    msg = _assert_one_line(ei)
    assert "not a dyninfer artifact" in msg
    assert sorted(os.listdir(target)) == ["thesis.tex"]
    assert (target / "thesis.tex").read_text() == "precious"
    assert _leftovers(tmp_path) == []


def test_refuses_existing_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("data")
    with pytest.raises(DyninferError) as ei:
        _artifact().save(target)
    _assert_one_line(ei)
    assert target.read_text() == "data"
    assert _leftovers(tmp_path) == []


def test_saves_into_empty_existing_dir_and_creates_parents(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _artifact().save(empty)
    assert artifact_exists(empty)
    deep = tmp_path / "a" / "b" / "c"
    _artifact().save(deep)
    assert artifact_exists(deep)


def test_unwritable_parent(tmp_path):
    blocker = tmp_path / "plainfile"
    blocker.write_text("not a dir")
    with pytest.raises(DyninferError) as ei:
        _artifact().save(blocker / "x")
    msg = _assert_one_line(ei)
    assert "is under" in msg and "which is a file" in msg  # refused before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plainfile"]
    assert blocker.read_text() == "not a dir"


# --------------------------------------------------------------------------- load errors


def _saved(tmp_path) -> pathlib.Path:
    return _artifact().save(tmp_path / "model.dyn")


def _rewrite_manifest(path: pathlib.Path, edit) -> None:
    m = json.loads((path / MANIFEST_NAME).read_text())
    edit(m)
    (path / MANIFEST_NAME).write_text(json.dumps(m))


def test_load_missing_dir(tmp_path):
    with pytest.raises(DyninferError) as ei:
        Artifact.load(tmp_path / "nope")
    assert "does not exist" in _assert_one_line(ei)


def test_load_missing_manifest(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DyninferError) as ei:
        Artifact.load(tmp_path / "d")
    assert "is not a dyninfer artifact (no dyninfer.json)" in _assert_one_line(ei)
    assert not artifact_exists(tmp_path / "d")


def test_load_path_is_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DyninferError) as ei:
        Artifact.load(tmp_path / "f")
    assert "not a dyninfer artifact" in _assert_one_line(ei)


def test_load_bad_json(tmp_path):
    p = _saved(tmp_path)
    (p / MANIFEST_NAME).write_text('{"schema_version": 1,\n "base_model": ')
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p)
    assert "not valid JSON" in _assert_one_line(ei)


def test_load_newer_schema(tmp_path):
    p = _saved(tmp_path)
    _rewrite_manifest(p, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p)
    msg = _assert_one_line(ei)
    assert "newer dyninfer" in msg and "upgrade" in msg


def test_load_missing_schema_version(tmp_path):
    p = _saved(tmp_path)
    _rewrite_manifest(p, lambda m: m.pop("schema_version"))
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p)
    assert "schema_version" in _assert_one_line(ei)


@pytest.mark.parametrize("field_name", ["base_model", "base_model.hidden_size"])
def test_load_missing_required_field(tmp_path, field_name):
    p = _saved(tmp_path)

    def edit(m):
        if field_name == "base_model":
            m.pop("base_model")
        else:
            m["base_model"].pop("hidden_size")

    _rewrite_manifest(p, edit)
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p)
    msg = _assert_one_line(ei)
    assert field_name.split(".")[-1] in msg


def test_load_tampered_tensor_file(tmp_path):
    p = _saved(tmp_path)
    data = bytearray((p / "exits.safetensors").read_bytes())
    data[-1] ^= 0xFF  # flip bits inside the tensor data: still parses, wrong checksum
    (p / "exits.safetensors").write_bytes(bytes(data))
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p)
    msg = _assert_one_line(ei)
    assert "corrupt: exits.safetensors does not match its checksum" in msg
    assert "re-create" in msg


def test_load_missing_tensor_file(tmp_path):
    p = _saved(tmp_path)
    (p / "masks.safetensors").unlink()
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p)
    assert "masks.safetensors is missing" in _assert_one_line(ei)


def test_load_unparseable_tensor_file(tmp_path):
    import hashlib

    p = _saved(tmp_path)
    garbage = b"this is not safetensors"
    (p / "exits.safetensors").write_bytes(garbage)
    _rewrite_manifest(p, lambda m: m["files"].update({"exits.safetensors": hashlib.sha256(garbage).hexdigest()}))
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p)
    msg = _assert_one_line(ei)
    assert "exits.safetensors" in msg and "safetensors" in msg


def test_load_rejects_path_traversal_in_files(tmp_path):
    p = _saved(tmp_path)
    _rewrite_manifest(p, lambda m: m["files"].update({"../evil.safetensors": "0" * 64}))
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p)
    assert "evil" in _assert_one_line(ei)


def test_load_expect_model_hash_mismatch(tmp_path):
    p = _saved(tmp_path)
    Artifact.load(p, expect_model_hash=HASH)  # matching: fine
    with pytest.raises(DyninferError) as ei:
        Artifact.load(p, expect_model_hash=OTHER_HASH)
    msg = _assert_one_line(ei)
    assert "made for model tiny-llama" in msg
    assert HASH[:12] in msg and OTHER_HASH[:12] in msg
    assert "re-run" in msg


def test_check_base_model(tmp_path):
    art = Artifact.load(_saved(tmp_path))
    art.check_base_model(HASH, spec="whatever/renamed")  # same content, other spec: fine
    with pytest.raises(DyninferError) as ei:
        art.check_base_model(OTHER_HASH, spec="other-model")
    msg = _assert_one_line(ei)
    assert "made for model tiny-llama" in msg and "not for other-model" in msg
    assert OTHER_HASH[:12] in msg


def test_error_messages_single_line_even_with_newlines_in_inputs(tmp_path):
    art = Artifact(base_model=BaseModelInfo("spec\nwith newline", HASH, "X", 1, 1, 1))
    with pytest.raises(DyninferError) as ei:
        art.check_base_model(OTHER_HASH, spec="other\nmodel")
    _assert_one_line(ei)


def test_library_callers_of_run_and_save_queue_on_one_artifact(tmp_path):
    """jobs.writer.run_and_save holds the artifact's writer lock from before the job reads until it saved: a second
    caller (here a thread of the same process) waits, is told so, and reads only once the first has saved."""
    import threading
    import time

    from dyninfer.jobs.writer import run_and_save

    out, events, waited = tmp_path / "artifact", [], []

    def run(config, progress=None, existing=None):
        events.append(f"{config} reads")
        time.sleep(0.3 if config == "first" else 0.0)
        return config

    def save(report, target, on_wait):
        events.append(f"{report} saves")
        return target

    first = threading.Thread(target=run_and_save, args=(run, save, "first", out))
    first.start()
    while not events:
        time.sleep(0.01)
    report, target = run_and_save(run, save, "second", out, on_wait=lambda: waited.append(True))
    first.join()
    assert events == ["first reads", "first saves", "second reads", "second saves"]
    assert waited == [True] and (report, target) == ("second", out)
