from services.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockSlot(_message.Message):
    __slots__ = ("chain_hash", "slot", "chain_name")
    CHAIN_HASH_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_NAME_FIELD_NUMBER: _ClassVar[int]
    chain_hash: int
    slot: int
    chain_name: bytes
    def __init__(self, chain_hash: _Optional[int] = ..., slot: _Optional[int] = ..., chain_name: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("layout", "chain_hashes", "pin_seconds", "chain_names", "session_id")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASHES_FIELD_NUMBER: _ClassVar[int]
    PIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_NAMES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    layout: str
    chain_hashes: _containers.RepeatedScalarFieldContainer[int]
    pin_seconds: float
    chain_names: _containers.RepeatedScalarFieldContainer[bytes]
    session_id: str
    def __init__(self, layout: _Optional[str] = ..., chain_hashes: _Optional[_Iterable[int]] = ..., pin_seconds: _Optional[float] = ..., chain_names: _Optional[_Iterable[bytes]] = ..., session_id: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hits", "pin_id", "target")
    HITS_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[BlockSlot]
    pin_id: str
    target: NixlTarget
    def __init__(self, hits: _Optional[_Iterable[_Union[BlockSlot, _Mapping]]] = ..., pin_id: _Optional[str] = ..., target: _Optional[_Union[NixlTarget, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("pin_id", "read_seconds", "read_blocks")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    READ_SECONDS_FIELD_NUMBER: _ClassVar[int]
    READ_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    read_seconds: float
    read_blocks: int
    def __init__(self, pin_id: _Optional[str] = ..., read_seconds: _Optional[float] = ..., read_blocks: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("layout", "chain_hashes", "block_bytes", "chain_names", "session_id")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHAIN_NAMES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    layout: str
    chain_hashes: _containers.RepeatedScalarFieldContainer[int]
    block_bytes: int
    chain_names: _containers.RepeatedScalarFieldContainer[bytes]
    session_id: str
    def __init__(self, layout: _Optional[str] = ..., chain_hashes: _Optional[_Iterable[int]] = ..., block_bytes: _Optional[int] = ..., chain_names: _Optional[_Iterable[bytes]] = ..., session_id: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("granted", "reservation_id", "target")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    granted: _containers.RepeatedCompositeFieldContainer[BlockSlot]
    reservation_id: str
    target: NixlTarget
    def __init__(self, granted: _Optional[_Iterable[_Union[BlockSlot, _Mapping]]] = ..., reservation_id: _Optional[str] = ..., target: _Optional[_Union[NixlTarget, _Mapping]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "chain_hashes", "abort", "chain_names")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHAIN_HASHES_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_NAMES_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    chain_hashes: _containers.RepeatedScalarFieldContainer[int]
    abort: bool
    chain_names: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, reservation_id: _Optional[str] = ..., chain_hashes: _Optional[_Iterable[int]] = ..., abort: _Optional[bool] = ..., chain_names: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("committed",)
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed: int
    def __init__(self, committed: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("chain_hashes", "all", "chain_names", "memory_only")
    CHAIN_HASHES_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    CHAIN_NAMES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ONLY_FIELD_NUMBER: _ClassVar[int]
    chain_hashes: _containers.RepeatedScalarFieldContainer[int]
    all: bool
    chain_names: _containers.RepeatedScalarFieldContainer[bytes]
    memory_only: bool
    def __init__(self, chain_hashes: _Optional[_Iterable[int]] = ..., all: _Optional[bool] = ..., chain_names: _Optional[_Iterable[bytes]] = ..., memory_only: _Optional[bool] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: int
    def __init__(self, evicted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("capacity_blocks", "used_blocks", "pinned_blocks", "lookups", "hit_blocks", "miss_blocks", "evictions", "disk_blocks", "block_bytes", "disk_capacity_blocks", "disk_hit_blocks", "disk_corrupt_blocks", "disk_writes_stopped", "disk_read_bytes", "disk_read_seconds", "disk_write_bytes", "disk_write_seconds", "disk_sessions", "disk_session_blocks", "load_seconds", "loaded_blocks")
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MISS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_CORRUPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITES_STOPPED_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DISK_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DISK_SESSION_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOADED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    capacity_blocks: int
    used_blocks: int
    pinned_blocks: int
    lookups: int
    hit_blocks: int
    miss_blocks: int
    evictions: int
    disk_blocks: int
    block_bytes: int
    disk_capacity_blocks: int
    disk_hit_blocks: int
    disk_corrupt_blocks: int
    disk_writes_stopped: bool
    disk_read_bytes: int
    disk_read_seconds: float
    disk_write_bytes: int
    disk_write_seconds: float
    disk_sessions: int
    disk_session_blocks: int
    load_seconds: float
    loaded_blocks: int
    def __init__(self, capacity_blocks: _Optional[int] = ..., used_blocks: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., lookups: _Optional[int] = ..., hit_blocks: _Optional[int] = ..., miss_blocks: _Optional[int] = ..., evictions: _Optional[int] = ..., disk_blocks: _Optional[int] = ..., block_bytes: _Optional[int] = ..., disk_capacity_blocks: _Optional[int] = ..., disk_hit_blocks: _Optional[int] = ..., disk_corrupt_blocks: _Optional[int] = ..., disk_writes_stopped: _Optional[bool] = ..., disk_read_bytes: _Optional[int] = ..., disk_read_seconds: _Optional[float] = ..., disk_write_bytes: _Optional[int] = ..., disk_write_seconds: _Optional[float] = ..., disk_sessions: _Optional[int] = ..., disk_session_blocks: _Optional[int] = ..., load_seconds: _Optional[float] = ..., loaded_blocks: _Optional[int] = ...) -> None: ...

class NixlTarget(_message.Message):
    __slots__ = ("agent_name", "agent_metadata", "base_address", "region_bytes", "slot_bytes", "device_id")
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    agent_name: str
    agent_metadata: bytes
    base_address: int
    region_bytes: int
    slot_bytes: int
    device_id: int
    def __init__(self, agent_name: _Optional[str] = ..., agent_metadata: _Optional[bytes] = ..., base_address: _Optional[int] = ..., region_bytes: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., device_id: _Optional[int] = ...) -> None: ...

class ShardEntry(_message.Message):
    __slots__ = ("instance_id", "grpc_address", "nixl_address", "ring_points", "capacity_bytes")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NIXL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RING_POINTS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    grpc_address: str
    nixl_address: str
    ring_points: _containers.RepeatedScalarFieldContainer[int]
    capacity_bytes: int
    def __init__(self, instance_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., nixl_address: _Optional[str] = ..., ring_points: _Optional[_Iterable[int]] = ..., capacity_bytes: _Optional[int] = ...) -> None: ...
