"""Scores of generated texts against their references (translation, summarization), for a corpus or one sentence."""

from __future__ import annotations

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def text_scores(hypotheses: list[str] | str, references: list[str] | str, metrics: tuple[str, ...]) -> dict[str, float]:
    """Scores of generated text against one reference each, in percent.

    Given lists, the scores of the corpus (what validation and test log); given one hypothesis and one
    reference as strings, the scores of that sentence (what a prediction file's line holds).

    ``bleu`` and ``chrf`` come from sacreBLEU on detokenized text (its corpus statistics, or its sentence
    ones for a single pair); ``rouge`` gives the ``rouge1``, ``rouge2`` and ``rougeL`` F-measures of
    torchmetrics (averaged over the sentences of a corpus).
    """
    import sacrebleu
    from torchmetrics.functional.text.rouge import rouge_score

    one = isinstance(hypotheses, str)
    bleu = sacrebleu.sentence_bleu if one else sacrebleu.corpus_bleu
    chrf = sacrebleu.sentence_chrf if one else sacrebleu.corpus_chrf
    scores = {}
    if "bleu" in metrics:
        scores["bleu"] = bleu(hypotheses, [references]).score
    if "chrf" in metrics:
        scores["chrf"] = chrf(hypotheses, [references]).score
    if "rouge" in metrics:
        rouge = rouge_score(hypotheses, references, rouge_keys=ROUGE_KEYS)
        scores.update({key: 100 * float(rouge[f"{key}_fmeasure"]) for key in ROUGE_KEYS})
    return scores
