"""The tests' fixtures, one per concept: the CMU lexicon, small simulated data sets, a single
trial file, the KenLM tools, language models to decode with, a short directory for Unix
sockets and a Dryad-shaped HTTP server. Helpers (data makers, the project copy the end-to-end
tests run in, synthetic logits, waiting) live in ``tests/helpers/``; no test module imports another.

Markers (pyproject.toml) say what a test needs: ``slow`` (the whole pipeline through Snakemake or
DVC), ``redis`` (real redis-server and LM-server processes), ``ddp`` (several training processes),
``kenlm`` (KenLM's lmplz, built once by scripts/build_kenlm.sh: added here to every test that uses
the tools). ``make test-fast`` leaves out slow, ddp and kenlm.

Session-scoped data are read-only: tests that corrupt data copy them first.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("B2TXT_PROGRESS", "0")  # no progress bars in test output

from helpers.arpa import template_graph, template_sentences  # noqa: E402
from helpers.data import SENTENCES, SESSION, TINY_SIM_CONFIG, make_trials  # noqa: E402
from helpers.dryad_server import FakeDryad, dryad_server  # noqa: E402
from helpers.github_server import FakeGithub, github_server  # noqa: E402

from b2txt.data.dryad import data_file_path, write_trials  # noqa: E402
from b2txt.ground.config import SimulateConfig  # noqa: E402
from b2txt.ground.phonemes import Lexicon  # noqa: E402

# tests/xla needs torch_xla (.venv-xla, `make test-xla`); in the main environment it is not even
# collected, so its conftest (another module named `conftest`) cannot shadow this one.
collect_ignore = [] if importlib.util.find_spec("torch_xla") else ["xla"]

#: Where scripts/build_kenlm.sh puts lmplz and build_binary by default (lm.kenlm_dir).
KENLM_DIR = Path("~/.cache/b2txt/kenlm").expanduser()
FORTUNES = "/usr/share/games/fortunes"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the KenLM tools (directly or through a fixture) is marked ``kenlm``."""
    for item in items:
        if "kenlm_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kenlm)


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="session")
def lexicon() -> Lexicon:
    return Lexicon.from_cmudict()


@pytest.fixture(scope="session")
def tiny_sim(tmp_path_factory, lexicon) -> Path:
    """Dryad-layout root (holding ``hdf5_data_final/`` and the description CSV): 2 sessions. Read-only."""
    from b2txt.data.simulate import simulate

    out = tmp_path_factory.mktemp("tiny_sim") / "data"
    return simulate(TINY_SIM_CONFIG, list(SENTENCES), out, lexicon)


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory, lexicon) -> tuple[Path, Path]:
    """3 sessions x (8 train, 4 val, 4 test) trials and their manifest, for training tests. Read-only."""
    from b2txt.data.simulate import simulate
    from b2txt.data.store import build_manifest, write_manifest

    root = tmp_path_factory.mktemp("small_sim")
    data = simulate(SimulateConfig(n_sessions=3, train_blocks=2, val_blocks=1, test_blocks=1, trials_per_block=4,
                                   span_days=30, max_words=5), list(SENTENCES), root / "data", lexicon)
    manifest = root / "manifest.csv"
    write_manifest(build_manifest(data), manifest)
    return data, manifest


@pytest.fixture
def make_trial_file(tmp_path, lexicon) -> Callable[..., Path]:
    """Factory: write a valid single-session ``data_<split>.hdf5`` and return its path.

    The file lies at ``<root>/hdf5_data_final/<session>/data_<split>.hdf5`` with ``root``
    defaulting to ``tmp_path / "data"``, so ``path.parents[2]`` is the data-set root to pass to
    ``validate_dataset``. Test files (``split="test"``) carry no labels. Corrupt the result with
    h5py afterwards.
    """

    def make(split: str = "train", n_trials: int = 3, session: str = SESSION, root: Path | None = None,
             seed: int = 0, block_num: int = 1, trials: list | None = None) -> Path:
        root = Path(root) if root is not None else tmp_path / "data"
        path = data_file_path(root, session, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        if trials is None:
            trials = make_trials(lexicon, n_trials, session, labelled=split != "test", seed=seed,
                                 block_num=block_num)
        write_trials(path, trials)
        return path

    return make


# ----------------------------------------------------------------------------- language models

@pytest.fixture(scope="session")
def kenlm_dir() -> Path:
    """lmplz + build_binary, built by the project's script (about a minute once, then instant)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_kenlm.sh"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return KENLM_DIR


@pytest.fixture(scope="session")
def fortune_sentences(lexicon) -> list[str]:
    """The tests' sentences and 300 of Debian's fortunes (LM text with some variety)."""
    from b2txt.data.corpus import extract_sentences, read_sources

    return list(SENTENCES) + extract_sentences(read_sources(FORTUNES, ["fortunes"]), lexicon, 3, 10)[:300]


@pytest.fixture(scope="session")
def kenlm_graph(tmp_path_factory, kenlm_dir, lexicon, fortune_sentences) -> Path:
    """A KenLM 3-gram over ``fortune_sentences``, pruned (``--prune 0 0 1``, with its unpruned twin),
    and its TLG graph, all in one ``3gram/`` directory (lm.arpa, lm.bin, TLG.fst, words.txt, ...)."""
    from b2txt.lm.graph import build_graph_from_arpa
    from b2txt.lm.ngram import build_ngram
    from b2txt.lm.text import prepare_text

    out = tmp_path_factory.mktemp("kenlm_graph")
    prepare_text(out / "text.txt", fortune_sentences, lexicon, add_lexicon_words=False)
    build_ngram(out / "text.txt", out / "3gram", 3, prune=[0, 0, 1], memory="5%", kenlm_dir=kenlm_dir)
    build_graph_from_arpa(out / "3gram" / "lm.arpa", out / "3gram", lexicon)
    return out / "3gram"


@pytest.fixture(scope="session")
def template_lm(tmp_path_factory, lexicon) -> Path:
    """A bigram TLG graph over the template sentences' words (no KenLM; decodes in a few ms)."""
    return template_graph(tmp_path_factory.mktemp("template_lm"), lexicon, template_sentences(300))


# ----------------------------------------------------------------------------- processes and servers

@pytest.fixture
def run_dir():
    """A short directory for Unix sockets (pytest's tmp paths can exceed the 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="b2t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dryad(monkeypatch) -> FakeDryad:
    """A Dryad-shaped API on 127.0.0.1 (helpers/dryad_server.py); tests fill ``datasets``, use ``url``."""
    for name in ("no_proxy", "NO_PROXY"):  # a proxy set for the machine must not see these requests
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    with dryad_server() as state:
        yield state


@pytest.fixture
def github(monkeypatch) -> FakeGithub:
    """A GitHub-shaped contents API, raw and LFS media host on 127.0.0.1 (helpers/github_server.py)."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    with github_server() as state:
        yield state
