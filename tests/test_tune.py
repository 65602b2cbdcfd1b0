"""Search spaces: every shipped space validates against its config, every bad space is one
clear error naming the file and the path, and samples become valid configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.tune.space import load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {
    "potsdam": ["potsdam3", "potsdam6"],
    "cocostuff": ["cocostuff3", "cocostuff15"],
    "clustering": ["demo", "clustering"],
    "demo": ["demo"],
}


def base(name: str) -> dict:
    return load_config(ROOT / "configs" / f"{name}.yaml").to_dict()


@pytest.mark.parametrize("space", sorted(SHIPPED))
def test_shipped_spaces_validate_against_their_configs(space):
    for cfg in SHIPPED[space]:
        parsed = load_space(ROOT / "tune_spaces" / f"{space}.yaml", base(cfg))
        assert parsed.dims and all("." in d.path for d in parsed.dims)


def test_samples_become_configs_and_ray_space():
    space = parse_space(
        {
            "params": {
                "loss.lamb_b": {"loguniform": [1.0, 3.0]},
                "loss.half_window": {"randint": [3, 5]},
                "pairs.strength": {"grid": [0.5, 1.0]},
                "optim.lr": {"choice": [0.001, 0.01]},
            }
        },
        base("demo"),
    )
    cfg = space.apply(base("demo"), {"loss.lamb_b": 2.0, "loss.half_window": 5})
    assert cfg.loss.lamb_b == 2.0 and cfg.loss.half_window == 5
    ray_space = space.to_ray()
    assert ray_space["pairs.strength"] == {"grid_search": [0.5, 1.0]}
    # Ray's randint excludes its upper bound; the space's includes it.
    samples = {ray_space["loss.half_window"].sample() for _ in range(200)}
    assert samples == {3, 4, 5}
    assert all(1.0 <= ray_space["loss.lamb_b"].sample() <= 3.0 for _ in range(50))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"loss.lamda_b": {"uniform": [1, 2]}}, r"loss.lamda_b: unknown key \(known in loss"),
        ({"lamb_b": {"uniform": [1, 2]}}, r"lamb_b: not a config path"),
        ({"loss.lamb_b": {"uniform": [2, 2]}}, r"loss.lamb_b: empty range \[2.0, 2.0\]"),
        ({"loss.lamb_b": {"uniform": [1]}}, r"loss.lamb_b: uniform needs \[low, high\]"),
        ({"loss.lamb_b": {"normal": [1, 2]}}, r"unknown distribution 'normal'"),
        ({"loss.lamb_b": {"choice": []}}, r"choice needs a non-empty list"),
        ({"loss.half_window": {"uniform": [1.5, 4.0]}}, r"loss.half_window: expected an integer"),
        ({"loss.half_window": {"choice": ["big"]}}, r"loss.half_window: expected an integer"),
        ({"optim.lr": {"loguniform": [0.0, 0.1]}}, r"loguniform needs low > 0"),
        ({"loss.lamb_b": {"uniform": [0.0, 2.0]}}, r"loss.lamb_b: expected > 0, got 0.0"),
        ({"pairs.strength": {"randint": [0, 2]}}, r"randint needs an integer key"),
        ({"data.shards": {"choice": ["a", "b"]}}, r"data.shards: not searchable"),
        ({"run.name": {"choice": ["a", "b"]}}, r"run.name: not searchable"),
    ],
)
def test_bad_spaces_are_one_line_errors(tmp_path, params, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"params": params}))
    with pytest.raises(ConfigError, match=message) as err:
        load_space(path, base("demo"))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_space_file_shape_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("loss.lamb_b: {uniform: [1, 2]}\n")
    with pytest.raises(ConfigError, match="expected a mapping with one key, params"):
        load_space(path)
    with pytest.raises(ConfigError, match="cannot read search space"):
        load_space(tmp_path / "missing.yaml")
