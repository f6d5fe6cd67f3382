"""Untrusted run folders (issue 10, item 1): nothing a run folder holds makes the tool read outside it or
run code, and tampered or malformed checkpoints are refused with one line.

Each crafted folder carries a payload that would create a marker file if it were ever unpickled
without restriction; every test checks the one-line refusal and that the marker is absent.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from sparse_transformer import checkpoint
from sparse_transformer.config import load_config
from sparse_transformer.errors import UserError
from sparse_transformer.model import SparseTransformer
from sparse_transformer.sample import sample_command
from sparse_transformer.train import check_resume_state, make_optimizer

SMALL = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--data.seq_len", "64"]
SMALL += ["--model.stride", "16", "--model.c", "4"]


class RunsCode:
    """Unpickled without restriction, this creates ``marker`` (any code could run instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def trained(cfg):
    """A model and optimizer after one step (so the optimizer has state)."""
    torch.manual_seed(0)
    model = SparseTransformer(cfg.model)
    torch.nn.init.normal_(model.head.weight)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    model(torch.randint(0, 256, (2, 64))).float().logsumexp(-1).mean().backward()
    opt.step()
    return model, opt


def training_state(step=1):
    return {
        "step": step,
        "elapsed_s": 1.0,
        "scaler": {},
        "timing": {"train_s": 1.0, "eval_s": 0.0, "compile_s": 0.0, "warmup_end_s": None},
        "ranks": [{"rng": {"torch": torch.get_rng_state(), "numpy": {"state": 1}}, "loss_sum": 0.0, "loss_steps": 0}],
    }


@pytest.fixture
def world(tmp_path):
    """``tmp_path/run`` (a plain checkpoint), ``tmp_path/sharded`` (shards, as FSDP2 writes them),
    ``tmp_path/outside`` (a folder elsewhere) and the marker path; the models for comparison."""
    cfg = load_config(None, SMALL)
    model, opt = trained(cfg)
    run, sharded, outside = tmp_path / "run", tmp_path / "sharded", tmp_path / "outside"
    for folder in (run, sharded, outside):
        folder.mkdir()
    checkpoint.save_config(run, cfg)
    checkpoint.save(run, {**training_state(), "model": model.state_dict(), "optimizer": opt.state_dict()})
    checkpoint.save_config(sharded, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP in one process
        name = checkpoint.save_sharded(sharded, 1, model, opt)
    checkpoint.save(sharded, {**training_state(), "sharded": name})
    return {
        "cfg": cfg,
        "model": model,
        "run": run,
        "sharded": sharded,
        "outside": outside,
        "marker": tmp_path / "pwned",
    }


def refused(world, folder, match, resume=True):
    """Loading ``folder`` for eval/sample (and for a resume) is refused with one line matching
    ``match``, and no payload ran."""
    with pytest.raises(UserError, match=match) as e:
        checkpoint.load_model(folder)
    assert "\n" not in str(e.value)
    if resume:
        model = SparseTransformer(world["cfg"].model)
        with pytest.raises(UserError, match=match) as e:
            checkpoint.load_training(folder, model, make_optimizer(model, world["cfg"].train, torch.device("cpu")))
        assert "\n" not in str(e.value)
    assert not world["marker"].exists()


def read_metadata(folder):
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)  # our own, trusted here


def write_metadata(folder, md):
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def test_genuine_folders_load(world):
    """The control: the crafted folders below differ from these only by the trick."""
    for name in ("run", "sharded"):
        loaded, _ = checkpoint.load_model(world[name])
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), world["model"].state_dict().values())
        )


def malicious_dcp(folder, marker):
    """A shard folder whose .metadata runs code when torch.distributed.checkpoint reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    (folder / "__0_0.distcp").write_bytes(b"")


@pytest.mark.parametrize(
    "name",
    [
        "../outside/checkpoint-dcp-1",  # the hole of the issue: a shard folder elsewhere
        "{outside}/checkpoint-dcp-1",  # an absolute path
        "checkpoint-dcp-1/../../outside/checkpoint-dcp-1",
        "checkpoint-dcp-1/",
        ["checkpoint-dcp-1"],
        None,
    ],
)
def test_shard_folder_named_elsewhere_is_refused(world, name):
    malicious_dcp(world["outside"] / "checkpoint-dcp-1", world["marker"])
    if isinstance(name, str):
        name = name.format(outside=world["outside"])
    checkpoint.save(world["sharded"], {**training_state(), "sharded": name})
    refused(world, world["sharded"], "refused .*names the shard folder")


def test_shard_folder_symlinked_elsewhere_is_refused(world):
    sharded = world["sharded"]
    malicious_dcp(world["outside"] / "checkpoint-dcp-1", world["marker"])
    shutil.rmtree(sharded / "checkpoint-dcp-1")
    (sharded / "checkpoint-dcp-1").symlink_to(world["outside"] / "checkpoint-dcp-1")
    refused(world, sharded, "leads out of the run folder")


def test_code_in_shard_metadata_is_never_run(world):
    folder = world["sharded"] / "checkpoint-dcp-1"
    md, genuine = read_metadata(folder), (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(world["marker"])))  # the whole file a payload
    refused(world, world["sharded"], r"refused .*\.metadata: it names .*open")
    md.planner_data = {"x": RunsCode(world["marker"])}  # a genuine metadata object carrying a payload
    write_metadata(folder, md)
    refused(world, world["sharded"], r"refused .*\.metadata: it names .*open")
    (folder / ".metadata").unlink()
    (world["outside"] / "x.metadata").write_bytes(genuine)  # even a genuine one: it is not this folder's
    (folder / ".metadata").symlink_to(world["outside"] / "x.metadata")
    refused(world, world["sharded"], "leads out of the run folder")


def test_shard_files_must_be_inside_the_folder(world):
    folder = world["sharded"] / "checkpoint-dcp-1"
    md = read_metadata(folder)
    genuine = pickle.dumps(md)
    (world["outside"] / "__0_0.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    for path in ("../../outside/__0_0.distcp", str(world["outside"] / "__0_0.distcp")):
        md = pickle.loads(genuine)
        md.storage_data = {k: _StorageInfo(path, v.offset, v.length) for k, v in md.storage_data.items()}
        write_metadata(folder, md)
        refused(world, world["sharded"], "corrupt or tampered .*storage entry")
    write_metadata(folder, pickle.loads(genuine))
    (folder / "__0_0.distcp").unlink()
    (folder / "__0_0.distcp").symlink_to(world["outside"] / "__0_0.distcp")
    refused(world, world["sharded"], "leads out of the run folder")


def test_a_tensor_stored_as_pickled_bytes_is_refused(world):
    """torch.distributed.checkpoint's planner loads byte entries with torch.load(weights_only=False)."""
    folder = world["sharded"] / "checkpoint-dcp-1"
    md = read_metadata(folder)
    buf = io.BytesIO()
    torch.save(RunsCode(world["marker"]), buf)
    (folder / "__9_0.distcp").write_bytes(buf.getvalue())
    key = "model.head.weight"
    md.state_dict_metadata[key] = BytesStorageMetadata()
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != key}
    md.storage_data[MetadataIndex(key)] = _StorageInfo("__9_0.distcp", 0, len(buf.getvalue()))
    write_metadata(folder, md)
    refused(world, world["sharded"], "model.head.weight is stored as pickled bytes")


def test_corrupt_or_foreign_shards_are_refused(world):
    folder = world["sharded"] / "checkpoint-dcp-1"
    genuine = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(genuine[: len(genuine) // 2])
    refused(world, world["sharded"], r"\.metadata is corrupt")
    (folder / ".metadata").write_bytes(os.urandom(2000))
    refused(world, world["sharded"], r"\.metadata is corrupt|refused")
    (folder / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    refused(world, world["sharded"], "not DCP metadata")
    (folder / ".metadata").write_bytes(genuine)
    shard = (folder / "__0_0.distcp").read_bytes()
    (folder / "__0_0.distcp").write_bytes(shard[:3000])
    refused(world, world["sharded"], "cannot load .* corrupt")
    (folder / "__0_0.distcp").write_bytes(shard)
    checkpoint.save_config(world["sharded"], load_config(None, [*SMALL, "--model.d_model", "64"]))
    with pytest.raises(UserError, match="another architecture: .* has shape"):
        checkpoint.load_model(world["sharded"])


@pytest.mark.parametrize("name", ["checkpoint.pt", "config.json", "model.safetensors"])
def test_files_symlinked_elsewhere_are_refused(world, name):
    run, outside = world["run"], world["outside"]
    if name == "model.safetensors":
        checkpoint.export(world["model"], world["cfg"], run)
        (run / "checkpoint.pt").unlink()
    (run / name).rename(outside / name)
    (run / name).symlink_to(outside / name)
    refused(world, run, "leads out of the run folder", resume=name == "checkpoint.pt")


def test_links_inside_the_folder_are_fine(world):
    run = world["run"]
    (run / "checkpoint.pt").rename(run / "step-1.pt")
    (run / "checkpoint.pt").symlink_to("step-1.pt")
    checkpoint.load_model(run)


def test_numbered_checkpoints_that_lead_out_are_passed_over(world):
    """keep_checkpoints: a resume tries checkpoint-N.pt newest first; one that leads out of the folder
    (or names a shard folder elsewhere) is never read: it is passed over, and named."""
    run, outside = world["run"], world["outside"]
    (run / "checkpoint.pt").rename(run / "checkpoint-1.pt")
    os.link(run / "checkpoint-1.pt", run / "checkpoint.pt")
    torch.save(RunsCode(world["marker"]), outside / "checkpoint-3.pt")
    (run / "checkpoint-3.pt").symlink_to(outside / "checkpoint-3.pt")
    malicious_dcp(outside / "checkpoint-dcp-2", world["marker"])
    checkpoint.save(run, {**training_state(2), "sharded": "../outside/checkpoint-dcp-2"}, "checkpoint-2.pt")
    assert [p.name for p in checkpoint.training_checkpoints(run)] == [
        "checkpoint-3.pt",
        "checkpoint-2.pt",
        "checkpoint-1.pt",
    ]
    model = SparseTransformer(world["cfg"].model)
    state = checkpoint.load_training(run, model, make_optimizer(model, world["cfg"].train, torch.device("cpu")))
    assert state["step"] == 1 and state["path"].endswith("checkpoint-1.pt")
    assert "leads out of the run folder" in state["passed_over"][0] and "checkpoint-3.pt" in state["passed_over"][0]
    assert "names the shard folder" in state["passed_over"][1] and "checkpoint-2.pt" in state["passed_over"][1]
    assert not world["marker"].exists()


def test_removing_old_checkpoints_never_follows_a_link(world):
    """Rotation (keep_checkpoints) and the cleanup of unfinished saves delete links, not what they point to;
    a shard folder about to be written is never a link out of the folder."""
    run, outside = world["run"], world["outside"]
    for name in ("checkpoint-dcp-1", "checkpoint-dcp-7", "checkpoint-dcp-9"):
        (outside / name).mkdir()
        (outside / name / "precious").write_text("keep me")
    (run / "checkpoint-5.pt").symlink_to(outside / "checkpoint-5.pt")
    (run / "checkpoint-dcp-1").symlink_to(outside / "checkpoint-dcp-1")
    (run / "checkpoint-dcp-9").symlink_to(outside / "checkpoint-dcp-9")
    checkpoint.remove_unfinished(run)  # no checkpoint-9.pt: an unfinished save
    assert not (run / "checkpoint-dcp-9").is_symlink()
    checkpoint._remove_old(run, 4, keep=1)  # checkpoint-5.pt is of a later step: it goes, as its link
    assert not (run / "checkpoint-5.pt").is_symlink() and not (run / "checkpoint-dcp-1").is_symlink()
    (run / "checkpoint-dcp-7").symlink_to(outside / "checkpoint-dcp-7")
    model, opt = trained(world["cfg"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP in one process
        checkpoint.save_sharded(run, 7, model, opt)
    assert (run / "checkpoint-dcp-7").is_dir() and not (run / "checkpoint-dcp-7").is_symlink()
    for name in ("checkpoint-dcp-1", "checkpoint-dcp-7", "checkpoint-dcp-9"):
        assert sorted(os.listdir(outside / name)) == ["precious"]


def test_an_export_may_lead_only_into_the_root_it_is_given(world, tmp_path):
    """from_pretrained of a Hub download: the snapshot's files link into the repo's blobs/ (the root)."""
    repo = tmp_path / "models--someone--model"
    snapshot, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    checkpoint.export(world["model"], world["cfg"], blobs)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(Path("../..") / "blobs" / name)
    with pytest.raises(UserError, match="leads out of the run folder"):
        checkpoint.load_export(snapshot)
    loaded, _ = checkpoint.load_export(snapshot, root=repo)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), world["model"].state_dict().values()))


WEIGHTS_TAMPERING = [  # refused by eval and sample as by a resume
    (lambda s: [s["model"]], "does not hold a state dict"),
    (lambda s: {k: v for k, v in s.items() if k != "model"}, "holds no weights"),
    (lambda s: {**s, "model": "weights"}, "does not hold a state dict of tensors"),
    (lambda s: {**s, "model": {**s["model"], "head.weight": [1.0, 2.0]}}, "state dict of tensors"),
    (lambda s: {**s, "model": {**s["model"], "head.weight": torch.zeros(3)}}, "another architecture"),
    (lambda s: {**s, "model": {k: v for k, v in s["model"].items() if k != "start"}}, "lacks start"),
]
OPTIMIZER_TAMPERING = [  # read only by a resume
    (lambda s: {**s, "optimizer": None}, "optimizer state that does not fit"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": []}}, "0 parameter groups"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "state": {999: {}}}}, "unknown parameter 999"),
    (
        lambda s: {**s, "optimizer": {**s["optimizer"], "state": {0: {"exp_avg": torch.zeros(7)}}}},
        r"exp_avg of parameter 0 has shape \[7\]",
    ),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "state": {0: {"exp_avg": 1.0}}}}, "unexpected entry"),
]


@pytest.mark.parametrize("tamper, match", WEIGHTS_TAMPERING + OPTIMIZER_TAMPERING)
def test_malformed_checkpoints_are_refused_with_one_line(world, tamper, match):
    run = world["run"]
    torch.save(tamper(checkpoint.load(run / "checkpoint.pt")), run / "checkpoint.pt")
    if (tamper, match) in WEIGHTS_TAMPERING:
        refused(world, run, match)
        return
    model = SparseTransformer(world["cfg"].model)
    with pytest.raises(UserError, match=match) as e:
        checkpoint.load_training(run, model, make_optimizer(model, world["cfg"].train, torch.device("cpu")))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"step": "12"}, "step = '12' is not a step count"),
        ({"step": -1}, "not a step count"),
        ({"ranks": []}, "no per-process states"),
        ({"ranks": [{"rng": None}]}, "process 0 is incomplete"),
        ({"scaler": None}, "no grad scaler state"),
        ({"timing": {"train_s": "x"}}, "timing"),
        ({"elapsed_s": None}, "elapsed_s"),
    ],
)
def test_malformed_training_state_is_refused(change, match):
    with pytest.raises(UserError, match=match):
        check_resume_state({**training_state(), **change}, Path("run/checkpoint.pt"))
    check_resume_state(training_state(), Path("run/checkpoint.pt"))


def test_config_json_must_be_a_config(world):
    run = world["run"]
    for text, match in [
        ("[1, 2]", "holds no config"),
        ("{", "not valid JSON"),
        ('{"model": {"d_model": "x"}}', "d_model"),
    ]:
        (run / "config.json").write_text(text)
        refused(world, run, match, resume=False)


def test_sample_never_writes_through_a_link_out_of_the_run_folder(world):
    run, outside = world["run"], world["outside"]
    (outside / "precious").write_text("keep me")
    (run / "samples").symlink_to(outside)
    with pytest.raises(UserError, match="leads out of the run folder"):
        sample_command(run, num=1, length=8, device="cpu")
    (run / "samples").unlink()
    (run / "samples").mkdir()
    (run / "samples" / "sample_000.txt").symlink_to(outside / "precious")
    (path,) = sample_command(run, num=1, length=8, device="cpu")
    assert not path.is_symlink() and len(path.read_bytes()) == 8
    assert (outside / "precious").read_text() == "keep me"


def test_eval_of_a_crafted_folder_exits_2_with_one_line_and_runs_nothing(world):
    """The campaign's case, end to end: `eval` on a run whose checkpoint.pt names a shard folder elsewhere."""
    malicious_dcp(world["outside"] / "checkpoint-dcp-1", world["marker"])
    checkpoint.save(world["sharded"], {**training_state(), "sharded": "../outside/checkpoint-dcp-1"})
    r = subprocess.run(
        [sys.executable, "-m", "sparse_transformer", "eval", "--run", str(world["sharded"]), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: checkpoint: refused"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not world["marker"].exists()


def test_a_pickle_payload_is_refused_without_torchs_warning_and_random_bytes_are_corrupt(world):
    """torch warns about the pickle protocol of a file it then refuses: the refusal stays one line."""
    path = world["run"] / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": RunsCode(world["marker"])}, protocol=4))  # a bare pickle, not torch's zip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match=r"is corrupt or not a checkpoint \(Unsupported operand 149\)"):
            checkpoint.load(path)
    assert not caught and not world["marker"].exists()
    torch.save({"model": RunsCode(world["marker"])}, path)
    with pytest.raises(UserError, match="could run code"):
        checkpoint.load(path)
    path.write_bytes(random.Random(0).randbytes(5000))
    with pytest.raises(UserError, match="is corrupt or not a checkpoint"):
        checkpoint.load(path)
    assert not world["marker"].exists()


def test_a_checkpoint_that_links_to_itself_is_refused(world):
    run = world["run"]
    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.pt").symlink_to("checkpoint.pt")
    refused(world, run, "leads back to itself")
