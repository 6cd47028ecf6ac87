"""``lmforge-serve``: a trained run (or a Hugging Face folder lmforge imports) behind an OpenAI-compatible HTTP API.

- :mod:`~lmforge.serve.protocol`: the request bodies and the OpenAI error format.
- :mod:`~lmforge.serve.served`: what is served (a run or a folder opened into one of the serving kinds).
- :mod:`~lmforge.serve.engine`: continuous batching of decoders, one KV-cache row per sequence.
- :mod:`~lmforge.serve.batcher`: dynamic batching of everything that is one call per batch.
- :mod:`~lmforge.serve.text`: generated tokens into text, with stop strings, for streaming.
- :mod:`~lmforge.serve.app`: the HTTP routes; :mod:`~lmforge.serve.server`: the command.
"""
