"""Test certificates and tokens, made at test time by the README's own openssl block (README,
"Security"): the suite checks that those commands work as written, and no key is ever
committed. `make_pki(where)` runs the block in `where` and returns what it made; two calls
give two unrelated PKIs (a wrong CA, tokens of another deployment).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/pki.py runs the next block as written -->"


def readme_block() -> str:
    """The shell block that follows MARKER in the README."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"```bash\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert found, "the README's certificate block is missing"
    return found.group(1)


@dataclass(frozen=True)
class Pki:
    """What the README block makes (in `root`, its `pki/` folder)."""

    root: Path

    def path(self, name: str) -> str:
        return str(self.root / name)

    @property
    def ca(self) -> str:
        return self.path("ca.crt")

    def token_file(self, server: str) -> str:
        """The token file of `server` (rollout, prm, verify, weights)."""
        return self.path(f"{server}.token")

    def token(self, server: str) -> str:
        return (self.root / f"{server}.token").read_text().strip()

    def server_security(self, server: str, mtls: bool = True) -> dict[str, str]:
        """ServerSecurity fields: TLS, the client CA (mTLS) and the server's token file."""
        fields = {
            "tls_cert": self.path("server.crt"),
            "tls_key": self.path("server.key"),
            "auth_tokens": self.token_file(server),
        }
        return {**fields, "tls_client_ca": self.ca} if mtls else fields

    def client_security(self, server: str, client_cert: bool = True) -> dict[str, str]:
        """ClientSecurity fields: the CA, the client certificate and `server`'s token."""
        fields = {"tls_ca": self.ca, "token_file": self.token_file(server)}
        if client_cert:
            fields.update(tls_cert=self.path("client.crt"), tls_key=self.path("client.key"))
        return fields


def make_pki(where: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificates (README, Security)")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["bash", "-e", "-c", readme_block()], cwd=where, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"the README's certificate block failed:\n{done.stderr}"
    return Pki(where / "pki")
