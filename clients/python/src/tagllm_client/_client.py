"""Thin, typed wrappers over the generated `tagllm.v1` stubs."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, Union

import grpc

from tagllm.v1 import tagllm_pb2, tagllm_pb2_grpc

from ._jagged import KeyedJagged, ResponseShapeError, keyed_jagged_from_proto

DEFAULT_TIMEOUT = 10.0
"""Deadline (seconds) of each FeatureClient unary call."""
DEFAULT_TAG_TIMEOUT = 120.0
"""Deadline (seconds) of each TagClient.tag_note call: generation on a CPU takes seconds, plus queueing."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message either way; the server's defaults (`server.max_*_message_bytes`) are the same."""

Metadata = Sequence[tuple[str, Union[str, bytes]]]
ImageLike = Union[bytes, bytearray, memoryview, str, tagllm_pb2.Image]
NoteLike = Union[tagllm_pb2.TagNoteRequest, tagllm_pb2.Note, Mapping[str, Any]]

_NOTE_KEYS = frozenset({"note_id", "category", "title", "body", "images", "updated_at_ms", "force"})

_C = TypeVar("_C", bound="_Client")


def _make_stub(stub_class: Any, channel: grpc.Channel) -> Any:
    # The generated *_pb2_grpc.py has no type annotations; the methods below annotate each result.
    return stub_class(channel)


class _Client:
    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        metadata: Metadata | None,
        channel_options: Sequence[tuple[str, Any]] | None,
    ) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        options.extend(channel_options or ())
        self._channel = grpc.insecure_channel(target, options=options)
        self._timeout = timeout
        self._metadata: tuple[tuple[str, str | bytes], ...] | None = (
            tuple(metadata) if metadata else None
        )

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel (owned by this client; `close()` closes it)."""
        return self._channel

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _str_list(items: Iterable[str] | None, what: str) -> list[str]:
    if items is None:
        return []
    if isinstance(items, (str, bytes)):
        raise TypeError(f"{what} must be an iterable of str, not a single {type(items).__name__}")
    return list(items)


class FeatureClient(_Client):
    """Client of `tagllm.v1.FeatureService`: ranking-time reads, scans and the schema.

    `target` is a gRPC address such as ``"127.0.0.1:50051"`` (plaintext). `timeout` is the deadline
    in seconds of every unary call; `metadata` is sent with every call. Use it as a context manager,
    or call `close()`, to close the channel.

    Every method lets gRPC failures through as `grpc.RpcError` (`.code()` is a `grpc.StatusCode`:
    `INVALID_ARGUMENT` for a bad request, e.g. an empty note id, more ids than
    `limits.max_ids_per_request` or an unknown group; `DEADLINE_EXCEEDED`; `UNAVAILABLE`; ...).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        metadata: Metadata | None = None,
        channel_options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            target, timeout=timeout, metadata=metadata, channel_options=channel_options
        )
        self._stub = _make_stub(tagllm_pb2_grpc.FeatureServiceStub, self._channel)

    def get_features_kjt(
        self, note_ids: Iterable[str], groups: Iterable[str] | None = None
    ) -> KeyedJagged:
        """Features of `note_ids` in TorchRec KeyedJaggedTensor order (`layout = LAYOUT_JAGGED`).

        `groups` limits the keys to those feature groups (all groups when None or empty). Never-tagged
        ids are not errors: they come back with `found = False` and length 0 in every key.

        Raises `grpc.RpcError` when the call fails (e.g. `INVALID_ARGUMENT`), and
        `ResponseShapeError` when the response is not a consistent jagged batch for these ids.
        """
        ids = _str_list(note_ids, "note_ids")
        request = tagllm_pb2.GetNoteFeaturesRequest(
            note_ids=ids,
            groups=_str_list(groups, "groups"),
            layout=tagllm_pb2.LAYOUT_JAGGED,
        )
        response: tagllm_pb2.GetNoteFeaturesResponse = self._stub.GetNoteFeatures(
            request, timeout=self._timeout, metadata=self._metadata
        )
        if not response.HasField("jagged"):
            if ids or response.notes:
                raise ResponseShapeError(
                    "GetNoteFeatures ignored layout = LAYOUT_JAGGED (the server is too old?)"
                )
            # An empty request may get an empty answer; the keys are then unknown.
        return keyed_jagged_from_proto(ids, response.jagged)

    def get_features(
        self,
        note_ids: Iterable[str],
        groups: Iterable[str] | None = None,
        include_tags: bool = False,
    ) -> list[tagllm_pb2.NoteFeatures]:
        """Features of `note_ids`, one `NoteFeatures` per id in request order (note-major layout).

        A never-tagged id yields `found = False` with every other field empty. `groups` limits the
        groups (all when None or empty); `include_tags` also returns the tags behind the ids.

        Raises `grpc.RpcError` when the call fails (e.g. `INVALID_ARGUMENT`), and
        `ResponseShapeError` when the server answers a different number of notes.
        """
        ids = _str_list(note_ids, "note_ids")
        request = tagllm_pb2.GetNoteFeaturesRequest(
            note_ids=ids,
            groups=_str_list(groups, "groups"),
            include_tags=include_tags,
            layout=tagllm_pb2.LAYOUT_NOTE_MAJOR,
        )
        response: tagllm_pb2.GetNoteFeaturesResponse = self._stub.GetNoteFeatures(
            request, timeout=self._timeout, metadata=self._metadata
        )
        notes = list(response.notes)
        if len(notes) != len(ids):
            raise ResponseShapeError(
                f"GetNoteFeatures answered {len(notes)} notes for {len(ids)} note ids"
            )
        return notes

    def schema(self) -> tagllm_pb2.GetFeatureSchemaResponse:
        """The feature groups (names, id spaces, weights), the categories and the versions.

        Raises `grpc.RpcError` when the call fails.
        """
        response: tagllm_pb2.GetFeatureSchemaResponse = self._stub.GetFeatureSchema(
            tagllm_pb2.GetFeatureSchemaRequest(), timeout=self._timeout, metadata=self._metadata
        )
        return response

    def scan(
        self,
        category: str = "",
        tagged_since_ms: int = 0,
        groups: Iterable[str] | None = None,
        include_tags: bool = False,
        limit: int = 0,
        *,
        timeout: float | None = None,
    ) -> Generator[tagllm_pb2.NoteFeatures, None, None]:
        """Streams stored notes' features (ScanNoteFeatures), for retrieval index builders.

        Filters: `category` (all when empty), `tagged_since_ms` (ms since the epoch, 0 = all),
        `groups`, `limit` (0 = no limit). The call starts at the first `next()`; leaving the loop
        early (or closing the iterator) cancels it. `timeout` is a deadline for the whole stream
        (none by default: a scan of a large store takes as long as it takes).

        Raises `grpc.RpcError` from the iteration when the call fails.
        """
        request = tagllm_pb2.ScanNoteFeaturesRequest(
            category=category,
            tagged_since_ms=tagged_since_ms,
            groups=_str_list(groups, "groups"),
            include_tags=include_tags,
            limit=limit,
        )
        call = self._stub.ScanNoteFeatures(request, timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()


def _image(image: ImageLike) -> tagllm_pb2.Image:
    if isinstance(image, tagllm_pb2.Image):
        return image
    if isinstance(image, str):
        return tagllm_pb2.Image(uri=image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return tagllm_pb2.Image(data=bytes(image))
    raise TypeError(f"an image is bytes (inline data) or str (a URI), not {type(image).__name__}")


def _images(images: Iterable[ImageLike]) -> list[tagllm_pb2.Image]:
    if isinstance(images, (str, bytes, bytearray, memoryview)):
        raise TypeError("images must be a list of images, not a single image")
    return [_image(image) for image in images]


def _request(note: NoteLike, force: bool) -> tagllm_pb2.TagNoteRequest:
    if isinstance(note, tagllm_pb2.TagNoteRequest):
        return note
    if isinstance(note, tagllm_pb2.Note):
        return tagllm_pb2.TagNoteRequest(note=note, force=force)
    if isinstance(note, Mapping):
        unknown = set(note) - _NOTE_KEYS
        if unknown:
            raise ValueError(
                f"note {note.get('note_id')!r}: unknown keys {sorted(unknown)}; "
                f"known: {sorted(_NOTE_KEYS)}"
            )
        return tagllm_pb2.TagNoteRequest(
            note=tagllm_pb2.Note(
                note_id=note.get("note_id", ""),
                category=note.get("category", ""),
                title=note.get("title", ""),
                body=note.get("body", ""),
                images=_images(note.get("images", ())),
                updated_at_ms=note.get("updated_at_ms", 0),
            ),
            force=bool(note.get("force", force)),
        )
    raise TypeError(
        f"a note is a TagNoteRequest, a Note or a mapping, not {type(note).__name__}"
    )


class TagClient(_Client):
    """Client of `tagllm.v1.TagService`: tags notes (generation, features, durable store).

    `target`, `timeout` (the deadline of each `tag_note`, seconds), `metadata` and the context
    manager work as for `FeatureClient`. gRPC failures surface as `grpc.RpcError`:
    `INVALID_ARGUMENT` (a bad note), `RESOURCE_EXHAUSTED` (the tagging queue is full: back off and
    retry), `UNAVAILABLE` (the model is loading or the server is shutting down), `INTERNAL`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TAG_TIMEOUT,
        metadata: Metadata | None = None,
        channel_options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            target, timeout=timeout, metadata=metadata, channel_options=channel_options
        )
        self._stub = _make_stub(tagllm_pb2_grpc.TagServiceStub, self._channel)

    def tag_note(
        self,
        note_id: str,
        category: str,
        title: str = "",
        body: str = "",
        images: Sequence[ImageLike] = (),
        force: bool = False,
        *,
        updated_at_ms: int = 0,
        include_raw_output: bool = False,
    ) -> tagllm_pb2.TagNoteResponse:
        """Tags one note and returns its tags and features (TagNote).

        `images` are inline bytes or URIs (str; the server never fetches them). Idempotent: unchanged
        content and versions return the stored result with `reused = True`, unless `force`.

        Raises `grpc.RpcError` when the call fails (e.g. `INVALID_ARGUMENT` for an empty note id).
        """
        request = tagllm_pb2.TagNoteRequest(
            note=tagllm_pb2.Note(
                note_id=note_id,
                category=category,
                title=title,
                body=body,
                images=_images(images),
                updated_at_ms=updated_at_ms,
            ),
            force=force,
            include_raw_output=include_raw_output,
        )
        response: tagllm_pb2.TagNoteResponse = self._stub.TagNote(
            request, timeout=self._timeout, metadata=self._metadata
        )
        return response

    def tag_notes(
        self,
        notes: Iterable[NoteLike],
        *,
        force: bool = False,
        timeout: float | None = None,
    ) -> Generator[tagllm_pb2.TagNoteResponse, None, None]:
        """Tags many notes over one TagNotes stream; yields one response per note.

        Each item of `notes` is a `TagNoteRequest`, a `Note` (sent with `force`), or a mapping with
        the keys of the JSON note format (`note_id`, `category`, `title`, `body`, `images` as bytes
        or URI strings, `updated_at_ms`, optionally `force`). `notes` is read lazily, so it may be a
        generator of any length. Responses come as notes finish, not necessarily in input order:
        match them by `note_id`. A bad note is answered with `error` set (a gRPC status code and
        message), not raised. `timeout` is a deadline for the whole stream (none by default).

        Raises `grpc.RpcError` from the iteration when the stream as a whole fails. If reading or
        converting `notes` raises, the notes sent so far are still answered, then that exception
        is raised. Leaving the loop early cancels the stream.
        """
        failure: list[BaseException] = []

        def requests() -> Iterator[tagllm_pb2.TagNoteRequest]:
            # Runs on a gRPC thread: an exception here would only cancel the call, so keep it and
            # end the request stream instead.
            try:
                for note in notes:
                    yield _request(note, force)
            except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread below
                failure.append(e)

        call = self._stub.TagNotes(requests(), timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()
        if failure:
            raise failure[0]
