from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    TRANSPORT_GRPC_STREAM: _ClassVar[Transport]
    TRANSPORT_NCCL: _ClassVar[Transport]
    TRANSPORT_TCP_BULK: _ClassVar[Transport]
TRANSPORT_UNSPECIFIED: Transport
TRANSPORT_GRPC_STREAM: Transport
TRANSPORT_NCCL: Transport
TRANSPORT_TCP_BULK: Transport

class WatchVersionsRequest(_message.Message):
    __slots__ = ("replica_id", "current_version", "run_id")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    current_version: int
    run_id: str
    def __init__(self, replica_id: _Optional[str] = ..., current_version: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class VersionAnnouncement(_message.Message):
    __slots__ = ("version", "total_bytes", "total_chunks", "num_tensors", "sha256", "transport", "bulk_port", "bulk_host", "run_id", "bulk_protocol", "bulk_tls")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    BULK_HOST_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BULK_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    BULK_TLS_FIELD_NUMBER: _ClassVar[int]
    version: int
    total_bytes: int
    total_chunks: int
    num_tensors: int
    sha256: str
    transport: Transport
    bulk_port: int
    bulk_host: str
    run_id: str
    bulk_protocol: int
    bulk_tls: bool
    def __init__(self, version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., total_chunks: _Optional[int] = ..., num_tensors: _Optional[int] = ..., sha256: _Optional[str] = ..., transport: _Optional[_Union[Transport, str]] = ..., bulk_port: _Optional[int] = ..., bulk_host: _Optional[str] = ..., run_id: _Optional[str] = ..., bulk_protocol: _Optional[int] = ..., bulk_tls: _Optional[bool] = ...) -> None: ...

class FetchWeightsRequest(_message.Message):
    __slots__ = ("version", "replica_id", "chunk_indices", "max_chunk_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDICES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    replica_id: str
    chunk_indices: _containers.RepeatedScalarFieldContainer[int]
    max_chunk_bytes: int
    def __init__(self, version: _Optional[int] = ..., replica_id: _Optional[str] = ..., chunk_indices: _Optional[_Iterable[int]] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("version", "index", "total_chunks", "offset", "data", "sha256", "manifest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    index: int
    total_chunks: int
    offset: int
    data: bytes
    sha256: str
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, version: _Optional[int] = ..., index: _Optional[int] = ..., total_chunks: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class DescribeVersionRequest(_message.Message):
    __slots__ = ("version", "replica_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    replica_id: str
    def __init__(self, version: _Optional[int] = ..., replica_id: _Optional[str] = ...) -> None: ...

class VersionLayout(_message.Message):
    __slots__ = ("version", "total_bytes", "sha256", "manifest", "crc32_chunk_bytes", "chunk_crc32", "run_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CRC32_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_CRC32_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    total_bytes: int
    sha256: str
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    crc32_chunk_bytes: int
    chunk_crc32: _containers.RepeatedScalarFieldContainer[int]
    run_id: str
    def __init__(self, version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., crc32_chunk_bytes: _Optional[int] = ..., chunk_crc32: _Optional[_Iterable[int]] = ..., run_id: _Optional[str] = ...) -> None: ...

class ConfirmVersionRequest(_message.Message):
    __slots__ = ("replica_id", "run_id", "version", "sha256")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    run_id: str
    version: int
    sha256: str
    def __init__(self, replica_id: _Optional[str] = ..., run_id: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ConfirmVersionResponse(_message.Message):
    __slots__ = ("current_version",)
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    current_version: int
    def __init__(self, current_version: _Optional[int] = ...) -> None: ...

class OpenNcclGroupRequest(_message.Message):
    __slots__ = ("replica_id", "run_id")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    run_id: str
    def __init__(self, replica_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class NcclGroup(_message.Message):
    __slots__ = ("group_id", "nccl_unique_id", "world_size", "rank", "setup_timeout_ms", "chunk_bytes")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    NCCL_UNIQUE_ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SETUP_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    group_id: int
    nccl_unique_id: bytes
    world_size: int
    rank: int
    setup_timeout_ms: int
    chunk_bytes: int
    def __init__(self, group_id: _Optional[int] = ..., nccl_unique_id: _Optional[bytes] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., setup_timeout_ms: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class SendNcclRequest(_message.Message):
    __slots__ = ("replica_id", "group_id", "version", "run_id")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    group_id: int
    version: int
    run_id: str
    def __init__(self, replica_id: _Optional[str] = ..., group_id: _Optional[int] = ..., version: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class SendNcclResponse(_message.Message):
    __slots__ = ("sent_bytes",)
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    sent_bytes: int
    def __init__(self, sent_bytes: _Optional[int] = ...) -> None: ...
