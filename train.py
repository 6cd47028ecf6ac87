"""Train a model: ``python train.py model=gpt2-tiny task=tinyshakespeare``; see conf/train.yaml."""

from lmforge.cli import train

if __name__ == "__main__":
    train()
