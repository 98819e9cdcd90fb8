"""Regenerate the Python protobuf/gRPC code from proto/ with a pinned grpcio-tools.

proto/adamax/v1/adamax.proto is the only source of the wire contract; its generated
modules (with .pyi stubs) are committed under wire/adamax_wire/proto/, in the wire package that
the client and the server both import (neither owns it privately).
Generated files are never edited by hand: change the .proto and rerun

    python scripts/gen_proto.py            # rewrite the committed files
    python scripts/gen_proto.py --check    # exit 1 if the committed files drift

protoc writes absolute imports (``from adamax.v1 import adamax_pb2``); the one rewrite this
script applies turns them into imports of the package the files live in.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("adamax/v1/adamax.proto",)
OUTPUT_DIR = REPO_ROOT / "wire" / "adamax_wire" / "proto"
OUTPUT_PACKAGE = "adamax_wire.proto"
# Bump together with the committed files; the check refuses other versions so that
# drift is never blamed on a different generator.
PINNED_GRPCIO_TOOLS = "1.85.1"

_INIT_DOC = '"""Generated protobuf/gRPC modules for adamax.v1 (scripts/gen_proto.py; do not edit)."""\n'


def _check_pinned_version() -> None:
    installed = metadata.version("grpcio-tools")
    if installed != PINNED_GRPCIO_TOOLS:
        raise SystemExit(
            f"grpcio-tools {PINNED_GRPCIO_TOOLS} is pinned for code generation; "
            f"found {installed}. Install grpcio-tools=={PINNED_GRPCIO_TOOLS}."
        )


def generate(output_dir: Path) -> list[Path]:
    """Run protoc into ``output_dir`` and return the files written, relative to it."""
    from grpc_tools import protoc

    _check_pinned_version()
    output_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={output_dir}",
        f"--pyi_out={output_dir}",
        f"--grpc_python_out={output_dir}",
        *PROTO_FILES,
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")

    written: list[Path] = []
    for path in sorted(output_dir.rglob("*")):
        if path.suffix not in {".py", ".pyi"}:
            continue
        text = path.read_text()
        for proto in PROTO_FILES:
            module_dir = str(Path(proto).parent).replace("/", ".")
            text = text.replace(f"from {module_dir} import", f"from {OUTPUT_PACKAGE}.{module_dir} import")
        path.write_text(text)
        written.append(path.relative_to(output_dir))
    # Packages so that ``adamax_wire.proto.adamax.v1`` imports as a regular package.
    for package_dir in {output_dir, *(output_dir / Path(p).parent for p in PROTO_FILES)}:
        package_dir_parts = package_dir
        while True:
            init = package_dir_parts / "__init__.py"
            if not init.exists():
                init.write_text(_INIT_DOC)
                written.append(init.relative_to(output_dir))
            if package_dir_parts == output_dir:
                break
            package_dir_parts = package_dir_parts.parent
    return sorted(set(written))


def _committed_files(directory: Path) -> set[Path]:
    return {
        p.relative_to(directory)
        for p in directory.rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyi"}
    }


def check(output_dir: Path = OUTPUT_DIR) -> list[str]:
    """Return a list of differences between committed and freshly generated files."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir)
        fresh = _committed_files(fresh_dir)
        committed = _committed_files(output_dir) if output_dir.exists() else set()
        problems = [f"missing: {p}" for p in sorted(fresh - committed)]
        problems += [f"not generated: {p}" for p in sorted(committed - fresh)]
        for rel in sorted(fresh & committed):
            if not filecmp.cmp(fresh_dir / rel, output_dir / rel, shallow=False):
                problems.append(f"differs: {rel}")
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; do not write")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("generated code drifted from proto/; run scripts/gen_proto.py", file=sys.stderr)
            return 1
        return 0
    if OUTPUT_DIR.exists():
        shutil.rmtree(OUTPUT_DIR)
    for rel in generate(OUTPUT_DIR):
        print(OUTPUT_DIR / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
