"""Typed job configs on the command line: --config FILE, --<key> flags, key=value overrides,
their precedence, --help listing every key, errors naming the key, defaults defined once."""
from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from cvnet.config import DEFAULT_SCALES, ExtractConfig, TrainGlobalConfig, describe_keys
from jobs.cli import build_parser
from jobs.config import ConfigError, add_config_arguments, config_from_args

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ["--manifest", "/m.parquet", "--model", "/model.pt"]


def _parse(model, argv: list[str]):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, model)
    return config_from_args(model, parser.parse_args(argv))


def test_precedence_defaults_file_flags_overrides(tmp_path):
    path = tmp_path / "extract.yaml"
    path.write_text("shard_size: 10\nbatch_size: 2\nnum_actors: 3\nfloat16: true\nscales: [1.0]\n")
    cfg = _parse(ExtractConfig, ["--config", str(path), *REQUIRED, "--shard-size", "20",
                                 "--no-float16", "--scales", "1.0", "0.5", "shard_size=30"])
    assert isinstance(cfg, ExtractConfig)
    assert cfg.shard_size == 30  # override beats flag beats file
    assert (cfg.batch_size, cfg.num_actors) == (2, 3)  # file beats default
    assert cfg.float16 is False and cfg.scales == (1.0, 0.5)  # flags beat file
    assert (cfg.part_rows, cfg.max_bad_fraction, cfg.experiment) == (64, 0.05, "extract")
    assert cfg.output is None and cfg.store is None  # None: the pipeline derives the output
    bare = _parse(ExtractConfig, [*REQUIRED, "--rerank-features"])
    assert bare.rerank_features is True and bare.scales == DEFAULT_SCALES


def test_train_global_uses_the_same_mechanism():
    cfg = _parse(TrainGlobalConfig, ["--config", str(ROOT / "configs" / "demo.yaml"),
                                     "--name", "x", "--seed", "3", "optim.lr=0.5", "data.flip=false"])
    assert (cfg.name, cfg.seed, cfg.optim.lr, cfg.data.flip) == ("x", 3, 0.5, False)
    assert cfg.optim.max_steps == 200  # from the file
    assert "fault_injection_step" not in TrainGlobalConfig.model_fields


def test_the_cli_passes_the_typed_config(tmp_path):
    args = build_parser().parse_args(["extract", *REQUIRED, "--num-actors", "2", "torch_threads=4"])
    cfg = config_from_args(ExtractConfig, args)
    assert (cfg.num_actors, cfg.torch_threads, cfg.manifest) == (2, 4, "/m.parquet")
    args = build_parser().parse_args(["train-global", "--store", str(tmp_path), "checkpoint.every_steps=5"])
    cfg = config_from_args(TrainGlobalConfig, args)
    assert cfg.store == str(tmp_path) and cfg.checkpoint.every_steps == 5


@pytest.mark.parametrize("argv,match", [
    (["--shard-size", "0"], "shard_size: Input should be greater than or equal to 1"),
    (["max_bad_fraction=2"], "max_bad_fraction"),
    (["shard_sz=4"], "shard_sz: Extra inputs are not permitted"),
    (["--num-actors", "1", "batch_size"], "override 'batch_size': expected key=value"),
    (["scales=[]"], "scales"),
])
def test_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        _parse(ExtractConfig, [*REQUIRED, *argv])


def test_missing_required_and_bad_file_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="model: Field required"):
        _parse(ExtractConfig, ["--manifest", "/m.parquet"])
    path = tmp_path / "bad.yaml"
    path.write_text("manifest: /m\nmodel: /x\nnum_actorz: 2\n")
    with pytest.raises(ConfigError, match=rf"file {path}.*num_actorz"):
        _parse(ExtractConfig, ["--config", str(path)])
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        _parse(ExtractConfig, ["--config", str(path)])


def test_help_lists_every_key_with_its_description(capsys):
    for command, model in (("extract", ExtractConfig), ("train-global", TrainGlobalConfig)):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for key, _, description in describe_keys(model):
            assert description, f"{model.__name__}.{key} has no description"
            assert (key if "." in key else "--" + key.replace("_", "-")) in text, key
            assert " ".join(description.split()) in text, key


def test_list_flags_stop_at_overrides_and_name_bad_values(capsys):
    cfg = _parse(ExtractConfig, [*REQUIRED, "--scales", "1.0", "0.5", "shard_size=7", "float16=true"])
    assert cfg.scales == (1.0, 0.5) and cfg.shard_size == 7 and cfg.float16
    with pytest.raises(SystemExit):
        _parse(ExtractConfig, [*REQUIRED, "--scales", "big"])
    assert "--scales: expected float values, got ['big']" in capsys.readouterr().err


def test_cvnet_help_imports_no_config_code_and_the_library_config_no_ray():
    code = ("import sys; from jobs.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('pydantic', 'torch', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import sys, cvnet.config; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_default_scales_are_defined_once():
    from cvnet.models.cvnet import CVNet
    from cvnet.models.global_net import multiscale_descriptors

    assert inspect.signature(CVNet.global_descriptor).parameters["scales"].default is DEFAULT_SCALES
    assert inspect.signature(multiscale_descriptors).parameters["scales"].default is DEFAULT_SCALES
    assert ExtractConfig.model_fields["scales"].default is DEFAULT_SCALES
    assert TrainGlobalConfig().eval.scales == DEFAULT_SCALES


def test_shipped_extract_config_loads():
    cfg = _parse(ExtractConfig, ["--config", str(ROOT / "configs" / "extract-gpu.yaml"), *REQUIRED])
    assert cfg.actor_gpus == 1 and cfg.num_actors >= 1 and cfg.rerank_features
