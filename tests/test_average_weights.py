"""headless_train average-weights: the element-wise mean of weights files, and its refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from headless_train.average_weights import AverageWeightsError, average_weights
from headless_train.cli import main as cli_main
from npbgpp_core.models import NPBGPlusPlus
from npbgpp_core.pretrained import read_weights, save_weights


def _weights_file(path: str, seed: int, **config) -> str:
    torch.manual_seed(seed)
    model = NPBGPlusPlus(config)
    for p in model.parameters():
        p.data.normal_()
    cfg = json.loads(json.dumps(model.config.__dict__, default=list))
    save_weights(path, model.state_dict(), "npbgpp", cfg, {"steps": seed}, fp16=False)
    return path


def test_mean_of_three_files_equals_the_hand_computed_mean(tmp_path):
    paths = [_weights_file(str(tmp_path / f"w{s}.safetensors"), s) for s in (1, 2, 3)]
    out = str(tmp_path / "mean.safetensors")
    info = average_weights(paths, out)
    assert info["inputs"] == 3
    files = [read_weights(p, "npbgpp") for p in paths]
    mean = read_weights(out, "npbgpp")
    assert mean.config == files[0].config
    checked = 0
    for k, v in mean.state.items():
        if v.is_floating_point():
            expect = (files[0].state[k].double() + files[1].state[k].double() + files[2].state[k].double()) / 3
            torch.testing.assert_close(v.double(), expect, rtol=0, atol=1e-6)
            checked += int(expect.abs().sum() > 0)
        else:
            assert torch.equal(v, files[2].state[k])
    assert checked > 10
    assert [e["steps"] for e in mean.card["averaged_from"]] == [1, 2, 3]
    assert mean.card["steps"] == 3  # the last input's card
    assert "average-weights" in mean.card["regenerate"]
    NPBGPlusPlus(mean.config).load_state_dict(mean.state)  # a loadable network


def test_refuses_files_that_do_not_belong_together(tmp_path):
    a = _weights_file(str(tmp_path / "a.safetensors"), 1)
    b = _weights_file(str(tmp_path / "b.safetensors"), 2, background="environment")
    out = str(tmp_path / "mean.safetensors")
    with pytest.raises(AverageWeightsError, match="another network config.*background"):
        average_weights([a, b], out)
    with pytest.raises(AverageWeightsError, match="at least 2"):
        average_weights([a], out)
    with pytest.raises(AverageWeightsError, match="one of the inputs"):
        average_weights([a, a], a)
    with pytest.raises(AverageWeightsError, match=r"--out .*mean.pt must end with .safetensors"):
        average_weights([a, a], str(tmp_path / "mean.pt"))
    with pytest.raises(FileNotFoundError):
        average_weights([a, str(tmp_path / "missing.safetensors")], out)
    assert not os.path.exists(out)


def test_cli_exit_status_and_nothing_written_on_error(tmp_path, capsys):
    a = _weights_file(str(tmp_path / "a.safetensors"), 1)
    b = _weights_file(str(tmp_path / "b.safetensors"), 2)
    bad = _weights_file(str(tmp_path / "bad.safetensors"), 3, feature_dim=4)
    out = str(tmp_path / "mean.safetensors")
    with pytest.raises(SystemExit) as exc:
        cli_main(["average-weights", "--out", out, a, bad])
    assert exc.value.code == 2
    assert "another network config" in capsys.readouterr().err
    assert not os.path.exists(out)
    with pytest.raises(SystemExit) as exc:
        cli_main(["average-weights", "--out", out, a, b])
    assert exc.value.code == 0
    assert os.path.isfile(out)
    # the suffix in any letter case, as readers (weights_path=, export --checkpoint) recognise it
    upper = str(tmp_path / "MEAN.SAFETENSORS")
    with pytest.raises(SystemExit) as exc:
        cli_main(["average-weights", "--out", upper, a, b])
    assert exc.value.code == 0
    assert read_weights(upper, "npbgpp").state.keys() == read_weights(out, "npbgpp").state.keys()
