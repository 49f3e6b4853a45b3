from puremesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreStepsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ...) -> None: ...

class ScoreItem(_message.Message):
    __slots__ = ("prompt_text", "prompt_token_ids", "response_text", "response_token_ids", "response_steps")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_STEPS_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_token_ids: _common_pb2.TokenIds
    response_text: str
    response_token_ids: _common_pb2.TokenIds
    response_steps: StepTexts
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., response_text: _Optional[str] = ..., response_token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., response_steps: _Optional[_Union[StepTexts, _Mapping]] = ...) -> None: ...

class StepTexts(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, steps: _Optional[_Iterable[str]] = ...) -> None: ...

class DescribeTokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenizerIdentity(_message.Message):
    __slots__ = ("fingerprint", "vocab_size", "step_tag", "readout")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_TAG_FIELD_NUMBER: _ClassVar[int]
    READOUT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    vocab_size: int
    step_tag: str
    readout: str
    def __init__(self, fingerprint: _Optional[str] = ..., vocab_size: _Optional[int] = ..., step_tag: _Optional[str] = ..., readout: _Optional[str] = ...) -> None: ...

class ScoreStepsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("steps", "error")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepScore]
    error: _common_pb2.ItemError
    def __init__(self, steps: _Optional[_Iterable[_Union[StepScore, _Mapping]]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class StepScore(_message.Message):
    __slots__ = ("score", "token_start", "token_end", "text")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    score: float
    token_start: int
    token_end: int
    text: str
    def __init__(self, score: _Optional[float] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...
