"""The typed config: YAML, overrides, and loud failures naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import CLUSTERING_DEFAULTS, Config, ConfigError, load_config
from pipeline.data.format import fit_to_data

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.shards and cfg.optim.epochs >= 1
    assert Config.from_dict(cfg.to_dict()) == cfg  # the dict sent to workers rebuilds exactly


def test_published_potsdam3_hyperparameters():
    cfg = load_config(Path(__file__).parents[1] / "configs/potsdam3.yaml")
    assert (
        cfg.optim.lr,
        cfg.data.batch_size,
        cfg.model.n_clusters_a,
        cfg.model.n_clusters_b,
        cfg.loss.lamb_a,
        cfg.loss.lamb_b,
        cfg.loss.half_window,
        cfg.model.in_channels,
    ) == (1e-5, 75, 24, 3, 1.0, 1.5, 10, 4)


def test_numbers_are_read_as_people_write_them(tmp_path):
    # YAML 1.1 reads 1e-3 as a string and 8.0 as a float; both mean what they say.
    path = write(tmp_path, "data: {shards: x}\noptim: {lr: 1E-4}")
    cfg = load_config(path, ["optim.epochs=8.0", "loss.lamb_b=2", "optim.lr=1e-3"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.loss.lamb_b) == (1e-3, 8, 2.0)
    assert isinstance(cfg.optim.epochs, int) and isinstance(cfg.loss.lamb_b, float)
    assert load_config(path).optim.lr == 1e-4


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("data: {shards: x}\nloss: {lamda_b: 2}", [], r"loss.lamda_b: unknown key"),
        ("data: {shards: x}\noptim: {epochs: two}", [], r"optim.epochs: expected an integer"),
        ("data: {shards: x}", ["optim.epochs=8.5"], r"optim.epochs: expected an integer, got 8.5"),
        ("data: {shards: x}", ["optim.lr=nan"], r"optim.lr: expected a number, got 'nan'"),
        ("data: {shards: x}", ["optim.lr=1e-3x"], r"optim.lr: expected a number, got '1e-3x'"),
        ("data: {shards: x}\nloss: {lamb_b: 0}", [], r"loss.lamb_b: expected > 0, got 0.0"),
        ("data: {shards: x}", ["loss.lamb_a=-1"], r"loss.lamb_a: expected > 0"),
        ("model: {}", [], r"data: missing required key"),
        ("data: {shards: x}\nmodel: {task: detection}", [], r"model.task: expected one of"),
        ("data: {shards: x}\npairs: {strength: -2}", [], r"pairs: pairs.strength must be >= 0"),
        ("data: {shards: x}", ["pairs.repeats=5"], r"pairs.repeats: 5 needs data.pairs_on: worker"),
        (
            "data: {shards: x}",
            ["pairs.augment_first=true"],
            r"pairs.augment_first: true needs model.task: clustering, got 'segmentation'",
        ),
        ("data: {shards: x}", ["nonsense"], r"expected section.key=value"),
        ("data: {shards: x}", ["run.name=../escaped"], r"run.name: expected letters, digits"),
        ("data: {shards: x}", ["run.name=a/b"], r"run.name: .* got 'a/b'"),
        ("data: {shards: x}", ["run.name=.hidden"], r"not starting with '.', got '.hidden'"),
        ("data: {shards: x}", ["run.seed=-1"], r"run.seed: expected >= 0, got -1"),
        ("data: {shards: x}", ["data.dtype=byte"], r"data.dtype: expected one of .*'byte'"),
        ("data: [unclosed", [], r"not valid YAML"),
        ("- data\n- model", [], r"expected a mapping at the top, got list"),
        ("42", [], r"expected a mapping at the top, got int"),
        ("data: {shards: x}", ["optim.lr=["], r"--set 'optim.lr=\[': the value is not valid YAML"),
        ("data: {shards: x}", ["=3"], r"--set '=3': expected section.key=value"),
        ("data: {shards: x}", ["model.input_size=24"], r"model.input_size: expected 0 for segm"),
        (
            "data: {shards: x}",
            ["pairs.stroke=0.5"],
            r"pairs.stroke: 0.5 needs model.task: clustering, got 'segmentation'",
        ),
        ("data: {shards: x}", ["pairs.stroke=2"], r"pairs.stroke must be in \[0, 1\], got 2.0"),
        ("data: {shards: x}", ["optim.=3"], r"--set 'optim.=3': expected section.key=value"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(write(tmp_path, text), overrides)
    assert "\n" not in str(err.value) and "c.yaml" in str(err.value)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, "data: {shards: x}"),
        ["loss.lamb_b=2", "pairs.affine=true", "data.train_splits=[train]"],
    )
    assert cfg.loss.lamb_b == 2.0 and isinstance(cfg.loss.lamb_b, float)
    assert cfg.pairs.affine is True and cfg.data.train_splits == ("train",)
    assert cfg.flat()["loss.lamb_b"] == 2.0


def test_clustering_starts_from_the_papers_recipe_and_set_keys_win(tmp_path):
    text = "data: {shards: x}\nmodel: {task: clustering, n_clusters_b: 10}"
    cfg = load_config(write(tmp_path, text))
    assert cfg.model.n_clusters_a == 50 and cfg.model.n_subheads == 5  # 5x overclustering
    assert cfg.pairs.affine and cfg.pairs.augment_first and not cfg.pairs.flip
    assert cfg.pairs.stroke > 0 and cfg.data.pairs_on == "worker"
    assert cfg.loss.lamb_b == CLUSTERING_DEFAULTS["loss"]["lamb_b"]
    assert cfg.data.batch_size == CLUSTERING_DEFAULTS["data"]["batch_size"]
    text = "data: {shards: x, batch_size: 7}\nmodel: {task: clustering, n_clusters_a: 12}"
    mine = load_config(write(tmp_path, text), ["pairs.flip=true", "pairs.stroke=0"])
    assert mine.data.batch_size == 7 and mine.model.n_clusters_a == 12
    assert mine.pairs.flip and mine.pairs.stroke == 0 and mine.pairs.affine
    # The round trip through a checkpoint's plain dict keeps every value.
    assert Config.from_dict(mine.to_dict()) == mine
    # Segmentation keeps its own defaults.
    seg = load_config(write(tmp_path, "data: {shards: x}"))
    assert not seg.pairs.affine and seg.model.n_clusters_a == 24 and seg.pairs.repeats == 1


@pytest.mark.parametrize(
    "side, bands, task, want_size, want_bands",
    [
        (28, 1, "clustering", 14, (0,)),  # grey digits: rescaled, the one band jittered
        (8, 1, "clustering", 8, (0,)),
        (96, 3, "clustering", 48, (0, 1, 2)),
        (None, 3, "clustering", 0, (0, 1, 2)),  # no recorded size: images as they come
        (28, 1, "segmentation", 0, (0, 1, 2)),  # segmentation names its bands itself
    ],
)
def test_the_dataset_sizes_a_clustering_network_and_its_jittered_bands(
    side, bands, task, want_size, want_bands
):
    cfg = Config.from_dict({"data": {"shards": "x"}, "model": {"task": task}})
    manifest = {"bands": bands, "dtype": "uint8"} | ({"image_size": [side, side]} if side else {})
    fitted = fit_to_data(cfg, manifest)
    assert fitted.model.input_size == want_size and fitted.pairs.rgb_bands == want_bands
    assert fitted.model.in_channels == bands
