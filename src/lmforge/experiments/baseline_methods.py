"""The trivial methods of the baseline rows, one example at a time: no data loading and no scoring here
(``baselines.py`` runs them over a task's splits and scores them with the task's own metric code).

Summarization: Lead-3 and Longest-3 of Gliwa et al. 2019 (SAMSum). Translation: the source copied.
Classification: the training split's majority class. Named entities: longest-match lookup of the
entity strings seen in training. Question answering: the sliding window of Rajpurkar et al. 2016
(after Richardson et al. 2013) and the best-sentence oracle.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

# -- summarization and translation -------------------------------------------------------------


def utterances(dialogue: str) -> list[str]:
    """The turns of a dialogue (``Speaker: text``, one a line), blank lines left out."""
    return [line.strip() for line in dialogue.splitlines() if line.strip()]


def lead(dialogue: str, n: int = 3) -> str:
    """Lead-n: the first ``n`` utterances, joined by spaces."""
    return " ".join(utterances(dialogue)[:n])


def longest(dialogue: str, n: int = 3) -> str:
    """Longest-n: the ``n`` utterances with the most words (the earlier one on a tie), in dialogue order."""
    turns = utterances(dialogue)
    chosen = sorted(sorted(range(len(turns)), key=lambda i: -len(turns[i].split()))[:n])
    return " ".join(turns[i] for i in chosen)


# -- classification and tagging ----------------------------------------------------------------


def majority_label(labels: list[int]) -> int:
    """The most frequent label (the smallest of equally frequent ones)."""
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))


def entity_dictionary(sentences: list[list[str]], tags: list[list[str]]) -> dict[tuple[str, ...], str]:
    """Every entity string of tagged sentences (its words, case kept) -> its most frequent type."""
    from seqeval.metrics.sequence_labeling import get_entities  # here: importing the suite runner stays light

    types: dict[tuple[str, ...], Counter] = defaultdict(Counter)
    for words, row in zip(sentences, tags, strict=True):
        for kind, first, last in get_entities(list(row)):  # seqeval's reading of IOB tags, ``last`` inclusive
            types[tuple(words[first : last + 1])][kind] += 1
    return {words: min(counts, key=lambda k: (-counts[k], k)) for words, counts in types.items()}


def dictionary_tags(words: list[str], dictionary: dict[tuple[str, ...], str]) -> list[str]:
    """IOB2 tags of a sentence: left to right, the longest run of words that is a known entity string."""
    longest_entity = max((len(key) for key in dictionary), default=0)
    tags, i = [], 0
    while i < len(words):
        for n in range(min(longest_entity, len(words) - i), 0, -1):
            kind = dictionary.get(tuple(words[i : i + n]))
            if kind is not None:
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
                i += n
                break
        else:
            tags.append("O")
            i += 1
    return tags


# -- question answering ------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:['’.-]\w+)*")
_TOKEN = re.compile(rf"{_WORD.pattern}|[^\w\s]")  # words and single punctuation marks
# A sentence ends at . ! or ? (and closing quotes or brackets) before white space and a capital, digit or quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
# Function words: never part of an answer candidate, and left out of the distance term (Richardson et al.).
_FUNCTION_WORDS = """a an the of in on at to for from by with about as into onto over under than then and or but nor so
is are was were be been being am has have had do does did will would shall should can could may might must
it its this that these those there here which who whom whose what when where why how whatever
he she they we you i him her them us me his hers their our your my
not no also very more most such many much some any each other all both"""
STOPWORDS = frozenset(_FUNCTION_WORDS.split())


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) characters of each sentence of a text (a rule-based split; abbreviations may cut one)."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def best_sentence(context: str, answers: list[str]) -> str:
    """The oracle: the sentence of the context with the highest SQuAD F1 against the gold answers
    (the first on a tie), an upper bound for any method that answers with a whole sentence."""
    from torchmetrics.functional.text import squad  # here: importing the suite runner stays light (no torch)

    target = {"answers": {"text": list(answers), "answer_start": [0] * len(answers)}, "id": "0"}
    best, best_f1 = "", -1.0
    for a, b in sentence_spans(context):
        f1 = float(squad({"prediction_text": context[a:b], "id": "0"}, target)["f1"])
        if f1 > best_f1:
            best, best_f1 = context[a:b], f1
    return best


def sliding_window_answer(context: str, question: str) -> str:
    """The sliding-window baseline of Rajpurkar et al. 2016 (SQuAD, section 5.1).

    Candidates are the maximal runs of words that are neither function words nor question words
    (standing in for the paper's parse constituents). Those whose sentence shares the most unigrams and
    bigrams with the question are kept; among them the answer maximises Richardson et al.'s (2013)
    sliding-window score minus their distance term, computed inside the candidate's sentence as the
    paper does: a window as long as the question and candidate words together, its words weighted by
    inverse counts in the passage, then the distance from the candidate to the nearest question word.
    """
    question_words = [w.lower() for w in _WORD.findall(question)]
    asked = set(question_words)
    counts = Counter(w.lower() for w in _WORD.findall(context))
    weight = {w: math.log(1 + 1 / c) for w, c in counts.items()}
    best, best_key = "", None
    for a, b in sentence_spans(context):
        tokens = [(m.group().lower(), a + m.start(), a + m.end()) for m in _TOKEN.finditer(context[a:b])]
        words = [w for w, _, _ in tokens]
        overlap = _overlap(words, question_words)
        for first, last in _candidates(words, asked):
            inside = set(words[first : last + 1])
            score = _window_score(words, asked | inside, weight) - _distance(words, first, last, asked)
            key = (overlap, score, first - last)  # then the shorter candidate
            if best_key is None or key > best_key:
                best, best_key = context[tokens[first][1] : tokens[last][2]], key
    return best


def _overlap(words: list[str], question_words: list[str]) -> int:
    """Distinct unigrams plus distinct bigrams that a sentence shares with the question."""
    unigrams = len(set(words) & set(question_words))
    bigrams = len(set(zip(words, words[1:])) & set(zip(question_words, question_words[1:])))
    return unigrams + bigrams


def _candidates(words: list[str], asked: set[str]) -> list[tuple[int, int]]:
    """(first, last) token positions of each maximal run of content words not in the question (punctuation
    ends a run)."""
    runs, first = [], None
    for i, word in enumerate([*words, ""]):
        usable = _WORD.fullmatch(word) is not None and word not in STOPWORDS and word not in asked
        if usable and first is None:
            first = i
        elif not usable and first is not None:
            runs.append((first, i - 1))
            first = None
    return runs


def _window_score(words: list[str], targets: set[str], weight: dict[str, float]) -> float:
    """Richardson et al.'s sliding window: the best sum, over windows of ``len(targets)`` words, of the
    weights of the window's words that are targets."""
    size = len(targets)
    values = [weight.get(w, 0.0) if w in targets else 0.0 for w in words]
    return max(sum(values[i : i + size]) for i in range(max(1, len(words) - size + 1)))


def _distance(words: list[str], first: int, last: int, asked: set[str]) -> float:
    """Richardson et al.'s distance term: words from the candidate to the nearest question content word,
    over the sentence length less one (1 where the sentence has no question content word)."""
    positions = [i for i, w in enumerate(words) if w in asked and w not in STOPWORDS]
    if not positions or len(words) < 2:
        return 1.0
    nearest = min(first - i if i < first else i - last for i in positions)
    return nearest / (len(words) - 1)
