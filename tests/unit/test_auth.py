"""The token file and header rules of worker/server/auth.py, without a server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from worker.config import is_loopback
from worker.server.auth import CredentialsError, TokenFile, bearer_token, parse_tokens

GOOD = "0123456789abcdef0123"


def test_token_lines_that_are_not_tokens_are_skipped_without_being_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = f"# comment\n\n  {GOOD}  \nshort-secret\nwith a space in it xxxxxxxx\n\u00e9{GOOD}\n"
    assert parse_tokens(text, "f") == [GOOD.encode()]
    assert "line 4" in caplog.text and "line 5" in caplog.text and "line 6" in caplog.text
    assert "short-secret" not in caplog.text and "with a space" not in caplog.text


def test_only_digests_of_tokens_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{GOOD}\n")
    tokens = TokenFile(path)
    assert tokens.accepts(GOOD)
    assert GOOD not in repr(vars(tokens)) and GOOD.encode() not in repr(vars(tokens)).encode()
    for wrong in ("", GOOD[:-1], GOOD + "0", GOOD.upper(), "\u00e9" * 20):
        assert not tokens.accepts(wrong)


def test_an_unreadable_or_emptied_file_refuses_every_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "tokens"
    path.write_text(f"{GOOD}\n")
    tokens = TokenFile(path)
    path.unlink()
    assert not tokens.accepts(GOOD)
    path.write_text("# nothing yet\n")
    assert not tokens.accepts(GOOD)
    replacement = tmp_path / "new"
    replacement.write_text(f"{GOOD}\n")
    os.replace(replacement, path)
    assert tokens.accepts(GOOD)
    assert "refusing every token" in caplog.text and GOOD not in caplog.text


def test_a_token_file_without_a_token_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# to be filled in\n")
    with pytest.raises(CredentialsError, match="server.auth.token_file"):
        TokenFile(path)
    with pytest.raises(CredentialsError, match="server.auth.token_file"):
        TokenFile(tmp_path / "missing")


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", f"Bearer {GOOD}"),), GOOD),
        ((("authorization", f"bearer   {GOOD} "),), GOOD),
        ((("Authorization", f"BEARER {GOOD}"),), GOOD),
        ((("authorization", f"Basic {GOOD}"),), None),
        ((("authorization", "Bearer "),), None),
        ((("authorization", GOOD),), None),
        ((("authorization", f"Bearer {GOOD}"), ("authorization", f"Bearer {GOOD}")), None),
        ((("authorization-bin", b"x"),), None),
        (None, None),
    ],
)
def test_bearer_token_is_read_from_exactly_one_authorization_entry(
    metadata: tuple[tuple[str, str | bytes], ...] | None, token: str | None
) -> None:
    assert bearer_token(metadata) == token


def test_loopback_addresses() -> None:
    for listen in ("127.0.0.1:1", "127.9.9.9:1", "[::1]:1", "localhost:1"):
        assert is_loopback(listen), listen
    for listen in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "example.com:1", "[::ffff:10.0.0.1]:1"):
        assert not is_loopback(listen), listen
