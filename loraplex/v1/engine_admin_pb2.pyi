import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_OUTCOME_UNSPECIFIED: _ClassVar[LoadOutcome]
    LOAD_OUTCOME_LOADED: _ClassVar[LoadOutcome]
    LOAD_OUTCOME_ALREADY_LOADED: _ClassVar[LoadOutcome]

class EvictOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVICT_OUTCOME_UNSPECIFIED: _ClassVar[EvictOutcome]
    EVICT_OUTCOME_EVICTED: _ClassVar[EvictOutcome]
    EVICT_OUTCOME_NOT_PRESENT: _ClassVar[EvictOutcome]

class Residency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIDENCY_UNSPECIFIED: _ClassVar[Residency]
    RESIDENCY_GPU: _ClassVar[Residency]
    RESIDENCY_CPU: _ClassVar[Residency]
    RESIDENCY_DISK: _ClassVar[Residency]
LOAD_OUTCOME_UNSPECIFIED: LoadOutcome
LOAD_OUTCOME_LOADED: LoadOutcome
LOAD_OUTCOME_ALREADY_LOADED: LoadOutcome
EVICT_OUTCOME_UNSPECIFIED: EvictOutcome
EVICT_OUTCOME_EVICTED: EvictOutcome
EVICT_OUTCOME_NOT_PRESENT: EvictOutcome
RESIDENCY_UNSPECIFIED: Residency
RESIDENCY_GPU: Residency
RESIDENCY_CPU: Residency
RESIDENCY_DISK: Residency

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "path", "sha256", "tenant", "aliases", "config_sha256", "chunked_sha256")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_SHA256_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    path: str
    sha256: str
    tenant: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    config_sha256: str
    chunked_sha256: str
    def __init__(self, adapter_id: _Optional[str] = ..., path: _Optional[str] = ..., sha256: _Optional[str] = ..., tenant: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., config_sha256: _Optional[str] = ..., chunked_sha256: _Optional[str] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("outcome", "adapter")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    outcome: LoadOutcome
    adapter: AdapterInfo
    def __init__(self, outcome: _Optional[_Union[LoadOutcome, str]] = ..., adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class EvictAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class EvictAdapterResponse(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: EvictOutcome
    def __init__(self, outcome: _Optional[_Union[EvictOutcome, str]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter_id", "tenant", "aliases", "rank", "size_bytes", "residency", "last_used", "requests_in_flight", "sha256", "target_modules", "alpha", "evicting", "path")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    EVICTING_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    tenant: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    rank: int
    size_bytes: int
    residency: Residency
    last_used: _timestamp_pb2.Timestamp
    requests_in_flight: int
    sha256: str
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    alpha: float
    evicting: bool
    path: str
    def __init__(self, adapter_id: _Optional[str] = ..., tenant: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., rank: _Optional[int] = ..., size_bytes: _Optional[int] = ..., residency: _Optional[_Union[Residency, str]] = ..., last_used: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., requests_in_flight: _Optional[int] = ..., sha256: _Optional[str] = ..., target_modules: _Optional[_Iterable[str]] = ..., alpha: _Optional[float] = ..., evicting: _Optional[bool] = ..., path: _Optional[str] = ...) -> None: ...

class GetEngineInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineInfo(_message.Message):
    __slots__ = ("boot_id", "model_name", "model_fingerprint", "max_loras", "max_lora_rank", "max_cpu_loras", "device", "dtype", "kv_blocks_total", "kv_blocks_free", "kv_block_size", "max_model_len", "running_requests", "waiting_requests", "num_adapters", "architecture")
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_CPU_LORAS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    boot_id: str
    model_name: str
    model_fingerprint: str
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    device: str
    dtype: str
    kv_blocks_total: int
    kv_blocks_free: int
    kv_block_size: int
    max_model_len: int
    running_requests: int
    waiting_requests: int
    num_adapters: int
    architecture: str
    def __init__(self, boot_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., max_loras: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_cpu_loras: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., num_adapters: _Optional[int] = ..., architecture: _Optional[str] = ...) -> None: ...

class ApiKeyEntry(_message.Message):
    __slots__ = ("key_id", "secret_hash", "tenant")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_HASH_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    secret_hash: str
    tenant: str
    def __init__(self, key_id: _Optional[str] = ..., secret_hash: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class SyncApiKeysRequest(_message.Message):
    __slots__ = ("keys", "generation")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKeyEntry]
    generation: int
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKeyEntry, _Mapping]]] = ..., generation: _Optional[int] = ...) -> None: ...

class SyncApiKeysResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...
