"""Every YAML under configs/ parses and runs with fast_dev_run on tiny stand-in data, so no config can rot.

Each ``data_dir`` under ``data:`` is pointed at stand-in files in the real on-disk formats
(tests/standin.py), and a ``# standin: ...`` comment line in a config adds CLI arguments for this test
only (e.g. to swap hub-only weights or checkpoints made by another run for tiny ones).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import cli
from tests.helpers import ROOT
from tests.standin import point_data_dirs, standin_args, write_all

# configs/strategies/ holds trainer snippets added to any technique's config (tests/test_strategy_check.py runs them)
CONFIGS = sorted(c for c in (ROOT / "configs").rglob("*.yaml") if "strategies" not in c.relative_to(ROOT / "configs").parts)


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory) -> Path:
    return write_all(tmp_path_factory.mktemp("standin"))


def test_configs_exist():
    assert (ROOT / "configs" / "quickstart.yaml") in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT / "configs")) for c in CONFIGS])
def test_config_runs_fast_dev_run(config: Path, standin_dir: Path, tmp_path: Path, monkeypatch):
    text = config.read_text()
    conf = yaml.safe_load(text)
    assert "data" in conf and "model" in conf, f"{config} must define model and data"
    conf["data"] = point_data_dirs(conf["data"], str(standin_dir))
    patched = tmp_path / config.name
    patched.write_text(yaml.safe_dump(conf))
    extra = standin_args(text)
    monkeypatch.chdir(tmp_path)  # relative paths (runs/, data/) land in the temp dir
    cli.main(["fit", "--config", str(patched), "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
              "--trainer.strategy=auto", "--trainer.logger=false", *extra])
