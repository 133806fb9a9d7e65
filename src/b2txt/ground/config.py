"""Typed configuration of every stage (pydantic), read from ``config/config.yaml``.

One set of defaults: the defaults below are the embedded default run's, and
``config/config.yaml`` + ``config/model/baseline.yaml`` write the same values out, documented
in place (a test keeps them equal). A command given no ``--config`` uses them, wherever it
runs; the presets (``config/model/paper.yaml``, ``triple.yaml``) override them.

The YAML file documents each knob in place; these models give defaults, types and checks,
and are the single source of the JSON schema in ``workflow/schemas/config.schema.json``
(regenerate with ``b2txt config-schema``). Every stage command takes ``--config FILE`` and
reads the sections it needs; unknown keys are errors so that typos do not pass silently.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .archive import unpack_target
from .errors import ConfigError
from .fileio import write_text_atomic


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Range(Section):
    """A closed interval ``[low, high]``."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        return self


class DataConfig(Section):
    source: Literal["simulated", "dryad", "dir"] = Field(
        "simulated", description="simulated: the simulator writes dir | dryad: `b2txt download` fills dir | dir: dir exists")
    dir: str = Field("data/simulated", description="Dryad-layout data directory (the simulator writes here)")


#: A directory of a GitHub repository at one commit, ``OWNER/REPO@COMMIT:PATH`` (a full 40-hex commit, so
#: that what it names never changes): ``download.github`` and ``b2txt dvc-pin --github``.
GITHUB_SOURCE_PATTERN = r"^([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)@([0-9a-f]{40}):([^:@]+)$"
#: The published 1-gram decoding graph (REFERENCE §1): in the reference repository, not on Dryad.
REFERENCE_1GRAM = ("Neuroprosthetics-Lab/nejm-brain-to-text@980a5b7e96392210edf976d76bdb5d15d2e0e62b:"
                   "language_model/pretrained_language_models/openwebtext_1gram_lm_sil")


class DownloadConfig(Section):
    """Dryad downloads (REFERENCE §1): checked against the API's size and digest, resumable."""

    api_root: str = Field("https://datadryad.org/api/v2", description="Dryad API root (a mirror or test server)")
    datasets: dict[str, str] = Field(
        default_factory=lambda: {"data": "doi:10.5061/dryad.dncjsxm85", "lm": "doi:10.5061/dryad.x69p8czpq"})
    files: list[str] | None = Field(None, description="file names to fetch (None: every file of the dataset)")
    partial_dir: str | None = Field(
        None, description="where partial downloads collect (None: <out>/.download; the Snakemake rule then uses "
                          "<out>.partial, since Snakemake empties <out> before a rerun)")
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(5, ge=0)
    archive_dir: str = Field(
        "data/published", description="the published archives, kept packed: `b2txt dvc-pin` pins them here for "
                                      "`dvc pull`, Snakemake's fetch_model rule downloads the checkpoint here; the "
                                      "unpack stages read them")
    github: dict[str, Annotated[str, Field(pattern=GITHUB_SOURCE_PATTERN)]] = Field(
        default_factory=lambda: {"reference-1gram": REFERENCE_1GRAM},
        description="directories of GitHub repositories that `b2txt dvc-pin --github NAME` pins (one directory "
                    "pin each, under archive_dir): OWNER/REPO@COMMIT:PATH, the commit in full")
    github_api_root: str = Field("https://api.github.com", description="GitHub REST API root (a test server)")
    github_media_root: str = Field("https://media.githubusercontent.com/media",
                                   description="where GitHub serves Git LFS files: <root>/OWNER/REPO/COMMIT/PATH")


class ModelSourceConfig(Section):
    """Where the phoneme decoder comes from: trained here, or the published checkpoint (REFERENCE §3)."""

    source: Literal["train", "pretrained"] = Field(
        "train", description="train: the train stage makes results/<run>/model | pretrained: the published "
                             "checkpoint (download.archive_dir/<file>, pinned for DVC or fetched), unpacked, no training")
    file: str = Field("t15_pretrained_rnn_baseline.zip",
                      description="the checkpoint archive's name in the data dataset (download.datasets.data)")
    dir: str = Field("data/pretrained", description="where the archive is unpacked: the model is <dir>/<file stem>/")

    @property
    def model_dir(self) -> str:
        """The unpacked published model directory (``checkpoint/best_checkpoint`` + ``args.yaml``)."""
        return f"{self.dir.rstrip('/')}/{unpack_target(self.file)}"


#: Debian's fortune files the default corpus reads (package ``fortunes``, BSD licence).
FORTUNE_FILES = (
    "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education", "ethnic", "food",
    "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie", "literature", "love",
    "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people", "perl", "pets",
    "platitudes", "politics", "pratchett", "riddles", "science", "songs-poems", "sports", "startrek", "tao",
    "translate-me", "wisdom", "work", "zippy")


class CorpusConfig(Section):
    source_dir: str | None = "/usr/share/games/fortunes"
    files: list[str] = Field(default_factory=lambda: list(FORTUNE_FILES))
    min_words: int = Field(3, ge=1)
    max_words: int = Field(14, ge=1)
    out: str = "data/corpus/sentences.txt"


class ArrayTuning(Section):
    """Relative speech tuning of the four arrays (REFERENCE §1 feature order)."""

    ventral_6v: float = 1.0
    area_4: float = 0.35
    area_55b: float = 0.7
    dorsal_6v: float = 0.85

    def as_list(self) -> list[float]:
        return [self.ventral_6v, self.area_4, self.area_55b, self.dorsal_6v]


class NeuralModelConfig(Section):
    latent_dim: int = Field(24, ge=2)
    phoneme_ms: Range = Range(low=60, high=150)
    sil_ms: Range = Range(low=40, high=160)
    pre_speech_ms: Range = Range(low=600, high=1200)
    post_speech_ms: Range = Range(low=200, high=500)
    speaking_rate_sd: float = Field(0.1, ge=0)
    coarticulation_ms: float = Field(30.0, gt=0)
    tx_rate_hz: Range = Range(low=10, high=60)
    tuning_depth: float = Field(0.7, ge=0)
    array_tuning: ArrayTuning = ArrayTuning()
    nuisance_dim: int = Field(4, ge=0)
    nuisance_sd: float = Field(0.3, ge=0)
    nuisance_timescale_ms: float = Field(500.0, gt=0)
    snr_db: float = 0.0
    gain_sd: float = Field(0.2, ge=0)
    gain_drift_per_month: float = Field(0.1, ge=0)
    offset_drift_per_month: float = Field(0.2, ge=0)
    mixing_timescale_days: float = Field(300.0, gt=0)
    dead_fraction_start: float = Field(0.02, ge=0, le=1)
    dead_fraction_per_month: float = Field(0.01, ge=0, le=1)
    session_gain_sd: float = Field(0.3, ge=0)
    session_offset_sd: float = Field(0.5, ge=0)
    session_tuning_change: float = Field(0.3, ge=0, le=1)


class SimulateConfig(Section):
    seed: int = 0
    implant_date: dt.date = dt.date(2023, 7, 17)
    n_sessions: int = Field(8, ge=1)
    first_day: int = Field(25, ge=0)
    span_days: int = Field(240, ge=0)
    train_blocks: int = Field(4, ge=0)
    val_blocks: int = Field(1, ge=0)
    test_blocks: int = Field(1, ge=0)
    trials_per_block: int = Field(20, ge=1)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(10, ge=1)
    corpus_mix: dict[str, float] = Field(default_factory=lambda: {"Fortunes": 0.8, "50-Word": 0.1, "Random": 0.1})
    neural: NeuralModelConfig = NeuralModelConfig()

    @model_validator(mode="after")
    def _check(self) -> "SimulateConfig":
        known = {"Fortunes", "50-Word", "Random"}
        bad = set(self.corpus_mix) - known
        if bad:
            raise ValueError(f"corpus_mix: unknown corpus {sorted(bad)}; known: {sorted(known)}")
        if not self.corpus_mix or sum(self.corpus_mix.values()) <= 0:
            raise ValueError("corpus_mix: weights must sum to a positive number")
        if self.min_words > self.max_words:
            raise ValueError("min_words is above max_words")
        return self


#: Generous bounds on what shapes a model: beyond them a config or an args.yaml is broken, not a
#: bigger model (the published one: 5 layers of 768 units, patches of 14 bins, stride 4).
MAX_UNITS, MAX_LAYERS, MAX_PATCH = 16384, 64, 1000


class ModelConfig(Section):
    """Phoneme decoder architecture (REFERENCE §3): the one model config of the models
    (:mod:`b2txt.models.decoders`), the trainer and ``args.yaml`` (:mod:`b2txt.models.checkpoint`).
    The default is the small baseline; the paper's GRU is n_units 768, n_layers 5
    (``config/model/paper.yaml``).

    ``triple`` (TripleGRUDecoder) adds a noise GRU and a noisy-speech GRU (``noise_*``,
    ``noisy_*``); ``n_units``/``n_layers`` then size its clean-speech GRU.
    """

    architecture: Literal["gru", "triple"] = "gru"
    n_units: int = Field(256, ge=1, le=MAX_UNITS)
    n_layers: int = Field(2, ge=1, le=MAX_LAYERS)
    rnn_dropout: float = Field(0.4, ge=0, lt=1)
    input_dropout: float = Field(0.2, ge=0, lt=1)
    patch_size: int = Field(14, ge=1, le=MAX_PATCH, description="bins per patch (20 ms each)")
    patch_stride: int = Field(4, ge=1, le=MAX_PATCH, description="bins between patches")
    noise_units: int = Field(256, ge=1, le=MAX_UNITS)
    noise_layers: int = Field(2, ge=1, le=MAX_LAYERS)
    noisy_units: int = Field(256, ge=1, le=MAX_UNITS)
    noisy_layers: int = Field(2, ge=1, le=MAX_LAYERS)
    grl_scale: float = Field(1.0, allow_inf_nan=False,
                             description="gradient-reversal scale between noise and noisy head")


class AugmentConfig(Section):
    white_noise_std: float = Field(1.0, ge=0)
    constant_offset_std: float = Field(0.2, ge=0)
    random_walk_std: float = Field(0.0, ge=0)
    static_gain_std: float = Field(0.0, ge=0)
    random_cut: int = Field(3, ge=0, description="cut 0..random_cut-1 leading bins per batch")
    smooth_data: bool = True
    smooth_kernel_std: float = Field(2.0, gt=0, le=1000, allow_inf_nan=False, description="bins")
    smooth_kernel_size: int = Field(100, ge=1, le=100000)
    noise_over_padding: bool = Field(
        False, description="add the noise over each batch's padding too (published: true); the noise inside a "
                           "trial is the same either way, but smoothing carries the padding's into its last bins")


class TrainConfig(Section):
    seed: int = 10
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    num_training_batches: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=1)
    days_per_batch: int = Field(4, ge=1)
    must_include_days: list[int] = Field(default_factory=list)
    length_bucketing: bool = Field(False, description="draw each batch's trials at one length quantile: less padding, "
                                   "but less learnt per batch (benchmarks/accuracy.py); length_chunks saves padding "
                                   "without that cost")
    bucket_mix: float = Field(0.0, ge=0, le=1, description="with length_bucketing: the chance that a batch is drawn "
                              "without it (keeps 1 - bucket_mix of its padding saving)")
    bucket_width: float = Field(1.5, ge=1, description="with length_bucketing: each day's n trials come from a window "
                                "of bucket_width * n neighbours in length order (wider: more mixing, more padding)")
    packed: bool | Literal["auto"] = Field(
        "auto", description="run the GRUs on each trial's real steps only (b2txt.models.packed_gru): the padded "
                            "batch's step without computing its padding. auto: on the CPU, whose time goes with "
                            "multiply-adds; off on GPUs (cuDNN's padded GRU is fast) and TPUs (static shapes)")
    length_chunks: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="split each batch into this many parts by trial length, each padded only to its own "
                            "longest trial, their gradients summed: the whole batch's gradient (accuracy unchanged) "
                            "with less padding. auto: 1 (packed training has no padding to save; GPUs and TPUs "
                            "spend their time on sequential steps, which each part adds); 4 on the CPU unpacked")
    trial_draw: Literal["even", "published"] = Field(
        "even", description="even: batch_size // days_per_batch distinct trials per day | published: ceil(batch_size / "
                            "days_per_batch) per day with replacement, the extra ones dropped from random days")
    ctc_zero_infinity: bool = Field(True, description="CTC: an impossible alignment adds 0 instead of inf (published: false)")
    fused_adamw: bool = Field(False, description="torch's fused AdamW kernel (published: true; CPU and CUDA only)")
    feature_subset: list[Annotated[int, Field(ge=0, le=511)]] | None = Field(
        None, min_length=1, description="feature indices to use, each once (default: all 512)")
    holdout_sessions: list[int | str] = Field(
        default_factory=lambda: [-1], description="sessions left out of training (names or indices, -1 = last), e.g. for calibrate")
    adversarial_weight: float = Field(0.5, ge=0, description="triple: weight of the noisy-head CTC term")
    lr_scheduler_type: Literal["cosine", "linear"] = "cosine"
    lr_max: float = Field(0.005, gt=0)
    lr_min: float = Field(0.0001, ge=0)
    lr_decay_steps: int = Field(400, ge=1)
    lr_warmup_steps: int = Field(50, ge=0)
    lr_max_day: float = Field(0.005, gt=0)
    lr_min_day: float = Field(0.0001, ge=0)
    lr_decay_steps_day: int = Field(400, ge=1)
    lr_warmup_steps_day: int = Field(50, ge=0)
    beta0: float = 0.9
    beta1: float = 0.999
    epsilon: float = 0.1
    weight_decay: float = Field(0.001, ge=0)
    weight_decay_day: float = Field(0.0, ge=0)
    grad_norm_clip_value: float = Field(10.0, gt=0)
    batches_per_train_log: int = Field(50, ge=1)
    batches_per_val_step: int = Field(100, ge=1)
    early_stopping_val_steps: int | None = Field(None, ge=1)
    batches_per_checkpoint: int = Field(100, ge=1, description="resume checkpoint interval")
    xla_pad_multiple: int = Field(64, ge=1, description="xla: pad batch lengths to a multiple (static shapes)")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights (decay per batch, warmed "
                                      "up as min(decay, (1+n)/(10+n))); it is validated and saved (None: off)")
    amp: Literal["auto", "bf16", "off"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, xla")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores given)")

    @model_validator(mode="after")
    def _packed_not_on_xla(self) -> "TrainConfig":
        if self.packed is True and self.device == "xla":
            raise ValueError("packed: XLA needs static shapes; use packed: false (or auto) with device: xla")
        return self

    @model_validator(mode="after")
    def _subset_once(self) -> "TrainConfig":
        if self.feature_subset is not None and len(set(self.feature_subset)) != len(self.feature_subset):
            twice = sorted({i for i in self.feature_subset if self.feature_subset.count(i) > 1})
            raise ValueError(f"feature_subset: index(es) {twice[:10]} listed more than once")
        return self


class CalibrateConfig(Section):
    """Rapid calibration: fit a new session's day layer from its first N labelled sentences."""

    enabled: bool = True
    session: int | str = Field(-1, description="the held-out session (name or index into all sessions)")
    n_sentences: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 10, 25, 50], min_length=1)
    steps: int = Field(60, ge=0)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(0.001, gt=0)
    fit: Literal["day", "all"] = Field("day", description="day: only the new day layer; all: the whole model")
    seed: int = 0


class TTATransform(Section):
    """One fixed input transform of test-time augmentation; ``{}`` is the identity. Applied in
    this order: time shift, noise, smoothing (the model's own kernel unless ``smooth_std``)."""

    shift: int = Field(0, description="bins: > 0 delays the trial (zeros before, its last bins dropped), "
                                      "< 0 advances it (first bins dropped, zeros after); the length stays")
    smooth_std: float | None = Field(None, gt=0, description="smooth with this Gaussian sd (bins) instead of "
                                                              "the model's own")
    noise_seed: int | None = Field(None, description="add the model's training noise (white noise, constant "
                                                     "offset, ...), drawn per trial from this seed (None: none)")
    noise_scale: float = Field(1.0, ge=0, description="multiplies the training noise's standard deviations")


class InferConfig(Section):
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["val", "test"])
    batch_size: int = Field(32, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, xla (the logits do not depend on it)")
    tta: list[TTATransform] = Field(
        default_factory=list, description="test-time augmentation: run every trial under each transform and "
                                          "average the log-probabilities like an ensemble ([]: plain inference)")


#: An ensemble member's name: part of stage names and paths (results/<run>/members/<name>/).
MEMBER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]*$"


class EnsembleMember(Section):
    name: str = Field(pattern=MEMBER_NAME_PATTERN, description="stage names train_<name>, infer_<name>; "
                                                               "results/<run>/members/<name>/")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the train section for this "
                                                                    "member (merged key by key), e.g. {seed: 11}")

    def train_config(self, base: "TrainConfig") -> "TrainConfig":
        return TrainConfig.model_validate(merge(base.model_dump(mode="json"), self.train))


class EnsembleConfig(Section):
    """Several models trained and run alike, their logits averaged per frame (``b2txt ensemble``).
    No members: the single model of the train section (the default run)."""

    members: list[EnsembleMember] = Field(default_factory=list, description="models of the ensemble; each is "
                                                                           "trained and run on every split")
    weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="one weight per member (or per --logits file of `b2txt ensemble`) for the average of "
                          "log-probabilities (None: equal)")

    @model_validator(mode="after")
    def _check(self) -> "EnsembleConfig":
        names = [m.name for m in self.members]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"members: names must be unique, {dup} repeat")
        if self.weights is not None and self.members:  # without members: weights of `b2txt ensemble`'s files
            if len(self.weights) != len(self.members):
                raise ValueError(f"weights: {len(self.weights)} weight(s) for {len(self.members)} member(s)")
            if self.members and sum(self.weights) <= 0:
                raise ValueError("weights: not all zero")
        return self

    def member(self, name: str) -> EnsembleMember:
        for m in self.members:
            if m.name == name:
                return m
        raise ConfigError(f"ensemble.members: no member named {name!r} (members: {[m.name for m in self.members]})")


class LMConfig(Section):
    """n-gram language models and decoding graphs (REFERENCE §4), built by ``b2txt lm …``."""

    source: Literal["build", "dir", "arpa"] = Field(
        "build", description="build: text -> n-gram -> graph here | dir: decode with the graph directory lm.dir | "
                             "arpa: import the ARPA file lm.arpa (made by any tool), then its binary and graph")
    dir: str | None = Field(None, description="with source dir: a graph directory (TLG.fst + words.txt), "
                                              "e.g. a published one unpacked by `b2txt download --dataset lm`")
    arpa: str | None = Field(
        None, description="with source arpa: an ARPA n-gram LM made by any tool (SRILM, KenLM, a lab's or a published "
                          "one; .gz/.bz2/.xz read as such), checked and lower-cased into results/<run>/lm/imported/")
    text: str | None = Field(None, description="LM training text, one sentence per line (default: the corpus section's sources)")
    exclude_splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["val", "test"],
        description="sentences of these splits in data.dir are removed from the LM text (no evaluation leakage)")
    add_lexicon_words: bool = Field(True, description="every lexicon word once, so the vocabulary is the whole lexicon")
    orders: list[Annotated[int, Field(ge=1, le=9)]] = Field(default_factory=lambda: [1, 3], min_length=1)
    prune: dict[int, list[Annotated[int, Field(ge=0)]]] = Field(
        default_factory=dict, description="lmplz --prune thresholds per order, e.g. {5: [0, 0, 1, 1, 2]}")
    tool: Literal["kenlm", "srilm"] = Field(
        "kenlm", description="the ARPA estimator: kenlm (lmplz) | srilm (ngram-count on PATH); lm.bin comes from "
                             "KenLM's build_binary in both")
    memory: str = Field("20%", description="lmplz -S (never the default 80 % of RAM)")
    kenlm_dir: str = Field("~/.cache/b2txt/kenlm", description="where scripts/build_kenlm.sh puts lmplz/build_binary "
                                                              "(source build and arpa)")
    decode_order: int = Field(3, ge=1, le=9, description="the order the decode stage uses (must be in orders)")
    source_files: list[str] | None = Field(None, description="fortune files for the LM text (default: corpus.files)")
    sil_prob: float | None = Field(None, gt=0, lt=1, description="optional SIL after words: None free; p: costs -ln p / -ln(1-p)")

    @model_validator(mode="after")
    def _check(self) -> "LMConfig":
        if self.source == "dir" and not self.dir:
            raise ValueError("source dir needs lm.dir (a directory holding TLG.fst and words.txt)")
        if self.source == "arpa" and not self.arpa:
            raise ValueError("source arpa needs lm.arpa (the path of an ARPA language model file)")
        if self.decode_order not in self.orders:
            raise ValueError(f"decode_order {self.decode_order} is not in orders {self.orders}")
        for order, thresholds in self.prune.items():
            if len(thresholds) != order:
                raise ValueError(f"prune[{order}] needs {order} thresholds, got {len(thresholds)}")
        return self


class DecodeConfig(Section):
    """Language-model decoding of phoneme logits (REFERENCE §4); the same meaning in both decoders.

    Logits go through log-softmax per frame; the blank's log-probability is lowered by
    ``log(blank_penalty)``; frames whose blank probability is at least ``blank_skip_threshold``
    (when below 1) are skipped; the search score is
    ``acoustic_scale · acoustic + ngram + length_penalty · words`` (natural logs).
    """

    decoder: Literal["wfst", "lexicon"] = "wfst"
    acoustic_scale: float = Field(1.5, gt=0, description="the published model's sharper logits: 0.325 (paper preset)")
    blank_penalty: float = Field(90.0, gt=0, description="blank log-prob lowered by log(blank_penalty)")
    blank_skip_threshold: float = Field(1.0, gt=0, le=1)
    beam: float = Field(17.0, gt=0)
    max_active: int = Field(7000, ge=1, description="wfst: max active states; lexicon: beam size")
    min_active: int = Field(200, ge=0, description="wfst only")
    lattice_beam: float = Field(8.0, gt=0, description="wfst only: lattice pruning beam for the n-best")
    nbest_beam: float | None = Field(
        12.0, gt=0, description="wfst: search beam of the n-best lattice pass (it has no max_active); None: beam")
    nbest: int = Field(100, ge=1)
    partial_beam: float = Field(
        12.0, gt=0, description="wfst streaming partials: search beam (min_active 0); the final n-best "
        "of a streamed trial is searched with the options above, so partials are previews")
    partial_max_active: int = Field(2000, ge=1, description="wfst streaming partials: max active states")
    length_penalty: float = Field(0.0, description="added to a candidate's score per word")
    rescore_unpruned: bool = Field(False, description="wfst: rescore n-best with G_no_prune.fst / G.fst when present")
    beam_size_token: int = Field(10, ge=1, description="lexicon: tokens considered per frame")
    augment_top: int = Field(20, ge=0, description="n-best augmentation among the top N candidates (0: off)")
    augment_penalty: float = Field(0.01, ge=0, description="augmented candidates: mean score of the pair minus this share")
    workers: int | None = Field(None, ge=1, description="decoding processes (default: all cores)")


class RescoreConfig(Section):
    """Large-language-model rescoring of the n-best list (REFERENCE §4)."""

    enabled: bool = False
    model: str = Field("facebook/opt-6.7b", description="any transformers causal LM: a Hub name or a local directory")
    alpha: float = Field(0.55, ge=0, le=1)
    context: str = Field("", description="text prepended before scoring (contextual decoding)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    batch_size: int = Field(16, ge=1)
    unsure_margin: float | None = Field(
        None, ge=0, description="rescore only the trials whose n-best margin (best minus second-best search score, "
                                "natural-log decoder units, without the LLM) is below this (None or .inf: every trial; "
                                "0: none)")


class ServerConfig(Section):
    """Evaluation through the Redis LM server (`b2txt evaluate`)."""

    sessions: int | None = Field(None, ge=0, description="concurrent client sessions (None: 2 x workers; 0: published single client)")
    timeout: float = Field(60.0, gt=0, description="seconds to wait for a trial's answer before re-sending it")
    startup_timeout: float = Field(600.0, gt=0)
    max_attempts: int = Field(5, ge=1)
    max_restarts: int = Field(5, ge=0)
    chunk_frames: int | None = Field(None, ge=1, description="send logits in chunks of this many frames (None: one)")
    group_workers: int = Field(0, ge=0, description="consumer-group mode: local lm-worker processes sharing whole "
                               "trials through a Redis stream (0: the session mode above)")
    claim_idle_ms: int = Field(60_000, ge=100, description="consumer-group mode: a trial pending this long on a "
                               "worker (e.g. a dead one) is claimed by another (XAUTOCLAIM)")
    max_deliveries: int = Field(5, ge=1, description="consumer-group mode: hand one trial to workers at most this "
                                "often, then fail it (a trial that kills every worker)")


class RuleResources(Section):
    """What one job of a rule family asks for: Snakemake ``threads:``/``resources:``, Slurm ``sbatch`` options.

    Locally ``cpus`` is capped at ``--cores`` and the rest is ignored (unless ``--resources`` limits
    it); with ``--profile profiles/slurm`` each job is an ``sbatch`` with ``--cpus-per-task=cpus``,
    ``--mem=mem_mb``, ``-t runtime``, ``--gpus=gpus`` (when > 0) and ``-p partition`` (when set).
    """

    cpus: int = Field(1, ge=1, description="threads of the rule (Slurm --cpus-per-task); locally at most --cores")
    mem_mb: int = Field(4000, ge=1, description="memory in MB (Slurm --mem)")
    runtime: int = Field(60, ge=1, description="wall-clock limit in minutes (Slurm -t)")
    gpus: int = Field(0, ge=0, description="GPUs (Slurm --gpus); train: > 1 runs `b2txt train --nproc gpus` (DDP)")
    partition: str | None = Field(None, description="Slurm partition (null: --default-resources slurm_partition, "
                                                    "else the cluster's default)")
    slurm_extra: str | None = Field(None, description="more sbatch options, e.g. '--qos=long --constraint=a100'")


class ResourcesConfig(Section):
    """Per rule family resources (``workflow/rules/common.smk``: ``rule_threads``/``rule_resources``)."""

    default: RuleResources = Field(
        RuleResources(), description="corpus, simulate, download, validate, preprocess, score, score_words, "
                                     "kenlm_tools, lm_text")
    train: RuleResources = Field(RuleResources(cpus=8, mem_mb=16000, runtime=720), description="train")
    calibrate: RuleResources = Field(RuleResources(cpus=4, mem_mb=8000, runtime=60), description="calibrate")
    infer: RuleResources = Field(RuleResources(cpus=4, mem_mb=8000, runtime=60), description="infer (per split)")
    lm: RuleResources = Field(RuleResources(cpus=2, mem_mb=8000, runtime=120),
                              description="lm_ngram, lm_graph (per order), lm_import: memory grows with the order and "
                                          "vocabulary")
    decode: RuleResources = Field(RuleResources(cpus=8, mem_mb=8000, runtime=120),
                                  description="decode, evaluate (per split; evaluate runs redis-server and the LM "
                                              "server inside its job)")
    figures: RuleResources = Field(RuleResources(runtime=30), description="figures")


class PipelineConfig(Section):
    run: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="results go to results/<run>/")
    data: DataConfig = DataConfig()
    corpus: CorpusConfig = CorpusConfig()
    simulate: SimulateConfig = SimulateConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    lm: LMConfig = LMConfig()
    decode: DecodeConfig = DecodeConfig()
    rescore: RescoreConfig = RescoreConfig()
    server: ServerConfig = ServerConfig()
    download: DownloadConfig = DownloadConfig()
    model: ModelSourceConfig = ModelSourceConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @model_validator(mode="after")
    def _ensemble_of_trained_models(self) -> "PipelineConfig":
        """Each member's train section is valid, and all members make frames alike (same patch and
        stride), so their logits can be averaged frame by frame."""
        members = self.ensemble.members
        if members and self.model.source == "pretrained":
            raise ValueError("ensemble.members: an ensemble trains its members; it needs model.source train")
        patches = {}
        for m in members:
            try:
                t = m.train_config(self.train)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"ensemble member {m.name!r}: train.{'.'.join(map(str, first['loc']))}: "
                                 f"{first['msg']}") from None
            patches[m.name] = (t.model.patch_size, t.model.patch_stride)
        if len(set(patches.values())) > 1:
            raise ValueError(f"ensemble.members: (patch_size, patch_stride) differ {patches}: their frames would "
                             "not line up")
        return self

    @model_validator(mode="after")
    def _separate_downloads(self) -> "PipelineConfig":
        """Directories that different stages (or DVC's pins) write must not nest: DVC refuses overlapping
        outputs, and a stage's output directory is emptied before it reruns."""
        if self.model.source != "pretrained":
            return self
        dirs = {"model.dir": self.model.dir, "download.archive_dir": self.download.archive_dir}
        if self.data.source != "simulated":
            dirs["data.dir"] = self.data.dir
        names = list(dirs)
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                a, b = Path(dirs[x]), Path(dirs[y])
                if a == b or a in b.parents or b in a.parents:
                    raise ValueError(f"{x} ({a}) and {y} ({b}) must not contain each other: "
                                     "each is written by a stage of its own")
        return self

def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"  - {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any] | None, source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge (mappings merge key by key; anything else is replaced), as Snakemake does."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from a file; any problem is one :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw or {}


def load_config(paths: str | Path | list | tuple | None) -> PipelineConfig:
    """Load and merge config files in order (later ones override); ``None`` gives the defaults."""
    if paths is None:
        return PipelineConfig()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict[str, Any] = {}
    for path in paths:
        raw = merge(raw, read_yaml(path))
    return parse_config(raw, " + ".join(str(p) for p in paths))


def config_to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def json_schema() -> dict[str, Any]:
    schema = PipelineConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "b2txt pipeline configuration (generated by `b2txt config-schema`)"
    return schema


def section_config_file(raw: dict[str, Any], directory: str | Path, *sections: str) -> str:
    """Validate a (possibly overridden) config; store the named sections in a file named by content.

    Snakemake merges ``--config`` overrides into its config dict, but stage commands read files:
    each rule passes the file holding just the sections its command reads (a dotted name,
    ``ensemble.members``, picks one key of a section). As a rule param the
    path changes exactly when those sections change (Snakemake's params trigger re-runs only
    then), and an existing file is never rewritten (no spurious mtime changes).
    """
    cfg = parse_config(raw, "snakemake config").model_dump(mode="json")
    picked: dict[str, Any] = {}
    for name in sections:  # a section, or a part of one: "ensemble.members"
        *parents, last = name.split(".")
        src, dst = cfg, picked
        for key in parents:
            src, dst = src[key], dst.setdefault(key, {})
        dst[last] = src[last]
    text = yaml.safe_dump(picked, sort_keys=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = Path(directory) / f"{'-'.join(sections)}-{digest}.yaml"
    if not path.exists():
        write_text_atomic(path, text)
    return str(path)
