"""Small back-off n-gram LMs in ARPA format for the language-model tests (no lmplz needed).

The model is interpolated absolute discounting, which is exactly representable in back-off
form: a seen n-gram stores its interpolated probability and a context's back-off weight is its
interpolation weight ``D · N1+(h·) / c(h)``, so every conditional distribution sums to one and
KenLM (and flashlight's KenLM) read the file like any lmplz output.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

#: Words of the template sentences (all in the CMU dictionary).
SUBJECTS = ("i", "we", "they", "you", "the man", "the woman", "my friend", "the children", "she", "he")
VERBS = ("like", "see", "want", "need", "have", "bring", "find", "keep", "make", "take")
OBJECTS = ("the book", "some water", "a green apple", "the red car", "my phone", "the old house",
           "a cup of tea", "the blue door", "two tickets", "a warm coat", "the small dog", "fresh bread")
TAILS = ("", "today", "right now", "at home", "every day", "in the morning", "after lunch", "again")


def template_sentences(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` distinct sentences "subject verb object [tail]" drawn reproducibly."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TAILS)]
        out[" ".join(p for p in parts if p)] = None
    return list(out)


def _counts(sentences: Iterable[str], order: int) -> list[Counter[tuple[str, ...]]]:
    counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order + 1)]
    for s in sentences:
        toks = [BOS, *s.split(), EOS]
        for n in range(1, order + 1):
            for i in range(len(toks) - n + 1):
                gram = tuple(toks[i:i + n])
                if gram != (BOS,):
                    counts[n][gram] += 1
    return counts


def write_arpa(path: str | Path, sentences: Sequence[str], order: int = 3, discount: float = 0.5,
               extra_words: Iterable[str] = ()) -> Path:
    """Write an ``order``-gram ARPA file estimated from ``sentences``; return its path.

    ``extra_words`` join the vocabulary with a zero count (add-one unigram smoothing gives them
    a small probability), e.g. to put homophones into the LM.
    """
    if order < 1 or not 0 < discount < 1:
        raise ValueError("order >= 1 and 0 < discount < 1 required")
    counts = _counts(sentences, order)
    vocab = sorted({w for (w,) in counts[1]} | {UNK} | set(extra_words))
    total = sum(counts[1].values())
    prob: list[dict[tuple[str, ...], float]] = [{} for _ in range(order + 1)]
    bow: list[dict[tuple[str, ...], float]] = [{} for _ in range(order + 1)]
    for w in vocab:
        prob[1][(w,)] = (counts[1][(w,)] + 1) / (total + len(vocab))

    def backed_off(gram: tuple[str, ...]) -> float:
        """P(last word | the rest) by the back-off rule over the orders estimated so far."""
        if gram in prob[len(gram)]:
            return prob[len(gram)][gram]
        return bow[len(gram) - 1].get(gram[:-1], 1.0) * backed_off(gram[1:])

    for n in range(2, order + 1):
        by_context: dict[tuple[str, ...], dict[str, int]] = defaultdict(dict)
        for gram, c in counts[n].items():
            by_context[gram[:-1]][gram[-1]] = c
        for h, followers in by_context.items():
            c_h = sum(followers.values())
            lam = discount * len(followers) / c_h
            bow[n - 1][h] = lam
            for w, c in followers.items():
                prob[n][h + (w,)] = (c - discount) / c_h + lam * backed_off(h[1:] + (w,))

    lines = ["\\data\\"]
    sizes = [len(prob[1]) + 1] + [len(prob[n]) for n in range(2, order + 1)]
    lines += [f"ngram {n}={k}" for n, k in enumerate(sizes, start=1)]
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        entries = sorted(prob[n].items())
        if n == 1:
            entries = [((BOS,), None), *entries]
        for gram, p in entries:
            logp = "-99" if p is None else f"{math.log10(p):.6f}"
            row = f"{logp}\t{' '.join(gram)}"
            if n < order:
                row += f"\t{math.log10(bow[n].get(gram, 1.0)):.6f}"
            lines.append(row)
    lines += ["", "\\end\\", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def template_graph(root: Path, lexicon, sentences: Sequence[str]) -> Path:
    """A bigram TLG graph over ``sentences`` and their words (decodes in a few ms): ``root/graph``."""
    from b2txt.ground.phonemes import Lexicon
    from b2txt.lm.graph import build_graph

    words = sorted({w for s in sentences for w in s.split()})
    write_arpa(root / "lm.arpa", sentences, order=2)
    build_graph(root / "lm.arpa", root / "graph", Lexicon({w: lexicon.pronunciations[w] for w in words}))
    return root / "graph"


#: A bigram LM written by hand in the published LMs' style (REFERENCE §1, §4: made with SRILM,
#: words in upper case, SRILM's lower-case ``<s>``/``</s>``/``<unk>``, a blank first line, tabs).
#: Its sentences: :data:`HAND_SENTENCES`, and the like ("we see the dog").
HAND_ARPA = """
\\data\\
ngram 1=12
ngram 2=17

\\1-grams:
-99\t<s>\t-0.30103
-1.0\t</s>
-2.5\t<unk>
-1.0\tI\t-0.30103
-1.1\tWE\t-0.30103
-1.0\tSEE\t-0.30103
-1.1\tLIKE\t-0.30103
-0.8\tTHE\t-0.30103
-1.2\tCAT\t-0.30103
-1.2\tDOG\t-0.30103
-1.3\tBOOK\t-0.30103
-1.4\tTODAY\t-0.30103

\\2-grams:
-0.35\t<s> I
-0.35\t<s> WE
-0.3\tI SEE
-0.3\tI LIKE
-0.3\tWE SEE
-0.3\tWE LIKE
-0.1\tSEE THE
-0.1\tLIKE THE
-0.5\tTHE CAT
-0.5\tTHE DOG
-0.5\tTHE BOOK
-0.2\tCAT </s>
-0.2\tDOG </s>
-0.4\tBOOK </s>
-0.4\tBOOK TODAY
-0.6\tCAT TODAY
-0.1\tTODAY </s>

\\end\\
"""
HAND_SENTENCES = ("i see the cat", "we like the book today")
