"""The v1 gRPC contracts: generated code is reproducible, services are named as documented, and
every element of every .proto is commented (rules of the house 4 and 7)."""

from __future__ import annotations

import filecmp
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
GENERATOR = PROTOS / "generate.py"
SERVICES = ["common", "rollout", "prm", "verify", "weights"]
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# service module -> (full service name, {method: (client_streaming, server_streaming)})
EXPECTED_SERVICES = {
    "rollout": (
        "puremesh.rollout.v1.RolloutService",
        {"Generate": (False, True), "GetStatus": (False, False)},
    ),
    "prm": (
        "puremesh.prm.v1.PrmService",
        {"ScoreSteps": (False, False), "DescribeTokenizer": (False, False)},
    ),
    "verify": ("puremesh.verify.v1.VerifyService", {"Verify": (False, False)}),
    "weights": (
        "puremesh.weights.v1.WeightService",
        {
            "WatchVersions": (False, True),
            "FetchWeights": (False, True),
            "DescribeVersion": (False, False),
            "ConfirmVersion": (False, False),
            "OpenNcclGroup": (False, False),
            "SendNccl": (False, False),
        },
    ),
}

# Field numbers of descriptor.proto, used as source_code_info location paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 4, 5, 6, 12
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

STATUS_CODES = {code.name for code in grpc.StatusCode} - {"OK", "UNKNOWN"}


def generated_in(root: Path) -> set[Path]:
    return {
        path.relative_to(root)
        for suffix in GENERATED_SUFFIXES
        for path in (root / "puremesh").rglob("*" + suffix)
    }


# ---------------------------------------------------------------------------------------------
# (a) the checked-in generated code is exactly what the generator writes


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fresh, checked_in = generated_in(tmp_path), generated_in(PROTOS)
    expected = {
        Path("puremesh", svc, "v1", svc + suffix) for svc in SERVICES for suffix in GENERATED_SUFFIXES
    }
    assert fresh == expected
    hint = "run `python protos/generate.py` and commit the result"
    missing = sorted(map(str, fresh - checked_in))
    assert not missing, f"generated files missing from protos/: {missing} ({hint})"
    extra = sorted(map(str, checked_in - fresh))
    assert not extra, f"stale generated files in protos/: {extra} ({hint})"
    differ = [str(rel) for rel in sorted(fresh) if not filecmp.cmp(tmp_path / rel, PROTOS / rel)]
    assert not differ, f"generated files out of date: {differ} ({hint})"


def test_generator_fails_loudly(tmp_path: Path) -> None:
    bad_root = tmp_path / "protos"
    bad = bad_root / "puremesh" / "broken" / "v1"
    bad.mkdir(parents=True)
    (bad / "broken.proto").write_text('syntax = "proto3";\nmessage {\n')
    spec = importlib.util.spec_from_file_location("puremesh_protos_generate", GENERATOR)
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    with pytest.raises(generate.GenerateError, match="protoc failed"):
        generate.generate(tmp_path / "out", root=bad_root)
    with pytest.raises(generate.GenerateError, match=r"no \.proto files"):
        generate.generate(tmp_path / "out", root=tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# (b) every generated module imports; services and methods carry their documented names


@pytest.mark.parametrize("svc", SERVICES)
def test_generated_modules_import(svc: str) -> None:
    pb2 = importlib.import_module(f"puremesh.{svc}.v1.{svc}_pb2")
    importlib.import_module(f"puremesh.{svc}.v1.{svc}_pb2_grpc")
    assert pb2.DESCRIPTOR.package == f"puremesh.{svc}.v1"
    assert pb2.DESCRIPTOR.name == f"puremesh/{svc}/v1/{svc}.proto"


@pytest.mark.parametrize("svc", sorted(EXPECTED_SERVICES))
def test_service_and_method_names(svc: str) -> None:
    full_name, methods = EXPECTED_SERVICES[svc]
    pb2 = importlib.import_module(f"puremesh.{svc}.v1.{svc}_pb2")
    pb2_grpc = importlib.import_module(f"puremesh.{svc}.v1.{svc}_pb2_grpc")
    services = pb2.DESCRIPTOR.services_by_name
    assert [s.full_name for s in services.values()] == [full_name]
    service = services[full_name.rsplit(".", 1)[1]]
    got = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert got == methods
    short = service.name
    assert hasattr(pb2_grpc, f"{short}Stub")
    assert hasattr(pb2_grpc, f"{short}Servicer")
    assert hasattr(pb2_grpc, f"add_{short}Servicer_to_server")
    for method in methods:
        assert callable(getattr(getattr(pb2_grpc, f"{short}Servicer"), method))


# ---------------------------------------------------------------------------------------------
# (c), (d) every element has a comment; every RPC documents idempotency and status codes


def source_descriptors(tmp_path: Path) -> list[descriptor_pb2.FileDescriptorProto]:
    from grpc_tools import protoc

    out = tmp_path / "descriptors.pb"
    protos = sorted((PROTOS / "puremesh").glob("*/v1/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--proto_path={include}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *map(str, protos),
        ]
    )
    assert rc == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert sorted(f.name for f in files) == sorted(f"puremesh/{s}/v1/{s}.proto" for s in SERVICES)
    return list(files)


def _enum_elements(e, prefix, path):
    yield "enum", f"{prefix}.{e.name}", path
    for j, v in enumerate(e.value):
        yield "enum value", f"{prefix}.{e.name}.{v.name}", (*path, ENUM_VALUE, j)


def _message_elements(m, prefix, path):
    name = f"{prefix}.{m.name}"
    yield "message", name, path
    for j, field in enumerate(m.field):
        yield "field", f"{name}.{field.name}", (*path, MSG_FIELD, j)
    synthetic = {f.oneof_index for f in m.field if f.proto3_optional}  # from `optional`
    for j, oneof in enumerate(m.oneof_decl):
        if j not in synthetic:
            yield "oneof", f"{name}.{oneof.name}", (*path, MSG_ONEOF, j)
    for j, nested in enumerate(m.nested_type):
        yield from _message_elements(nested, name, (*path, MSG_NESTED, j))
    for j, e in enumerate(m.enum_type):
        yield from _enum_elements(e, name, (*path, MSG_ENUM, j))


def elements(f: descriptor_pb2.FileDescriptorProto):
    """(kind, qualified name, source path) for every element that must carry a comment."""
    for i, m in enumerate(f.message_type):
        yield from _message_elements(m, f.package, (FILE_MESSAGE, i))
    for i, e in enumerate(f.enum_type):
        yield from _enum_elements(e, f.package, (FILE_ENUM, i))
    for i, s in enumerate(f.service):
        yield "service", f"{f.package}.{s.name}", (FILE_SERVICE, i)
        for j, method in enumerate(s.method):
            yield "rpc", f"{f.package}.{s.name}.{method.name}", (FILE_SERVICE, i, SERVICE_METHOD, j)


def comments(f: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    found: dict[tuple[int, ...], str] = {}
    for loc in f.source_code_info.location:
        text = (loc.leading_comments + loc.trailing_comments).strip()
        key = tuple(loc.path)
        if text and key not in found:
            found[key] = text
    return found


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory: pytest.TempPathFactory):
    return source_descriptors(tmp_path_factory.mktemp("protos"))


def test_every_element_has_a_comment(descriptors) -> None:
    missing = []
    count = 0
    for f in descriptors:
        documented = comments(f)
        for kind, name, path in elements(f):
            count += 1
            if not documented.get(tuple(path)):
                missing.append(f"{kind} {name} ({f.name})")
    assert count > 100  # the walk really covers the files
    assert not missing, "elements without a comment:\n  " + "\n  ".join(missing)


def test_every_file_has_a_header_comment(descriptors) -> None:
    for f in descriptors:
        syntax = [loc for loc in f.source_code_info.location if tuple(loc.path) == (FILE_SYNTAX,)]
        assert syntax, f.name
        header = " ".join(syntax[0].leading_detached_comments)
        assert f.package in header, f"{f.name}: header comment must name {f.package}"


def test_every_rpc_documents_idempotency_and_status_codes(descriptors) -> None:
    problems = []
    rpcs = 0
    for f in descriptors:
        documented = comments(f)
        for kind, name, path in elements(f):
            if kind != "rpc":
                continue
            rpcs += 1
            text = documented.get(tuple(path), "")
            if not re.search(r"^\s*Idempotent: (yes|no)\b", text, re.MULTILINE):
                problems.append(f"{name}: no 'Idempotent: yes|no' line")
            named = set(re.findall(r"\b[A-Z][A-Z_]+\b", text)) & STATUS_CODES
            if not named:
                problems.append(f"{name}: names no gRPC status code")
            if re.search(r"^\s*UNKNOWN\b", text, re.MULTILINE):
                problems.append(f"{name}: lists UNKNOWN as a returned status code")
    assert rpcs == sum(len(methods) for _, methods in EXPECTED_SERVICES.values())
    assert not problems, "\n".join(problems)
