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

from ..ground.config import ModelConfig, TrainConfig, read_yaml
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


def model_config_from_args(m: dict[str, Any]) -> ModelConfig:
    """The model config of an ``args.yaml`` ``model`` section, ours or published (which lacks our keys)."""
    triple = {k: v for k, v in (m.get("triple") or {}).items() if k != "adversarial_weight"}
    return ModelConfig(
        architecture=m.get("architecture", "gru"), n_units=int(m["n_units"]), n_layers=int(m["n_layers"]),
        rnn_dropout=float(m.get("rnn_dropout", 0.0)),
        input_dropout=float((m.get("input_network") or {}).get("input_layer_dropout", 0.0)),
        patch_size=int(m.get("patch_size", 1)) or 1, patch_stride=int(m.get("patch_stride", 1)) or 1, **triple)


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


def _model_from_args(args: dict[str, Any], where: Path) -> tuple[nn.Module, list[str], list[int] | None, dict]:
    try:
        m, ds = args["model"], args["dataset"]
        sessions = [str(s) for s in ds["sessions"]]
        transforms = ds.get("data_transforms") or {}
        subset = ds.get("feature_subset")
        mcfg = model_config_from_args(m)
        neural_dim = int(m.get("n_input_features", N_FEATURES))
    except (KeyError, TypeError, ValueError) as exc:
        raise B2txtError(f"{where}: not a valid args.yaml ({exc!r})") from None
    if subset is not None and len(subset) != neural_dim:
        raise B2txtError(f"{where}: feature_subset has {len(subset)} entries but n_input_features is {neural_dim}")
    return build_model(mcfg, len(sessions), neural_dim), sessions, subset, transforms


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
    if transforms.get("smooth_data", True):
        kernel = gaussian_kernel(float(transforms.get("smooth_kernel_std", 2)),
                                 int(transforms.get("smooth_kernel_size", 100)))
    return LoadedModel(model.to(device).eval(), sessions, kernel, subset, args,
                       {k: v for k, v in ckpt.items() if k != "model_state_dict"} if isinstance(ckpt, dict) else {})
