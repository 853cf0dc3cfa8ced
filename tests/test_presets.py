"""Every experiment preset composes, expands into a valid grid, and names the download command
when its data is missing."""
from __future__ import annotations


import pytest

from critbatch.config import ConfigError
from sweeps import schema
from sweeps.grid import check_data, expand
from tests.fake_datasets import write_mnist
from tests.helpers import CONF, compose as composed

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_expands_into_a_valid_grid(preset):
    cfg = composed(f"experiment={preset}")
    runs = expand(cfg)
    batch_sizes = sorted({r.config["batch_size"] for r in runs})
    assert len(batch_sizes) >= 5, "a preset must span batch sizes well below and above B_crit"
    ratios = {b2 / b1 for b1, b2 in zip(batch_sizes, batch_sizes[1:])}
    assert len(ratios) == 1 and ratios.pop() >= 2, "batch sizes a constant factor apart (powers of two)"
    assert {r.config["task"]["name"] for r in runs} == {cfg["task"]["name"]}
    thresholds = cfg["goals"]["thresholds"]
    assert len(thresholds) >= 4 and thresholds == sorted(thresholds, reverse=True)
    if preset.startswith("paper_"):
        assert cfg["launcher"]["gpus_per_node"] == 1  # read by launcher=slurm


@pytest.mark.parametrize("preset, dataset", [("paper_mnist", "mnist"), ("paper_fashion_mnist", "fashion_mnist"),
                                             ("paper_svhn", "svhn"), ("paper_cifar10", "cifar10")])
def test_missing_dataset_gives_the_download_command(tmp_path, preset, dataset):
    runs = expand(composed(f"experiment={preset}", f"paths.data_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=rf"scripts/download_data.py --data-dir {tmp_path} --datasets {dataset}"):
        check_data(runs)


def test_present_dataset_passes_the_data_check(tmp_path):
    write_mnist(tmp_path, n_train=64)
    check_data(expand(composed("experiment=paper_mnist", f"paths.data_dir={tmp_path}")))


def test_git_ignored_local_config_overrides_cluster_settings(tmp_path):
    import shutil
    import subprocess

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\npaths:\n  data_dir: /datasets/x\nlauncher:\n  partition: gpu\n  account: lab\n")
    cfg = schema.compose(["launcher=slurm", "experiment=paper_mnist"], config_path=str(conf))
    assert cfg["launcher"]["partition"] == "gpu" and cfg["launcher"]["account"] == "lab"
    assert cfg["task"]["data_dir"] == "/datasets/x"
    assert cfg["launcher"]["gpus_per_node"] == 1  # the preset's resources survive
    # ... and git keeps such a file out of the repository.
    ignored = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=CONF.parent)
    assert ignored.returncode == 0
