"""The dgm command line, end to end on the synthetic data set (CPU, a few seconds per command)."""
from __future__ import annotations

import json

import pytest
import torch

from dgm.cli import main
from helpers import TINY_TRAIN_ARGS as TINY


def test_two_task_run_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert "2 tasks" in capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    for key in ("accuracy_matrix", "average_accuracy", "forgetting", "backward_transfer", "wall_seconds", "backend",
                "config", "complete", "task_seconds", "generator"):
        assert key in results, key
    assert results["complete"] and results["backend"] == "reference"
    assert len(results["accuracy_matrix"]) == 2 and results["accuracy_matrix"][0][1] is None
    assert results["config"]["dataset"] == "synthetic" and results["config"]["seed"] == 0
    assert results["config"]["class_order"] == list(range(10))
    for png in ("samples/task_00.png", "samples/task_01.png", "accuracy.png"):
        assert (run / png).stat().st_size > 0, png
    for csv in ("accuracy_matrix.csv", "metrics.csv"):
        assert (run / csv).read_text().count("\n") == 3
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["tasks_done"] == 2 and state["format"] == "dgm-run"

    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "reserved fraction" in out and "conv3" in out
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["widths"] for t in info["tasks"]][0] == [24, 12, 6]
    assert main(["sample", str(run), "--task", "1", "--n", "3"]) == 0
    assert "2 class(es) seen up to task 1 x 3 images" in capsys.readouterr().out
    from PIL import Image  # one row per class seen (tasks 0 and 1: one class each) of 3 images, 1 px separators

    width, height = Image.open(run / "samples" / "sample_task_01.png").size  # the grid may be scaled up whole
    assert width * (2 * 33 + 1) == height * (3 * 33 + 1), (width, height)
    assert main(["eval", str(run)]) == 0
    assert "re-evaluated after task 1" in capsys.readouterr().out
    # the same directory again: refused; resumed: nothing left to do, same results
    assert main(["train", *TINY, "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert json.loads((run / "results.json").read_text())["accuracy_matrix"] == results["accuracy_matrix"]


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mnits"], "dataset must be one of"),
    (["--method", "hat"], "method must be one of"),
    (["--backend", "gpu"], "backend must be one of"),
    (["--epochs", "-1"], "epochs must be an int >= 0, got -1"),
    (["--preset", "slow"], "preset must be one of"),
    (["--set", "lr_g=0"], "lr_g must be a finite number > 0"),
    (["--set", "nonsense=1"], "unknown config field"),
    (["--resume"], "--resume needs --out"),
])
def test_bad_arguments_are_clear_errors(args, message, tmp_path, capsys):
    assert main(["train", *args, "--out", str(tmp_path / "x")] if "--resume" not in args else ["train", *args]) == 2
    assert message in capsys.readouterr().err


def test_info_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_set_null_clears_a_preset_value():
    import argparse

    from dgm.cli import config_overrides
    from dgm.presets import make_config

    assert make_config("mnist", "dgmw", "quick").max_train_per_class == 1280
    args = argparse.Namespace(seed=None, epochs=None, num_tasks=None, max_train_per_class=None, mask_mode=None,
                              data_dir=None, device=None, threads=None, val_fraction=None, select_on_val=None,
                              backend=None, compile=None,
                              set=["max_train_per_class=null", "classifier_batchnorm=true"])
    ov, explicit = config_overrides(args)
    assert explicit == {"max_train_per_class": None, "classifier_batchnorm": True}
    config = make_config("mnist", "dgmw", "quick", explicit=explicit, **ov)
    assert config.max_train_per_class is None  # all training images, not the preset's 1280
    assert config.classifier_batchnorm is True
    # a value given by an option is overridden by --set, never the other way round
    args.max_train_per_class, args.set = 64, ["max_train_per_class=null"]
    ov, explicit = config_overrides(args)
    assert make_config("mnist", "dgmw", "quick", explicit=explicit, **ov).max_train_per_class is None


def test_compile_option_reaches_the_config():
    from dgm.cli import build_parser, config_overrides
    from dgm.presets import ConfigError, RunConfig, make_config

    def config(*argv):
        ov, explicit = config_overrides(build_parser().parse_args(["train", *argv]))
        return make_config("mnist", "dgmw", "quick", explicit=explicit, **ov)

    assert config().compile is False  # the default: the eager iteration
    assert config("--compile").compile is True and config("--set", "compile=true").compile is True
    # recorded like any field, and not part of the result key (it changes how a run computes, not what)
    on = config("--compile")
    assert RunConfig.from_dict(on.to_dict()).compile is True and "compile" not in on.result_key()
    with pytest.raises(ConfigError, match="compile must be true or false"):
        config("--set", "compile=1")


def test_names_are_defined_once(capsys):
    from dgm_kernels.backends import BACKEND_NAMES

    from dgm import cli, models, names, presets
    from dgm.data import DATASETS, SYNTHETIC

    assert names.BACKENDS is BACKEND_NAMES
    assert names.DATASET_NAMES == (*DATASETS, SYNTHETIC)
    assert presets.DATASET_NAMES is names.DATASET_NAMES and presets.METHODS is names.METHODS
    assert presets.BACKENDS is names.BACKENDS
    assert models.MASKED_METHODS is names.MASKED_METHODS and names.METHODS == names.MASKED_METHODS + names.RIVALS
    assert [names.image_channels(d) for d in names.DATASET_NAMES] == [1, 1, 3, 3, 3, 3, 1]
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert all(m in help_text for m in names.METHODS + names.BACKENDS + names.DATASET_NAMES)


def test_compare_without_the_extra_names_the_install_command(monkeypatch, capsys):
    import sys

    for name in [m for m in sys.modules if m == "dgm.avalanche" or m.startswith("dgm.avalanche.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "avalanche", None)  # "import avalanche" now fails
    assert main(["compare", "--dataset", "synthetic"]) == 2
    assert 'pip install --no-build-isolation -e ".[avalanche]"' in capsys.readouterr().err
