"""The one place that turns configs into objects.

- :mod:`~lmforge.compose.parts`: each config group's object (backbone, fine-tuning method, tokenizer and
  data, task, loggers, callbacks) and the checks that a model and a task fit together;
- :mod:`~lmforge.compose.weights`: what a run starts from (a public checkpoint, another run, its own
  checkpoints) and so its tokenizer; a finished run's backbone reopened;
- :mod:`~lmforge.compose.run`: a whole training run's objects, trainer included.
"""
