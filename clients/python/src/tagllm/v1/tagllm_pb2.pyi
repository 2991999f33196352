from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_NOTE_MAJOR: _ClassVar[Layout]
    LAYOUT_JAGGED: _ClassVar[Layout]

class IdKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ID_KIND_UNSPECIFIED: _ClassVar[IdKind]
    ID_KIND_VOCAB: _ClassVar[IdKind]
    ID_KIND_HASH: _ClassVar[IdKind]
LAYOUT_NOTE_MAJOR: Layout
LAYOUT_JAGGED: Layout
ID_KIND_UNSPECIFIED: IdKind
ID_KIND_VOCAB: IdKind
ID_KIND_HASH: IdKind

class Note(_message.Message):
    __slots__ = ("note_id", "category", "title", "body", "images", "updated_at_ms")
    NOTE_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    note_id: str
    category: str
    title: str
    body: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    updated_at_ms: int
    def __init__(self, note_id: _Optional[str] = ..., category: _Optional[str] = ..., title: _Optional[str] = ..., body: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., updated_at_ms: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "uri")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    uri: str
    def __init__(self, data: _Optional[bytes] = ..., uri: _Optional[str] = ...) -> None: ...

class Tag(_message.Message):
    __slots__ = ("dimension", "value", "score")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    dimension: str
    value: str
    score: float
    def __init__(self, dimension: _Optional[str] = ..., value: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class SparseFeature(_message.Message):
    __slots__ = ("ids", "weights")
    IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class Versions(_message.Message):
    __slots__ = ("model", "handbook", "schema")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HANDBOOK_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    model: str
    handbook: str
    schema: str
    def __init__(self, model: _Optional[str] = ..., handbook: _Optional[str] = ..., schema: _Optional[str] = ...) -> None: ...

class NoteFeatures(_message.Message):
    __slots__ = ("note_id", "found", "groups", "tags", "tagged_at_ms", "versions", "category")
    class GroupsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SparseFeature
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SparseFeature, _Mapping]] = ...) -> None: ...
    NOTE_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TAGGED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    note_id: str
    found: bool
    groups: _containers.MessageMap[str, SparseFeature]
    tags: _containers.RepeatedCompositeFieldContainer[Tag]
    tagged_at_ms: int
    versions: Versions
    category: str
    def __init__(self, note_id: _Optional[str] = ..., found: _Optional[bool] = ..., groups: _Optional[_Mapping[str, SparseFeature]] = ..., tags: _Optional[_Iterable[_Union[Tag, _Mapping]]] = ..., tagged_at_ms: _Optional[int] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., category: _Optional[str] = ...) -> None: ...

class TagNoteRequest(_message.Message):
    __slots__ = ("note", "force", "include_raw_output")
    NOTE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RAW_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    note: Note
    force: bool
    include_raw_output: bool
    def __init__(self, note: _Optional[_Union[Note, _Mapping]] = ..., force: _Optional[bool] = ..., include_raw_output: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "prefill_ms", "decode_ms", "total_ms", "prompt_tokens", "generated_tokens", "cached_prompt_tokens")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int
    def __init__(self, queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class NoteError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class TagNoteResponse(_message.Message):
    __slots__ = ("note_id", "tags", "features", "reused", "raw_output", "timings", "error", "warnings", "images_used", "dropped_tags")
    NOTE_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    RAW_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_USED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TAGS_FIELD_NUMBER: _ClassVar[int]
    note_id: str
    tags: _containers.RepeatedCompositeFieldContainer[Tag]
    features: NoteFeatures
    reused: bool
    raw_output: str
    timings: Timings
    error: NoteError
    warnings: _containers.RepeatedScalarFieldContainer[str]
    images_used: int
    dropped_tags: int
    def __init__(self, note_id: _Optional[str] = ..., tags: _Optional[_Iterable[_Union[Tag, _Mapping]]] = ..., features: _Optional[_Union[NoteFeatures, _Mapping]] = ..., reused: _Optional[bool] = ..., raw_output: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., error: _Optional[_Union[NoteError, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ..., images_used: _Optional[int] = ..., dropped_tags: _Optional[int] = ...) -> None: ...

class GetNoteFeaturesRequest(_message.Message):
    __slots__ = ("note_ids", "groups", "include_tags", "layout")
    NOTE_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TAGS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    note_ids: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedScalarFieldContainer[str]
    include_tags: bool
    layout: Layout
    def __init__(self, note_ids: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[str]] = ..., include_tags: _Optional[bool] = ..., layout: _Optional[_Union[Layout, str]] = ...) -> None: ...

class JaggedGroup(_message.Message):
    __slots__ = ("name", "lengths", "values", "weights")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    lengths: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., lengths: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[int]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class JaggedFeatures(_message.Message):
    __slots__ = ("note_ids", "found", "groups")
    NOTE_IDS_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    note_ids: _containers.RepeatedScalarFieldContainer[str]
    found: _containers.RepeatedScalarFieldContainer[bool]
    groups: _containers.RepeatedCompositeFieldContainer[JaggedGroup]
    def __init__(self, note_ids: _Optional[_Iterable[str]] = ..., found: _Optional[_Iterable[bool]] = ..., groups: _Optional[_Iterable[_Union[JaggedGroup, _Mapping]]] = ...) -> None: ...

class GetNoteFeaturesResponse(_message.Message):
    __slots__ = ("notes", "jagged")
    NOTES_FIELD_NUMBER: _ClassVar[int]
    JAGGED_FIELD_NUMBER: _ClassVar[int]
    notes: _containers.RepeatedCompositeFieldContainer[NoteFeatures]
    jagged: JaggedFeatures
    def __init__(self, notes: _Optional[_Iterable[_Union[NoteFeatures, _Mapping]]] = ..., jagged: _Optional[_Union[JaggedFeatures, _Mapping]] = ...) -> None: ...

class ScanNoteFeaturesRequest(_message.Message):
    __slots__ = ("category", "tagged_since_ms", "groups", "include_tags", "limit")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TAGGED_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TAGS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    category: str
    tagged_since_ms: int
    groups: _containers.RepeatedScalarFieldContainer[str]
    include_tags: bool
    limit: int
    def __init__(self, category: _Optional[str] = ..., tagged_since_ms: _Optional[int] = ..., groups: _Optional[_Iterable[str]] = ..., include_tags: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class GetFeatureSchemaRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FeatureGroupSchema(_message.Message):
    __slots__ = ("name", "dimensions", "id_kind", "vocab_size", "oov_buckets", "hash_buckets", "id_space", "weight", "hash_seed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ID_KIND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    OOV_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    HASH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    ID_SPACE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    HASH_SEED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimensions: _containers.RepeatedScalarFieldContainer[str]
    id_kind: IdKind
    vocab_size: int
    oov_buckets: int
    hash_buckets: int
    id_space: int
    weight: str
    hash_seed: int
    def __init__(self, name: _Optional[str] = ..., dimensions: _Optional[_Iterable[str]] = ..., id_kind: _Optional[_Union[IdKind, str]] = ..., vocab_size: _Optional[int] = ..., oov_buckets: _Optional[int] = ..., hash_buckets: _Optional[int] = ..., id_space: _Optional[int] = ..., weight: _Optional[str] = ..., hash_seed: _Optional[int] = ...) -> None: ...

class GetFeatureSchemaResponse(_message.Message):
    __slots__ = ("groups", "versions", "categories")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[FeatureGroupSchema]
    versions: Versions
    categories: _containers.RepeatedCompositeFieldContainer[CategorySchema]
    def __init__(self, groups: _Optional[_Iterable[_Union[FeatureGroupSchema, _Mapping]]] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., categories: _Optional[_Iterable[_Union[CategorySchema, _Mapping]]] = ...) -> None: ...

class CategorySchema(_message.Message):
    __slots__ = ("key", "dimensions")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    key: str
    dimensions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., dimensions: _Optional[_Iterable[str]] = ...) -> None: ...
