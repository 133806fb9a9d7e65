"""Real-time (online) inference: logits as soon as they are computable, chunk by chunk.

A speech BCI receives neural features in chunks of a few 20 ms bins and must show phonemes
with the least possible delay. :class:`StreamingDecoder` feeds such chunks through the same
computation as the one-pass :func:`b2txt.models.inference.run_model` — Gaussian smoothing with 'same'
zero padding, per-day affine layer, softsign, patching, GRU, output layer — carrying the GRU
state between chunks, so that concatenating what :meth:`~StreamingDecoder.push` returns for
every chunk and what :meth:`~StreamingDecoder.finish` returns at the end of the trial gives
the one-pass logits (up to float rounding), whatever the chunking.

Two stages delay the output:

* **Smoothing** is non-causal. With a kernel of ``K`` taps, the one-pass convolution pads
  ``K // 2`` zeros at the start and smoothed bin ``i`` is
  ``sum_j kernel[j] * raw[i + j - K // 2]``, so it needs raw bins up to ``i + r`` with the
  look-ahead ``r = K - 1 - K // 2`` (the kernel radius, ``(K - 1) / 2``, for the usual odd
  symmetric kernel: 4 bins = 80 ms for sd 2). Raw bins are buffered and smoothed bins are
  emitted ``r`` bins late; the start is zero-padded exactly like the one-pass convolution, and
  :meth:`~StreamingDecoder.finish` pads the end with zeros, as the one-pass 'same' padding does.
  Without a kernel, ``r = 0``.
* **Patching**: output step ``k`` reads the smoothed bins ``k*stride … k*stride + P - 1``
  (``P = patch_size``, or 1 without patching), so it waits for a whole patch.

Together: **the logits of output step k need the raw bins up to
``k * patch_stride + patch_size - 1 + r``**. After ``n`` raw bins of a trial have been pushed,
exactly ``max(0, (n - P - r) // patch_stride + 1)`` output steps have been returned (every
step as soon as it is computable, never earlier); :meth:`~StreamingDecoder.finish` returns the
rest, up to ``model.output_lengths(T)`` steps for a trial of ``T`` bins (none when
``T < P``). For the published model (patch 14, stride 4, sd 2: r = 4) the first logits come after
18 bins (360 ms), then one step per 4 bins (80 ms); a step's logits arrive with raw bin
``start + 17`` of its patch, i.e. 4 bins (80 ms, the smoothing look-ahead) after the last bin
of the patch.

The model is put in eval mode (as ``run_model`` does): dropout would make streaming and
one-pass results differ.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ground.errors import B2txtError
from .decoders import GRUDecoder


class StreamingDecoder:
    """Chunk-by-chunk phoneme logits for one trial at a time (see the module docstring).

    ``push(chunk)`` takes float features ``[t, neural_dim]`` (``t >= 0``) and returns the
    logits ``[t', n_classes]`` (float32) that became computable; ``finish()`` returns the
    remaining ones at the end of the trial; ``reset()`` starts the next trial.
    """

    def __init__(self, model: GRUDecoder, day: int, kernel: torch.Tensor | None,
                 device: torch.device | str | None = None):
        if not isinstance(model, GRUDecoder):
            raise B2txtError(f"StreamingDecoder runs the baseline GRUDecoder only, got {type(model).__name__}")
        cfg = model.cfg
        if not 0 <= int(day) < model.n_days:
            raise B2txtError(f"day index {day} out of range: the model has {model.n_days} day layer(s)")
        self.patching = cfg.patch_size > 1 or cfg.patch_stride > 1
        if self.patching and cfg.patch_size < 1:
            raise B2txtError(f"patch_size {cfg.patch_size} with patch_stride {cfg.patch_stride} is not a valid model")
        self.patch_size = max(int(cfg.patch_size), 1)
        self.patch_stride = int(cfg.patch_stride)
        if kernel is not None:
            kernel = torch.as_tensor(kernel, dtype=torch.float32).detach().cpu()
            if kernel.ndim != 1 or kernel.numel() == 0:
                raise B2txtError(f"smoothing kernel must be a non-empty 1-D tensor, got shape {tuple(kernel.shape)}")
            k = kernel.numel()
            self.pad_left = k // 2  # what F.conv1d(padding=k // 2) puts before the first bin
            self.lookahead = k - 1 - k // 2  # raw bins after bin i that smoothed bin i reads
        else:
            self.pad_left = self.lookahead = 0
        self.kernel = kernel
        self.model = model.eval()
        self.day = int(day)
        self.neural_dim = int(model.neural_dim)
        self.n_classes = int(model.n_classes)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._day_idx = torch.tensor([self.day], device=self.device)
        self.reset()

    # -- public API -------------------------------------------------------------------------

    @property
    def latency_bins(self) -> int:
        """Raw bins needed beyond the start of an output step's patch: ``patch_size - 1 + r``."""
        return self.patch_size - 1 + self.lookahead

    @property
    def n_bins(self) -> int:
        """Raw bins pushed in the current trial."""
        return self._n_raw

    @property
    def n_emitted(self) -> int:
        """Output steps returned so far in the current trial."""
        return self._n_out

    def reset(self) -> None:
        """Forget the current trial: empty buffers, GRU state back to the learned ``h0``."""
        cfg = self.model.cfg
        self._n_raw = 0
        self._finished = False
        # Raw bins in the zero-padded coordinates of the one-pass convolution: padded index
        # p = raw index + pad_left. ``_raw`` holds padded bins from ``_raw_start`` on.
        self._raw = torch.zeros(self.pad_left, self.neural_dim)
        self._raw_start = 0
        self._n_smooth = 0  # smoothed bins produced
        self._smooth = torch.zeros(0, self.neural_dim)  # smoothed bins from ``_smooth_start`` on
        self._smooth_start = 0
        self._n_out = 0
        with torch.no_grad():
            self._state = self.model.h0.detach().to(self.device).expand(cfg.n_layers, 1, cfg.n_units).contiguous()

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Add the bins of ``chunk [t, neural_dim]``; return the logits that became computable."""
        if self._finished:
            raise B2txtError("push() after finish(): call reset() to start the next trial")
        x = self._check_chunk(chunk)
        if x.shape[0] == 0:
            return np.zeros((0, self.n_classes), dtype=np.float32)
        self._n_raw += x.shape[0]
        self._raw = torch.cat([self._raw, x], dim=0)
        # Smoothed bin i is complete once padded bin i + K - 1 (= raw bin i + r) has arrived.
        return self._advance(n_smooth_ready=max(self._n_raw - self.lookahead, 0))

    def finish(self) -> np.ndarray:
        """End of trial: pad with zeros like the one-pass 'same' smoothing; return the rest."""
        if self._finished:
            raise B2txtError("finish() called twice: call reset() to start the next trial")
        self._finished = True
        self._raw = torch.cat([self._raw, torch.zeros(self.lookahead, self.neural_dim)], dim=0)
        return self._advance(n_smooth_ready=self._n_raw)

    # -- internals --------------------------------------------------------------------------

    def _check_chunk(self, chunk) -> torch.Tensor:
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().cpu().numpy()
        arr = np.asarray(chunk)
        if arr.dtype.kind not in "fiu":
            raise B2txtError(f"chunk must hold real numbers, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise B2txtError(f"chunk must be 2-D [bins, {self.neural_dim}], got shape {arr.shape}")
        if arr.shape[1] != self.neural_dim:
            raise B2txtError(f"chunk has {arr.shape[1]} features per bin, the model expects {self.neural_dim} "
                             f"(shape {arr.shape})")
        arr = arr.astype(np.float32, copy=False)
        bad = ~np.isfinite(arr)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise B2txtError(f"chunk contains {int(bad.sum())} NaN/Inf value(s), in {len(rows)} bin(s) "
                             f"(first: bin {int(rows[0])} of the chunk, bin {self._n_raw + int(rows[0])} of the trial)")
        return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))

    def _advance(self, n_smooth_ready: int) -> np.ndarray:
        new = self._smooth_up_to(n_smooth_ready)
        if new.shape[0]:
            self._smooth = torch.cat([self._smooth, new], dim=0)
        return self._emit()

    def _smooth_up_to(self, n_ready: int) -> torch.Tensor:
        """Smoothed bins ``_n_smooth … n_ready - 1`` from the raw buffer; trims the buffer."""
        n_new = n_ready - self._n_smooth
        if n_new <= 0:
            return torch.zeros(0, self.neural_dim)
        if self.kernel is None:
            lo = self._n_smooth - self._raw_start
            out = self._raw[lo: lo + n_new]
        else:
            k = self.kernel.numel()
            # Smoothed bin i reads padded bins i … i + K - 1: a 'valid' correlation of that window
            # (F.conv1d's formula, no kernel flip). Written as unfold + matmul: conv1d on CPU
            # builds a new oneDNN primitive for every new window length (~5 ms each).
            lo = self._n_smooth - self._raw_start
            window = self._raw[lo: lo + n_new + k - 1]
            out = window.unfold(0, k, 1) @ self.kernel  # [n_new, C, K] @ [K] -> [n_new, C]
        self._n_smooth = n_ready
        keep_from = self._n_smooth - self._raw_start  # padded bins before n_smooth are no longer read
        self._raw = self._raw[keep_from:]
        self._raw_start = self._n_smooth
        return out

    def _emit(self) -> np.ndarray:
        """Run every output step whose patch is complete, carrying the GRU state."""
        p, s = self.patch_size, self.patch_stride
        n_total = (self._n_smooth - p) // s + 1 if self._n_smooth >= p else 0
        m = n_total - self._n_out
        if m <= 0:
            return np.zeros((0, self.n_classes), dtype=np.float32)
        lo = self._n_out * s - self._smooth_start
        window = self._smooth[lo: lo + (m - 1) * s + p]  # exactly the bins of steps n_out … n_total-1
        with torch.no_grad():
            x = self.model._apply_preprocessing(window.unsqueeze(0).to(self.device), self._day_idx)
            if x.shape[1] != m:  # guards the window arithmetic against a model change
                raise B2txtError(f"internal error: {x.shape[1]} patches for {m} output steps")
            out, self._state = self.model.gru(x, self._state.to(x.dtype))
            logits = self.model.out(out)[0].float().cpu().numpy()
        self._n_out = n_total
        drop = min(self._n_out * s - self._smooth_start, self._smooth.shape[0])
        self._smooth = self._smooth[drop:]
        self._smooth_start += drop
        return logits


def stream_logits(model: GRUDecoder, features: list[np.ndarray], day_idx, kernel: torch.Tensor | None,
                  chunk_bins: int, device: torch.device | str | None = None) -> list[np.ndarray]:
    """Logits of whole trials computed online, ``chunk_bins`` bins at a time (as a BCI would)."""
    if chunk_bins < 1:
        raise B2txtError(f"chunk size must be at least 1 bin, got {chunk_bins}")
    out = []
    decoders: dict[int, StreamingDecoder] = {}
    for feats, day in zip(features, day_idx):
        dec = decoders.setdefault(int(day), StreamingDecoder(model, int(day), kernel, device))
        dec.reset()
        parts = [dec.push(feats[i: i + chunk_bins]) for i in range(0, len(feats), chunk_bins)]
        parts.append(dec.finish())
        out.append(np.concatenate(parts, axis=0))
    return out
