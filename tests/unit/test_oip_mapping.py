"""The Open Inference Protocol mapping without a server: BYTES wire form, input checks, parameters,
output tensors."""
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterserve.runtime.errors import InvalidInputError, UnknownTaskError
from adapterserve.runtime.server import oip
from adapterserve.runtime.server.classify import Classified, check_version
from adapterserve.runtime.types import Prediction, Row


def wire(elements):
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@settings(max_examples=200, derandomize=True)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_raw_bytes_round_trip(elements):
    assert oip.decode_raw_bytes(wire(elements), "TEXT") == elements


@pytest.mark.parametrize("raw,needle", [
    (b"\x05\x00", "4-byte length prefix"),
    (struct.pack("<I", 10) + b"short", "says 10 bytes but only 5 remain"),
])
def test_truncated_raw_bytes_say_what_is_wrong(raw, needle):
    with pytest.raises(InvalidInputError, match=needle):
        oip.decode_raw_bytes(raw, "TEXT")


def test_texts_of_checks_datatype_shape_count_and_utf8():
    assert oip.texts_of("TEXT", "BYTES", [2], [b"a", "b"]) == ["a", "b"]
    assert oip.texts_of("TEXT", "BYTES", [2, 1], [b"a", b"b"]) == ["a", "b"]
    with pytest.raises(InvalidInputError, match="must be BYTES"):
        oip.texts_of("TEXT", "FP32", [1], [b"a"])
    with pytest.raises(InvalidInputError, match=r"\[N\] or \[N, 1\]"):
        oip.texts_of("TEXT", "BYTES", [1, 2], [b"a", b"b"])
    with pytest.raises(InvalidInputError, match="carries 1 elements"):
        oip.texts_of("TEXT", "BYTES", [2], [b"a"])
    with pytest.raises(InvalidInputError, match="element 1 is not valid UTF-8"):
        oip.texts_of("TEXT", "BYTES", [2], [b"a", b"\xff\xfe"])


def test_inputs_and_outputs_are_checked_by_name():
    assert oip.collect_inputs({"TEXT": ["a"], "TEXT_PAIR": ["b"]}) == (["a"], ["b"])
    with pytest.raises(InvalidInputError, match="input TEXT is missing"):
        oip.collect_inputs({"TEXT_PAIR": ["b"]})
    with pytest.raises(InvalidInputError, match="TEXT_PAIR has 2 elements but TEXT has 1"):
        oip.collect_inputs({"TEXT": ["a"], "TEXT_PAIR": ["b", "c"]})
    assert [o.name for o in oip.check_outputs([])] == ["LABEL", "SCORES", "LOGITS"]
    with pytest.raises(InvalidInputError, match="requested twice"):
        oip.check_outputs([oip.RequestedOutput("LABEL"), oip.RequestedOutput("LABEL")])
    with pytest.raises(InvalidInputError, match="applies to SCORES"):
        oip.check_outputs([oip.RequestedOutput("LABEL", classification=2)])


def test_parameters():
    assert oip.read_parameters({}) == (0, False, None)
    assert oip.read_parameters({"top_k": 3, "truncate": True, "timeout": 2_000_000}) == (3, True, 2.0)
    for bad in ({"top_k": -1}, {"top_k": 1.5}, {"top_k": True}, {"truncate": 1}):
        with pytest.raises(InvalidInputError):
            oip.read_parameters(bad)


def test_versions_match_exactly_or_by_a_listing_prefix():
    served = "ab" * 32
    check_version("t", served, "")
    check_version("t", served, served)
    check_version("t", served, served[:12])
    for stale in (served[:8], "0" * 64):
        with pytest.raises(UnknownTaskError, match=served[:12]):
            check_version("t", served, stale)


def test_output_tensors_in_label_order():
    labels = ["a", "b", "c"]
    logits = [[0.0, 2.0, 1.0], [3.0, 0.5, 0.0]]
    rows = []
    for lg in logits:
        lg = np.asarray(lg, dtype=np.float32)
        p = np.exp(lg) / np.exp(lg).sum()
        order = np.argsort(-p)
        rows.append(Row(entry=None, encoded=None, prediction=Prediction("t", "v", labels, (p, order, lg), 3, False)))
    result = Classified("t", "v", labels, rows, 0, 0, 0, 0)
    call = oip.InferCall("t", "", "", ["x", "y"], None, top_k=2, truncate=False, timeout_s=None,
                         outputs=oip.check_outputs([oip.RequestedOutput("LABEL"), oip.RequestedOutput("SCORES"),
                                                    oip.RequestedOutput("LOGITS")]))
    label, scores, raw_logits = oip.output_tensors(call, result)
    assert label.shape == [2, 2] and label.data == [b"b", b"c", b"a", b"b"]
    assert scores.shape == [2, 3]
    np.testing.assert_allclose(scores.data.sum(1), 1.0, rtol=1e-6)
    assert np.argmax(scores.data[0]) == 1 and np.argmax(scores.data[1]) == 0
    np.testing.assert_array_equal(raw_logits.data, np.asarray(logits, dtype=np.float32))
    assert raw_logits.raw() == np.asarray(logits, dtype="<f4").tobytes()
    assert oip.decode_raw_bytes(label.raw(), "LABEL") == label.data
    call.outputs = [oip.RequestedOutput("SCORES", classification=1)]
    (top,) = oip.output_tensors(call, result)
    assert top.datatype == "BYTES" and top.shape == [2, 1] and top.data[0].endswith(b":1:b")
