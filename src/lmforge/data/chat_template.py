"""Chat templates: conversations (``[{"role", "content"}, ...]``) into text, the Hugging Face way.

A template is Jinja text rendered with the variables and Jinja settings of ``transformers``'
``apply_chat_template`` (``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``;
``trim_blocks``, ``lstrip_blocks``, a sandbox), so that a run exported with its template gives the
same token ids in ``transformers`` as in lmforge.

The text each assistant message contributes is found by rendering: the conversation up to that
message with the generation prompt, then with the message; the difference is the reply as the
template writes it (with whatever ends it, such as the end-of-text token), which is what a model
learns to produce. That works for any template that renders conversations as growing prefixes.
"""

from __future__ import annotations

from functools import cached_property

from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")

# Zephyr-style: a role tag (a special token) on its own line before each message; an assistant
# message ends with the end-of-text token, which is where generation stops.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
DEFAULT_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")


class ChatTemplate:
    """A Jinja chat template with the special tokens it writes.

    Args:
        source: the template's Jinja text.
        eos_token, bos_token: what ``{{ eos_token }}`` and ``{{ bos_token }}`` render to.
    """

    def __init__(self, source: str, eos_token: str = "", bos_token: str = ""):
        self.source, self.eos_token, self.bos_token = source, eos_token, bos_token

    @cached_property
    def _template(self):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):  # templates call it to refuse a conversation
            raise ValueError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text; with ``add_generation_prompt``, followed by what opens the assistant's reply."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     eos_token=self.eos_token, bos_token=self.bos_token)  # fmt: skip

    def with_replies(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant message in it.

        A reply whose prefix does not render as the start of the whole (a template that rewrites earlier
        turns) or that renders to nothing gets no span.
        """
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if text.startswith(through) and through.startswith(before) and len(through) > len(before):
                spans.append((len(before), len(through)))
        return text, spans
