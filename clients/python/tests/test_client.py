"""Tests of the Python client against a running tagllm server, plus offline checks.

The server address comes from TAGLLM_ADDR (e.g. 127.0.0.1:50051); the tests that need a server fail
when it is unset. Run from the repo root:

    TAGLLM_ADDR=127.0.0.1:50051 python -m pytest -q clients/python/tests
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tagllm.v1 import tagllm_pb2
from tagllm_client import (
    FeatureClient,
    KeyedJagged,
    ResponseShapeError,
    TagClient,
    keyed_jagged_from_proto,
)

CLIENT_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = CLIENT_DIR.parents[1]
FIXTURE_NOTES = [REPO_ROOT / "tests" / "fixtures" / "notes" / name
                 for name in ("sneakers_1.json", "beauty_1.json")]
# Our own ids, so that other tests sharing the server cannot change these notes under us.
ID_PREFIX = "pyclient-"
NEVER_TAGGED = ID_PREFIX + "never-tagged"
SERVING_WAIT_S = 60.0


# --- server fixtures -------------------------------------------------------------------------------


def _health_status(channel: grpc.Channel, service: str) -> bytes:
    # grpc.health.v1.Health/Check without generated stubs: HealthCheckRequest{service} is field 1
    # (a string), and a SERVING HealthCheckResponse is b"\x08\x01" (field 1, varint 1).
    encoded = service.encode()
    check: Any = channel.unary_unary("/grpc.health.v1.Health/Check")
    response: bytes = check(b"\x0a" + bytes([len(encoded)]) + encoded, timeout=5)
    return response


@pytest.fixture(scope="session")
def addr() -> str:
    value = os.environ.get("TAGLLM_ADDR", "").strip()
    if not value:
        pytest.fail(
            "TAGLLM_ADDR is not set: these tests need a running tagllm server, e.g. "
            "`cargo run --release -- serve` and TAGLLM_ADDR=127.0.0.1:50051",
            pytrace=False,
        )
    # Wait (briefly) for the model: TagService is NOT_SERVING until it is loaded and warm.
    deadline = time.monotonic() + SERVING_WAIT_S
    last = "no answer"
    with grpc.insecure_channel(value) as channel:
        while time.monotonic() < deadline:
            try:
                status = _health_status(channel, "tagllm.v1.TagService")
                if status == b"\x08\x01":
                    return value
                last = f"health status bytes {status!r}"
            except grpc.RpcError as e:
                last = f"{e.code()}: {e.details()}"
            time.sleep(0.5)
    pytest.fail(
        f"tagllm server at TAGLLM_ADDR={value} is not SERVING after {SERVING_WAIT_S:.0f} s ({last})",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def notes() -> list[dict[str, Any]]:
    out = []
    for path in FIXTURE_NOTES:
        note = json.loads(path.read_text(encoding="utf-8"))
        note["note_id"] = ID_PREFIX + note["note_id"]
        out.append(note)
    assert len({n["category"] for n in out}) == len(out), "fixture notes must differ in category"
    return out


@pytest.fixture(scope="session")
def ids(notes: list[dict[str, Any]]) -> list[str]:
    return [n["note_id"] for n in notes]


@pytest.fixture(scope="session")
def tagged(addr: str, notes: list[dict[str, Any]]) -> dict[str, tagllm_pb2.TagNoteResponse]:
    """Tags the fixture notes (and one bad note) over one TagNotes stream; responses by note_id."""
    bad = {"note_id": "", "category": "food", "body": "an empty id is a per-note error"}
    with TagClient(addr) as client:
        responses = list(client.tag_notes([*notes, bad], timeout=600))
    assert len(responses) == len(notes) + 1, [r.note_id for r in responses]
    by_id = {r.note_id: r for r in responses}
    assert len(by_id) == len(responses), "each response names a different note"
    return by_id


@pytest.fixture(scope="session")
def features(addr: str) -> Iterator[FeatureClient]:
    with FeatureClient(addr) as client:
        yield client


# --- helpers ---------------------------------------------------------------------------------------


def _group(note: tagllm_pb2.NoteFeatures, key: str) -> tuple[list[int], np.ndarray]:
    # `note.groups[key]` would insert an empty entry; a missing group means no ids.
    if key not in note.groups:
        return [], np.empty(0, dtype=np.float32)
    feature = note.groups[key]
    assert len(feature.ids) == len(feature.weights), (note.note_id, key)
    return list(feature.ids), np.array(feature.weights, dtype=np.float32)


def assert_same_features(kj: KeyedJagged, notes: Sequence[tagllm_pb2.NoteFeatures]) -> None:
    """The jagged batch holds exactly the note-major features: same ids and weights, same order."""
    b = kj.batch_size
    assert [n.note_id for n in notes] == kj.note_ids
    assert [n.found for n in notes] == kj.found.tolist()
    for note in notes:
        extra = set(note.groups) - set(kj.keys)
        assert not extra, f"{note.note_id}: note-major groups {extra} missing from keys {kj.keys}"
    offsets = kj.offsets()
    for k, key in enumerate(kj.keys):
        part = kj[key]
        assert part.lengths.tolist() == kj.lengths[k * b : (k + 1) * b].tolist()
        want_values: list[int] = []
        want_weights: list[np.ndarray] = []
        for i, note in enumerate(notes):
            start, end = int(offsets[k * b + i]), int(offsets[k * b + i + 1])
            ids, weights = _group(note, key)
            assert kj.values[start:end].tolist() == ids, f"ids of {key!r} for {note.note_id!r}"
            np.testing.assert_array_equal(
                kj.weights[start:end], weights, err_msg=f"weights of {key!r} for {note.note_id!r}"
            )
            assert int(part.lengths[i]) == len(ids)
            want_values.extend(ids)
            want_weights.append(weights)
        assert part.values.tolist() == want_values
        np.testing.assert_array_equal(part.weights, np.concatenate(want_weights))


def assert_invalid_argument(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> None:
    error: Any = excinfo.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())


# --- against the server ----------------------------------------------------------------------------


def test_tag_notes_answers_every_note(
    tagged: dict[str, tagllm_pb2.TagNoteResponse], notes: list[dict[str, Any]]
) -> None:
    bad = tagged[""]
    assert bad.HasField("error")
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.error.message.startswith("note.note_id"), bad.error.message
    for note in notes:
        response = tagged[note["note_id"]]
        assert not response.HasField("error"), response.error
        assert response.features.found
        assert response.features.note_id == note["note_id"]
        assert response.features.category == note["category"]


def test_tag_note_reuses_the_stored_result(
    addr: str, tagged: dict[str, tagllm_pb2.TagNoteResponse], notes: list[dict[str, Any]]
) -> None:
    note = notes[0]
    with TagClient(addr) as client:
        response = client.tag_note(
            note["note_id"],
            note["category"],
            title=note["title"],
            body=note["body"],
            images=note["images"],
            updated_at_ms=note["updated_at_ms"],
        )
    assert response.reused, "same content and versions must return the stored result"
    first = tagged[note["note_id"]]
    assert [(t.dimension, t.value) for t in response.tags] == [
        (t.dimension, t.value) for t in first.tags
    ]
    assert dict(response.features.groups) == dict(first.features.groups)


def test_kjt_matches_note_major(
    features: FeatureClient, tagged: dict[str, tagllm_pb2.TagNoteResponse], ids: list[str]
) -> None:
    batch = [ids[0], NEVER_TAGGED, ids[1]]
    kj = features.get_features_kjt(batch)

    assert kj.found.dtype == np.bool_
    assert kj.values.dtype == np.int64
    assert kj.lengths.dtype == np.int32
    assert kj.weights.dtype == np.float32
    assert kj.offsets().dtype == np.int64
    assert kj.note_ids == batch
    assert kj.found.tolist() == [True, False, True]
    k, b = len(kj.keys), len(batch)
    assert k > 0
    assert kj.lengths.shape == (k * b,)
    assert len(kj.values) == len(kj.weights) == int(kj.lengths.sum())
    assert kj.offsets()[-1] == len(kj.values)
    assert sum(kj.length_per_key()) == len(kj.values)
    assert kj.lengths.reshape(k, b)[:, 1].tolist() == [0] * k, "never-tagged note has ids"
    for key, part in kj.to_dict().items():
        assert part.lengths[1] == 0, key
    # Not vacuous: the tagged notes have features.
    assert len(kj.values) > 0, "the tagged notes have no feature ids at all"

    note_major = features.get_features(batch)
    assert_same_features(kj, note_major)

    # What the store serves is what tagging returned.
    for note_id, note in zip(batch, note_major):
        if note_id in tagged:
            assert dict(note.groups) == dict(tagged[note_id].features.groups), note_id


def test_schema_lists_the_keys(
    features: FeatureClient, ids: list[str], notes: list[dict[str, Any]]
) -> None:
    schema = features.schema()
    names = [g.name for g in schema.groups]
    assert names and len(set(names)) == len(names)
    assert schema.versions.schema and schema.versions.handbook and schema.versions.model
    categories = {c.key for c in schema.categories}
    assert {n["category"] for n in notes} <= categories

    kj = features.get_features_kjt(ids)
    assert set(kj.keys) <= set(names), f"keys {kj.keys} not in schema {names}"
    assert kj.keys == names, "without a filter, every schema group is a key, in schema order"


def test_groups_filter(features: FeatureClient, ids: list[str]) -> None:
    names = [g.name for g in features.schema().groups]
    wanted = [names[-1], names[0]]
    batch = [ids[1], NEVER_TAGGED, ids[0]]
    kj = features.get_features_kjt(batch, groups=wanted)
    assert sorted(kj.keys) == sorted(wanted)
    assert kj.lengths.shape == (len(wanted) * len(batch),)
    for name in names:
        if name not in wanted:
            assert name not in kj
            with pytest.raises(KeyError):
                kj[name]
    note_major = features.get_features(batch, groups=wanted)
    for note in note_major:
        assert set(note.groups) <= set(wanted)
    assert_same_features(kj, note_major)


def test_get_features_include_tags(
    features: FeatureClient, tagged: dict[str, tagllm_pb2.TagNoteResponse], ids: list[str]
) -> None:
    with_tags, missing = features.get_features([ids[0], NEVER_TAGGED], include_tags=True)
    assert with_tags.found and not missing.found
    assert [(t.dimension, t.value) for t in with_tags.tags] == [
        (t.dimension, t.value) for t in tagged[ids[0]].tags
    ]
    assert not missing.groups and not missing.tags
    (without_tags,) = features.get_features([ids[0]])
    assert not without_tags.tags


def test_scan(
    features: FeatureClient,
    tagged: dict[str, tagllm_pb2.TagNoteResponse],
    notes: list[dict[str, Any]],
) -> None:
    note = notes[1]
    since = tagged[note["note_id"]].features.tagged_at_ms
    assert since > 0
    scanned = list(
        features.scan(category=note["category"], tagged_since_ms=since, groups=["tags"])
    )
    by_id = {n.note_id: n for n in scanned}
    assert note["note_id"] in by_id
    for n in scanned:
        assert n.found and n.category == note["category"] and n.tagged_at_ms >= since
        assert set(n.groups) <= {"tags"}
    (direct,) = features.get_features([note["note_id"]], groups=["tags"])
    assert dict(by_id[note["note_id"]].groups) == dict(direct.groups)

    assert len(list(features.scan(limit=1))) == 1
    # Leaving a scan early cancels it without an error.
    stream = features.scan()
    next(stream)
    stream.close()


def test_invalid_requests_raise_invalid_argument(addr: str, features: FeatureClient) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        features.get_features(["fine", ""])
    assert_invalid_argument(excinfo)

    with pytest.raises(grpc.RpcError) as excinfo:
        features.get_features_kjt([f"{ID_PREFIX}{i}" for i in range(5001)])
    assert_invalid_argument(excinfo)
    details: Any = excinfo.value
    assert "5000" in details.details(), details.details()

    with pytest.raises(grpc.RpcError) as excinfo:
        features.get_features_kjt([NEVER_TAGGED], groups=["no-such-group"])
    assert_invalid_argument(excinfo)

    with TagClient(addr) as client, pytest.raises(grpc.RpcError) as excinfo:
        client.tag_note("", "food", body="no id")
    assert_invalid_argument(excinfo)


def test_empty_batch(features: FeatureClient) -> None:
    kj = features.get_features_kjt([])
    assert kj.note_ids == [] and len(kj.found) == len(kj.values) == len(kj.lengths) == 0
    assert features.get_features([]) == []


# --- offline ---------------------------------------------------------------------------------------


def _jagged() -> tagllm_pb2.JaggedFeatures:
    return tagllm_pb2.JaggedFeatures(
        note_ids=["a", "missing", "b"],
        found=[True, False, True],
        groups=[
            tagllm_pb2.JaggedGroup(
                name="brand", lengths=[1, 0, 2], values=[7, 8, 9], weights=[0.5, 0.25, 1.0]
            ),
            tagllm_pb2.JaggedGroup(name="style", lengths=[0, 0, 0]),
            tagllm_pb2.JaggedGroup(
                name="tags", lengths=[2, 0, 1], values=[1, 2 << 40, 3], weights=[1, 1, 1]
            ),
        ],
    )


def test_keyed_jagged_layout() -> None:
    kj = keyed_jagged_from_proto(["a", "missing", "b"], _jagged())
    assert kj.keys == ["brand", "style", "tags"]
    assert kj.values.tolist() == [7, 8, 9, 1, 2 << 40, 3]
    assert kj.lengths.tolist() == [1, 0, 2, 0, 0, 0, 2, 0, 1]
    assert kj.weights.tolist() == [0.5, 0.25, 1.0, 1.0, 1.0, 1.0]
    assert kj.offsets().tolist() == [0, 1, 1, 3, 3, 3, 3, 5, 5, 6]
    assert kj.length_per_key() == [3, 0, 3]
    assert kj["brand"].values.tolist() == [7, 8, 9]
    assert kj["style"].lengths.tolist() == [0, 0, 0] and kj["style"].values.size == 0
    assert kj["tags"].weights.dtype == np.float32
    assert list(kj.to_dict()) == kj.keys
    with pytest.raises(KeyError):
        kj["nope"]


def _mutations() -> list[tuple[str, Any]]:
    def lengths_short(j: tagllm_pb2.JaggedFeatures) -> None:
        del j.groups[0].lengths[-1]

    def sum_mismatch(j: tagllm_pb2.JaggedFeatures) -> None:
        j.groups[2].lengths[0] = 3

    def weights_short(j: tagllm_pb2.JaggedFeatures) -> None:
        del j.groups[0].weights[-1]

    def negative(j: tagllm_pb2.JaggedFeatures) -> None:
        j.groups[0].lengths[:] = [-1, 0, 4]

    def found_short(j: tagllm_pb2.JaggedFeatures) -> None:
        del j.found[-1]

    def other_ids(j: tagllm_pb2.JaggedFeatures) -> None:
        j.note_ids[1] = "other"

    def duplicate_group(j: tagllm_pb2.JaggedFeatures) -> None:
        j.groups[1].name = "brand"

    def ids_for_missing(j: tagllm_pb2.JaggedFeatures) -> None:
        j.groups[1].lengths[:] = [0, 1, 0]
        j.groups[1].values[:] = [5]
        j.groups[1].weights[:] = [1.0]

    return [(f.__name__, f) for f in (lengths_short, sum_mismatch, weights_short, negative,
                                      found_short, other_ids, duplicate_group, ids_for_missing)]


@pytest.mark.parametrize("name,mutate", _mutations(), ids=[n for n, _ in _mutations()])
def test_keyed_jagged_rejects_inconsistent_responses(name: str, mutate: Any) -> None:
    jagged = _jagged()
    mutate(jagged)
    with pytest.raises(ResponseShapeError):
        keyed_jagged_from_proto(["a", "missing", "b"], jagged)


def test_note_ids_must_not_be_a_string() -> None:
    with FeatureClient("127.0.0.1:1") as client, pytest.raises(TypeError):
        client.get_features("note-1")


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    """Regenerates the stubs from proto/ and compares them with the committed ones, byte for byte."""
    result = subprocess.run(
        ["bash", str(CLIENT_DIR / "generate.sh"), str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"generate.sh failed:\n{result.stdout}\n{result.stderr}"

    def tree(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        }

    fresh = tree(tmp_path / "tagllm")
    committed = tree(CLIENT_DIR / "src" / "tagllm")
    hint = "the generated stubs are stale: run clients/python/generate.sh and commit the result"
    assert sorted(fresh) == sorted(committed), hint
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{hint} (differs: {stale})"
