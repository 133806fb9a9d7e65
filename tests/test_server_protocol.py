"""The LM server's protocol layer without processes: names, logits checks, parameter updates,
request ordering, addresses. (Round trips with a real redis-server: test_server.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from b2txt.ground.config import DecodeConfig
from b2txt.ground.errors import B2txtError
from b2txt.server import protocol as P
from b2txt.server.connection import RedisAddress, check_address, is_loopback
from b2txt.server.router import ordered_entries

GOOD = np.random.default_rng(0).normal(size=(5, 41)).astype(np.float32)


def test_stream_names_are_the_published_ones_for_the_default_session():
    s = P.Streams()
    assert (s.input, s.partial, s.final) == ("remote_lm_input", "remote_lm_output_partial", "remote_lm_output_final")
    assert (s.reset, s.done_resetting) == ("remote_lm_reset", "remote_lm_done_resetting")
    assert (s.finalize, s.done_finalizing) == ("remote_lm_finalize", "remote_lm_done_finalizing")
    assert (s.update_params, s.done_updating_params) == ("remote_lm_update_params", "remote_lm_done_updating_params")
    assert s.args == "remote_lm_args" and s.context_key == "contextual_decoding_current_context"


def test_session_streams_are_prefixed():
    s = P.Streams("lab-2")
    assert s.input == "lab-2:remote_lm_input" and s.context_key == "lab-2:contextual_decoding_current_context"
    assert set(s.requests().values()) == set(P.Kind)
    with pytest.raises(P.ProtocolError, match="session name"):
        P.check_session_name("bad name:x")


def test_logits_round_trip_and_wire_format():
    raw = P.encode_logits(GOOD)
    assert raw == GOOD.astype("<f4").tobytes() and len(raw) == 5 * 41 * 4
    np.testing.assert_array_equal(P.decode_logits(raw, 10**6), GOOD)


@pytest.mark.parametrize("raw, message", [
    (None, "no 'logits' field"),
    (b"", r"empty \(0 bytes\)"),
    (b"\0" * 100, "100 bytes is not a multiple of 164"),
    (b"\0" * 164 * 11, "exceeds the limit of 1640 bytes"),
    ("text", "expected bytes"),
])
def test_malformed_logits_are_named(raw, message):
    with pytest.raises(P.ProtocolError, match=message):
        P.decode_logits(raw, 1640)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_refused_with_their_position(bad):
    x = GOOD.copy()
    x[3, 7] = bad
    with pytest.raises(P.ProtocolError, match="frame 3, column 7"):
        P.decode_logits(P.encode_logits(x), 10**6)


def test_update_with_published_and_own_names():
    p = P.apply_update(P.SessionParams(), {"acoustic_scale": b"0.5", "nbest": b"10", "do_opt": b"1",
                                           "alpha": "0.3", "ctc_blank_skip_threshold": "0.9", "rescore": "0",
                                           "top_candidates_to_augment": "5", "beam_size_token": "7",
                                           "request_id": "x-1"})
    assert p.decode.acoustic_scale == 0.5 and p.decode.nbest == 10 and p.decode.blank_skip_threshold == 0.9
    assert p.decode.augment_top == 5 and p.decode.beam_size_token == 7 and p.do_opt and p.alpha == 0.3
    args = P.args_fields(p, "/lm")
    assert args["acoustic_scale"] == "0.5" and args["nbest"] == "10" and args["do_opt"] == "1"
    assert args["top_candidates_to_augment"] == "5" and args["lm_path"] == "/lm"


@pytest.mark.parametrize("fields, message", [
    ({"bogus": "1"}, "unknown parameter bogus"),
    ({"beam": "wide"}, "parameter beam: 'wide' is not a number"),
    ({"nbest": "2.5"}, "parameter nbest: '2.5' is not an integer"),
    ({"beam": "-1"}, "parameter beam: Input should be greater than 0"),
    ({"beam": "nan"}, "not a finite number"),
    ({"alpha": "1.5"}, r"outside \[0, 1\]"),
    ({"do_opt": "maybe"}, "is not 0 or 1"),
    ({"lm_path": "/x"}, "cannot be changed while the server runs"),
    ({"request_id": "only"}, "names no parameter"),
])
def test_bad_updates_are_refused_whole(fields, message):
    before = P.SessionParams()
    with pytest.raises(P.ProtocolError, match=message):
        P.apply_update(before, {**fields})
    if "request_id" not in fields:  # all or nothing: a good name beside a bad one changes nothing
        with pytest.raises(P.ProtocolError):
            P.apply_update(before, {"acoustic_scale": "0.9", **fields})


def test_error_replies_keep_the_published_fields():
    s = P.Streams()
    (stream, fields), = P.error_reply(s, P.Kind.LOGITS, "boom", "r1")
    assert stream == s.partial and fields == {"lm_response_partial": "", "error": "boom", "request_id": "r1"}
    (final, f1), (ack, f2) = P.error_reply(s, P.Kind.FINALIZE, "boom")
    assert final == s.final and {"lm_response_final", "scoring", "context_str", "error"} <= set(f1)
    assert ack == s.done_finalizing and f2["done"] == 0


def _xread_result(streams: dict[str, list[str]]):
    return [(name.encode(), [(i.encode(), {b"f": b"1"}) for i in ids]) for name, ids in streams.items()]


def test_requests_are_ordered_by_id_then_kind():
    s = P.Streams()
    session_of = {name: "" for name in s.requests()}
    kind_of = s.requests()
    result = _xread_result({s.finalize: ["5-0"], s.input: ["5-0", "3-0", "5-1"], s.reset: ["5-6", "1-0"]})
    got = [(e.stream, e.entry_id.decode()) for e in ordered_entries(result, 100, session_of, kind_of)]
    # within one millisecond the kind decides (a pipelined reset, chunks, finalize), then the sequence
    assert got == [(s.reset, "1-0"), (s.input, "3-0"), (s.reset, "5-6"), (s.input, "5-0"), (s.input, "5-1"),
                   (s.finalize, "5-0")]


def test_a_full_read_holds_back_later_requests_of_the_same_session():
    s = P.Streams()
    session_of = {name: "" for name in s.requests()}
    # the input stream returned COUNT (2) entries: more may wait before the finalize at 9-0
    result = _xread_result({s.input: ["1-0", "2-0"], s.finalize: ["9-0"]})
    got = [e.entry_id.decode() for e in ordered_entries(result, 2, session_of, s.requests())]
    assert got == ["1-0", "2-0"]


def test_id_before_ms_includes_the_whole_millisecond():
    assert P.parse_id(P.id_before_ms(1000)) < (1000, 0)
    assert P.parse_id(b"1700000000000-3") == (1700000000000, 3)


def test_addresses_are_loopback_or_socket_by_default(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("192.168.150.2")
    with pytest.raises(B2txtError, match="--allow-remote"):
        check_address(RedisAddress(host="192.168.150.2"))
    # one policy (issue 15): a remote host, even when allowed, only with a password
    monkeypatch.delenv("B2TXT_REDIS_PASSWORD", raising=False)
    with pytest.raises(B2txtError, match="not a loopback address, and B2TXT_REDIS_PASSWORD is not set"):
        check_address(RedisAddress(host="192.168.150.2"), allow_remote=True)
    monkeypatch.setenv("B2TXT_REDIS_PASSWORD", "s3cret")
    assert check_address(RedisAddress(host="192.168.150.2"), allow_remote=True).host == "192.168.150.2"
    assert RedisAddress.parse("unix:/tmp/r.sock").socket == Path("/tmp/r.sock")
    assert RedisAddress.parse("6380").port == 6380 and RedisAddress.parse("6380").host == "127.0.0.1"
    with pytest.raises(B2txtError, match="too long"):
        check_address(RedisAddress(socket=Path("/tmp/" + "x" * 120)))


def test_password_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("MY_PW", raising=False)
    assert RedisAddress(password_env="MY_PW").password is None
    monkeypatch.setenv("MY_PW", "s3cret")
    assert RedisAddress(password_env="MY_PW").password == "s3cret"


def test_session_params_defaults_follow_the_config():
    assert P.SessionParams().decode == DecodeConfig()
    assert math.isclose(P.SessionParams().alpha, 0.55)
