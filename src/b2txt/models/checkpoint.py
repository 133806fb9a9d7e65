"""Model directories: building models from config, the published checkpoint layout, safe loading.

Layout (the published one)::

    MODEL_DIR/checkpoint/best_checkpoint   torch.save dict: model_state_dict, optimizer_state_dict,
                                           scheduler_state_dict, val_PER, val_loss (+ step, b2txt)
    MODEL_DIR/checkpoint/args.yaml         the training arguments (published key names)
    MODEL_DIR/training_log

``args.yaml`` keeps the published keys (``model.n_units``, ``dataset.sessions``,
``dataset.data_transforms.smooth_kernel_std`` …), so a published model directory loads here
and ours loads in published tools; our additions live under keys the published code ignores
(``model.architecture``, ``model.triple``, ``b2txt``).

Checkpoints are read with ``torch.load(weights_only=True)``: no pickled code runs. The only
non-tensor globals allowed are numpy scalars and dtypes (a metric saved as ``np.float64``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..ground.config import MAX_LAYERS, MAX_PATCH, MAX_UNITS, ModelConfig, TrainConfig, read_yaml
from ..ground.errors import B2txtError
from ..ground.phonemes import N_CLASSES
from .decoders import N_FEATURES, GRUDecoder, TripleGRUDecoder
from .transforms import gaussian_kernel


def build_model(mcfg: ModelConfig, n_days: int, neural_dim: int = N_FEATURES) -> nn.Module:
    """A freshly initialised model of the configured architecture."""
    return (GRUDecoder if mcfg.architecture == "gru" else TripleGRUDecoder)(mcfg, n_days, neural_dim)


def model_args(m: ModelConfig, n_features: int) -> dict[str, Any]:
    """``args.yaml``'s ``model`` section (published key names) of a model config; our additions
    (``architecture``, ``triple``) live under keys the published code ignores.
    :func:`model_config_from_args` is its inverse."""
    model: dict[str, Any] = {
        "n_input_features": n_features, "n_units": m.n_units, "rnn_dropout": m.rnn_dropout,
        "rnn_trainable": True, "n_layers": m.n_layers, "patch_size": m.patch_size,
        "patch_stride": m.patch_stride,
        "input_network": {"n_input_layers": 1, "input_layer_sizes": [n_features], "input_trainable": True,
                          "input_layer_dropout": m.input_dropout},
        "architecture": m.architecture,
    }
    if m.architecture == "triple":
        model["triple"] = {"noise_units": m.noise_units, "noise_layers": m.noise_layers,
                           "noisy_units": m.noisy_units, "noisy_layers": m.noisy_layers, "grl_scale": m.grl_scale}
    return model


def published_args(cfg: TrainConfig, sessions: list[str], data_dir: str, out_dir: str) -> dict[str, Any]:
    """``args.yaml`` in the published layout (REFERENCE §3), plus our own keys."""
    a = cfg.augment
    n_features = len(cfg.feature_subset) if cfg.feature_subset else N_FEATURES
    model = model_args(cfg.model, n_features)
    if cfg.model.architecture == "triple":
        model["triple"]["adversarial_weight"] = cfg.adversarial_weight
    return {
        "model": model,
        "mode": "train", "use_amp": cfg.amp != "off", "output_dir": out_dir,
        "checkpoint_dir": f"{out_dir}/checkpoint", "seed": cfg.seed,
        "num_training_batches": cfg.num_training_batches, "lr_scheduler_type": cfg.lr_scheduler_type,
        "lr_max": cfg.lr_max, "lr_min": cfg.lr_min, "lr_decay_steps": cfg.lr_decay_steps,
        "lr_warmup_steps": cfg.lr_warmup_steps, "lr_max_day": cfg.lr_max_day, "lr_min_day": cfg.lr_min_day,
        "lr_decay_steps_day": cfg.lr_decay_steps_day, "lr_warmup_steps_day": cfg.lr_warmup_steps_day,
        "beta0": cfg.beta0, "beta1": cfg.beta1, "epsilon": cfg.epsilon, "weight_decay": cfg.weight_decay,
        "weight_decay_day": cfg.weight_decay_day, "grad_norm_clip_value": cfg.grad_norm_clip_value,
        "batches_per_train_log": cfg.batches_per_train_log, "batches_per_val_step": cfg.batches_per_val_step,
        "early_stopping": cfg.early_stopping_val_steps is not None,
        "early_stopping_val_steps": cfg.early_stopping_val_steps or 20,
        "dataset": {
            "data_transforms": {
                "white_noise_std": a.white_noise_std, "constant_offset_std": a.constant_offset_std,
                "random_walk_std": a.random_walk_std, "random_walk_axis": -1,
                "static_gain_std": a.static_gain_std, "random_cut": a.random_cut,
                "smooth_kernel_size": a.smooth_kernel_size, "smooth_data": a.smooth_data,
                "smooth_kernel_std": a.smooth_kernel_std,
            },
            "neural_dim": n_features, "batch_size": cfg.batch_size, "n_classes": N_CLASSES,
            "max_seq_elements": 500, "days_per_batch": cfg.days_per_batch,
            "must_include_days": cfg.must_include_days or None, "feature_subset": cfg.feature_subset,
            "dataset_dir": data_dir, "sessions": list(sessions),
        },
        "b2txt": {"train": cfg.model_dump(mode="json")},
    }


_MISSING = object()


class _Args:
    """Checked reads of ``args.yaml``: every error names the file and the field (``model.n_units``)."""

    def __init__(self, args: Any, where: Path):
        if not isinstance(args, dict):
            raise B2txtError(f"{where}: not a valid args.yaml (expected a mapping, got {type(args).__name__})")
        self.args, self.where = args, where

    def get(self, path: str, default: Any = _MISSING) -> Any:
        node: Any = self.args
        for key in path.split("."):
            if not isinstance(node, dict) or node.get(key) is None:
                if default is _MISSING:
                    raise B2txtError(f"{self.where}: {path}: missing")
                return default
            node = node[key]
        return node

    def fail(self, path: str, value: Any, expected: str) -> B2txtError:
        shown = repr(value)
        return B2txtError(f"{self.where}: {path}: {shown if len(shown) <= 80 else shown[:76] + ' ...'}, "
                          f"expected {expected}")

    def int(self, path: str, low: int, high: int | None = None, default: Any = _MISSING) -> int:
        v = self.get(path, default)
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and np.isfinite(v) and v == int(v)
        if not ok or v < low or (high is not None and v > high):
            raise self.fail(path, v, f"an integer {low}..{high}" if high is not None else f"an integer ≥ {low}")
        return int(v)

    def float(self, path: str, low: float, high: float, default: Any = _MISSING, *, low_open: bool = False,
              high_open: bool = False) -> float:
        v = self.get(path, default)
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and bool(np.isfinite(v))
        if ok:
            ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            raise self.fail(path, v, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
        return float(v)

    def bool(self, path: str, default: Any = _MISSING) -> bool:
        v = self.get(path, default)
        if not isinstance(v, bool):
            raise self.fail(path, v, "true or false")
        return v


def _model_config(a: _Args) -> ModelConfig:
    """The model config of ``args.yaml``'s ``model`` section (ours or the published, which lacks our
    keys), every value range-checked with an error naming its field."""
    architecture = a.get("model.architecture", "gru")
    if architecture not in ("gru", "triple"):
        raise a.fail("model.architecture", architecture, "gru or triple")
    # the published code patches only when patch_size > 0: 0 means none (as size 1, stride 1)
    patch_size = a.int("model.patch_size", 0, MAX_PATCH, default=0)
    patch_stride = a.int("model.patch_stride", 1, MAX_PATCH, default=1) if patch_size else 1
    triple = {}
    if architecture == "triple":
        for key in ("noise_units", "noisy_units"):
            triple[key] = a.int(f"model.triple.{key}", 1, MAX_UNITS, default=getattr(ModelConfig(), key))
        for key in ("noise_layers", "noisy_layers"):
            triple[key] = a.int(f"model.triple.{key}", 1, MAX_LAYERS, default=getattr(ModelConfig(), key))
        triple["grl_scale"] = a.float("model.triple.grl_scale", -1e6, 1e6, default=1.0)
    return ModelConfig(
        architecture=architecture, n_units=a.int("model.n_units", 1, MAX_UNITS),
        n_layers=a.int("model.n_layers", 1, MAX_LAYERS),
        rnn_dropout=a.float("model.rnn_dropout", 0, 1, default=0.0, high_open=True),
        input_dropout=a.float("model.input_network.input_layer_dropout", 0, 1, default=0.0, high_open=True),
        patch_size=max(patch_size, 1), patch_stride=patch_stride, **triple)


def model_config_from_args(m: dict[str, Any], where: Path = Path("args.yaml")) -> ModelConfig:
    """The model config of an ``args.yaml`` ``model`` section, checked; the inverse of :func:`model_args`."""
    return _model_config(_Args({"model": m}, where))


def _model_from_args(args: dict[str, Any], where: Path) -> tuple[nn.Module, list[str], list[int] | None, dict]:
    """The model an ``args.yaml`` describes; every value that shapes the computation is range-checked
    here, with one error naming the field, before anything is built."""
    a = _Args(args, where)
    neural_dim = a.int("model.n_input_features", 1, N_FEATURES, default=N_FEATURES)
    mcfg = _model_config(a)

    sessions = a.get("dataset.sessions")
    if not isinstance(sessions, list) or not sessions or not all(isinstance(s, str) and s for s in sessions):
        raise a.fail("dataset.sessions", sessions, "a non-empty list of session names")
    repeated = sorted({s for s in sessions if sessions.count(s) > 1})
    if repeated:
        raise a.fail("dataset.sessions", repeated, "each session once (these are listed twice)")

    subset = a.get("dataset.feature_subset", None)
    if subset is not None:
        if (not isinstance(subset, list) or not subset
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < N_FEATURES for i in subset)):
            raise a.fail("dataset.feature_subset", subset, f"a list of feature indices 0..{N_FEATURES - 1}")
        if len(set(subset)) != len(subset):
            raise a.fail("dataset.feature_subset", subset, "each index once")
        if len(subset) != neural_dim:
            raise B2txtError(f"{where}: dataset.feature_subset has {len(subset)} entries but model.n_input_features "
                             f"is {neural_dim}")

    transforms = a.get("dataset.data_transforms", {})
    if not isinstance(transforms, dict):
        raise a.fail("dataset.data_transforms", transforms, "a mapping")
    checked: dict[str, Any] = {"smooth_data": a.bool("dataset.data_transforms.smooth_data", default=True)}
    if checked["smooth_data"]:
        std = a.float("dataset.data_transforms.smooth_kernel_std", 0, 1000, default=2.0, low_open=True)
        size = a.int("dataset.data_transforms.smooth_kernel_size", 1, 100000, default=100)
        if gaussian_kernel(std, size).numel() == 0:
            raise B2txtError(f"{where}: dataset.data_transforms.smooth_kernel_std: {std} with smooth_kernel_size "
                             f"{size} leaves no kernel tap above 0.01 (no smoothing at all); expected a few bins")
        checked.update(smooth_kernel_std=std, smooth_kernel_size=size)
    return build_model(mcfg, len(sessions), neural_dim), [str(s) for s in sessions], subset, checked


def _allowed_globals() -> list:
    import numpy.dtypes as npd

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [scalar, np.dtype, npd.Float64DType, npd.Float32DType, npd.Int64DType, npd.Int32DType]


def safe_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` without executing pickled code; any refusal is one clear error."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise B2txtError(f"{path}: cannot load checkpoint safely: {first}") from None


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``_orig_mod.`` (torch.compile) and ``module.`` (DataParallel/DDP) key prefixes."""
    out = {}
    for key, value in state.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


@dataclass
class LoadedModel:
    model: nn.Module
    sessions: list[str]
    kernel: torch.Tensor | None
    feature_subset: list[int] | None
    args: dict[str, Any]
    checkpoint: dict[str, Any]

    def select_features(self, features: np.ndarray) -> np.ndarray:
        return features if self.feature_subset is None else features[:, self.feature_subset]


def read_args(model_dir: str | Path) -> dict[str, Any]:
    return read_yaml(Path(model_dir) / "checkpoint" / "args.yaml",
                     "args.yaml (expected a model directory with checkpoint/args.yaml)")


def load_model(model_dir: str | Path, device: torch.device | str = "cpu",
               checkpoint_name: str = "best_checkpoint") -> LoadedModel:
    """Load a model directory (ours or the published layout), ready for inference."""
    model_dir = Path(model_dir)
    ckpt_path = model_dir / "checkpoint" / checkpoint_name
    if not ckpt_path.is_file():
        raise B2txtError(f"{ckpt_path}: not found; expected a model directory with "
                         "checkpoint/best_checkpoint and checkpoint/args.yaml")
    args = read_args(model_dir)
    model, sessions, subset, transforms = _model_from_args(args, model_dir / "checkpoint" / "args.yaml")
    ckpt = safe_load(ckpt_path)
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise B2txtError(f"{ckpt_path}: no model_state_dict in checkpoint")
    try:
        model.load_state_dict(strip_prefixes(state))
    except RuntimeError as exc:
        raise B2txtError(f"{ckpt_path}: weights do not match args.yaml: {str(exc).splitlines()[0]} "
                         f"{' '.join(str(exc).split())[:400]}") from None
    kernel = None
    if transforms["smooth_data"]:
        kernel = gaussian_kernel(transforms["smooth_kernel_std"], transforms["smooth_kernel_size"])
    return LoadedModel(model.to(device).eval(), sessions, kernel, subset, args,
                       {k: v for k, v in ckpt.items() if k != "model_state_dict"} if isinstance(ckpt, dict) else {})
