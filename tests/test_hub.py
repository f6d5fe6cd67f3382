"""save_pretrained / from_pretrained (huggingface_hub's PyTorchModelHubMixin) and the run export are one
format read and written by one code path: round trips, a train export loads, a save_pretrained folder
samples and evaluates from anywhere, tampered or missing files end in one line, and the Hub branch
(with huggingface_hub's download replaced by a local folder: no network in tests)."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open

import sparse_transformer as st
from sparse_transformer import checkpoint
from sparse_transformer.cli import main
from sparse_transformer.config import Config, ModelConfig, config_for_model, load_config
from sparse_transformer.data.prepare import prepare
from sparse_transformer.errors import UserError
from sparse_transformer.model import SparseTransformer
from sparse_transformer.train import train

SMALL = ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2", "--data.seq_len", "64"]
SMALL += ["--model.stride", "16", "--model.c", "4"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-text")
    rng = np.random.default_rng(0)
    (root / "corpus.txt").write_bytes(bytes(rng.integers(97, 123, 20000).astype(np.uint8)))
    prepare("text", root / "corpus.txt", root / "data", progress=False)
    return root / "data"


def random_model(cfg: Config) -> SparseTransformer:
    torch.manual_seed(0)
    model = SparseTransformer(cfg)
    with torch.no_grad():
        model.head.weight.normal_()  # W_out starts at zero; make the output depend on every weight
    return model.eval()


def same_outputs(a: SparseTransformer, b: SparseTransformer) -> bool:
    x = torch.randint(0, 256, (2, a.cfg.n_ctx))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_save_pretrained_round_trip(tmp_path):
    cfg = load_config(None, [*SMALL, "--train.lr", "0.003", "--sample.top_k", "5"])
    model = random_model(cfg)
    assert model.config is cfg and model.cfg is cfg.model
    model.save_pretrained(tmp_path / "export")
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]  # the export, and a model card
    assert json.loads((tmp_path / "export" / "config.json").read_text()) == cfg.to_dict()  # the whole run config
    assert "library_name: sparse-transformer" in (tmp_path / "export" / "README.md").read_text()

    loaded = SparseTransformer.from_pretrained(tmp_path / "export")
    assert isinstance(loaded, SparseTransformer) and not loaded.training
    assert loaded.config == cfg and same_outputs(model, loaded)
    # the CLI's reader sees the same model: one format
    via_cli, via_cli_cfg = checkpoint.load_model(tmp_path / "export")
    assert via_cli_cfg == cfg and same_outputs(model, via_cli)
    # saving a loaded model again writes the same files
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == (tmp_path / "export" / "config.json").read_text()
    a, b = (safe_open(str(tmp_path / f / "model.safetensors"), "pt") for f in ("export", "again"))
    assert a.metadata() == b.metadata() and a.metadata()["config"] == cfg.to_json()
    names = a.keys()
    assert names == b.keys() and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in names)


def test_a_model_built_from_its_model_config_saves_what_sampling_needs(tmp_path):
    m = ModelConfig(n_layer=1, d_model=16, n_head=2, position="image", image_shape=[4, 4, 3], n_ctx=48)
    model = st.SparseTransformer(m)
    assert model.config.model is m and model.config.data.seq_len == 48
    assert model.config.data.modality == "image" and model.config.data.shape == [4, 4, 3]
    model.save_pretrained(tmp_path)
    assert SparseTransformer.from_pretrained(tmp_path).config == config_for_model(m)
    text = config_for_model(ModelConfig(n_ctx=32))
    assert text.data.modality == "" and text.data.seq_len == 32 and text.model.n_ctx == 32  # unrecorded: text


def test_from_pretrained_loads_the_export_of_train_and_of_the_export_command(text_dir, tmp_path, capsys):
    args = [*SMALL, "--data.dir", str(text_dir), "--train.max_steps", "3", "--train.warmup_steps", "1"]
    args += ["--train.batch_size", "2", "--train.test_tokens", "256", "--train.eval_batches", "1"]
    args += ["--train.progress", "false", "--train.device", "cpu"]
    train(load_config(None, args), tmp_path / "run")
    run_model, run_cfg = checkpoint.load_model(tmp_path / "run")  # from checkpoint.pt
    loaded = SparseTransformer.from_pretrained(str(tmp_path / "run"))  # from the run's export
    assert loaded.config == run_cfg and loaded.config.data.modality == "text"
    assert same_outputs(run_model, loaded)

    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "shared")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    shared = SparseTransformer.from_pretrained(tmp_path / "shared")
    assert shared.config == run_cfg and same_outputs(run_model, shared)


def test_a_save_pretrained_folder_samples_and_evaluates_from_another_directory(text_dir, tmp_path, monkeypatch, capsys):
    cfg = load_config(None, [*SMALL, "--data.dir", str(text_dir), "--train.device", "cpu"])
    cfg.data.modality = "text"
    random_model(cfg).save_pretrained(tmp_path / "export")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["sample", "--run", str(tmp_path / "export"), "--num", "2", "--length", "16", "--out", "out"]) == 0
    capsys.readouterr()
    assert len(list((elsewhere / "out").iterdir())) == 2  # the run's data is not needed to write text samples
    assert main(["eval", "--run", str(tmp_path / "export"), "--max-tokens", "128", "--no-progress"]) == 0
    assert "bits per byte over 128 bytes" in capsys.readouterr().out


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file when unpickled


def tamper(folder, how, marker):
    config, weights = folder / "config.json", folder / "model.safetensors"
    if how == "no weights":
        weights.unlink()
    elif how == "no config":
        config.unlink()
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "garbage weights":
        weights.write_bytes(b"\xff" * 64)
    elif how == "pickle as weights":
        weights.write_bytes(pickle.dumps(RunsCode(str(marker))))
    elif how == "pickle beside":  # a pytorch_model.bin is never read
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(str(marker))))
    elif how == "not json":
        config.write_text('{"model": {"n_layer": 1,')
    elif how == "binary config":
        config.write_bytes(b"\xff\xfe\x00 not text")
    elif how == "json list":
        config.write_text("[1, 2, 3]")
    elif how == "unknown section":
        config.write_text(json.dumps({"self": {}, "cfg": {}}))
    elif how == "bad value":
        table = json.loads(config.read_text())
        table["model"]["pattern"] = "diagonal"
        config.write_text(json.dumps(table))
    elif how == "other architecture":
        table = json.loads(config.read_text())
        table["model"]["d_model"] = 64
        config.write_text(json.dumps(table))


TAMPERED = [
    "no weights",
    "no config",
    "truncated weights",
    "garbage weights",
    "pickle as weights",
    "pickle beside",
    "not json",
    "binary config",
    "json list",
    "unknown section",
    "bad value",
    "other architecture",
]


@pytest.mark.parametrize("how", TAMPERED)
def test_a_tampered_or_incomplete_export_is_refused_with_one_line(tmp_path, how, capsys):
    folder = tmp_path / "export"
    random_model(load_config(None, SMALL)).save_pretrained(folder)
    marker = tmp_path / "pwned"
    tamper(folder, how, marker)
    with pytest.raises(UserError) as e:
        SparseTransformer.from_pretrained(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    capsys.readouterr()
    assert main(["sample", "--run", str(folder), "--num", "1", "--length", "4", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not marker.exists()  # nothing was unpickled


def test_a_missing_folder_is_refused_with_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach the Hub.\nSecond line.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", offline)
    for missing in (tmp_path / "nope", tmp_path / "a" / "b", "./nope"):
        with pytest.raises(UserError, match="is not a folder") as e:
            SparseTransformer.from_pretrained(missing)
        assert "\n" not in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        SparseTransformer.from_pretrained(tmp_path / "file")
    monkeypatch.chdir(tmp_path)  # "owner/name" that is no folder here: a Hub id, and the Hub is out of reach
    with pytest.raises(UserError, match=r"could not be fetched from the Hub \(Cannot reach the Hub.\)") as e:
        SparseTransformer.from_pretrained("owner/name")
    assert "\n" not in str(e.value)


def test_a_hub_repo_id_loads_through_the_same_reader(tmp_path, monkeypatch):
    """The Hub branch with huggingface_hub's download served from a local snapshot folder."""
    import huggingface_hub

    model = random_model(load_config(None, SMALL))
    snapshot = tmp_path / "cache" / "snapshots" / "0123abc"
    model.save_pretrained(snapshot)
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("revision")))
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", download)
    monkeypatch.chdir(tmp_path)
    loaded = SparseTransformer.from_pretrained("someone/sparse-model", revision="v1")
    assert same_outputs(model, loaded) and loaded.config == model.config
    assert ("someone/sparse-model", "model.safetensors", "v1") in calls
    assert all(name in ("config.json", "model.safetensors") for _, name, _ in calls)  # never a pickle

    (snapshot / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        SparseTransformer.from_pretrained("someone/sparse-model")
