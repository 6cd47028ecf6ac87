"""Label values that the data modules write and the tasks read.

Kept apart from both so that each imports it without importing the other.
"""

# The label of a position without a loss (padding, a word's later sub-tokens, unmasked tokens):
# the ignore_index that torch.nn.functional.cross_entropy skips by default.
IGNORE = -100
