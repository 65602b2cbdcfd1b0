"""Search spaces: every shipped space validates against its config, every bad space is one
clear error naming the file and the path, and samples become valid configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, load_config
from pipeline.tune.search import SearchOptions
from pipeline.tune.space import load_space, parse_space, read_space_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {
    "aerial": ["aerial", "potsdam3", "potsdam6"],
    "aerial-gpu": ["aerial", "potsdam3", "potsdam6"],
    "cocostuff": ["cocostuff3", "cocostuff15"],
    "cocostuff-gpu": ["cocostuff3", "cocostuff15"],
    "clustering": ["demo", "clustering"],
    "clustering-gpu": ["clustering"],
    "demo": ["demo"],
}


def base(name: str) -> dict:
    return load_config(ROOT / "configs" / f"{name}.yaml").to_dict()


@pytest.mark.parametrize("space", sorted(SHIPPED))
def test_shipped_spaces_validate_against_their_configs(space):
    path = ROOT / "tune_spaces" / f"{space}.yaml"
    file = read_space_file(path)
    for cfg in SHIPPED[space]:
        parsed = load_space(path, base(cfg))
        assert parsed.dims and all("." in d.path for d in parsed.dims)
        Config.from_dict(file.sized(base(cfg)))  # the sized base is a valid config
    SearchOptions.resolve("s", file.search, {}, str(path))


def test_every_shipped_space_is_listed():
    assert {p.stem for p in (ROOT / "tune_spaces").glob("*.yaml")} == set(SHIPPED)


def test_each_kind_has_a_two_core_space_and_a_gpu_space():
    for kind in ("aerial", "cocostuff", "clustering"):
        small = read_space_file(ROOT / "tune_spaces" / f"{kind}.yaml")
        big = read_space_file(ROOT / "tune_spaces" / f"{kind}-gpu.yaml")
        assert small.config.get("scaling.use_gpu", False) is False
        assert small.config["scaling.num_workers"] * small.config["scaling.cpus_per_worker"] <= 2
        assert small.search["max_concurrent"] == 1
        assert big.config["scaling.use_gpu"] is True
        assert big.search["num_samples"] > small.search["num_samples"]


def test_a_space_file_sizes_the_search_and_the_user_wins(tmp_path):
    path = tmp_path / "sized.yaml"
    path.write_text(
        "search: {num_samples: 5, grace_period: 2}\n"
        "config: {optim.epochs: 7, scaling.use_gpu: true}\n"
        "params: {loss.lamb_b: {uniform: [1.0, 2.0]}}\n"
    )
    file = read_space_file(path)
    assert file.raw == {"params": {"loss.lamb_b": {"uniform": [1.0, 2.0]}}}
    sized = file.sized(base("demo"))
    assert sized["optim"]["epochs"] == 7 and sized["scaling"]["use_gpu"] is True
    assert sized["optim"]["lr"] == base("demo")["optim"]["lr"]  # the rest as the config says
    opts = SearchOptions.resolve("s", file.search, {"num_samples": 9}, str(path))
    assert (opts.num_samples, opts.grace_period, opts.max_concurrent) == (9, 2, 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("search: {trials: 3}", r"search.trials: unknown option \(known: num_samples"),
        ("search: {num_samples: many}", r"search.num_samples: expected int, got 'many'"),
        ("search: {num_samples: 0}", r"search.num_samples: expected an integer >= 1, got 0"),
        ("search: {algorithm: grid}", r"search.algorithm: 'grid' is not one of optuna"),
        ("search: [1]", r"search: expected a mapping, got \[1\]"),
        ("config: {optim.epoch: 3}", r"config.optim.epoch: unknown key \(known in optim"),
        ("config: {optim.epochs: lots}", r"config.optim.epochs: expected an integer"),
        ("config: {data.shards: /x}", r"config.data.shards: not set by a space file"),
        ("extra: {a: 1}", r"expected a mapping with params"),
    ],
)
def test_bad_space_file_sections_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\nparams: {loss.lamb_b: {uniform: [1.0, 2.0]}}\n")
    with pytest.raises(ConfigError, match=message) as err:
        file = read_space_file(path)
        SearchOptions.resolve("s", file.search, {}, str(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


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
    with pytest.raises(ConfigError, match="expected a mapping with params"):
        load_space(path)
    with pytest.raises(ConfigError, match="cannot read search space"):
        load_space(tmp_path / "missing.yaml")
