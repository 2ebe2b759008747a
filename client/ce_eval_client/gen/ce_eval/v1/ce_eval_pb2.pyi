from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedTensor
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedTensor, _Mapping]] = ...) -> None: ...

class SharedTensor(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("loss", "logits", "targets", "sample_weight", "options", "outputs", "vector", "metrics", "backend", "features", "weight", "bias", "output_shared_memory")
    class OutputSharedMemoryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SharedTensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SharedTensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    loss: str
    logits: Tensor
    targets: Tensor
    sample_weight: Tensor
    options: _struct_pb2.Struct
    outputs: _containers.RepeatedScalarFieldContainer[str]
    vector: Tensor
    metrics: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    features: Tensor
    weight: Tensor
    bias: Tensor
    output_shared_memory: _containers.MessageMap[str, SharedTensor]
    def __init__(self, loss: _Optional[str] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., sample_weight: _Optional[_Union[Tensor, _Mapping]] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., outputs: _Optional[_Iterable[str]] = ..., vector: _Optional[_Union[Tensor, _Mapping]] = ..., metrics: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., output_shared_memory: _Optional[_Mapping[str, SharedTensor]] = ...) -> None: ...

class EvaluateChunk(_message.Message):
    __slots__ = ("data", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("loss", "value", "sum", "denominator", "count", "ignored", "reduction", "normalization", "unit", "outputs", "metrics", "extras", "backend", "compute_dtype", "elapsed_ms", "non_finite")
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
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
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
    non_finite: NonFinitePositions
    def __init__(self, loss: _Optional[str] = ..., value: _Optional[float] = ..., sum: _Optional[float] = ..., denominator: _Optional[float] = ..., count: _Optional[int] = ..., ignored: _Optional[int] = ..., reduction: _Optional[str] = ..., normalization: _Optional[str] = ..., unit: _Optional[str] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., extras: _Optional[_Mapping[str, float]] = ..., backend: _Optional[str] = ..., compute_dtype: _Optional[str] = ..., elapsed_ms: _Optional[float] = ..., non_finite: _Optional[_Union[NonFinitePositions, _Mapping]] = ...) -> None: ...

class NonFinitePositions(_message.Message):
    __slots__ = ("count", "positions")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    count: int
    positions: _containers.RepeatedCompositeFieldContainer[Position]
    def __init__(self, count: _Optional[int] = ..., positions: _Optional[_Iterable[_Union[Position, _Mapping]]] = ...) -> None: ...

class Position(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, index: _Optional[_Iterable[int]] = ...) -> None: ...

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

class CreateRunRequest(_message.Message):
    __slots__ = ("name", "loss", "options", "metrics", "class_names", "tags", "confidence", "slice_keys", "max_slice_values")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SLICE_KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_SLICE_VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    loss: str
    options: _struct_pb2.Struct
    metrics: _containers.RepeatedScalarFieldContainer[str]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.ScalarMap[str, str]
    confidence: _struct_pb2.Struct
    slice_keys: _containers.RepeatedScalarFieldContainer[str]
    max_slice_values: int
    def __init__(self, name: _Optional[str] = ..., loss: _Optional[str] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., metrics: _Optional[_Iterable[str]] = ..., class_names: _Optional[_Iterable[str]] = ..., tags: _Optional[_Mapping[str, str]] = ..., confidence: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., slice_keys: _Optional[_Iterable[str]] = ..., max_slice_values: _Optional[int] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("id", "name", "status", "loss", "options", "metrics_requested", "class_names", "tags", "created_at", "updated_at", "closed_at", "batches", "count", "ignored", "sum", "denominator", "value", "reduction", "normalization", "unit", "metrics", "num_classes", "details", "confidence", "intervals", "no_interval", "paired_ids", "fingerprint", "slice_keys", "gate")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    METRICS_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    INTERVALS_FIELD_NUMBER: _ClassVar[int]
    NO_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PAIRED_IDS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SLICE_KEYS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    status: str
    loss: str
    options: _struct_pb2.Struct
    metrics_requested: _containers.RepeatedScalarFieldContainer[str]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.ScalarMap[str, str]
    created_at: str
    updated_at: str
    closed_at: str
    batches: int
    count: int
    ignored: int
    sum: float
    denominator: float
    value: float
    reduction: str
    normalization: str
    unit: str
    metrics: _struct_pb2.Struct
    num_classes: int
    details: _containers.RepeatedScalarFieldContainer[str]
    confidence: _struct_pb2.Struct
    intervals: _struct_pb2.Struct
    no_interval: _containers.RepeatedScalarFieldContainer[str]
    paired_ids: bool
    fingerprint: _struct_pb2.Struct
    slice_keys: _containers.RepeatedScalarFieldContainer[str]
    gate: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., loss: _Optional[str] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., metrics_requested: _Optional[_Iterable[str]] = ..., class_names: _Optional[_Iterable[str]] = ..., tags: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., closed_at: _Optional[str] = ..., batches: _Optional[int] = ..., count: _Optional[int] = ..., ignored: _Optional[int] = ..., sum: _Optional[float] = ..., denominator: _Optional[float] = ..., value: _Optional[float] = ..., reduction: _Optional[str] = ..., normalization: _Optional[str] = ..., unit: _Optional[str] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., num_classes: _Optional[int] = ..., details: _Optional[_Iterable[str]] = ..., confidence: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., intervals: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., no_interval: _Optional[_Iterable[str]] = ..., paired_ids: _Optional[bool] = ..., fingerprint: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., slice_keys: _Optional[_Iterable[str]] = ..., gate: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AddBatchRequest(_message.Message):
    __slots__ = ("run_id", "batch_id", "logits", "targets", "sample_weight", "features", "weight", "bias", "example_ids", "example_int_ids", "slices")
    class SlicesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SliceValues
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SliceValues, _Mapping]] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_INT_IDS_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    batch_id: str
    logits: Tensor
    targets: Tensor
    sample_weight: Tensor
    features: Tensor
    weight: Tensor
    bias: Tensor
    example_ids: _containers.RepeatedScalarFieldContainer[str]
    example_int_ids: _containers.RepeatedScalarFieldContainer[int]
    slices: _containers.MessageMap[str, SliceValues]
    def __init__(self, run_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., sample_weight: _Optional[_Union[Tensor, _Mapping]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., example_ids: _Optional[_Iterable[str]] = ..., example_int_ids: _Optional[_Iterable[int]] = ..., slices: _Optional[_Mapping[str, SliceValues]] = ...) -> None: ...

class SliceValues(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, values: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("value", "sum", "denominator", "count", "ignored", "metrics")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    value: float
    sum: float
    denominator: float
    count: int
    ignored: int
    metrics: _struct_pb2.Struct
    def __init__(self, value: _Optional[float] = ..., sum: _Optional[float] = ..., denominator: _Optional[float] = ..., count: _Optional[int] = ..., ignored: _Optional[int] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AddBatchResponse(_message.Message):
    __slots__ = ("run_id", "batch_id", "seq", "duplicate", "batch", "run")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    batch_id: str
    seq: int
    duplicate: bool
    batch: BatchResult
    run: Run
    def __init__(self, run_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., seq: _Optional[int] = ..., duplicate: _Optional[bool] = ..., batch: _Optional[_Union[BatchResult, _Mapping]] = ..., run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class AddBatchesResponse(_message.Message):
    __slots__ = ("run_id", "batches", "accepted", "duplicates", "run")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    batches: int
    accepted: int
    duplicates: int
    run: Run
    def __init__(self, run_id: _Optional[str] = ..., batches: _Optional[int] = ..., accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunMetricRequest(_message.Message):
    __slots__ = ("run_id", "name", "normalize", "top", "classes", "sort", "order", "limit", "offset")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    SORT_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    normalize: bool
    top: int
    classes: _containers.RepeatedScalarFieldContainer[int]
    sort: str
    order: str
    limit: int
    offset: int
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., normalize: _Optional[bool] = ..., top: _Optional[int] = ..., classes: _Optional[_Iterable[int]] = ..., sort: _Optional[str] = ..., order: _Optional[str] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class RunMetric(_message.Message):
    __slots__ = ("detail",)
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    detail: _struct_pb2.Struct
    def __init__(self, detail: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GateRunRequest(_message.Message):
    __slots__ = ("run_id", "gate")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    gate: _struct_pb2.Struct
    def __init__(self, run_id: _Optional[str] = ..., gate: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GetRunSlicesRequest(_message.Message):
    __slots__ = ("run_id", "key", "sort", "order", "limit", "offset", "min_slice_size")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SORT_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MIN_SLICE_SIZE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    key: str
    sort: str
    order: str
    limit: int
    offset: int
    min_slice_size: int
    def __init__(self, run_id: _Optional[str] = ..., key: _Optional[str] = ..., sort: _Optional[str] = ..., order: _Optional[str] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ..., min_slice_size: _Optional[int] = ...) -> None: ...

class CompareRunsRequest(_message.Message):
    __slots__ = ("ids", "baseline", "slice_key")
    IDS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    SLICE_KEY_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    baseline: str
    slice_key: str
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., baseline: _Optional[str] = ..., slice_key: _Optional[str] = ...) -> None: ...

class RunAnswer(_message.Message):
    __slots__ = ("answer",)
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    answer: _struct_pb2.Struct
    def __init__(self, answer: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("name", "tags", "status", "limit", "cursor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    status: str
    limit: int
    cursor: str
    def __init__(self, name: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., limit: _Optional[int] = ..., cursor: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_cursor")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_cursor: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...
