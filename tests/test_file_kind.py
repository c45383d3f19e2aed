"""file_kind tells files apart by their first bytes: checked against files written by the
real writers (safetensors, pickle, torch.save) rather than hand-typed magic numbers."""

import io
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from npbgpp_core.file_kind import HEAD_SIZE, file_kind


def test_safetensors_whose_header_length_starts_with_0x80(tmp_path):
    """A header length of 0x1280 puts 0x80 first, which once read as a pickle's opcode."""
    data = np.arange(4, dtype=np.float32)
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (0x1280 - len(header))  # the format allows trailing spaces
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data.tobytes())
    np.testing.assert_array_equal(load_file(str(path))["x"], data)  # a valid file by its own reader
    head = path.read_bytes()[:HEAD_SIZE]
    assert head[0] == 0x80
    assert file_kind(head) == "safetensors"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_every_framed_protocol(protocol):
    assert file_kind(pickle.dumps({"a": 1}, protocol=protocol)[:HEAD_SIZE]) == "pickle"


def test_torch_legacy_and_zip_checkpoints():
    for zipped, kind in ((False, "pickle"), (True, "zip")):
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(2)}, buf, _use_new_zipfile_serialization=zipped)
        assert file_kind(buf.getvalue()[:HEAD_SIZE]) == kind


def test_a_lone_0x80_is_nothing():
    assert file_kind(b"\x80\x00" + b"\x00" * 14) is None
