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


def make_trials(lexicon: Lexicon, n_trials: int = 3, session: str = SESSION, labelled: bool = True,
                seed: int = 0, block_num: int = 1, first_trial_num: int = 0) -> list[Trial]:
    """Valid trials: TX-like counts in 0..255, Gaussian SBP in 256..511, lexicon labels."""
    rng = np.random.default_rng(seed)
    trials = []
    for i in range(n_trials):
        n_steps = 20 + 3 * i
        tx = rng.poisson(1.0, size=(n_steps, 256)).astype(np.float32)
        sbp = rng.normal(size=(n_steps, 256)).astype(np.float32)
        sentence = SENTENCES[(seed + i) % len(SENTENCES)]
        trials.append(Trial(
            features=np.concatenate([tx, sbp], axis=1),
            session=session, block_num=block_num, trial_num=first_trial_num + i,
            sentence=sentence if labelled else None,
            phoneme_ids=np.asarray(lexicon.sentence_ids(sentence)) if labelled else None,
        ))
    return trials
