"""Figures of the pipeline's results and of the paper (PDF with TrueType fonts for journals, and PNG).

One plotting module serves two sources. Our run writes trial tables (``scores/<split>/trials.csv``
with phoneme ``edits``/``ref_len``, ``wer_trials.csv`` with ``word_edits``/``ref_words``) and
logits files; :mod:`b2txt.paper` turns the paper's Dryad pickles into the same tables, so the
figure-2 panels below are drawn by the same code from either.

- ``training_curve``: training CTC loss and validation PER against the training step (two panels).
- ``per_session_per``: validation PER per session, sessions as evenly spaced categories
  labelled with their post-implant day, with 95 % bootstrap intervals over trials.
- ``figure2``: an example trial's logits (lines, image with phoneme names, softmax image) and
  the aggregate phoneme and word error rates per session and vocabulary (50 words red, larger
  vocabularies blue) with 95 % bootstrap intervals, y axis 0–20 % (REFERENCE §6).
- ``figure4``: the personal-use figure: cumulative hours and sentences, the correctness pie,
  rating groups per day and words per minute per day.
- ``calibration_curve``: held-out session PER against the number of calibration sentences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .evaluation.error_rates import bootstrap_ci  # noqa: E402
from .ground.errors import B2txtError  # noqa: E402
from .ground.fileio import atomic_dir, atomic_file  # noqa: E402

matplotlib.rcParams["pdf.fonttype"] = 42  # TrueType, editable text in journals' tools
matplotlib.rcParams["ps.fonttype"] = 42

#: Seconds per logit frame: 20 ms bins, patches taken every 4 bins (REFERENCE §3).
FRAME_S = 0.08
#: Figure 2's colours: the 50-word vocabulary red, every larger vocabulary blue.
RED, BLUE = "#d62728", "#1f77b4"
RATING_COLORS = {"100% correct": "#2ca02c", "mostly correct": "#e6b800", "incorrect": RED,
                 "blank trial": "0.4", "no rating": "0.6"}
def class_names() -> tuple[str, ...]:
    """Names of the logit columns in our model order (blank, AA … ZH, SIL)."""
    from .ground.phonemes import CLASSES

    return ("blank", *CLASSES[1:])


def save(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("pdf", "png"):
        path = out_dir / f"{name}.{ext}"
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def save_table(table: pd.DataFrame, out_dir: Path, name: str) -> Path:
    """The table behind a figure, as CSV next to it (so numbers can be checked, not read off plots)."""
    path = out_dir / f"{name}.csv"
    with atomic_file(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return path


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise B2txtError(f"{path}: not found")
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def _require(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise B2txtError(f"{what}: column(s) {missing} missing")


def _clean_axes(ax: plt.Axes) -> None:
    ax.spines[["top", "right"]].set_visible(False)


# ----------------------------------------------------------------------------- training and calibration

def training_curve(metrics: pd.DataFrame) -> plt.Figure:
    fig, (ax_loss, ax_per) = plt.subplots(1, 2, figsize=(7, 2.8))
    train = metrics.dropna(subset=["train_loss"])
    ax_loss.plot(train["step"], train["train_loss"], color="tab:gray", marker="o", ms=2)
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("training CTC loss (per trial)")
    val = metrics.dropna(subset=["val_PER"])
    ax_per.plot(val["step"], 100 * val["val_PER"], color="tab:blue", marker="s", ms=3)
    ax_per.set_xlabel("training step")
    ax_per.set_ylabel("validation PER (%)")
    ax_per.set_ylim(bottom=0)
    for ax in (ax_loss, ax_per):
        _clean_axes(ax)
    fig.tight_layout()
    return fig


def per_session_per(trials: pd.DataFrame, seed: int = 0) -> plt.Figure:
    rows = []
    for session, g in trials.groupby("session", sort=True):
        lo, hi = bootstrap_ci(g["edits"].to_numpy(), g["ref_len"].to_numpy(), seed=seed)
        rows.append((session, int(g["post_implant_day"].iloc[0]), g["edits"].sum() / g["ref_len"].sum(), lo, hi))
    df = pd.DataFrame(rows, columns=["session", "day", "per", "lo", "hi"]).sort_values("session")
    x = range(len(df))
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(df) + 1.5), 3.2))
    ax.errorbar(x, 100 * df["per"], yerr=[100 * (df["per"] - df["lo"]), 100 * (df["hi"] - df["per"])],
                fmt="o", color="tab:blue", capsize=3, ms=4)
    ax.set_xticks(list(x))
    ax.set_xticklabels([str(d) if d >= 0 else s for d, s in zip(df["day"], df["session"])], rotation=0)
    ax.set_xlabel("post-implant day")
    ax.set_ylabel("phoneme error rate (%)")
    ax.set_ylim(0, max(20.0, float(100 * df["hi"].max()) * 1.1))
    _clean_axes(ax)
    ax.set_title("Validation PER per session (95 % CI)", fontsize=9)
    fig.tight_layout()
    return fig


def calibration_curve(table: pd.DataFrame) -> plt.Figure:
    """Held-out session PER against the number of calibration sentences."""
    fig, ax = plt.subplots(figsize=(3.6, 3))
    ax.plot(table["n_sentences"], 100 * table["PER"], marker="o", color="tab:blue")
    ax.set_xlabel("calibration sentences")
    ax.set_ylabel("phoneme error rate (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"New session {table['session'].iloc[0]}", fontsize=9)
    _clean_axes(ax)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- figure 2 (both sources)

def vocabulary_of(trials: pd.DataFrame) -> pd.Series:
    """The series of figure 2: the paper's vocabulary, or for our run the 50-Word corpus vs the rest."""
    if "vocabulary" in trials.columns:
        return trials["vocabulary"].astype(str)
    corpus = trials["corpus"].astype(str) if "corpus" in trials.columns else pd.Series("", index=trials.index)
    return corpus.map(lambda c: "50-Word corpus" if c == "50-Word" else "other corpora")


def vocabulary_color(label: str) -> str:
    return RED if label.startswith("50") else BLUE


def error_rates(trials: pd.DataFrame, errors: str, length: str, metric: str, seed: int = 0,
                n_resamples: int = 10_000) -> pd.DataFrame:
    """Aggregate error rate (total errors / total length) and its bootstrap 95 % interval
    per session and vocabulary: the numbers behind figure 2's error-rate panels."""
    _require(trials, ["session", "post_implant_day", errors, length], f"{metric} trial table")
    t = trials.assign(vocabulary=vocabulary_of(trials))
    rows = []
    for (session, vocab), g in t.groupby(["session", "vocabulary"], sort=True):
        e, n = g[errors].to_numpy(dtype=float), g[length].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(e, n, n_resamples=n_resamples, seed=seed)
        rows.append({"metric": metric, "session": session, "post_implant_day": int(g["post_implant_day"].iloc[0]),
                     "vocabulary": vocab, "n_trials": len(g), "errors": int(e.sum()), "length": int(n.sum()),
                     "rate": e.sum() / max(n.sum(), 1e-12), "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows).sort_values(["post_implant_day", "session", "vocabulary"], ignore_index=True)


def error_rate_panel(ax: plt.Axes, rates: pd.DataFrame, ylabel: str) -> None:
    """Rates with 95 % intervals; sessions as evenly spaced categories labelled by day."""
    sessions = rates.drop_duplicates("session")[["session", "post_implant_day"]]
    position = {s: i for i, s in enumerate(sessions["session"])}
    vocabularies = sorted(rates["vocabulary"].unique(), key=lambda v: (not v.startswith("50"), v))
    offsets = np.linspace(-0.15, 0.15, len(vocabularies)) if len(vocabularies) > 1 else [0.0]
    for vocab, dx in zip(vocabularies, offsets):
        r = rates[rates["vocabulary"] == vocab]
        x = np.array([position[s] for s in r["session"]]) + dx
        ax.errorbar(x, 100 * r["rate"], yerr=[100 * (r["rate"] - r["ci_low"]), 100 * (r["ci_high"] - r["rate"])],
                    fmt="o", ms=3.5, capsize=2, lw=1, color=vocabulary_color(vocab), label=vocab)
    ax.set_xticks(range(len(sessions)))
    ax.set_xticklabels([str(d) if d >= 0 else s for s, d in zip(sessions["session"], sessions["post_implant_day"])],
                       rotation=90 if len(sessions) > 12 else 0, fontsize=7)
    ax.set_xlim(-0.6, len(sessions) - 0.4)
    top = float(100 * rates["ci_high"].max()) if len(rates) else 0.0
    ax.set_ylim(0, 20 if not np.isfinite(top) or top <= 20 else top * 1.05)
    ax.set_xlabel("post-implant day")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=7)
    _clean_axes(ax)


@dataclass
class ExampleTrial:
    """One trial's logits (model column order) and, when known, its sentences for the title."""

    logits: np.ndarray
    reference: str = ""
    decoded: str = ""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def logits_panels(axes: Sequence[plt.Axes], example: ExampleTrial, frame_s: float = FRAME_S) -> None:
    """The example trial three ways: logits as lines, as an image with phoneme names, after softmax."""
    x = np.asarray(example.logits, dtype=float)
    names = class_names()
    t_end = len(x) * frame_s
    ax_line, ax_img, ax_prob = axes
    time = np.arange(len(x)) * frame_s
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, x.shape[1]))
    for k in range(x.shape[1]):  # blank grey, SIL black, phonemes in colour
        color = "0.6" if k == 0 else "k" if k == x.shape[1] - 1 else colors[k]
        ax_line.plot(time, x[:, k], lw=0.7, color=color)
    ax_line.set_ylabel("logit")
    ax_line.set_xlim(0, t_end)
    title = " | ".join(s for s in (f"cue: {example.reference}" if example.reference else "",
                                   f"decoded: {example.decoded}" if example.decoded else "") if s)
    if title:
        ax_line.set_title(title, fontsize=7, loc="left")
    for ax, values, label in ((ax_img, x, "logit"), (ax_prob, softmax(x), "probability")):
        image = ax.imshow(values.T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                          extent=(0, t_end, -0.5, x.shape[1] - 0.5), vmin=0 if label == "probability" else None,
                          vmax=1 if label == "probability" else None)
        ax.set_yticks(range(x.shape[1]))
        ax.set_yticklabels(names, fontsize=4.5)
        ax.tick_params(axis="y", length=1.5, pad=1)
        # an inset colour bar keeps the three panels' time axes aligned
        ax.figure.colorbar(image, cax=ax.inset_axes((1.005, 0.0, 0.008, 1.0)), label=label)
    ax_prob.set_xlabel("time (s)")
    for ax in axes:
        _clean_axes(ax)


def figure2(phoneme_trials: pd.DataFrame, word_trials: pd.DataFrame | None = None,
            example: ExampleTrial | None = None, seed: int = 0) -> tuple[plt.Figure, pd.DataFrame]:
    """Figure 2 (REFERENCE §6) from trial tables; returns the figure and the rates it shows."""
    rates = [error_rates(phoneme_trials, "edits", "ref_len", "PER", seed)]
    if word_trials is not None and len(word_trials):
        rates.append(error_rates(word_trials, "word_edits", "ref_words", "WER", seed))
    table = pd.concat(rates, ignore_index=True)
    n_sessions = table["session"].nunique()
    width = max(7.0, 0.28 * n_sessions * len(rates) + 2)
    rows = [1.0, 2.0, 2.0, 1.4] if example is not None else [1.0]
    fig = plt.figure(figsize=(width, 2.6 * sum(rows) / (1.4 if example is not None else 1.0)))
    grid = fig.add_gridspec(len(rows), len(rates), height_ratios=rows)
    if example is not None:
        logits_panels([fig.add_subplot(grid[i, :]) for i in range(3)], example)
    panels = (("PER", "phoneme error rate (%)"), ("WER", "word error rate (%)"))[:len(rates)]
    for j, (metric, ylabel) in enumerate(panels):
        error_rate_panel(fig.add_subplot(grid[len(rows) - 1, j]), table[table["metric"] == metric], ylabel)
    fig.tight_layout()
    return fig, table


# ----------------------------------------------------------------------------- figure 4 (paper)

def figure4(personal) -> tuple[plt.Figure, dict[str, pd.DataFrame]]:
    """Figure 4 (REFERENCE §6) from :class:`b2txt.paper.PersonalUse`; returns its tables too."""
    from .paper import GROUP_ORDER, pie_table, rating_table

    usage, ratings, pie = personal.usage, rating_table(personal.trials), pie_table(personal.trials)
    fig = plt.figure(figsize=(10, 8))
    grid = fig.add_gridspec(3, 3, height_ratios=[1.1, 1.2, 0.8])
    ax_hours, ax_sent, ax_pie = (fig.add_subplot(grid[0, j]) for j in range(3))
    ax_hours.plot(usage["post_implant_day"], usage["cumulative_hours"], "k.-", lw=1)
    ax_hours.set_ylabel("cumulative use (hours)")
    ax_sent.plot(usage["post_implant_day"], usage["cumulative_sentences"], "k.-", lw=1)
    ax_sent.set_ylabel("cumulative sentences")
    for ax in (ax_hours, ax_sent):
        ax.set_xlabel("post-implant day")
        ax.set_ylim(bottom=0)
        _clean_axes(ax)
    shown = pie[pie["n_trials"] > 0]
    if len(shown):
        ax_pie.pie(shown["n_trials"], colors=[RATING_COLORS[g] for g in shown["group"]], startangle=90,
                   counterclock=False, textprops={"fontsize": 8}, wedgeprops={"linewidth": 0.5, "edgecolor": "white"},
                   labels=[f"{g}\n{n:,} ({100 * n / shown['n_trials'].sum():.0f} %)"
                           for g, n in zip(shown["group"], shown["n_trials"])])
    ax_pie.text(0.5, -0.12, f"rated sentences: {int(pie['n_trials'].sum()):,}", transform=ax_pie.transAxes,
                ha="center", fontsize=9)
    ax_pie.axis("equal")
    ax_rating = fig.add_subplot(grid[1, :])
    for group in GROUP_ORDER:
        ax_rating.plot(ratings["post_implant_day"], ratings[f"pct_{group}"], ".-", lw=1, ms=4,
                       color=RATING_COLORS[group], label=group)
    ax_rating.set_ylabel("sentences (%)")
    ax_rating.set_ylim(0, 100)
    ax_rating.legend(frameon=False, fontsize=8, ncol=len(GROUP_ORDER), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax_wpm = fig.add_subplot(grid[2, :], sharex=ax_rating)
    ax_wpm.plot(ratings["post_implant_day"], ratings["mean_wpm"], "k.-", lw=1, ms=4)
    ax_wpm.set_ylabel("words per minute")
    ax_wpm.set_xlabel("post-implant day")
    ax_wpm.set_ylim(bottom=0)
    for ax in (ax_rating, ax_wpm):
        ax.grid(axis="y", alpha=0.3)
        _clean_axes(ax)
    fig.tight_layout()
    return fig, {"figure4_usage": usage, "figure4_ratings": ratings, "figure4_pie": pie}


# ----------------------------------------------------------------------------- the two entry points

def make_paper_figures(copy_task: str | Path | None, personal_use: str | Path | None, out_dir: str | Path,
                       seed: int = 0, example_trial: int = 0) -> list[Path]:
    """Figures 2 and 4 of the paper from its Dryad pickles, with the tables behind them."""

    if copy_task is None and personal_use is None:
        raise B2txtError("give --copy-task, --personal-use or both")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:  # the directory whole, or the old one as it was
        paths = _paper_figures(copy_task, personal_use, tmp, seed, example_trial)
    return [out_dir / p.relative_to(tmp) for p in paths]


def _paper_figures(copy_task: str | Path | None, personal_use: str | Path | None, out_dir: Path,
                   seed: int, example_trial: int) -> list[Path]:
    from .paper import read_copy_task, read_personal_use

    paths: list[Path] = []
    if copy_task is not None:
        data = read_copy_task(copy_task)
        if not 0 <= example_trial < len(data.logits):
            raise B2txtError(f"{copy_task}: example trial {example_trial} out of range (0..{len(data.logits) - 1})")
        row = data.phoneme_trials.iloc[example_trial]
        example = ExampleTrial(data.logits[example_trial], row["reference"], row["decoded"])
        fig, rates = figure2(data.phoneme_trials, data.word_trials, example, seed)
        paths += save(fig, out_dir, "figure2")
        paths += [save_table(rates, out_dir, "figure2_error_rates"),
                  save_table(data.phoneme_trials, out_dir, "copy_task_trials"),
                  save_table(data.word_trials, out_dir, "copy_task_wer_trials")]
    if personal_use is not None:
        personal = read_personal_use(personal_use)
        fig, tables = figure4(personal)
        paths += save(fig, out_dir, "figure4")
        paths += [save_table(t, out_dir, name) for name, t in tables.items()]
        paths.append(save_table(personal.trials, out_dir, "personal_use_trials"))
    return paths


def example_from_logits(path: str | Path, index: int = 0) -> ExampleTrial:
    """Trial ``index`` of a logits file, with its reference and greedy-decoded phonemes for the title."""
    from .data.logits import greedy_decode, read_logits
    from .ground.phonemes import ids_to_string

    trials = read_logits(path)
    if not 0 <= index < len(trials):
        raise B2txtError(f"{path}: example trial {index} out of range (0..{len(trials) - 1})")
    t = trials[index]
    reference = ids_to_string(t.labels.tolist()) if t.labels is not None else ""
    return ExampleTrial(t.logits, reference, ids_to_string(greedy_decode(t.logits)))


def make_pipeline_figures(model_dir: str | Path, scores_dir: str | Path, out_dir: str | Path,
                          seed: int = 0, logits: str | Path | None = None,
                          calibration: str | Path | None = None, example_trial: int = 0) -> list[Path]:
    """Our run's figures: training curve, PER per session and figure 2's panels (always); the
    example trial's logits when ``logits`` is given, WER panels when ``scores_dir`` holds
    ``wer_trials.csv``, the calibration curve when ``calibration`` (a calibration.csv) is given."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:  # the directory whole, or the old one as it was
        paths = _pipeline_figures(model_dir, Path(scores_dir), tmp, seed, logits, calibration, example_trial)
    return [out_dir / p.relative_to(tmp) for p in paths]


def _pipeline_figures(model_dir: str | Path, scores_dir: Path, out_dir: Path, seed: int,
                      logits: str | Path | None, calibration: str | Path | None, example_trial: int) -> list[Path]:
    trials = _read_csv(scores_dir / "trials.csv")
    paths = save(training_curve(_read_csv(Path(model_dir) / "metrics.csv")), out_dir, "training_curve")
    paths += save(per_session_per(trials, seed), out_dir, "per_session_per")
    wer_path = scores_dir / "wer_trials.csv"
    word_trials = _read_csv(wer_path) if wer_path.is_file() else None
    example = example_from_logits(logits, example_trial) if logits is not None else None
    fig, rates = figure2(trials, word_trials, example, seed)
    paths += save(fig, out_dir, "figure2")
    paths.append(save_table(rates, out_dir, "error_rates"))
    if calibration is not None:
        paths += save(calibration_curve(_read_csv(Path(calibration))), out_dir, "calibration_curve")
    return paths
