"""Python client for the tagllm gRPC feature service.

`FeatureClient` reads features (note-major protobuf messages, or numpy arrays in TorchRec
KeyedJaggedTensor order via `get_features_kjt`), scans the store and reads the schema; `TagClient`
tags notes. gRPC failures surface as `grpc.RpcError`. The generated messages are in
`tagllm.v1.tagllm_pb2`.
"""

from ._client import (
    DEFAULT_TAG_TIMEOUT,
    DEFAULT_TIMEOUT,
    MAX_MESSAGE_BYTES,
    FeatureClient,
    TagClient,
)
from ._jagged import JaggedSlice, KeyedJagged, ResponseShapeError, keyed_jagged_from_proto

__all__ = [
    "DEFAULT_TAG_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "MAX_MESSAGE_BYTES",
    "FeatureClient",
    "JaggedSlice",
    "KeyedJagged",
    "ResponseShapeError",
    "TagClient",
    "keyed_jagged_from_proto",
]
