"""rpc/auth.py without servers: token files, bearer metadata, the exposure rule, the security
settings (the real servers are tests/service/test_auth.py)."""

from __future__ import annotations

import logging

import pytest

from puremesh.rpc import auth
from puremesh.rpc.auth import Authenticator, SecurityError, TokenFile, TokenSource, bearer_token
from puremesh.rpc.settings import ClientSecurity, ServerSecurity, ServerSettings

GOOD = "a" * 32
OTHER = "b" * 40


def test_a_token_file_holds_one_token_per_line_with_comments(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# the learner\n{GOOD}\n\n   {OTHER}  \n# {'c' * 32}\nshort\n")
    tokens = TokenFile(str(path))
    assert tokens.accepts(GOOD) and tokens.accepts(OTHER)
    assert not tokens.accepts("c" * 32), "a commented-out token is not accepted"
    assert not tokens.accepts("short"), "tokens under MIN_TOKEN_CHARS are ignored"
    assert not tokens.accepts(GOOD[:-1]) and not tokens.accepts(GOOD + "a")


@pytest.mark.parametrize("content", ["", "# only a comment\n", "short\n"])
def test_a_token_file_without_a_usable_token_is_refused_at_start(tmp_path, content):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(SecurityError, match="holds no token"):
        TokenFile(str(path))
    with pytest.raises(SecurityError, match="cannot read token file"):
        TokenFile(str(tmp_path / "missing"))


def test_a_reload_that_finds_no_token_refuses_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text(GOOD)
    tokens = TokenFile(str(path))
    path.write_text("# emptied\n")
    assert not tokens.accepts(GOOD)
    path.unlink()  # unreadable later: the last content stays
    assert not tokens.accepts(GOOD)
    path.write_text(OTHER)
    assert tokens.accepts(OTHER)


def test_bearer_metadata(tmp_path):
    assert bearer_token([("application", "prm"), ("authorization", f"Bearer {GOOD}")]) == GOOD
    assert bearer_token([("Authorization", f"Bearer {GOOD}".encode())]) == GOOD
    assert bearer_token([("authorization", f"Basic {GOOD}")]) == ""
    assert bearer_token([]) is None and bearer_token(None) is None
    path = tmp_path / "tokens"
    path.write_text(GOOD)
    checker = Authenticator(TokenFile(str(path)))
    assert checker.refusal([("authorization", f"Bearer {GOOD}")]) is None
    missing, wrong = checker.refusal([]), checker.refusal([("authorization", f"Bearer {OTHER}")])
    assert "missing" in missing.message and "invalid" in wrong.message and OTHER not in wrong.message
    assert Authenticator(None).refusal([]) is None


def test_a_client_sends_the_first_token_of_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_INTERVAL_S", 0.0)
    path = tmp_path / "token"
    path.write_text(f"# mine\n{GOOD}\n{OTHER}\n")
    source = TokenSource(str(path))
    assert source.token() == GOOD
    path.write_text(f"{OTHER}\n")
    assert source.token() == OTHER
    path.write_text("")
    with pytest.raises(SecurityError, match="holds no token"):
        source.token()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"])
def test_loopback_binds_need_nothing(host):
    assert auth.is_loopback(host)
    auth.check_exposure(host, ServerSecurity(), "gRPC")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.7"])
def test_other_binds_need_tls_and_tokens_or_insecure(host, tmp_path, caplog):
    assert not auth.is_loopback(host)
    with pytest.raises(SecurityError, match=r"without TLS and tokens.*--insecure"):
        auth.check_exposure(host, ServerSecurity(), "gRPC")
    tls = ServerSecurity(tls_cert="c.pem", tls_key="k.pem")
    with pytest.raises(SecurityError, match="without tokens"):
        auth.check_exposure(host, tls, "gRPC")
    with pytest.raises(SecurityError, match="without TLS:"):
        auth.check_exposure(host, ServerSecurity(auth_tokens="t"), "gRPC")
    auth.check_exposure(host, tls.model_copy(update={"auth_tokens": "t"}), "gRPC")
    caplog.set_level(logging.WARNING)
    auth._warned.discard(f"test {host}")
    for _ in range(3):
        auth.check_exposure(host, ServerSecurity(insecure=True), f"test {host}")
    assert caplog.text.count("insecure") == 1, "warned once"


def test_security_settings_come_in_pairs():
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ServerSettings(tls_cert="c.pem")
    with pytest.raises(ValueError, match="needs tls_cert"):
        ServerSettings(tls_client_ca="ca.pem")
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        ClientSecurity(tls_key="k.pem")
    assert ClientSecurity(tls_ca="ca.pem").uses_tls and ClientSecurity(tls=True).uses_tls
    assert not ClientSecurity(token_file="t").uses_tls
