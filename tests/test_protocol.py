"""The error tokens of protocol.py (issue #27: the client decides by code, never by wording), in-process: the
format both ways, the server's texts (statuses.py, service.row_failure, the proxy's own errors) and how the client
reads a failed answer (client/errors.py)."""

import pytest

from reward_server.client.errors import (RewardInputError, RewardServerError, read_failure, request_error,
                                         rows_error)
from reward_server.protocol import (INTERNAL, INVALID_ARG, OVERLOADED, REASONS, UNAVAILABLE, InputError,
                                    ParsedError, Unavailable, encode_error, error_token, parse_error, parse_errors)


@pytest.mark.parametrize("code", [INVALID_ARG, UNAVAILABLE, INTERNAL])
@pytest.mark.parametrize("reason", ["", *REASONS])
@pytest.mark.parametrize("row", [None, 0, 17])
def test_round_trip(code, reason, row):
    text = encode_error(code, "a message: with [brackets], row 5: and colons", reason, row)
    assert text.startswith(error_token(code, reason, row) + " ")
    assert parse_error(text) == ParsedError(code, reason, row, "a message: with [brackets], row 5: and colons")
    assert parse_errors(text) == [parse_error(text)]


def test_token_format_is_short_and_first():
    assert encode_error(UNAVAILABLE, "the reward server is overloaded", OVERLOADED) == \
        "[reward_server:UNAVAILABLE:overloaded] the reward server is overloaded"
    assert encode_error(INVALID_ARG, "empty sequence", row=3) == "[reward_server:INVALID_ARG:row=3] empty sequence"
    assert encode_error(INTERNAL, "") == "[reward_server:INTERNAL]"
    assert parse_error("[reward_server:INTERNAL]") == ParsedError(INTERNAL, "", None, "")
    for bad in [dict(code="invalid"), dict(code=INVALID_ARG, reason="Over loaded"),
                dict(code=INVALID_ARG, reason="x]"), dict(code=INVALID_ARG, row=-1), dict(code=INVALID_ARG, row=1.5)]:
        with pytest.raises(ValueError):
            error_token(**bad)


def test_a_token_inside_a_longer_text_is_found():
    token = encode_error(UNAVAILABLE, "shutting down; retry", "shutting_down")
    for text in (f"in ensemble 'reward': {token}", f"Error: {token}\n  (more)", f"  {token}  "):
        parsed = parse_error(text)
        assert (parsed.code, parsed.reason, parsed.row) == (UNAVAILABLE, "shutting_down", None), text
        assert "[reward_server" not in parsed.message and "shutting down; retry" in parsed.message


def test_a_text_without_a_token():
    for text in ("", "plain words", "Traceback ...\nInputError: row 3: empty", "[reward_server:lower] x",
                 "[reward_server:] x", "[other:INVALID_ARG] x"):
        parsed = parse_error(text)
        assert parsed == ParsedError(None, "", None, text.strip()), text
        assert parse_errors(text) == []
    assert parse_error(None) == ParsedError(None, "", None, "")


def test_several_tokens_each_with_its_message():
    text = ("[reward_server:INVALID_ARG] [reward_server:INVALID_ARG:row=0] empty text; "
            "[reward_server:INTERNAL:row=2] forward failed; [reward_server:INVALID_ARG:row=5] bad; and 4 more rows")
    assert parse_error(text) == ParsedError(INVALID_ARG, "", None,
                                            "empty text; forward failed; bad; and 4 more rows")
    assert parse_errors(text) == [ParsedError(INVALID_ARG, "", None, ""),
                                  ParsedError(INVALID_ARG, "", 0, "empty text"),
                                  ParsedError(INTERNAL, "", 2, "forward failed"),
                                  ParsedError(INVALID_ARG, "", 5, "bad; and 4 more rows")]
    # fields in any order, unknown ones ignored (a later server may add some)
    assert parse_error("[reward_server:UNAVAILABLE:row=4:overloaded:extra=9] x") == \
        ParsedError(UNAVAILABLE, OVERLOADED, 4, "x")


# ------------------------------------------------------------------------------------------ the server's texts

def message_of(response: dict) -> str:
    from reward_server.serving import proxy_status

    return bytes(response[proxy_status.MESSAGE][0]).decode()


def test_statuses_failure_and_row_text_carry_code_reason_and_row(monkeypatch):
    from reward_server.engine.errors import Overloaded, RanksFailed, ShuttingDown
    from reward_server.serving import proxy_status
    from reward_server.serving.statuses import REWORD_ENV, failure, row_text

    monkeypatch.delenv(REWORD_ENV, raising=False)
    for exc, code, reason in [(InputError("send exactly one of text"), INVALID_ARG, ""),
                              (Overloaded("the reward server is overloaded (limit 40)"), UNAVAILABLE, "overloaded"),
                              (ShuttingDown("the reward server is shutting down; retry"), UNAVAILABLE, "shutting_down"),
                              (RanksFailed("reward ranks failed: rank 1 exited"), UNAVAILABLE, "ranks_failed"),
                              (Unavailable("busy"), UNAVAILABLE, ""), (RuntimeError("boom\n  at x"), INTERNAL, "")]:
        response = failure(exc)
        assert bytes(response[proxy_status.STATUS][0]).decode() == code
        text = message_of(response)
        assert text == encode_error(code, " ".join(str(exc).split()), reason), text
        assert "\n" not in text
    assert row_text(3, InputError("row 3: empty sequence")) == "[reward_server:INVALID_ARG:row=3] empty sequence"
    assert row_text(2, RuntimeError("row 2: forward failed")) == "[reward_server:INTERNAL:row=2] forward failed"
    assert row_text(2, InputError("no row here")) == "[reward_server:INVALID_ARG:row=2] no row here"


def test_a_request_whose_every_row_failed_names_its_rows_by_token(monkeypatch):
    from reward_server.engine import ForwardError
    from reward_server.serving.service import MESSAGE_ROWS, row_failure
    from reward_server.serving.statuses import REWORD_ENV, failure

    monkeypatch.delenv(REWORD_ENV, raising=False)
    excs = [InputError(f"row {i}: empty text") for i in range(MESSAGE_ROWS + 2)]
    text = message_of(failure(row_failure(excs)))
    assert text.startswith("[reward_server:INVALID_ARG] [reward_server:INVALID_ARG:row=0] empty text; ")
    parts = parse_errors(text)
    assert parts[0] == ParsedError(INVALID_ARG, "", None, "")
    assert [(p.code, p.row) for p in parts[1:]] == [(INVALID_ARG, i) for i in range(MESSAGE_ROWS)]
    mixed = message_of(failure(row_failure([InputError("row 0: empty text"), ForwardError("row 1: nan")])))
    assert [(p.code, p.row) for p in parse_errors(mixed)] == [(INTERNAL, None), (INVALID_ARG, 0), (INTERNAL, 1)]


def test_rewording_keeps_every_token(monkeypatch):
    from reward_server.engine.errors import Overloaded
    from reward_server.serving.service import row_failure
    from reward_server.serving.statuses import REWORD_ENV, failure, row_text

    texts = {}
    for reword in ("0", "1"):
        monkeypatch.setenv(REWORD_ENV, reword)
        texts[reword] = [message_of(failure(Overloaded("the reward server is overloaded (limit 40)"))),
                         row_text(3, InputError("row 3: empty sequence")),
                         message_of(failure(row_failure([InputError("row 0: empty text"),
                                                         InputError("row 1: token id 9 outside [0, 5)")])))]
    for plain, scrambled in zip(*texts.values()):
        assert plain != scrambled and "zzz" in scrambled
        assert [p._replace(message="") for p in parse_errors(plain)] == \
            [p._replace(message="") for p in parse_errors(scrambled)]
        for p in parse_errors(scrambled):
            assert p.message == "" or p.message.startswith("zzz "), scrambled
    assert texts["1"][1] == "[reward_server:INVALID_ARG:row=3] zzz ecneuqes ytpme"


def test_the_proxy_writes_the_same_tokens():
    """proxy_status.py may not import reward_server: its own copy of the format must agree."""
    from reward_server.serving import proxy_status

    for code in (INVALID_ARG, INTERNAL, UNAVAILABLE):
        assert proxy_status._token(code, "input 'text' has no elements") == \
            encode_error(code, "input 'text' has no elements")


# ------------------------------------------------------------------------------------ the client's reading

def test_the_client_reads_the_code_not_the_status_or_the_words():
    # a token decides; its wording may say anything
    misleading = "overloaded; shutting down; connection refused; row 7: InputError: x"
    failure = read_failure(503, encode_error(INVALID_ARG, misleading))
    assert (failure.code, failure.reason, failure.rows, failure.message) == (INVALID_ARG, "", [], misleading)
    assert read_failure(400, encode_error(UNAVAILABLE, "row 3: empty", OVERLOADED)).code == UNAVAILABLE
    # no token (or an unknown code): the HTTP status decides
    assert [read_failure(s, "InputError: row 3: empty").code for s in (400, 503, 500, 404, 502)] == \
        [INVALID_ARG, UNAVAILABLE, INTERNAL, INTERNAL, INTERNAL]
    assert read_failure(503, "[reward_server:NEW_CODE] x").code == UNAVAILABLE


def test_request_and_row_errors_by_code():
    every = encode_error(INVALID_ARG, encode_error(INVALID_ARG, "zzz a", row=0) + "; " +
                         encode_error(INVALID_ARG, "zzz b", row=1))
    exc = request_error(400, every, 32, 2, "http://h:1", "sequences 32..33")
    assert type(exc) is RewardInputError and exc.index == 32 and exc.code == INVALID_ARG
    assert str(exc) == "sequence 32 rejected by the reward server: zzz a (every sequence of 32..33 failed)"
    one = request_error(400, encode_error(INVALID_ARG, encode_error(INVALID_ARG, "empty text", row=0)), 5, 1, "u", "w")
    assert (type(one), one.index, str(one)) == (RewardInputError, 5, "sequence 5 rejected by the reward server: "
                                                                      "empty text")
    whole = request_error(400, encode_error(INVALID_ARG, "send exactly one of text"), 0, 4, "u", "w")
    assert type(whole) is RewardInputError and whole.index is None and "sequences 0..3 rejected" in str(whole)
    internal = request_error(500, encode_error(INTERNAL, "row 3: rejected input"), 0, 4, "http://h:1", "w")
    assert type(internal) is RewardServerError and internal.index is None and internal.code == INTERNAL
    old = request_error(400, "row 2: empty text", 0, 4, "u", "w")  # a server without tokens: by status, no row
    assert type(old) is RewardInputError and old.index is None
    rows = rows_error([(1, parse_error(encode_error(INTERNAL, "nan", row=1))),
                       (3, parse_error(encode_error(INVALID_ARG, "e", row=3)))], 8, 4, every=False)
    assert type(rows) is RewardServerError and rows.index == 9 and rows.code == INTERNAL
    assert str(rows) == "sequence 9 failed on the reward server (INTERNAL): nan (1 more of sequences 8..11 failed too)"
    assert isinstance(rows_error([(2, parse_error("row 2: old server"))], 0, 4, every=False), RewardInputError)
