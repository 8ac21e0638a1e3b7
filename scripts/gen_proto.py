"""Generates the Python gRPC stubs from proto/ into agent/api/gen/ (gitignored).

Run by scripts/setup.sh. Regenerates only when a .proto file or the grpcio-tools
version changed (a stamp file holds their hash), so a second run changes nothing.
proto/ is mapped to the virtual path agent/api/gen/, which makes protoc's absolute
imports `from agent.api.gen.egress_warden.v1 import ...` resolve inside our package.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTO = REPO / "proto"
GEN = REPO / "agent" / "api" / "gen"
STAMP = GEN / ".generated-from"


def fingerprint(protos: list[Path]) -> str:
    digest = hashlib.sha256(version("grpcio-tools").encode())
    for path in protos:
        digest.update(str(path.relative_to(PROTO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def generate(protos: list[Path]) -> None:
    shutil.rmtree(GEN, ignore_errors=True)
    GEN.mkdir(parents=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{include}", f"-Iagent/api/gen={PROTO}", f"--python_out={REPO}",
            f"--grpc_python_out={REPO}", f"--pyi_out={REPO}", *map(str, protos)]
    if protoc.main(args) != 0:
        sys.exit(f"gen_proto: protoc failed on {', '.join(map(str, protos))}")
    for package in {GEN, *(p.parent for p in GEN.rglob("*_pb2.py"))}:
        while package != GEN.parent:
            (package / "__init__.py").touch()
            package = package.parent


def main() -> None:
    protos = sorted(PROTO.rglob("*.proto"))
    want = fingerprint(protos)
    if STAMP.exists() and STAMP.read_text() == want:
        print("gen_proto: gRPC stubs up to date")
        return
    generate(protos)
    STAMP.write_text(want)
    print(f"gen_proto: generated gRPC stubs for {len(protos)} proto file(s) into {GEN.relative_to(REPO)}")


if __name__ == "__main__":
    main()
