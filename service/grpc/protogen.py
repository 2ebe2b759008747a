"""Generate ``client/ce_eval_client/gen`` from ``proto/`` with grpcio-tools.

``python -m service.grpc.protogen`` rewrites the generated package in place;
``--out DIR`` writes elsewhere (the test compares a fresh generation with the committed code).
protoc emits absolute imports of the proto package (``from ce_eval.v1 import ...``); they are
rewritten to ``ce_eval_client.gen.ce_eval.v1`` so the code lives inside this package.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ("ce_eval/v1/ce_eval.proto",)
GEN_DIR = ROOT / "client" / "ce_eval_client" / "gen"
GEN_PACKAGE = "ce_eval_client.gen"
_IMPORT = re.compile(r"^from ce_eval(\.v1)? import ", re.MULTILINE)


def generated_files(directory: Path) -> list[Path]:
    """The ``.py``/``.pyi`` files under ``directory`` (bytecode caches left out)."""
    return sorted(
        p
        for p in directory.rglob("*.py*")
        if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    )


def generate(out: Path) -> list[Path]:
    """Run protoc into ``out``; returns the generated files (sorted)."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    files = []
    for path in generated_files(out):
        text = path.read_text()
        fixed = _IMPORT.sub(lambda m: f"from {GEN_PACKAGE}.ce_eval{m.group(1) or ''} import ", text)
        path.write_text(fixed)
        files.append(path)
    for path in files:
        package = path.parent
        while package != out.parent:  # every directory up to ``out`` is a regular package
            init = package / "__init__.py"
            if not init.exists():
                init.write_text("")
            package = package.parent
    return generated_files(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=GEN_DIR, help="output directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
