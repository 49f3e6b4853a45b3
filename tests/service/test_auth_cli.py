"""The security flags of the command line (issue 13): the README's own example (a verify server
with TLS and a token; `puremesh verify`, `puremesh probe` and grpcurl against it) run as written,
the refusal of a non-loopback plaintext bind and its --insecure escape, and one error line for a
missing token file.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ServedProcess
from pki import MARKER, README

pytestmark = pytest.mark.slow

SERVER_MARKER = "<!-- tests/service/test_auth_cli.py starts the server of the next block"
CLIENTS_MARKER = "<!-- tests/service/test_auth_cli.py runs the next block as written"
BIN = str(Path(sys.executable).parent)  # puremesh and grpcurl


def block_after(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"```bash\n(.*?)```", text[text.index(marker) :], re.S)
    assert found, f"no block after {marker!r}"
    return found.group(1)


@pytest.fixture
def pki_dir(pki, tmp_path) -> Path:
    """A folder holding `pki/` (the README's commands run from there)."""
    (tmp_path / "pki").symlink_to(pki.root)
    return tmp_path


def test_the_readme_example_works_as_written(pki_dir, pki):
    assert MARKER  # the certificates come from the README's block too (tests/pki.py)
    words = shlex.split(block_after(SERVER_MARKER))
    server = ServedProcess(*words[words.index("serve") + 1 :], cwd=pki_dir)
    try:
        port = server.target.rsplit(":", 1)[1]
        script = block_after(CLIENTS_MARKER).replace("localhost:50053", f"localhost:{port}")
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        env.pop("PUREMESH_TOKEN_FILE", None)
        done = subprocess.run(
            ["bash", "-e", "-c", script], cwd=pki_dir, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        server.stop()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert '{"verdict": "correct", "answer": "2"}' in out
    assert f"verify at localhost:{port}: SERVING" in out
    assert "puremesh.verify.v1.VerifyService" in out and "grpc.reflection.v1alpha.ServerReflection" in out
    assert '"verdict": "VERDICT_CORRECT"' in out and '"status": "SERVING"' in out
    lines = [line for line in done.stderr.splitlines() if "UNAUTHENTICATED" in line]
    assert lines == [f"puremesh verify: error: UNAUTHENTICATED from localhost:{port}: invalid bearer token"]
    assert pki.token("verify") not in out and pki.token("prm") not in out


def serve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "puremesh.cli.main", "serve", "verify", "--port", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_plaintext_bind_beyond_loopback_is_refused_unless_insecure(pki, served):
    refused = serve("--host", "0.0.0.0", "--metrics-port", "0")
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith("puremesh serve: error: verify: refusing to serve gRPC on 0.0.0.0 without TLS and tokens")
    )
    tls = ("--tls-cert", pki.path("server.crt"), "--tls-key", pki.path("server.key"))
    half = serve("--host", "0.0.0.0", *tls)
    assert half.returncode == 2 and "without tokens" in half.stderr
    server = served("verify", "--host", "0.0.0.0", "--insecure")
    server.terminate()
    warnings = [line for line in server.process.stderr.read().splitlines() if "(insecure)" in line]
    assert len(warnings) == 1 and "anyone who reaches it may call it" in warnings[0]


def test_a_missing_token_file_is_one_line(tmp_path):
    missing = str(tmp_path / "nope.token")
    server = serve("--auth-tokens", missing)
    assert server.returncode == 2
    assert server.stderr.strip().splitlines()[-1] == (
        f"puremesh serve: error: verify: cannot read token file {missing}: No such file or directory"
    )
    client = subprocess.run(
        [sys.executable, "-m", "puremesh.cli.main", "verify", "--target", "127.0.0.1:1", "--response", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PUREMESH_TOKEN_FILE": missing},
    )
    assert client.returncode == 2
    assert client.stderr.strip().splitlines() == [
        f"puremesh verify: error: cannot read token file {missing}: No such file or directory"
    ]


def test_the_learner_refuses_an_exposed_plaintext_weight_plane(tmp_path):
    config = tmp_path / "learner.yaml"
    endpoints = {name: ["127.0.0.1:1"] for name in ("rollout", "prm", "verify")}
    learner = {"policy_path": "-", "train_path": "-", "out_dir": str(tmp_path / "run")}
    learner["endpoints"] = endpoints
    config.write_text(yaml.safe_dump({"learner": {**learner, "weights": {"host": "0.0.0.0"}}}))
    command = [sys.executable, "-m", "puremesh.cli.main", "train", "--config", str(config)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "puremesh train: error: learner.weights: refusing to serve the weight plane on 0.0.0.0 without "
        "TLS and tokens: set tls_cert/tls_key and auth_tokens (--tls-cert --tls-key --auth-tokens), or "
        "pass --insecure (insecure: true) to accept the exposure"
    ]
