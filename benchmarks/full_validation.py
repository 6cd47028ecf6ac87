"""Validation loss of char-level Tiny Shakespeare checkpoints on the whole validation split.

Evaluates lmforge run dirs (their ``checkpoints/last.ckpt``) and nanoGPT ``ckpt.pt`` files
with the same code, on every non-overlapping 64-character window of the validation text,
and prints a table. nanoGPT's parameter names are lmforge's, so both load into one GPT.

    python benchmarks/full_validation.py outputs/runs/<date>/<run> /path/to/nanoGPT/out/ckpt.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.data.sources import TextCorpus
from lmforge.data.tokenizers import char_tokenizer, encode_text
from lmforge.models.gpt import GPT

BLOCK = 64


def load(path: Path) -> tuple[dict[str, torch.Tensor], int, str]:
    """State dict of the backbone, vocabulary size and a label for one checkpoint."""
    if path.is_dir():  # an lmforge run dir
        ckpt = torch.load(path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        state = {k.removeprefix("backbone."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
        seed = next(
            (line.split()[1] for line in (path / "config.yaml").read_text().splitlines() if line.startswith("seed:")),
            "?",
        )
        return state, state["transformer.wte.weight"].shape[0], f"lmforge seed {seed} step {ckpt['global_step']}"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # nanoGPT pickles its config
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    return state, state["transformer.wte.weight"].shape[0], f"nanoGPT {path.parent.name} step {ckpt['iter_num']}"


def validation_windows() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of every non-overlapping 64-character window of the validation text, (n, 64) each."""
    texts = TextCorpus(name="tinyshakespeare", builtin="tinyshakespeare").load(None)
    ids = torch.tensor(encode_text(char_tokenizer(texts["train"]), texts["validation"].text()))
    n = (len(ids) - 1) // BLOCK
    return ids[: n * BLOCK].view(n, BLOCK), ids[1 : n * BLOCK + 1].view(n, BLOCK)


@torch.no_grad()
def full_split_loss(path: Path, windows: tuple[torch.Tensor, torch.Tensor]) -> tuple[str, float]:
    """Label and mean loss per character of one checkpoint (lmforge run dir or nanoGPT ckpt.pt) on ``windows``."""
    x, y = windows
    state, vocab, label = load(path)
    model = GPT(vocab, n_layer=4, n_head=4, n_embd=128, n_positions=BLOCK, bias=False)
    model.load_state_dict(state)
    model.eval()
    total = sum(
        F.cross_entropy(model(x[i : i + 256]).flatten(0, 1), y[i : i + 256].flatten(), reduction="sum").item()
        for i in range(0, len(x), 256)
    )
    return label, total / y.numel()


def main() -> None:
    """Evaluate every path given on the command line."""
    windows = validation_windows()
    print(f"{'checkpoint':<40} {'val loss (all ' + str(len(windows[0])) + ' windows)':>28}")
    for arg in sys.argv[1:]:
        label, loss = full_split_loss(Path(arg), windows)
        print(f"{label:<40} {loss:28.4f}")


if __name__ == "__main__":
    main()
