"""Generates the Python code for every puremesh .proto file: one command, deterministic output.

    python protos/generate.py              # regenerate the checked-in code under protos/
    python protos/generate.py --out DIR    # generate into DIR instead (used by the tests)

For protos/puremesh/<svc>/v1/<svc>.proto it writes <svc>_pb2.py, <svc>_pb2.pyi and
<svc>_pb2_grpc.py next to the .proto (under --out), importable as puremesh.<svc>.v1.<svc>_pb2.
Generated files under OUT/puremesh that no longer have a .proto are removed. Exits non-zero
with a message on stderr when protoc fails.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
# The files protoc writes for one .proto, by suffix of the stem.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class GenerateError(RuntimeError):
    """Raised when the protos cannot be compiled."""


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Every v1 .proto file under root/puremesh, sorted for a deterministic protoc call."""
    return sorted((root / "puremesh").glob("*/v1/*.proto"))


def expected_outputs(root: Path = PROTO_ROOT) -> list[Path]:
    """The generated files (relative to the output dir) that the .proto files produce."""
    outs: list[Path] = []
    for proto in proto_files(root):
        rel = proto.relative_to(root)
        outs.extend(rel.with_name(rel.stem + suffix) for suffix in GENERATED_SUFFIXES)
    return sorted(outs)


def generated_files(out: Path) -> list[Path]:
    """The generated files present under out/puremesh (relative to out), sorted."""
    found = {
        path.relative_to(out)
        for suffix in GENERATED_SUFFIXES
        for path in (out / "puremesh").rglob("*" + suffix)
        if path.is_file()
    }
    return sorted(found)


def well_known_include() -> Path:
    """The grpc_tools folder holding google/protobuf/*.proto (the well-known types)."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def generate(out: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Compiles every .proto under root into out; returns the written files (relative)."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise GenerateError("grpcio-tools is not installed (pip install -e '.[dev]')") from exc

    protos = proto_files(root)
    if not protos:
        raise GenerateError(f"no .proto files found under {root / 'puremesh'}/*/v1/")
    wanted = set(expected_outputs(root))
    try:
        out.mkdir(parents=True, exist_ok=True)
        out = out.resolve()
        for stale in generated_files(out):
            if stale not in wanted:
                (out / stale).unlink()
    except OSError as exc:
        raise GenerateError(f"cannot prepare output folder {out}: {exc}") from exc

    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={well_known_include()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p) for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise GenerateError(f"protoc failed with exit code {rc} (see its messages above)")

    missing = sorted(wanted - set(generated_files(out)))
    if missing:
        raise GenerateError("protoc did not write: " + ", ".join(map(str, missing)))
    return sorted(wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=PROTO_ROOT,
        help="output root; files land in OUT/puremesh/<svc>/v1/ (default: %(default)s)",
    )
    ns = parser.parse_args(argv)
    try:
        written = generate(ns.out)
    except GenerateError as exc:
        print(f"generate.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"generate.py: wrote {len(written)} files under {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
