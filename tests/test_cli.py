"""What a user sees on bad input: one sentence and exit status 1."""

import pytest

from conftest import DATA_DIR, requires_data, run_cli
from lmforge.config_dirs import config_choices
from lmforge.errors import LmforgeError
from lmforge.overrides import check_group_choices


def test_unknown_group_choice_lists_the_names_that_exist():
    with pytest.raises(
        LmforgeError,
        match=r"^Unknown model 'gtp2'; choose one of: bert-base, bert-mini, bert-tiny, bidaf, gpt2, gpt2-mini, gpt2-tiny, "
        r"gru, gru-attention, lstm, lstm-attention, t5-mini, t5-small, t5-tiny, transformer\.$",
    ):
        check_group_choices(["model=gtp2"])
    with pytest.raises(LmforgeError, match="Unknown task 'nope'"):
        check_group_choices(["-m", "task=tinyshakespeare,nope"])
    with pytest.raises(
        LmforgeError,
        match=r"^Unknown task/source 'wiki'; choose one of: chat-file, code, instruct-mixture, instruct-pretrain, samsum-pairs, squad, sst2-pretrain, "
        r"text, tinyshakespeare, wikitext2\.$",
    ):
        check_group_choices(["task=mlm", "task/source=wiki"])
    with pytest.raises(
        LmforgeError, match=r"^Unknown callbacks 'early-stop'; choose one of: default, early-stopping, ema\.$"
    ):
        check_group_choices(["callbacks=[ema,early-stop]"])
    check_group_choices(["model=gpt2-tiny", "task=tinyshakespeare", "optimizer.lr=1e-3", "debug=null"])
    check_group_choices(["callbacks=[ema,early-stopping]"])  # a list of configs of one group
    assert "shakespeare-char" in config_choices("experiment")


def test_cli_unknown_model_is_one_line_and_exit_1():
    result = run_cli(["model=gtp2"])
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "error: Unknown model 'gtp2'; choose one of: bert-base, bert-mini, bert-tiny, bidaf, gpt2, gpt2-mini, "
        "gpt2-tiny, gru, gru-attention, lstm, lstm-attention, t5-mini, t5-small, t5-tiny, transformer."
    )
    assert "Traceback" not in result.stderr + result.stdout


@requires_data
def test_cli_missing_train_split_is_one_sentence(tmp_path):
    result = run_cli(["task=wikitext2", f"paths.output_root={tmp_path}"], env={"LMFORGE_DATA": DATA_DIR})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Dataset 'wikitext-2'") and "has no train split" in last


def test_cli_missing_data_dir_names_folder_and_variable(tmp_path):
    missing = tmp_path / "no-such-mirror"
    result = run_cli(["task=wikitext2", f"paths.output_root={tmp_path}"], env={"LMFORGE_DATA": str(missing)})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert str(missing / "wikitext-2") in last and "LMFORGE_DATA" in last
    assert "Traceback" not in result.stderr


def test_cli_config_typo_is_reported_without_traceback(tmp_path):
    result = run_cli(["trainer.max_stpes=5", f"paths.output_root={tmp_path}"])
    assert result.returncode == 1
    assert "max_stpes" in result.stderr and "Traceback" not in result.stderr


def test_submitit_local_launcher_runs_a_sweep_as_jobs(tmp_path):
    result = run_cli(["-m", "hydra/launcher=local", "debug=fast", "logger=none", "optimizer.lr=1e-3,3e-4",
                      f"paths.output_root={tmp_path}"], timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("runs/*/*"))) == 2
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_a_key_the_model_does_not_take_is_one_sentence():
    from omegaconf import OmegaConf

    from lmforge.compose.parts import build_backbone

    node = OmegaConf.create({"name": "gpt2-tiny", "_target_": "lmforge.models.gpt.GPT", "hidden_size": 64})
    with pytest.raises(LmforgeError, match=r"^Model gpt2-tiny cannot be built from its config: .*'hidden_size'\.$"):
        build_backbone(node, vocab_size=10)
