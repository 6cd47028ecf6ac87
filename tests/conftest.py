"""Shared fixtures: configs composed from the real conf/ with small overrides."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

# Under pytest-xdist each worker gets its share of the cores, for itself and the runs it starts:
# OpenMP threads that outnumber the cores spin against each other and slow every test down.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)

import httpx  # noqa: E402
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from lmforge.config_dirs import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("LMFORGE_DATA")
SERVE = str(Path(sys.executable).parent / "lmforge-serve")

# A tiny but real run: char-level GPT on Tiny Shakespeare, a few steps, CSV only.
TINY = [
    "experiment=shakespeare-char",
    "logger=none",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "task.module.sample_tokens=8",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
]

requires_data = pytest.mark.skipif(
    not DATA_DIR or not Path(DATA_DIR).is_dir(), reason="needs the local data mirror (LMFORGE_DATA)"
)


def make_cfg(overrides: list[str], output_root: Path, data_dir: str | None = DATA_DIR) -> DictConfig:
    """Compose conf/train.yaml as `python train.py <overrides>` would, writing under ``output_root``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_root = str(output_root)
        cfg.paths.data_dir = data_dir
    return cfg


def entry_cfg(name: str, overrides: list[str]) -> DictConfig:
    """Compose another entry point's config (``generate``, ``evaluate``, ``predict``) as its command would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture
def cfg_factory(tmp_path):
    """Compose a config whose outputs land in this test's temporary folder."""

    def factory(overrides: list[str], data_dir: str | None = DATA_DIR) -> DictConfig:
        return make_cfg(overrides, tmp_path / "outputs", data_dir)

    return factory


def run_cli(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300):
    """Run ``python train.py <args>`` in a subprocess, as a user would."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    for key, value in list(full_env.items()):
        if value is None:
            del full_env[key]
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def torchrun_nodes(launcher_args: list[list[str]], args: list[str], env: dict[str, str] | None = None):
    """Start ``torchrun <launcher_args[i]> train.py <args>`` for each i, an agent standing for a node.

    Yields the agents' processes (output in ``.stdout``); on the way out, kills what still runs of
    them and of their workers, so that a hung job does not outlive its test.
    """
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *node_args, str(REPO / "train.py"), *args],
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a process group of its own, workers included
        )
        for node_args in launcher_args
    ]
    try:
        yield nodes
    finally:
        for node in nodes:
            with suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()


@contextmanager
def serving(*args: str, env: dict[str, str] | None = None):
    """``lmforge-serve <args> port=<free>`` until the block ends; yields (base URL, process)."""
    port = free_port()
    proc = subprocess.Popen([SERVE, *args, f"port={port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"lmforge-serve exited: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "lmforge-serve did not start"
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAtStep`."""


class CrashAtStep:
    """A Lightning callback that crashes a fresh run at one global step, as a kill would (resume tests)."""

    def __new__(cls, step: int):
        import pytorch_lightning as pl

        class _Crash(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == step and trainer.ckpt_path is None:  # not once resumed
                    raise SimulatedCrash(f"crash at step {step}")

        return _Crash()


def crashed_run(cfg_factory, overrides: list[str], step: int = 5) -> str:
    """Train ``overrides`` (last checkpoint every 2 steps) until a simulated crash at ``step``; its run dir."""
    from lmforge.training import run_training

    crashing = cfg_factory([*overrides, "callbacks.last_checkpoint.every_n_train_steps=2",
                            "+callbacks.crash._target_=conftest.CrashAtStep", f"+callbacks.crash.step={step}"])  # fmt: skip
    with pytest.raises(SimulatedCrash):
        run_training(crashing)
    return crashing.paths.run_dir


@pytest.fixture(scope="session")
def sst2_run(tmp_path_factory):
    """A short real SST-2 run (BiLSTM, 300 steps), trained once for every test that needs one."""
    from lmforge.training import run_training

    if not DATA_DIR:
        pytest.skip("needs the local data mirror (LMFORGE_DATA)")
    overrides = ["experiment=sst2-lstm", "logger=none", "trainer.max_steps=300", "trainer.val_check_interval=150",
                 "trainer.limit_test_batches=5"]  # fmt: skip
    return run_training(make_cfg(overrides, tmp_path_factory.mktemp("sst2")))
