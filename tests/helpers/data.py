"""Small data of the tests' own: sentences whose every word is in the CMU dictionary, and valid trials."""

from __future__ import annotations

import numpy as np

from b2txt.data.dryad import Trial
from b2txt.ground.config import SimulateConfig
from b2txt.ground.phonemes import Lexicon

#: Plain sentences of 3-6 common words, every word in the CMU dictionary.
SENTENCES: list[str] = [
    "the cat sat on the mat",
    "i like green apples",
    "we went home early",
    "she reads a good book",
    "the sun is very warm",
    "open the door please",
    "they play music at night",
    "my dog runs fast",
    "he drinks cold water",
    "the bird can sing",
    "you need more time",
    "we eat lunch at noon",
    "the car is red",
    "please call me later",
    "it was a long day",
    "she has two sisters",
    "the tree is tall",
    "turn off the light",
    "i want some tea",
    "the baby is asleep",
]

#: A valid session folder name used by ``make_trial_file``.
SESSION = "t15.2023.08.13"

TINY_SIM_CONFIG = SimulateConfig(
    n_sessions=2, train_blocks=1, val_blocks=1, test_blocks=1, trials_per_block=3,
    span_days=30, max_words=6,
)


def trial_steps(lexicon: Lexicon, sentence: str, i: int = 0) -> int:
    """Bins of the i-th made trial of ``sentence``: enough output frames of the default model (patch 14,
    stride 4) for CTC to align its phonemes (`b2txt validate` checks), plus a little, varying with i."""
    ids = lexicon.sentence_ids(sentence)
    needed = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))
    return 14 + 4 * (needed + 2) + 3 * i


def make_trials(lexicon: Lexicon, n_trials: int = 3, session: str = SESSION, labelled: bool = True,
                seed: int = 0, block_num: int = 1, first_trial_num: int = 0) -> list[Trial]:
    """Valid trials: TX-like counts in 0..255, Gaussian SBP in 256..511, lexicon labels; each long
    enough for the default model (:func:`trial_steps`)."""
    rng = np.random.default_rng(seed)
    trials = []
    for i in range(n_trials):
        sentence = SENTENCES[(seed + i) % len(SENTENCES)]
        n_steps = trial_steps(lexicon, sentence, i)
        tx = rng.poisson(1.0, size=(n_steps, 256)).astype(np.float32)
        sbp = rng.normal(size=(n_steps, 256)).astype(np.float32)
        trials.append(Trial(
            features=np.concatenate([tx, sbp], axis=1),
            session=session, block_num=block_num, trial_num=first_trial_num + i,
            sentence=sentence if labelled else None,
            phoneme_ids=np.asarray(lexicon.sentence_ids(sentence)) if labelled else None,
        ))
    return trials
