from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("loss", "logits", "targets", "sample_weight", "options", "outputs", "vector", "metrics", "backend")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    loss: str
    logits: Tensor
    targets: Tensor
    sample_weight: Tensor
    options: _struct_pb2.Struct
    outputs: _containers.RepeatedScalarFieldContainer[str]
    vector: Tensor
    metrics: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    def __init__(self, loss: _Optional[str] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., sample_weight: _Optional[_Union[Tensor, _Mapping]] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., outputs: _Optional[_Iterable[str]] = ..., vector: _Optional[_Union[Tensor, _Mapping]] = ..., metrics: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("loss", "value", "sum", "denominator", "count", "ignored", "reduction", "normalization", "unit", "outputs", "metrics", "extras", "backend", "compute_dtype", "elapsed_ms")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class ExtrasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    loss: str
    value: float
    sum: float
    denominator: float
    count: int
    ignored: int
    reduction: str
    normalization: str
    unit: str
    outputs: _containers.MessageMap[str, Tensor]
    metrics: _struct_pb2.Struct
    extras: _containers.ScalarMap[str, float]
    backend: str
    compute_dtype: str
    elapsed_ms: float
    def __init__(self, loss: _Optional[str] = ..., value: _Optional[float] = ..., sum: _Optional[float] = ..., denominator: _Optional[float] = ..., count: _Optional[int] = ..., ignored: _Optional[int] = ..., reduction: _Optional[str] = ..., normalization: _Optional[str] = ..., unit: _Optional[str] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., extras: _Optional[_Mapping[str, float]] = ..., backend: _Optional[str] = ..., compute_dtype: _Optional[str] = ..., elapsed_ms: _Optional[float] = ...) -> None: ...

class ErrorItem(_message.Message):
    __slots__ = ("loc", "msg", "type")
    LOC_FIELD_NUMBER: _ClassVar[int]
    MSG_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    loc: _struct_pb2.ListValue
    msg: str
    type: str
    def __init__(self, loc: _Optional[_Union[_struct_pb2.ListValue, _Mapping]] = ..., msg: _Optional[str] = ..., type: _Optional[str] = ...) -> None: ...

class Problem(_message.Message):
    __slots__ = ("type", "title", "status", "detail", "errors")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    type: str
    title: str
    status: int
    detail: str
    errors: _containers.RepeatedCompositeFieldContainer[ErrorItem]
    def __init__(self, type: _Optional[str] = ..., title: _Optional[str] = ..., status: _Optional[int] = ..., detail: _Optional[str] = ..., errors: _Optional[_Iterable[_Union[ErrorItem, _Mapping]]] = ...) -> None: ...
