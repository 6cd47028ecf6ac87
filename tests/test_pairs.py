"""Every model config with every task config: it trains, or it stops before reading data with one
sentence that says why and which models would work."""

import re

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from conftest import DATA_DIR, REPO, requires_data
from lmforge.compose.parts import check_pairing, model_kinds
from lmforge.config_dirs import CONF_DIR
from lmforge.errors import LmforgeError
from lmforge.training import run_training

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))


def test_every_pair_composes_or_is_refused_in_one_sentence_naming_the_models_that_can(cfg_factory):
    kinds = model_kinds()
    assert set(kinds) == set(MODELS) and None not in kinds.values()
    models = {m: OmegaConf.load(CONF_DIR / "model" / f"{m}.yaml") for m in MODELS}
    refused = {}
    for task in TASKS:
        module = cfg_factory([f"task={task}"]).task.module  # composed once per task: the model is a plain node
        wanted = get_class(module._target_).backbone_kinds
        for model in MODELS:
            pair = OmegaConf.create({"task": {"module": module}, "model": {**models[model], "name": model}})
            try:
                check_pairing(pair)
            except LmforgeError as err:
                refused[model, task] = str(err)
            assert ((model, task) in refused) == (kinds[model] not in wanted), (model, task)
    assert len(refused) > 40  # the matrix is not trivially all-accepted
    for (_, task), message in refused.items():
        able = [m for m in MODELS if (m, task) not in refused]
        assert "\n" not in message and message.endswith(f"models that can: {', '.join(able)}."), message
    # The docs' examples of refused pairs are refused.
    readme = (REPO / "docs" / "tasks-and-data.md").read_text()
    examples = re.findall(r"`model=([\w-]+) task=([\w-]+)`", readme.split("A task that cannot")[1][:300])
    assert examples and all(pair in refused for pair in examples), examples


# One model per backbone class and default tokenizer: the sizes of a class (gpt2, gpt2-mini) share all code.
REPRESENTATIVES = {
    "gpt2-tiny": [],
    "bert-tiny": [],
    "t5-tiny": [],
    "lstm": [],
    "gru-attention": [],
    "transformer": ["model.d_model=32", "model.n_layer=1"],
}
# Tasks whose local data prepares in seconds (squad, samsum and mlm train in their own test files).
LOCAL_TASKS = ["tinyshakespeare", "sst2", "conll2003", "multi30k"]


def _pairs():
    for name, extra in REPRESENTATIVES.items():
        for task in LOCAL_TASKS:
            yield pytest.param(name.split("+")[0], extra, task, id=f"{name}-{task}")


@requires_data
@pytest.mark.slow
@pytest.mark.parametrize("model, extra, task", list(_pairs()))
def test_each_accepted_pair_trains_a_step_on_the_local_data(cfg_factory, model, extra, task):
    cfg = cfg_factory([f"model={model}", f"task={task}", *extra, "debug=fast", "logger=none"], data_dir=DATA_DIR)
    try:
        check_pairing(cfg)
    except LmforgeError:
        pytest.skip("a refused pair (checked above)")
    record = run_training(cfg)
    assert record["steps"] == 1 and record["metrics"]
