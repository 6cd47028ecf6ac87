"""Hydra's main around an lmforge command: the command line checked first, then every failure (ours,
Hydra's, a library's deep inside the run) printed as one sentence with exit status 1."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from typing import Any

from lmforge.config_dirs import CONF_DIR, use_user_config_dirs
from lmforge.errors import LmforgeError
from lmforge.failures import failed_target, hydra_error_sentence, job_failure_sentence
from lmforge.overrides import check_group_choices, check_job_overrides, quote_free_text


def fail(err: BaseException) -> None:
    """Print a user error as one line on stderr (rank 0 only, unless every rank has its own) and exit 1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    from lmforge.distributed import is_rank_zero

    if is_rank_zero() or not getattr(err, "every_rank", False):
        print(f"error: {err}", file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """Set (or, for None, remove) an environment variable for the duration of a block."""
    before = os.environ.get(name)
    _set_environment(name, value)
    try:
        yield
    finally:
        _set_environment(name, before)


def _set_environment(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def hydra_main(task_function: Callable[[Any], Any], config_name: str) -> None:
    """Run a Hydra main function, turning user errors into one sentence and exit status 1."""
    import hydra

    from lmforge.distributed import COMMAND_VAR
    from lmforge.experiments.sweeps import single_job_argv

    command = os.environ.get(COMMAND_VAR) or shlex.join(sys.argv)  # set: a DDP rank or job of this command
    sys.argv = single_job_argv(sys.argv)  # a DDP rank > 0 of a sweep job runs that job alone
    try:
        check_group_choices(sys.argv[1:])
    except LmforgeError as err:
        fail(err)
    sys.argv[1:] = quote_free_text(sys.argv[1:])

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    full_error = os.environ.get("HYDRA_FULL_ERROR")
    use_user_config_dirs()

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def main(cfg):
        # The job (and the DDP ranks it starts) sees the user's setting; see below.
        with _environment("HYDRA_FULL_ERROR", full_error):
            try:
                check_job_overrides(cfg, config_name)
                return task_function(cfg)
            except LmforgeError as err:
                fail(err)
            except (HydraException, OmegaConfBaseException) as err:  # an interpolation, a target that fails
                target_failed = failed_target(err) is not None
                fail(LmforgeError(job_failure_sentence(err, cfg) if target_failed else hydra_error_sentence(err)))
            except Exception as err:  # anything else a value of the config set off, deep in a library
                if full_error == "1":
                    raise
                fail(LmforgeError(job_failure_sentence(err, cfg)))

    # Hydra prints its own errors (a typo'd key, a bad override) over several lines unless this is
    # set; set, it raises them here, where they become one sentence like ours.
    with _environment("HYDRA_FULL_ERROR", "1"), _environment(COMMAND_VAR, command):
        try:
            main()
            return
        except (HydraException, OmegaConfBaseException) as err:
            if full_error == "1":
                raise
            error = LmforgeError(hydra_error_sentence(err))
    fail(error)
