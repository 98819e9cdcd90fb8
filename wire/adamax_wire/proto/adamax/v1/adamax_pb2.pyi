from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    DENSE: _ClassVar[Layout]
    ROW_SPARSE: _ClassVar[Layout]

class TensorGroup(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_GROUP_UNSPECIFIED: _ClassVar[TensorGroup]
    OPTIMIZER_VARIABLES: _ClassVar[TensorGroup]
    GRADIENTS: _ClassVar[TensorGroup]
    TRAINABLE_VARIABLES: _ClassVar[TensorGroup]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    ASYNC: _ClassVar[Mode]
    SYNC: _ClassVar[Mode]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    MEAN: _ClassVar[Aggregation]
    SUM: _ClassVar[Aggregation]

class RoundTimeoutPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_TIMEOUT_POLICY_UNSPECIFIED: _ClassVar[RoundTimeoutPolicy]
    CLOSE_WITH_ARRIVED: _ClassVar[RoundTimeoutPolicy]
    ABORT_ROUND: _ClassVar[RoundTimeoutPolicy]

class NonFinitePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NON_FINITE_POLICY_UNSPECIFIED: _ClassVar[NonFinitePolicy]
    REJECT: _ClassVar[NonFinitePolicy]
    SKIP_STEP: _ClassVar[NonFinitePolicy]

class IfExists(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IF_EXISTS_UNSPECIFIED: _ClassVar[IfExists]
    IF_EXISTS_RESUME: _ClassVar[IfExists]
    IF_EXISTS_ERROR: _ClassVar[IfExists]
    IF_EXISTS_REPLACE: _ClassVar[IfExists]

class PushOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_OUTCOME_UNSPECIFIED: _ClassVar[PushOutcome]
    APPLIED: _ClassVar[PushOutcome]
    ACCEPTED: _ClassVar[PushOutcome]
    ROUND_CLOSED: _ClassVar[PushOutcome]
    DROPPED_LATE: _ClassVar[PushOutcome]
    SKIPPED_NON_FINITE: _ClassVar[PushOutcome]

class AssignOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ASSIGN_OP_UNSPECIFIED: _ClassVar[AssignOp]
    ASSIGN: _ClassVar[AssignOp]
    ASSIGN_ADD: _ClassVar[AssignOp]
    ASSIGN_SUB: _ClassVar[AssignOp]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
LAYOUT_UNSPECIFIED: Layout
DENSE: Layout
ROW_SPARSE: Layout
TENSOR_GROUP_UNSPECIFIED: TensorGroup
OPTIMIZER_VARIABLES: TensorGroup
GRADIENTS: TensorGroup
TRAINABLE_VARIABLES: TensorGroup
MODE_UNSPECIFIED: Mode
ASYNC: Mode
SYNC: Mode
AGGREGATION_UNSPECIFIED: Aggregation
MEAN: Aggregation
SUM: Aggregation
ROUND_TIMEOUT_POLICY_UNSPECIFIED: RoundTimeoutPolicy
CLOSE_WITH_ARRIVED: RoundTimeoutPolicy
ABORT_ROUND: RoundTimeoutPolicy
NON_FINITE_POLICY_UNSPECIFIED: NonFinitePolicy
REJECT: NonFinitePolicy
SKIP_STEP: NonFinitePolicy
IF_EXISTS_UNSPECIFIED: IfExists
IF_EXISTS_RESUME: IfExists
IF_EXISTS_ERROR: IfExists
IF_EXISTS_REPLACE: IfExists
PUSH_OUTCOME_UNSPECIFIED: PushOutcome
APPLIED: PushOutcome
ACCEPTED: PushOutcome
ROUND_CLOSED: PushOutcome
DROPPED_LATE: PushOutcome
SKIPPED_NON_FINITE: PushOutcome
ASSIGN_OP_UNSPECIFIED: AssignOp
ASSIGN: AssignOp
ASSIGN_ADD: AssignOp
ASSIGN_SUB: AssignOp

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "layout", "num_rows", "absent", "group", "in_shm", "shm_offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    ABSENT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    IN_SHM_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    layout: Layout
    num_rows: int
    absent: bool
    group: TensorGroup
    in_shm: bool
    shm_offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., layout: _Optional[_Union[Layout, str]] = ..., num_rows: _Optional[int] = ..., absent: _Optional[bool] = ..., group: _Optional[_Union[TensorGroup, str]] = ..., in_shm: _Optional[bool] = ..., shm_offset: _Optional[int] = ...) -> None: ...

class VariableSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class CoordinationPolicy(_message.Message):
    __slots__ = ("mode", "num_workers", "min_workers", "aggregation", "round_timeout_seconds", "round_timeout_policy", "max_staleness", "non_finite")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    mode: Mode
    num_workers: int
    min_workers: int
    aggregation: Aggregation
    round_timeout_seconds: float
    round_timeout_policy: RoundTimeoutPolicy
    max_staleness: int
    non_finite: NonFinitePolicy
    def __init__(self, mode: _Optional[_Union[Mode, str]] = ..., num_workers: _Optional[int] = ..., min_workers: _Optional[int] = ..., aggregation: _Optional[_Union[Aggregation, str]] = ..., round_timeout_seconds: _Optional[float] = ..., round_timeout_policy: _Optional[_Union[RoundTimeoutPolicy, str]] = ..., max_staleness: _Optional[int] = ..., non_finite: _Optional[_Union[NonFinitePolicy, str]] = ...) -> None: ...

class CreateOptimizerRequest(_message.Message):
    __slots__ = ("optimizer", "config_json", "policy", "if_exists")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    IF_EXISTS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    config_json: str
    policy: CoordinationPolicy
    if_exists: IfExists
    def __init__(self, optimizer: _Optional[str] = ..., config_json: _Optional[str] = ..., policy: _Optional[_Union[CoordinationPolicy, _Mapping]] = ..., if_exists: _Optional[_Union[IfExists, str]] = ...) -> None: ...

class CreateOptimizerResponse(_message.Message):
    __slots__ = ("created", "info")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    created: bool
    info: OptimizerInfo
    def __init__(self, created: _Optional[bool] = ..., info: _Optional[_Union[OptimizerInfo, _Mapping]] = ...) -> None: ...

class OptimizerRef(_message.Message):
    __slots__ = ("optimizer",)
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    def __init__(self, optimizer: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "last_step", "pushes", "seconds_since_seen")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    last_step: int
    pushes: int
    seconds_since_seen: float
    def __init__(self, worker_id: _Optional[str] = ..., last_step: _Optional[int] = ..., pushes: _Optional[int] = ..., seconds_since_seen: _Optional[float] = ...) -> None: ...

class OptimizerInfo(_message.Message):
    __slots__ = ("optimizer", "config_json", "policy", "built", "variables", "version", "iterations", "learning_rate", "learning_rate_is_schedule", "workers", "round_arrivals")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUILT_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_IS_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    config_json: str
    policy: CoordinationPolicy
    built: bool
    variables: _containers.RepeatedCompositeFieldContainer[VariableSpec]
    version: int
    iterations: int
    learning_rate: float
    learning_rate_is_schedule: bool
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    round_arrivals: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, optimizer: _Optional[str] = ..., config_json: _Optional[str] = ..., policy: _Optional[_Union[CoordinationPolicy, _Mapping]] = ..., built: _Optional[bool] = ..., variables: _Optional[_Iterable[_Union[VariableSpec, _Mapping]]] = ..., version: _Optional[int] = ..., iterations: _Optional[int] = ..., learning_rate: _Optional[float] = ..., learning_rate_is_schedule: _Optional[bool] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., round_arrivals: _Optional[_Iterable[str]] = ...) -> None: ...

class ListOptimizersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOptimizersResponse(_message.Message):
    __slots__ = ("optimizers",)
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    optimizers: _containers.RepeatedCompositeFieldContainer[OptimizerInfo]
    def __init__(self, optimizers: _Optional[_Iterable[_Union[OptimizerInfo, _Mapping]]] = ...) -> None: ...

class DeleteOptimizerResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class SetLearningRateRequest(_message.Message):
    __slots__ = ("optimizer", "learning_rate")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    learning_rate: float
    def __init__(self, optimizer: _Optional[str] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class ExcludeFromWeightDecayRequest(_message.Message):
    __slots__ = ("optimizer", "var_names", "var_list")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    VAR_NAMES_FIELD_NUMBER: _ClassVar[int]
    VAR_LIST_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    var_names: _containers.RepeatedScalarFieldContainer[str]
    var_list: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, optimizer: _Optional[str] = ..., var_names: _Optional[_Iterable[str]] = ..., var_list: _Optional[_Iterable[str]] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionResponse(_message.Message):
    __slots__ = ("version", "iterations")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    iterations: int
    def __init__(self, version: _Optional[int] = ..., iterations: _Optional[int] = ...) -> None: ...

class BuildHeader(_message.Message):
    __slots__ = ("optimizer", "worker_id")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    worker_id: str
    def __init__(self, optimizer: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class BuildRequest(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: BuildHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[BuildHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class BuildResponse(_message.Message):
    __slots__ = ("built_now", "info")
    BUILT_NOW_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    built_now: bool
    info: OptimizerInfo
    def __init__(self, built_now: _Optional[bool] = ..., info: _Optional[_Union[OptimizerInfo, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("optimizer", "worker_id", "step", "request_id", "num_tensors", "commit")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    worker_id: str
    step: int
    request_id: str
    num_tensors: int
    commit: bool
    def __init__(self, optimizer: _Optional[str] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., request_id: _Optional[str] = ..., num_tensors: _Optional[int] = ..., commit: _Optional[bool] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("outcome", "version", "iterations", "duplicate", "detail")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    outcome: PushOutcome
    version: int
    iterations: int
    duplicate: bool
    detail: str
    def __init__(self, outcome: _Optional[_Union[PushOutcome, str]] = ..., version: _Optional[int] = ..., iterations: _Optional[int] = ..., duplicate: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("optimizer", "names", "min_version", "known_version", "worker_id", "shm", "wait_seconds")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    names: _containers.RepeatedScalarFieldContainer[str]
    min_version: int
    known_version: int
    worker_id: str
    shm: bool
    wait_seconds: float
    def __init__(self, optimizer: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., min_version: _Optional[int] = ..., known_version: _Optional[int] = ..., worker_id: _Optional[str] = ..., shm: _Optional[bool] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "iterations", "not_modified", "num_tensors", "shm_name")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    version: int
    iterations: int
    not_modified: bool
    num_tensors: int
    shm_name: str
    def __init__(self, version: _Optional[int] = ..., iterations: _Optional[int] = ..., not_modified: _Optional[bool] = ..., num_tensors: _Optional[int] = ..., shm_name: _Optional[str] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class AssignHeader(_message.Message):
    __slots__ = ("optimizer", "op")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    op: AssignOp
    def __init__(self, optimizer: _Optional[str] = ..., op: _Optional[_Union[AssignOp, str]] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: AssignHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[AssignHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SetWeightsRequest(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: OptimizerRef
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[OptimizerRef, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class StoreFrame(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: OptimizerRef
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[OptimizerRef, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class StatelessApplyFrame(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: OptimizerRef
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[OptimizerRef, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class OpenBulkChannelRequest(_message.Message):
    __slots__ = ("optimizer", "worker_id")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    worker_id: str
    def __init__(self, optimizer: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class OpenBulkChannelResponse(_message.Message):
    __slots__ = ("available", "port", "ticket", "ticket_ttl_seconds", "shared_memory")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TICKET_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    available: bool
    port: int
    ticket: bytes
    ticket_ttl_seconds: float
    shared_memory: bool
    def __init__(self, available: _Optional[bool] = ..., port: _Optional[int] = ..., ticket: _Optional[bytes] = ..., ticket_ttl_seconds: _Optional[float] = ..., shared_memory: _Optional[bool] = ...) -> None: ...

class BulkHello(_message.Message):
    __slots__ = ("ticket",)
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    def __init__(self, ticket: _Optional[bytes] = ...) -> None: ...

class BulkStatus(_message.Message):
    __slots__ = ("code", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ShmRegister(_message.Message):
    __slots__ = ("name", "nonce", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    nonce: bytes
    size: int
    def __init__(self, name: _Optional[str] = ..., nonce: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class ShmRelease(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BulkFrame(_message.Message):
    __slots__ = ("hello", "status", "push", "pull", "tensor", "push_response", "pull_header", "shm_register", "release")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    PUSH_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PULL_HEADER_FIELD_NUMBER: _ClassVar[int]
    SHM_REGISTER_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    hello: BulkHello
    status: BulkStatus
    push: PushHeader
    pull: PullRequest
    tensor: TensorHeader
    push_response: PushResponse
    pull_header: PullHeader
    shm_register: ShmRegister
    release: ShmRelease
    def __init__(self, hello: _Optional[_Union[BulkHello, _Mapping]] = ..., status: _Optional[_Union[BulkStatus, _Mapping]] = ..., push: _Optional[_Union[PushHeader, _Mapping]] = ..., pull: _Optional[_Union[PullRequest, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., push_response: _Optional[_Union[PushResponse, _Mapping]] = ..., pull_header: _Optional[_Union[PullHeader, _Mapping]] = ..., shm_register: _Optional[_Union[ShmRegister, _Mapping]] = ..., release: _Optional[_Union[ShmRelease, _Mapping]] = ...) -> None: ...

class CheckpointOptimizer(_message.Message):
    __slots__ = ("optimizer", "version", "iterations", "num_variables", "nbytes")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    version: int
    iterations: int
    num_variables: int
    nbytes: int
    def __init__(self, optimizer: _Optional[str] = ..., version: _Optional[int] = ..., iterations: _Optional[int] = ..., num_variables: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("checkpoint_id", "created_unix", "reason", "nbytes", "optimizers", "valid", "error", "format_version")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    created_unix: float
    reason: str
    nbytes: int
    optimizers: _containers.RepeatedCompositeFieldContainer[CheckpointOptimizer]
    valid: bool
    error: str
    format_version: int
    def __init__(self, checkpoint_id: _Optional[str] = ..., created_unix: _Optional[float] = ..., reason: _Optional[str] = ..., nbytes: _Optional[int] = ..., optimizers: _Optional[_Iterable[_Union[CheckpointOptimizer, _Mapping]]] = ..., valid: _Optional[bool] = ..., error: _Optional[str] = ..., format_version: _Optional[int] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class InspectCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint_id", "verify")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    verify: bool
    def __init__(self, checkpoint_id: _Optional[str] = ..., verify: _Optional[bool] = ...) -> None: ...

class RestoreCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint_id", "optimizers")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    optimizers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, checkpoint_id: _Optional[str] = ..., optimizers: _Optional[_Iterable[str]] = ...) -> None: ...

class RestoredOptimizer(_message.Message):
    __slots__ = ("optimizer", "version", "iterations")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    version: int
    iterations: int
    def __init__(self, optimizer: _Optional[str] = ..., version: _Optional[int] = ..., iterations: _Optional[int] = ...) -> None: ...

class RestoreCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint_id", "restored")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    restored: _containers.RepeatedCompositeFieldContainer[RestoredOptimizer]
    def __init__(self, checkpoint_id: _Optional[str] = ..., restored: _Optional[_Iterable[_Union[RestoredOptimizer, _Mapping]]] = ...) -> None: ...

class DownloadCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint_id", "optimizers")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    optimizers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, checkpoint_id: _Optional[str] = ..., optimizers: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointHeader(_message.Message):
    __slots__ = ("checkpoint_id", "manifest_json", "total_bytes", "restore", "save")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    SAVE_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    manifest_json: str
    total_bytes: int
    restore: bool
    save: bool
    def __init__(self, checkpoint_id: _Optional[str] = ..., manifest_json: _Optional[str] = ..., total_bytes: _Optional[int] = ..., restore: _Optional[bool] = ..., save: _Optional[bool] = ...) -> None: ...

class CheckpointFrame(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: CheckpointHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[CheckpointHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadCheckpointResponse(_message.Message):
    __slots__ = ("saved", "restored")
    SAVED_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    saved: CheckpointInfo
    restored: _containers.RepeatedCompositeFieldContainer[RestoredOptimizer]
    def __init__(self, saved: _Optional[_Union[CheckpointInfo, _Mapping]] = ..., restored: _Optional[_Iterable[_Union[RestoredOptimizer, _Mapping]]] = ...) -> None: ...

class ShardCallHeader(_message.Message):
    __slots__ = ("optimizer", "method", "args_json", "num_tensors")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    method: str
    args_json: str
    num_tensors: int
    def __init__(self, optimizer: _Optional[str] = ..., method: _Optional[str] = ..., args_json: _Optional[str] = ..., num_tensors: _Optional[int] = ...) -> None: ...

class ShardCallFrame(_message.Message):
    __slots__ = ("header", "tensor", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ShardCallHeader
    tensor: TensorHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ShardCallHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ShardCallBatch(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[ShardCallFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[ShardCallFrame, _Mapping]]] = ...) -> None: ...
