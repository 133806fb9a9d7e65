"""The Redis stream protocol between a phoneme decoder and the LM server (REFERENCE §5).

Stream and key names, field names and message encoding live here and nowhere else, so the
server, our client and the tests agree by construction and a reader can check them against
the reference table in one place.

The published protocol (one client per Redis database) uses the bare names. Our one extension,
**sessions**, lets many clients decode at once without changing anything for a published
client: a client registers a session name ``S`` on :data:`SESSIONS_STREAM` and then speaks the
unchanged protocol on streams named ``S:<published name>`` (``S:remote_lm_input``, …, and the
key ``S:contextual_decoding_current_context``). A few optional fields are also ours: requests may
carry ``request_id``, which the server copies into the reply so a client can tell a late reply
to an abandoned attempt from the one it waits for; error replies carry ``error``; a logits entry
may say what it holds (``logits_dtype``, ``logits_shape``), so a payload of the wrong type or width
is refused by name instead of being decoded as garbage. Published clients neither send nor read
any of them.

Every malformed request gets an answer on the stream its sender waits on (:func:`error_reply`;
for a session registration with a bad name, :func:`done_opening_stream`): nothing a client sends
leaves it waiting for its timeout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..ground.config import DecodeConfig
from ..ground.errors import B2txtError
from ..ground.phonemes import N_CLASSES
from ..lm.nbest import DecodeInputError, check_logits

# ----------------------------------------------------------------------------- names

INPUT = "remote_lm_input"
OUTPUT_PARTIAL = "remote_lm_output_partial"
OUTPUT_FINAL = "remote_lm_output_final"
RESET = "remote_lm_reset"
DONE_RESETTING = "remote_lm_done_resetting"
FINALIZE = "remote_lm_finalize"
DONE_FINALIZING = "remote_lm_done_finalizing"
UPDATE_PARAMS = "remote_lm_update_params"
DONE_UPDATING_PARAMS = "remote_lm_done_updating_params"
ARGS = "remote_lm_args"
CONTEXT_KEY = "contextual_decoding_current_context"
#: Extension: session registration (fields ``session``, ``action`` = open | close, ``request_id``).
SESSIONS_STREAM = "remote_lm_sessions"
#: Extension: the server's answer to a session ``open`` (``done`` = 1, or 0 with ``error``).
DONE_OPENING = "remote_lm_done_opening"

LOGITS_FIELD = "logits"
PARTIAL_FIELD = "lm_response_partial"
FINAL_FIELD = "lm_response_final"
SCORING_FIELD = "scoring"
CONTEXT_FIELD = "context_str"
DONE_FIELD = "done"
ERROR_FIELD = "error"
REQUEST_ID_FIELD = "request_id"
SESSION_FIELD = "session"
ACTION_FIELD = "action"
#: Extension: what a logits entry holds (``float32``; ``T,41``). Checked when present.
DTYPE_FIELD = "logits_dtype"
SHAPE_FIELD = "logits_shape"
WIRE_DTYPES = ("float32", "<f4", "f4", "float32le")
#: Beyond this magnitude a value is no logit: most likely float64 (or int) bytes read as float32.
MAX_ABS_LOGIT = 1e6

#: Bytes of one frame of logits: 41 little-endian float32.
FRAME_BYTES = N_CLASSES * 4
SESSION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ProtocolError(B2txtError):
    """A request the server cannot serve; the message goes back in the reply's ``error`` field."""


class Kind(str, Enum):
    """Request kinds. The order of the members breaks ties between entries of equal stream id
    (a pipelining client may write several streams within one millisecond): a reset before
    parameters, before logits, before finalize — the order a trial needs."""

    RESET = "reset"
    UPDATE = "update"
    LOGITS = "logits"
    FINALIZE = "finalize"

    @property
    def rank(self) -> int:
        return list(Kind).index(self)


@dataclass(frozen=True)
class Streams:
    """Every stream and key of one session; the default session (``prefix`` '') is the published one."""

    prefix: str = ""
    #: the published server's --input_stream / --partial_output_stream / --final_output_stream
    input_name: str = INPUT
    partial_name: str = OUTPUT_PARTIAL
    final_name: str = OUTPUT_FINAL

    def name(self, base: str) -> str:
        return f"{self.prefix}:{base}" if self.prefix else base

    @property
    def input(self) -> str:
        return self.name(self.input_name)

    @property
    def partial(self) -> str:
        return self.name(self.partial_name)

    @property
    def final(self) -> str:
        return self.name(self.final_name)

    @property
    def reset(self) -> str:
        return self.name(RESET)

    @property
    def done_resetting(self) -> str:
        return self.name(DONE_RESETTING)

    @property
    def finalize(self) -> str:
        return self.name(FINALIZE)

    @property
    def done_finalizing(self) -> str:
        return self.name(DONE_FINALIZING)

    @property
    def update_params(self) -> str:
        return self.name(UPDATE_PARAMS)

    @property
    def done_updating_params(self) -> str:
        return self.name(DONE_UPDATING_PARAMS)

    @property
    def args(self) -> str:
        return self.name(ARGS)

    @property
    def context_key(self) -> str:
        return self.name(CONTEXT_KEY)

    @property
    def done_opening(self) -> str:
        return self.name(DONE_OPENING)

    def requests(self) -> dict[str, Kind]:
        """The streams the server reads for this session, and what each carries."""
        return {self.reset: Kind.RESET, self.update_params: Kind.UPDATE, self.input: Kind.LOGITS,
                self.finalize: Kind.FINALIZE}


def check_session_name(name: str) -> str:
    if not isinstance(name, str) or not SESSION_NAME.match(name):
        raise ProtocolError(f"session name {shown(name)}: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return name


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a hostile request must not flood the log or the reply."""
    text_ = repr(value)
    return text_ if len(text_) <= limit else f"{text_[:limit]}... ({len(text_)} characters)"


def done_opening_stream(raw_session: bytes | str | None) -> bytes:
    """Where a client that registered ``raw_session`` waits for the answer, byte for byte.

    For a valid name this is ``Streams(name).done_opening``; for an invalid one (which has no
    :class:`Streams`) the same ``NAME:remote_lm_done_opening``, built from the bytes the client
    sent, so its refusal reaches it. No name at all: the bare stream.
    """
    if raw_session is None or raw_session in (b"", ""):
        return DONE_OPENING.encode()
    raw = raw_session.encode("utf-8", errors="surrogateescape") if isinstance(raw_session, str) else bytes(raw_session)
    return raw + b":" + DONE_OPENING.encode()


# ----------------------------------------------------------------------------- stream ids

def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    """``b'1700000000000-3'`` -> ``(1700000000000, 3)``: ids compare as (milliseconds, sequence)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def id_before_ms(ms: int) -> str:
    """The id just before millisecond ``ms``: an XREAD from it returns every entry of ``ms`` on.

    Used as the start of a new session's streams: an entry written in the same millisecond as
    the registration but with a smaller sequence number must not be skipped.
    """
    return f"{max(ms - 1, 0)}-18446744073709551615"


def text(value: bytes | str | None, default: str = "") -> str:
    if value is None:
        return default
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def fields_text(fields: dict[Any, Any]) -> dict[str, Any]:
    """Field names as str (redis-py returns bytes); values unchanged (logits stay bytes)."""
    return {text(k): v for k, v in fields.items()}


# ----------------------------------------------------------------------------- logits

def encode_logits(logits: np.ndarray) -> bytes:
    """``[T, 41]`` logits (LM column order) as the published wire format: float32 bytes, row-major."""
    return np.ascontiguousarray(logits, dtype="<f4").tobytes()


def decode_logits(raw: object, max_bytes: int) -> np.ndarray:
    """The ``logits`` field of an input entry as a checked ``[T, 41]`` float32 array.

    One clear :class:`ProtocolError` per problem: missing, empty, over ``max_bytes``, a length
    that is not whole frames, or a non-finite value (the C++ decoders must never see those).
    """
    if raw is None:
        raise ProtocolError(f"input entry has no '{LOGITS_FIELD}' field")
    if not isinstance(raw, (bytes, bytearray)):
        raise ProtocolError(f"{LOGITS_FIELD}: expected bytes, got {type(raw).__name__}")
    n = len(raw)
    if n == 0:
        raise ProtocolError(f"{LOGITS_FIELD}: empty (0 bytes)")
    if n > max_bytes:
        raise ProtocolError(f"{LOGITS_FIELD}: {n} bytes exceeds the limit of {max_bytes} bytes")
    if n % FRAME_BYTES:
        raise ProtocolError(f"{LOGITS_FIELD}: {n} bytes is not a multiple of {FRAME_BYTES} "
                            f"({N_CLASSES} float32 per frame)")
    array = np.frombuffer(raw, dtype="<f4").reshape(-1, N_CLASSES).astype(np.float32)
    try:
        array = check_logits(array, LOGITS_FIELD)
    except DecodeInputError as exc:
        raise ProtocolError(str(exc)) from None
    huge = np.abs(array) > MAX_ABS_LOGIT
    if huge.any():
        frame, column = np.argwhere(huge)[0]
        raise ProtocolError(f"{LOGITS_FIELD}: value {array[frame, column]:.3g} at frame {frame}, column {column} is "
                            f"beyond +-{MAX_ABS_LOGIT:.0e}: not logits (float64 or integers sent as float32?)")
    return array


def decode_logits_entry(fields: dict[str, Any], max_bytes: int) -> np.ndarray:
    """The logits of a request entry, checked against its ``logits_dtype`` / ``logits_shape``
    when it carries them (our clients do; published clients send the bare bytes)."""
    raw = fields.get(LOGITS_FIELD)
    dtype = fields.get(DTYPE_FIELD)
    if dtype is not None and text(dtype).strip().lower() not in WIRE_DTYPES:
        raise ProtocolError(f"{DTYPE_FIELD} {shown(text(dtype))}: the wire format is float32 "
                            f"({N_CLASSES} little-endian float32 per frame); convert before sending")
    shape = fields.get(SHAPE_FIELD)
    if shape is not None:
        parts = text(shape).replace("x", ",").split(",")
        try:
            frames, width = (int(p) for p in parts)
        except ValueError:
            raise ProtocolError(f"{SHAPE_FIELD} {shown(text(shape))}: expected T,{N_CLASSES}") from None
        if width != N_CLASSES:
            raise ProtocolError(f"{SHAPE_FIELD} {frames},{width}: expected T,{N_CLASSES} "
                                f"(logits in LM column order, one row per frame)")
        if frames < 1:
            raise ProtocolError(f"{LOGITS_FIELD}: no frames ({SHAPE_FIELD} {frames},{width})")
        if isinstance(raw, (bytes, bytearray)) and len(raw) != frames * FRAME_BYTES:
            raise ProtocolError(f"{LOGITS_FIELD}: {len(raw)} bytes, but {SHAPE_FIELD} {frames},{width} "
                                f"means {frames * FRAME_BYTES} bytes of float32")
    return decode_logits(raw, max_bytes)


def logits_fields(logits: np.ndarray) -> dict[str, Any]:
    """A logits entry as our clients send it: the published bytes plus what they hold."""
    array = np.asarray(logits)
    if array.ndim != 2 or array.shape[1] != N_CLASSES:
        raise ProtocolError(f"logits: expected shape [T, {N_CLASSES}], got {list(array.shape)}")
    return {LOGITS_FIELD: encode_logits(array), DTYPE_FIELD: "float32", SHAPE_FIELD: f"{array.shape[0]},{N_CLASSES}"}


# ----------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class SessionParams:
    """The options one session decodes with: the decoder's plus LLM rescoring (alpha, do_opt)."""

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    alpha: float = 0.55
    do_opt: bool = False


#: Published parameter names -> (our DecodeConfig field or 'alpha'/'do_opt', type).
PUBLISHED_PARAMS: dict[str, tuple[str, type]] = {
    "max_active": ("max_active", int),
    "min_active": ("min_active", int),
    "beam": ("beam", float),
    "lattice_beam": ("lattice_beam", float),
    "acoustic_scale": ("acoustic_scale", float),
    "ctc_blank_skip_threshold": ("blank_skip_threshold", float),
    "length_penalty": ("length_penalty", float),
    "nbest": ("nbest", int),
    "blank_penalty": ("blank_penalty", float),
    "alpha": ("alpha", float),
    "do_opt": ("do_opt", bool),
    "rescore": ("rescore_unpruned", bool),
    "top_candidates_to_augment": ("augment_top", int),
    "score_penalty_percent": ("augment_penalty", float),
}
#: Our own names accepted as well (the DecodeConfig fields the published names do not cover).
OWN_PARAMS: dict[str, tuple[str, type]] = {
    "blank_skip_threshold": ("blank_skip_threshold", float),
    "augment_top": ("augment_top", int),
    "augment_penalty": ("augment_penalty", float),
    "rescore_unpruned": ("rescore_unpruned", bool),
    "beam_size_token": ("beam_size_token", int),
}
UPDATABLE: dict[str, tuple[str, type]] = {**PUBLISHED_PARAMS, **OWN_PARAMS}
#: Names a client may see in remote_lm_args but cannot change while the server runs.
READ_ONLY = ("lm_path", "decoder", "workers", "llm", "session")
INT32_MAX = 2**31 - 1
#: Fields of an update entry that are not parameters.
NOT_PARAMS = (REQUEST_ID_FIELD,)


def parse_value(name: str, raw: object, kind: type) -> int | float | bool:
    """One parameter value from its wire text, or a :class:`ProtocolError` naming it."""
    value = text(raw).strip() if isinstance(raw, (bytes, str)) else raw
    try:
        if kind is bool:
            lowered = str(value).lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        number = float(value)  # type: ignore[arg-type]
        if not math.isfinite(number):
            raise ProtocolError(f"parameter {name}: {value!r} is not a finite number")
        if kind is int:
            if number != int(number):
                raise ValueError
            if abs(number) > INT32_MAX:  # the C++ decoders take 32-bit ints
                raise ProtocolError(f"parameter {name}: {value!r} is out of range (at most {INT32_MAX})")
            return int(number)
        return number
    except (TypeError, ValueError):
        want = {bool: "0 or 1", int: "an integer", float: "a number"}[kind]
        raise ProtocolError(f"parameter {name}: {value!r} is not {want}") from None


def apply_update(params: SessionParams, fields: dict[str, Any]) -> SessionParams:
    """``params`` with an update entry applied, all or nothing.

    Unknown names, read-only names and bad values are errors (the published server silently
    ignored unknown names, so a typo went unnoticed); constraints are those of
    :class:`~b2txt.ground.config.DecodeConfig` (e.g. beam > 0) and 0 <= alpha <= 1.
    """
    names = [k for k in fields if k not in NOT_PARAMS]
    if not names:
        raise ProtocolError("parameter update names no parameter")
    read_only = sorted(n for n in names if n in READ_ONLY)
    if read_only:
        raise ProtocolError(f"parameter {', '.join(read_only)}: cannot be changed while the server runs")
    unknown = sorted(n for n in names if n not in UPDATABLE)
    if unknown:
        raise ProtocolError(f"unknown parameter {', '.join(unknown)}; known: {', '.join(sorted(UPDATABLE))}")
    decode_changes: dict[str, Any] = {}
    alpha, do_opt = params.alpha, params.do_opt
    for name in names:
        target, kind = UPDATABLE[name]
        value = parse_value(name, fields[name], kind)
        if target == "alpha":
            if not 0.0 <= float(value) <= 1.0:
                raise ProtocolError(f"parameter alpha: {value} is outside [0, 1]")
            alpha = float(value)
        elif target == "do_opt":
            do_opt = bool(value)
        else:
            decode_changes[target] = value
    try:
        decode = DecodeConfig.model_validate({**params.decode.model_dump(), **decode_changes})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ProtocolError(f"parameter {where}: {err['msg']}") from None
    return SessionParams(decode=decode, alpha=alpha, do_opt=do_opt)


def args_fields(params: SessionParams, lm_path: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ``remote_lm_args`` entry: the published names and formats, then ours."""
    d = params.decode
    out = {
        "lm_path": lm_path,
        "max_active": str(int(d.max_active)),
        "min_active": str(int(d.min_active)),
        "beam": str(float(d.beam)),
        "lattice_beam": str(float(d.lattice_beam)),
        "acoustic_scale": str(float(d.acoustic_scale)),
        "ctc_blank_skip_threshold": str(float(d.blank_skip_threshold)),
        "length_penalty": str(float(d.length_penalty)),
        "nbest": str(int(d.nbest)),
        "blank_penalty": str(float(d.blank_penalty)),
        "alpha": str(float(params.alpha)),
        "do_opt": str(int(params.do_opt)),
        "rescore": str(int(d.rescore_unpruned)),
        "top_candidates_to_augment": str(int(d.augment_top)),
        "score_penalty_percent": str(float(d.augment_penalty)),
        "decoder": d.decoder,
        "beam_size_token": str(int(d.beam_size_token)),
    }
    out.update(extra or {})
    return out


# ----------------------------------------------------------------------------- replies

def with_request_id(fields: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    """``fields`` plus the request's ``request_id`` when it carried one (published clients send none)."""
    if request_id:
        return {**fields, REQUEST_ID_FIELD: request_id}
    return fields


def error_reply(streams: Streams, kind: Kind, message: str,
                request_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The entries that answer a failed request, on the stream(s) its sender waits on.

    The normal fields are present (empty), so a published client that ignores ``error`` still
    gets its answer instead of waiting forever.
    """
    err = {ERROR_FIELD: message}
    if kind is Kind.LOGITS:
        return [(streams.partial, with_request_id({PARTIAL_FIELD: "", **err}, request_id))]
    if kind is Kind.FINALIZE:
        return [(streams.final, with_request_id({FINAL_FIELD: "", SCORING_FIELD: "", CONTEXT_FIELD: "", **err},
                                                request_id)),
                (streams.done_finalizing, with_request_id({DONE_FIELD: 0, **err}, request_id))]
    ack = streams.done_resetting if kind is Kind.RESET else streams.done_updating_params
    return [(ack, with_request_id({DONE_FIELD: 0, **err}, request_id))]
