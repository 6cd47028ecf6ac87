"""lmforge as a library: the wheel holds every package and config, and users add configs of their own."""

import pytest
import tomllib

from conftest import REPO, run_cli
from lmforge.errors import LmforgeError
from lmforge.overrides import check_group_choices

MY_GPT = "defaults:\n  - gpt2-tiny\n  - _self_\nname: my-gpt\nn_layer: 1\nn_embd: 32\n"


def test_the_package_list_names_every_package_of_the_source_tree():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src").rglob("__init__.py")}
    assert listed == found | {"lmforge.conf"}


def test_a_users_config_dir_adds_options_to_a_group(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my-gpt.yaml").write_text(MY_GPT)
    with pytest.raises(LmforgeError, match="Unknown model 'my-gpt'"):
        check_group_choices(["model=my-gpt"])
    monkeypatch.setenv("LMFORGE_CONF", str(tmp_path))
    check_group_choices(["model=my-gpt"])
    monkeypatch.delenv("LMFORGE_CONF")
    check_group_choices(["--config-dir", str(tmp_path), "model=my-gpt"])


@pytest.mark.parametrize("how", ["LMFORGE_CONF", "--config-dir"])
def test_a_run_trains_a_model_from_the_users_config_dir(tmp_path, how):
    conf = tmp_path / "my-conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "my-gpt.yaml").write_text(MY_GPT)
    (conf / "experiment").mkdir()
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: my-gpt\n")
    args = ["experiment=mine", "debug=fast", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    if how == "LMFORGE_CONF":
        result = run_cli(args, env={"LMFORGE_CONF": str(conf)}, cwd=tmp_path)
    else:
        result = run_cli(["--config-dir", str(conf), *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: my-gpt" in saved and "n_layer: 1" in saved
