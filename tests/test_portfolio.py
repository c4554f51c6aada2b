"""The learned portfolio: the default preset ships it, a bad reference is one clear error, and the learning rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autoft.config import SearchConfig
from autoft.errors import AutoftError
from autoft.space import learned_portfolio, load_space

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_data
import learn_portfolio
import portfolio_grid


def test_the_default_preset_tries_the_learned_image_portfolio() -> None:
    space = load_space("default")
    assert list(space.portfolio) == learned_portfolio("image")
    assert load_space("default", fixed=["augment=none"]).portfolio == tuple(
        {k: v for k, v in entry.items() if k != "augment"} for entry in learned_portfolio("image")
    )  # --fix still removes the fixed knob from every entry


def test_a_portfolio_file_replaces_the_spaces_own_and_bad_ones_are_one_clear_error(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("portfolio:\n  - {freeze: full, lr: 1.0e-3, batch_size: 16}\n  - {freeze: linear_probe}\n")
    space = load_space("default", portfolio=mine)
    assert space.portfolio == ({"freeze": "full", "lr": 1e-3, "batch_size": 16}, {"freeze": "linear_probe"})
    assert "portfolio from" in space.source
    (tmp_path / "typo.yaml").write_text("portfolio:\n  - {freez: full}\n")
    with pytest.raises(AutoftError, match=r"portfolio entry 1 sets freez"):
        load_space("default", portfolio=tmp_path / "typo.yaml")
    (tmp_path / "list.yaml").write_text("- {freeze: full}\n")  # no 'portfolio:' key
    with pytest.raises(AutoftError, match=r"must hold 'portfolio:', a non-empty list of recipes"):
        load_space("default", portfolio=tmp_path / "list.yaml")
    with pytest.raises(AutoftError, match=r"--portfolio .*nothing.yaml: no such file"):
        SearchConfig(model="test_resnet", data=tmp_path, portfolio=tmp_path / "nothing.yaml")
    from autoft.cli import _parser
    from autoft.cli.search import _config

    args = _parser().parse_args(["search", "--model", "m", "--data", str(tmp_path), "--portfolio", str(mine)])
    assert _config(args).portfolio == mine


def test_every_learned_entry_is_a_point_of_the_default_space() -> None:
    """Each value lies in its knob's range or choices, and exactly the knobs that apply to the entry are set."""
    params = load_space("default").params
    for entry in learned_portfolio("image"):
        applying = {}
        for param in params:
            if param.applies(applying):
                applying[param.name] = entry[param.name]
                if param.kind == "categorical":
                    assert entry[param.name] in param.choices, (param.name, entry)
                else:
                    assert param.low <= entry[param.name] <= param.high, (param.name, entry)
        assert applying == entry


def test_an_inline_portfolio_stays_the_users_own(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2}\nportfolio:\n  - {lr: 1.0e-3}\n")
    assert load_space(path).portfolio == ({"lr": 1.0e-3},)


@pytest.mark.parametrize(
    ("reference", "phrase"),
    [
        ("{learned: imgae}", "names no learned portfolio table; did you mean 'image'?"),
        ("{learned: image, extra: 1}", "must be {learned: NAME} alone"),
        ("{learned: [image]}", "must be {learned: NAME} alone"),
    ],
)
def test_a_bad_learned_reference_is_one_clear_error(tmp_path: Path, reference: str, phrase: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(f"params:\n  lr: {{type: float, low: 1.0e-4, high: 1.0e-2}}\nportfolio: {reference}\n")
    with pytest.raises(AutoftError) as error:
        load_space(path)
    assert phrase in str(error.value) and str(path) in str(error.value)


# Two tasks where "a" is best and "b" a close second, one where only "c" works: the best pair is a + c, although
# "b" has the second best mean. A top-k by mean would pick a + b; greedy selection must pick the complement.
VAL = {
    "t1": {"a": 0.9, "b": 0.8, "c": 0.1},
    "t2": {"a": 0.9, "b": 0.8, "c": 0.1},
    "t3": {"a": 0.1, "b": 0.2, "c": 0.9},
}
TEST = {
    "t1": {"a": 0.85, "b": 0.9, "c": 0.1},
    "t2": {"a": 0.8, "b": 0.7, "c": 0.2},
    "t3": {"a": 0.15, "b": 0.05, "c": 0.95},  # on t3, "b" has the better val but the worse test of a, b
}


def test_greedy_selection_adds_the_recipe_that_covers_the_tasks_left_behind() -> None:
    assert learn_portfolio.greedy_portfolio(VAL, ["a", "b", "c"], 2) == ["a", "c"]
    assert learn_portfolio.greedy_portfolio(VAL, ["b", "a", "c"], 1) == ["a"]  # the best mean first, whatever order


def test_once_every_task_is_covered_the_better_recipe_alone_comes_next_not_the_first_listed() -> None:
    val = {"t1": {"a": 0.9, "x": 0.1, "b": 0.5}, "t2": {"a": 0.8, "x": 0.2, "b": 0.7}}
    assert learn_portfolio.greedy_portfolio(val, ["a", "x", "b"], 2) == ["a", "b"]


def test_scores_are_normalized_per_task_so_every_task_weighs_the_same() -> None:
    # t2's raw spread is tiny, but normalized its best recipe "b" counts as much as t1's "a".
    val = {"t1": {"a": 0.9, "b": 0.1}, "t2": {"a": 0.50, "b": 0.52}, "t3": {"a": 0.3, "b": 0.31}}
    assert learn_portfolio.greedy_portfolio(val, ["a", "b"], 1) == ["b"]  # raw means would choose "a"
    assert learn_portfolio.normalized({"t": {"a": 0.4, "b": 0.4}}) == {"t": {"a": 1.0, "b": 1.0}}


def test_leave_one_task_out_learns_without_the_task_and_reports_the_test_of_the_val_best() -> None:
    loto = learn_portfolio.leave_one_task_out(VAL, TEST, ["a", "b", "c"], 2)
    # Without t3 nothing needs "c": a first, then of the others (no gain either) the better one alone, b.
    assert loto["t3"]["learned"] == ["a", "b"]
    assert loto["t3"]["picks"] == ["a", "b"] and loto["t3"]["test"] == [0.15, 0.05]
    assert loto["t1"]["learned"] == ["a", "c"] and loto["t1"]["test"] == [0.85, 0.85]


def test_leaving_a_data_set_out_leaves_out_its_other_resolutions_too() -> None:
    # "a" wins only on t@24; left out task by task, t@16 would learn "a" from its own data set at another size.
    val = {"t@16": {"a": 0.9, "b": 0.1}, "t@24": {"a": 0.9, "b": 0.1}, "u@16": {"a": 0.1, "b": 0.9}}
    by_task = learn_portfolio.leave_one_task_out(val, val, ["a", "b"], 1)
    by_dataset = learn_portfolio.leave_one_task_out(val, val, ["a", "b"], 1, group=learn_portfolio.dataset_of)
    assert by_task["t@16"]["learned"] in (["a"], ["b"]) and by_dataset["t@16"]["learned"] == ["b"]
    assert learn_portfolio.dataset_of("digits-few@24") == "digits-few"


def test_grid_rows_round_trip_through_the_csv(tmp_path: Path) -> None:
    path = tmp_path / "grid.csv"
    row = {
        "task": "t", "dataset": "d", "image_size": 16, "recipe": "untuned", "seed": 0, "train_images": 40,
        "epochs_run": 2, "best_epoch": 1, "best_val": 0.5, "test_at_best_val": 0.45, "val_curve": "0.4;0.5",
        "seconds_curve": "1.0;2.0", "steps_curve": "2;4", "seconds": 2.1, "finished": "now",
    }  # fmt: skip
    portfolio_grid.append_row(path, row, columns=portfolio_grid.COLUMNS)
    (read,) = portfolio_grid.read_grid(path)
    assert read["val_curve"] == [0.4, 0.5] and read["steps_curve"] == [2.0, 4.0] and read["best_val"] == 0.5
    assert learn_portfolio.scores_from_rows([read, read | {"seed": 1, "best_val": 0.7}], "best_val") == {
        "t": {"untuned": pytest.approx(0.6)}
    }


def test_every_grid_candidate_is_a_recipe_of_the_default_space_knobs() -> None:
    names = set(load_space("default").names())
    for name, knobs in portfolio_grid.CANDIDATES.items():
        assert set(knobs) <= names, name
    assert set(portfolio_grid.HANDWRITTEN) <= set(portfolio_grid.CANDIDATES)


def test_few_shot_variants_cut_each_split_per_class(tmp_path: Path) -> None:
    def ten_per_class(root: Path, *, seed: int = 0) -> None:
        for split in ("train", "val", "test"):
            for label in ("a", "b"):
                (root / split / label).mkdir(parents=True)
                for i in range(10):
                    (root / split / label / f"{i}.png").write_bytes(b"")

    bench_data.few_shot(ten_per_class, 3, val=5, test=7)(tmp_path / "few")
    counts = {
        split: [len(list((tmp_path / "few" / split / c).iterdir())) for c in "ab"] for split in ("train", "val", "test")
    }
    assert counts == {"train": [3, 3], "val": [5, 5], "test": [7, 7]}
