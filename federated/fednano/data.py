"""The offline multimodal task of FedNano: image + question -> answer, built from digit images.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824). The paper uses
ScienceQA / IconQA with MiniGPT-4 / LLaVA-1.5 (GPU-only); this is the CPU stand-in the methods
notes propose: every image is asked three fixed questions, answers share one vocabulary.

- ``which digit is it``         -> ``"0"`` .. ``"9"``
- ``is it even``                -> ``"yes"`` / ``"no"``
- ``is it greater than five``   -> ``"yes"`` (6..9) / ``"no"``

Label skew is over the digit (the image's class); every image of a client carries all three
questions, so a client skewed to a few digits is also skewed in its yes/no answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["QUESTIONS", "ANSWERS", "VOCAB", "QUESTION_LEN", "VQASet", "question_tokens", "answer_of",
           "make_vqa", "split_public"]

QUESTIONS = ("which digit is it", "is it even", "is it greater than five")
ANSWERS = tuple(str(d) for d in range(10)) + ("yes", "no")
VOCAB = ("<pad>",) + tuple(sorted({w for q in QUESTIONS for w in q.split()}))
QUESTION_LEN = max(len(q.split()) for q in QUESTIONS)
YES, NO = ANSWERS.index("yes"), ANSWERS.index("no")


def question_tokens() -> torch.Tensor:
    """(3, QUESTION_LEN) token ids of the questions, left-padded with ``<pad>`` (id 0)."""
    out = torch.zeros(len(QUESTIONS), QUESTION_LEN, dtype=torch.long)
    for i, q in enumerate(QUESTIONS):
        ids = [VOCAB.index(w) for w in q.split()]
        out[i, QUESTION_LEN - len(ids):] = torch.tensor(ids)
    return out


def answer_of(digit: int, question: int) -> int:
    """Answer id of ``question`` (index into QUESTIONS) about an image of ``digit``.

    Raises:
        ValueError: for a question id outside 0..2.
    """
    if question == 0:
        return int(digit)
    if question == 1:
        return YES if digit % 2 == 0 else NO
    if question == 2:
        return YES if digit > 5 else NO
    raise ValueError(f"question id must be 0..{len(QUESTIONS) - 1}, got {question}")


@dataclass
class VQASet:
    """Image-question-answer triples over a base image set.

    Attributes:
        image: (M,) index of the image in the base set (features are looked up by it).
        question: (M,) question id.
        answer: (M,) answer id (into ANSWERS).
        digit: (M,) digit label of the image (what the label skew is over).
    """

    image: torch.Tensor
    question: torch.Tensor
    answer: torch.Tensor
    digit: torch.Tensor

    def __len__(self) -> int:
        return len(self.image)


def make_vqa(digits: torch.Tensor | np.ndarray, image_ids: np.ndarray | None = None) -> VQASet:
    """Every image in ``image_ids`` (default: all) asked every question (image-major order).

    Args:
        digits: (N,) digit labels of the base image set.
        image_ids: which images of the base set to use.

    Returns:
        A :class:`VQASet` of ``3 * len(image_ids)`` triples.
    """
    digits = torch.as_tensor(digits, dtype=torch.long)
    ids = torch.arange(len(digits)) if image_ids is None else torch.as_tensor(image_ids, dtype=torch.long)
    nq = len(QUESTIONS)
    image = ids.repeat_interleave(nq)
    question = torch.arange(nq).repeat(len(ids))
    digit = digits[image]
    answer = torch.tensor([answer_of(int(d), int(q)) for d, q in zip(digit, question)], dtype=torch.long)
    return VQASet(image, question, answer, digit)


def split_public(digits: torch.Tensor | np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Holds ``per_class`` images per digit out as the server's public pretraining split.

    Returns:
        ``(public image ids, private image ids)``, both sorted; disjoint; their union is all.
    """
    y = np.asarray(digits)
    rng = np.random.default_rng([seed, 7919])
    public = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    pub = np.sort(np.concatenate(public)) if public else np.zeros(0, dtype=np.int64)
    priv = np.setdiff1d(np.arange(len(y)), pub)
    return pub, priv
