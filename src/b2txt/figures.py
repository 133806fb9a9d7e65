"""Figures of the pipeline's results (PDF with TrueType fonts for journals, and PNG).

- ``training_curve``: training CTC loss and validation PER against the training step (two panels).
- ``per_session_per``: validation PER per session, sessions as evenly spaced categories
  labelled with their post-implant day, with 95 % bootstrap intervals over trials.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .errors import B2txtError  # noqa: E402
from .evaluate import bootstrap_ci  # noqa: E402
from .fileio import atomic_file  # noqa: E402

matplotlib.rcParams["pdf.fonttype"] = 42  # TrueType, editable text in journals' tools
matplotlib.rcParams["ps.fonttype"] = 42


def save(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("pdf", "png"):
        path = out_dir / f"{name}.{ext}"
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise B2txtError(f"{path}: not found")
    return pd.read_csv(path)


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
        ax.spines[["top", "right"]].set_visible(False)
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
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("Validation PER per session (95 % CI)", fontsize=9)
    fig.tight_layout()
    return fig


def make_pipeline_figures(model_dir: str | Path, scores_dir: str | Path, out_dir: str | Path,
                          seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = save(training_curve(_read_csv(Path(model_dir) / "metrics.csv")), out_dir, "training_curve")
    paths += save(per_session_per(_read_csv(Path(scores_dir) / "trials.csv"), seed), out_dir, "per_session_per")
    return paths


def calibration_curve(table: pd.DataFrame) -> plt.Figure:
    """Held-out session PER against the number of calibration sentences."""
    fig, ax = plt.subplots(figsize=(3.6, 3))
    ax.plot(table["n_sentences"], 100 * table["PER"], marker="o", color="tab:blue")
    ax.set_xlabel("calibration sentences")
    ax.set_ylabel("phoneme error rate (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"New session {table['session'].iloc[0]}", fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig
