"""Shared fixtures: the CMU lexicon, a tiny simulated data set and a single-file writer.

``tiny_sim`` is session-scoped and must be treated as read-only: tests that corrupt data copy
it first (``shutil.copytree``) or build their own file with ``make_trial_file``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("B2TXT_PROGRESS", "0")  # no progress bars in test output

from b2txt.data.dryad import Trial, data_file_path, write_trials  # noqa: E402
from b2txt.data.simulate import simulate  # noqa: E402
from b2txt.ground.config import SimulateConfig  # noqa: E402
from b2txt.ground.phonemes import Lexicon  # noqa: E402

# tests/xla needs torch_xla (.venv-xla, `make test-xla`); in the main environment it is not even
# collected, so its conftest (another module named `conftest`) cannot shadow this one.
collect_ignore = [] if importlib.util.find_spec("torch_xla") else ["xla"]

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


#: Where scripts/build_kenlm.sh puts lmplz and build_binary by default (lm.kenlm_dir).
KENLM_DIR = Path("~/.cache/b2txt/kenlm").expanduser()


@pytest.fixture(scope="session")
def kenlm_dir() -> Path:
    """lmplz + build_binary, built by the project's script (about a minute once, then instant)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "build_kenlm.sh"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return KENLM_DIR


@pytest.fixture(scope="session")
def lexicon() -> Lexicon:
    return Lexicon.from_cmudict()


@pytest.fixture(scope="session")
def tiny_sim_config() -> SimulateConfig:
    return TINY_SIM_CONFIG


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return list(SENTENCES)


@pytest.fixture(scope="session")
def tiny_sim(tmp_path_factory, lexicon) -> Path:
    """Dryad-layout root (holding ``hdf5_data_final/`` and the description CSV). Read-only."""
    out = tmp_path_factory.mktemp("tiny_sim") / "data"
    return simulate(TINY_SIM_CONFIG, list(SENTENCES), out, lexicon)


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


@pytest.fixture
def make_trial_file(tmp_path, lexicon) -> Callable[..., Path]:
    """Factory: write a valid single-session ``data_<split>.hdf5`` and return its path.

    The file lies at ``<root>/hdf5_data_final/<session>/data_<split>.hdf5`` with ``root``
    defaulting to ``tmp_path / "data"``, so ``path.parents[2]`` is the data-set root to pass to
    ``validate_dataset``. Test files (``split="test"``) carry no labels. Corrupt the result with
    h5py afterwards.
    """

    def make(split: str = "train", n_trials: int = 3, session: str = SESSION, root: Path | None = None,
             seed: int = 0, block_num: int = 1, trials: list[Trial] | None = None) -> Path:
        root = Path(root) if root is not None else tmp_path / "data"
        path = data_file_path(root, session, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        if trials is None:
            trials = make_trials(lexicon, n_trials, session, labelled=split != "test", seed=seed,
                                 block_num=block_num)
        write_trials(path, trials)
        return path

    return make


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory, lexicon) -> tuple[Path, Path]:
    """3 sessions x (8 train, 4 val, 4 test) trials and their manifest, for training tests. Read-only."""
    from b2txt.data.store import build_manifest, write_manifest

    root = tmp_path_factory.mktemp("small_sim")
    data = simulate(SimulateConfig(n_sessions=3, train_blocks=2, val_blocks=1, test_blocks=1, trials_per_block=4,
                                   span_days=30, max_words=5), list(SENTENCES), root / "data", lexicon)
    manifest = root / "manifest.csv"
    write_manifest(build_manifest(data), manifest)
    return data, manifest


@pytest.fixture
def run_dir():
    """A short directory for Unix sockets (pytest's tmp paths can exceed the 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="b2t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
