"""atheris harness: request bodies → JSON parse + tensor decoding + request validation.

    python -m tests.fuzz.fuzz_codecs -runs=20000          # coverage-guided, libFuzzer flags

Only the documented service errors may come out; anything else is a crash (a finding).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import orjson

    from service.codecs.tensors import decode_tensor
    from service.config import Settings
    from service.dataplane.evaluate import DataPlane, parse_evaluate_request
    from service.errors import ServiceError

SETTINGS = Settings(max_elements=100_000, log_level="warning")
DATAPLANE = DataPlane(SETTINGS)


def one_input(data: bytes) -> None:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    try:
        if isinstance(payload, dict) and "loss" in payload:
            DATAPLANE.evaluate(parse_evaluate_request(payload, SETTINGS))
        else:
            decode_tensor(payload, ("logits",), SETTINGS.max_elements)
    except ServiceError:
        return


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
