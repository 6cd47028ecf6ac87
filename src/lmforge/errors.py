"""The one exception type for problems a user can fix (bad config, missing data)."""


class LmforgeError(Exception):
    """A user-facing error: its message is one sentence that says what is wrong and how to fix it.

    The CLI prints the message alone and exits with status 1; set
    ``HYDRA_FULL_ERROR=1`` to see the traceback instead.

    Args:
        every_rank: every DDP rank raises this same error (they took the decision together), so
            only rank 0 prints it.
    """

    def __init__(self, message: str, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


def sentence(text: str) -> str:
    """``text`` ending in a full stop, unless it ends in a stop, question or exclamation mark already."""
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else f"{text}."
