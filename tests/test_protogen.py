"""The committed generated code is what ``python -m service.grpc.protogen`` produces from proto/."""

from __future__ import annotations

import re
from pathlib import Path

from service.grpc import protogen

# protoc stamps its own version into the output; the descriptor and the API must not drift.
_VERSION_LINES = re.compile(
    r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s+\d+,\s*)\n",
    re.MULTILINE,
)


def _normalised(path: Path) -> str:
    return _VERSION_LINES.sub("", path.read_text())


def test_regenerating_gives_no_diff(tmp_path: Path) -> None:
    fresh = {p.relative_to(tmp_path) for p in protogen.generate(tmp_path)}
    committed = {
        p.relative_to(protogen.GEN_DIR) for p in protogen.generated_files(protogen.GEN_DIR)
    }
    assert fresh == committed
    for rel in sorted(fresh):
        assert _normalised(tmp_path / rel) == _normalised(protogen.GEN_DIR / rel), rel


def test_service_descriptor_lists_evaluate() -> None:
    from ce_eval_client.gen.ce_eval.v1 import ce_eval_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["LossEvaluation"]
    method = service.methods_by_name["Evaluate"]
    assert (method.input_type.name, method.output_type.name) == (
        "EvaluateRequest",
        "EvaluateResponse",
    )
