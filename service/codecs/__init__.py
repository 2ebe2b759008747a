"""Codecs: request and response (de)serialisation for every transport.

- :mod:`service.codecs.tensors`: tensors as nested lists, ``{dtype, shape, data: base64}``,
  raw bytes;
- :mod:`service.codecs.proto`: the protobuf messages of ``proto/`` (REST protobuf and gRPC);
- :mod:`service.codecs.oip`: Open Inference Protocol v2 infer requests and responses.
"""
