import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_SNAPSHOT: _ClassVar[EventKind]
    EVENT_KIND_ENV_ADDED: _ClassVar[EventKind]
    EVENT_KIND_POD_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_TTL_EXTENDED: _ClassVar[EventKind]
    EVENT_KIND_EXPIRED: _ClassVar[EventKind]
    EVENT_KIND_CLEANED: _ClassVar[EventKind]
    EVENT_KIND_FAILURE_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_AGENTS_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_SHARES_CHANGED: _ClassVar[EventKind]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_STEAL: _ClassVar[Mode]
    MODE_MIRROR: _ClassVar[Mode]

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_STATE_ATTACHING: _ClassVar[AgentState]
    AGENT_STATE_ROUTING: _ClassVar[AgentState]
    AGENT_STATE_FAILED: _ClassVar[AgentState]
    AGENT_STATE_CAPPED: _ClassVar[AgentState]
    AGENT_STATE_FOREIGN: _ClassVar[AgentState]
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_SNAPSHOT: EventKind
EVENT_KIND_ENV_ADDED: EventKind
EVENT_KIND_POD_CHANGED: EventKind
EVENT_KIND_TTL_EXTENDED: EventKind
EVENT_KIND_EXPIRED: EventKind
EVENT_KIND_CLEANED: EventKind
EVENT_KIND_FAILURE_CHANGED: EventKind
EVENT_KIND_AGENTS_CHANGED: EventKind
EVENT_KIND_SHARES_CHANGED: EventKind
MODE_UNSPECIFIED: Mode
MODE_STEAL: Mode
MODE_MIRROR: Mode
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_STATE_ATTACHING: AgentState
AGENT_STATE_ROUTING: AgentState
AGENT_STATE_FAILED: AgentState
AGENT_STATE_CAPPED: AgentState
AGENT_STATE_FOREIGN: AgentState

class RefreshDbRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class RefreshDbResponse(_message.Message):
    __slots__ = ("branches",)
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    branches: _containers.RepeatedCompositeFieldContainer[DbBranch]
    def __init__(self, branches: _Optional[_Iterable[_Union[DbBranch, _Mapping]]] = ...) -> None: ...

class PodRequest(_message.Message):
    __slots__ = ("config", "image", "target", "namespace", "name")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    config: str
    image: str
    target: str
    namespace: str
    name: str
    def __init__(self, config: _Optional[str] = ..., image: _Optional[str] = ..., target: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("pods", "key", "ttl")
    PODS_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[PodRequest]
    key: str
    ttl: str
    def __init__(self, pods: _Optional[_Iterable[_Union[PodRequest, _Mapping]]] = ..., key: _Optional[str] = ..., ttl: _Optional[str] = ...) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("key", "environment", "warnings")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    key: str
    environment: Environment
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., environment: _Optional[_Union[Environment, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class AddPodRequest(_message.Message):
    __slots__ = ("key", "pod")
    KEY_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    key: str
    pod: PodRequest
    def __init__(self, key: _Optional[str] = ..., pod: _Optional[_Union[PodRequest, _Mapping]] = ...) -> None: ...

class AddPodResponse(_message.Message):
    __slots__ = ("environment", "warnings")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    environment: Environment
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, environment: _Optional[_Union[Environment, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("key", "namespace", "watch")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WATCH_FIELD_NUMBER: _ClassVar[int]
    key: str
    namespace: str
    watch: bool
    def __init__(self, key: _Optional[str] = ..., namespace: _Optional[str] = ..., watch: _Optional[bool] = ...) -> None: ...

class StatusEvent(_message.Message):
    __slots__ = ("kind", "sequence", "environments", "pod")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENTS_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    kind: EventKind
    sequence: int
    environments: _containers.RepeatedCompositeFieldContainer[Environment]
    pod: Pod
    def __init__(self, kind: _Optional[_Union[EventKind, str]] = ..., sequence: _Optional[int] = ..., environments: _Optional[_Iterable[_Union[Environment, _Mapping]]] = ..., pod: _Optional[_Union[Pod, _Mapping]] = ...) -> None: ...

class Environment(_message.Message):
    __slots__ = ("key", "namespace", "created_at", "expires_at", "mode", "pods", "pending", "failure", "agents", "shares", "queues", "db_branches")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    DB_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    key: str
    namespace: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    mode: Mode
    pods: _containers.RepeatedCompositeFieldContainer[Pod]
    pending: bool
    failure: str
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    shares: _containers.RepeatedCompositeFieldContainer[ShareLink]
    queues: _containers.RepeatedCompositeFieldContainer[Queue]
    db_branches: _containers.RepeatedCompositeFieldContainer[DbBranch]
    def __init__(self, key: _Optional[str] = ..., namespace: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mode: _Optional[_Union[Mode, str]] = ..., pods: _Optional[_Iterable[_Union[Pod, _Mapping]]] = ..., pending: _Optional[bool] = ..., failure: _Optional[str] = ..., agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ..., shares: _Optional[_Iterable[_Union[ShareLink, _Mapping]]] = ..., queues: _Optional[_Iterable[_Union[Queue, _Mapping]]] = ..., db_branches: _Optional[_Iterable[_Union[DbBranch, _Mapping]]] = ...) -> None: ...

class DbBranch(_message.Message):
    __slots__ = ("type", "source", "server", "database", "copy", "phase", "reason", "size_bytes", "snapshot_at", "secret")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    COPY_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_AT_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    type: str
    source: str
    server: str
    database: str
    copy: str
    phase: str
    reason: str
    size_bytes: int
    snapshot_at: _timestamp_pb2.Timestamp
    secret: str
    def __init__(self, type: _Optional[str] = ..., source: _Optional[str] = ..., server: _Optional[str] = ..., database: _Optional[str] = ..., copy: _Optional[str] = ..., phase: _Optional[str] = ..., reason: _Optional[str] = ..., size_bytes: _Optional[int] = ..., snapshot_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class Queue(_message.Message):
    __slots__ = ("queue_id", "target", "topic", "original_topic", "staging_topic", "mode", "forwarded", "lag")
    QUEUE_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_TOPIC_FIELD_NUMBER: _ClassVar[int]
    STAGING_TOPIC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    queue_id: str
    target: str
    topic: str
    original_topic: str
    staging_topic: str
    mode: str
    forwarded: int
    lag: int
    def __init__(self, queue_id: _Optional[str] = ..., target: _Optional[str] = ..., topic: _Optional[str] = ..., original_topic: _Optional[str] = ..., staging_topic: _Optional[str] = ..., mode: _Optional[str] = ..., forwarded: _Optional[int] = ..., lag: _Optional[int] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("pod", "target", "state", "reason")
    POD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pod: str
    target: str
    state: AgentState
    reason: str
    def __init__(self, pod: _Optional[str] = ..., target: _Optional[str] = ..., state: _Optional[_Union[AgentState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Pod(_message.Message):
    __slots__ = ("name", "target", "container", "image", "phase", "ready", "restarts", "node", "ip", "last_error", "reason", "group")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    name: str
    target: str
    container: str
    image: str
    phase: str
    ready: bool
    restarts: int
    node: str
    ip: str
    last_error: str
    reason: str
    group: str
    def __init__(self, name: _Optional[str] = ..., target: _Optional[str] = ..., container: _Optional[str] = ..., image: _Optional[str] = ..., phase: _Optional[str] = ..., ready: _Optional[bool] = ..., restarts: _Optional[int] = ..., node: _Optional[str] = ..., ip: _Optional[str] = ..., last_error: _Optional[str] = ..., reason: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class CleanRequest(_message.Message):
    __slots__ = ("key", "glob", "all_expired")
    KEY_FIELD_NUMBER: _ClassVar[int]
    GLOB_FIELD_NUMBER: _ClassVar[int]
    ALL_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    key: str
    glob: str
    all_expired: bool
    def __init__(self, key: _Optional[str] = ..., glob: _Optional[str] = ..., all_expired: _Optional[bool] = ...) -> None: ...

class CleanResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: _containers.RepeatedCompositeFieldContainer[CleanedEnvironment]
    def __init__(self, removed: _Optional[_Iterable[_Union[CleanedEnvironment, _Mapping]]] = ...) -> None: ...

class CleanedEnvironment(_message.Message):
    __slots__ = ("key", "objects")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    key: str
    objects: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., objects: _Optional[_Iterable[str]] = ...) -> None: ...

class ShareRequest(_message.Message):
    __slots__ = ("key", "service", "port", "ttl", "staging_url", "revoke", "list")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    STAGING_URL_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    key: str
    service: str
    port: int
    ttl: str
    staging_url: str
    revoke: str
    list: bool
    def __init__(self, key: _Optional[str] = ..., service: _Optional[str] = ..., port: _Optional[int] = ..., ttl: _Optional[str] = ..., staging_url: _Optional[str] = ..., revoke: _Optional[str] = ..., list: _Optional[bool] = ...) -> None: ...

class ShareResponse(_message.Message):
    __slots__ = ("links",)
    LINKS_FIELD_NUMBER: _ClassVar[int]
    links: _containers.RepeatedCompositeFieldContainer[ShareLink]
    def __init__(self, links: _Optional[_Iterable[_Union[ShareLink, _Mapping]]] = ...) -> None: ...

class ShareLink(_message.Message):
    __slots__ = ("url", "slug", "key", "service", "port", "created_by", "created_at", "expires_at")
    URL_FIELD_NUMBER: _ClassVar[int]
    SLUG_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    url: str
    slug: str
    key: str
    service: str
    port: int
    created_by: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, url: _Optional[str] = ..., slug: _Optional[str] = ..., key: _Optional[str] = ..., service: _Optional[str] = ..., port: _Optional[int] = ..., created_by: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GatewayHello(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LinkSet(_message.Message):
    __slots__ = ("links",)
    LINKS_FIELD_NUMBER: _ClassVar[int]
    links: _containers.RepeatedCompositeFieldContainer[GatewayLink]
    def __init__(self, links: _Optional[_Iterable[_Union[GatewayLink, _Mapping]]] = ...) -> None: ...

class GatewayLink(_message.Message):
    __slots__ = ("slug", "key", "upstream", "authority", "expires_at", "ended", "staging_url")
    SLUG_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    STAGING_URL_FIELD_NUMBER: _ClassVar[int]
    slug: str
    key: str
    upstream: str
    authority: str
    expires_at: _timestamp_pb2.Timestamp
    ended: str
    staging_url: str
    def __init__(self, slug: _Optional[str] = ..., key: _Optional[str] = ..., upstream: _Optional[str] = ..., authority: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended: _Optional[str] = ..., staging_url: _Optional[str] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("namespace", "pod")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    pod: str
    def __init__(self, namespace: _Optional[str] = ..., pod: _Optional[str] = ...) -> None: ...

class RouteSet(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("key", "mode", "filter", "ports", "destination", "expires_at")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    key: str
    mode: Mode
    filter: Filter
    ports: _containers.RepeatedScalarFieldContainer[int]
    destination: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, key: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., ports: _Optional[_Iterable[int]] = ..., destination: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("header", "path", "method", "all_of", "any_of", "key")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ALL_OF_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    header: str
    path: str
    method: str
    all_of: FilterList
    any_of: FilterList
    key: str
    def __init__(self, header: _Optional[str] = ..., path: _Optional[str] = ..., method: _Optional[str] = ..., all_of: _Optional[_Union[FilterList, _Mapping]] = ..., any_of: _Optional[_Union[FilterList, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class FilterList(_message.Message):
    __slots__ = ("filters",)
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    def __init__(self, filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ...) -> None: ...
