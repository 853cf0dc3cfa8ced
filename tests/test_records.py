"""Run records: round trip, strict JSON, run identity, and loading a sweep that holds finished,
partial and torn records."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from critbatch import records
from critbatch.config import RunConfig
from critbatch.train import train


def plain_config(**changes) -> dict:
    values = {"task": {"name": "digits", "hidden": 32}, "optimizer": {"name": "sgd", "lr": 0.1},
              "batch_size": 32, "seed": 0, "device": "cpu",
              "goals": {"metric": "train_error", "thresholds": [0.5, 0.2]}, "budget": {"max_steps": 400}}
    values.update(changes)
    return RunConfig.from_dict(values).to_dict()


def minimal_record(status="completed", **changes) -> dict:
    config = plain_config()
    record = {"schema_version": records.SCHEMA_VERSION, "run_id": records.run_id(config),
              "run_name": records.run_name(config), "status": status, "config": config,
              "goals": [{"metric": "train_error", "threshold": 0.5, "reached": True, "step": 12.5,
                         "examples": 400.0, "wall_time": 0.1, "b_simple": 30.0, "grad_sq_norm": 0.5,
                         "trace_sigma": 15.0},
                        {"metric": "train_error", "threshold": 0.2, "reached": False}],
              "summary": {"steps": 40, "examples": 1280, "wall_time": 0.4, "reason": "x", "error": None},
              "curve": {"step": [0, 1, 2], "train_loss": [math.nan, 2.0, 1.5], "b_simple": [math.nan] * 3}}
    record.update(changes)
    return record


# ---------------------------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------------------------

def test_round_trip_and_nan_becomes_null(tmp_path):
    record = minimal_record()
    path = tmp_path / "a" / "b" / records.RECORD_FILE  # parents are created
    records.write_record(path, record)
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert "NaN" not in text and "Infinity" not in text
    back = records.read_record(path)
    assert back["curve"]["train_loss"] == [None, 2.0, 1.5]
    assert back["curve"]["b_simple"] == [None, None, None]
    expected = json.loads(json.dumps(record).replace("NaN", "null"))
    assert back == expected
    assert record["curve"]["train_loss"][0] != record["curve"]["train_loss"][0]  # input not mutated
    assert list(tmp_path.rglob("*.tmp")) == []  # no temp file left behind


def test_infinities_become_null_too(tmp_path):
    record = minimal_record(summary={"steps": 1, "examples": 1, "wall_time": math.inf, "x": -math.inf})
    records.write_record(tmp_path / records.RECORD_FILE, record)
    back = records.read_record(tmp_path / records.RECORD_FILE)
    assert back["summary"]["wall_time"] is None and back["summary"]["x"] is None


def test_rewrite_replaces(tmp_path):
    path = tmp_path / records.RECORD_FILE
    records.write_record(path, minimal_record(status="running"))
    records.write_record(path, minimal_record(status="completed"))
    assert records.read_record(path)["status"] == "completed"
    assert [p.name for p in tmp_path.iterdir()] == [records.RECORD_FILE]


@pytest.mark.parametrize("text, problem", [
    ('{"schema_version": 1, "run_id": "x", "sta', "unreadable"),
    ("", "unreadable"),
    ("[1, 2]", "not a record"),
    (json.dumps({**minimal_record(), "schema_version": 99}), "schema_version"),
    (json.dumps({k: v for k, v in minimal_record().items() if k != "curve"}), "curve"),
    (json.dumps(minimal_record(status="finished")), "status"),
])
def test_read_record_rejects_bad_files(tmp_path, text, problem):
    path = tmp_path / records.RECORD_FILE
    path.write_text(text)
    with pytest.raises(records.RecordError, match=problem):
        records.read_record(path)
    assert not records.is_complete(path)


@pytest.mark.parametrize("status, complete", [("completed", True), ("diverged", True),
                                              ("budget_exhausted", True), ("running", False),
                                              ("failed", False)])
def test_is_complete_by_status(tmp_path, status, complete):
    path = tmp_path / records.RECORD_FILE
    records.write_record(path, minimal_record(status=status))
    assert records.is_complete(path) is complete
    assert not records.is_complete(tmp_path / "missing" / records.RECORD_FILE)


# ---------------------------------------------------------------------------------------------
# run identity
# ---------------------------------------------------------------------------------------------

def test_run_id_is_stable_and_depends_on_identifying_settings():
    base = plain_config()
    same = plain_config()
    assert records.run_id(base) == records.run_id(same)
    assert len(records.run_id(base)) == 12
    # key order does not matter
    assert records.run_id(dict(reversed(list(base.items())))) == records.run_id(base)
    # an identifying setting that is absent counts as null
    assert records.run_id({k: None for k in records.IDENTITY_KEYS}) == records.run_id({})
    changed = [plain_config(optimizer={"name": "sgd", "lr": 0.2}),
               plain_config(batch_size=64),
               plain_config(seed=1),
               plain_config(optimizer={"name": "momentum", "lr": 0.1}),
               plain_config(task={"name": "digits", "hidden": 64}),
               plain_config(goals={"metric": "train_error", "thresholds": [0.5, 0.1]})]
    ids = {records.run_id(c) for c in changed}
    assert len(ids) == len(changed) and records.run_id(base) not in ids
    # bookkeeping settings do not change the identity
    assert records.run_id(plain_config(log={"checkpoint_seconds": 5.0}, device="auto")) == records.run_id(base)


def test_run_name_is_readable_and_unique():
    config = plain_config()
    name = records.run_name(config)
    assert name.startswith("digits_sgd_B32_lr0.1_s0_")
    assert name.endswith(records.run_id(config)[:8])
    assert records.run_name(plain_config(batch_size=64)) != name
    assert records.run_dir("/sweep", config).as_posix() == f"/sweep/runs/{name}"


def test_run_id_stable_across_processes():
    """The hash does not depend on the process (no Python hash randomisation)."""
    import subprocess
    import sys

    config = plain_config()
    code = "import json, sys; from critbatch import records; print(records.run_id(json.loads(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config)],
                         capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == records.run_id(config)


# ---------------------------------------------------------------------------------------------
# loading a sweep
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep directory with a completed, a diverged, a running (partial) and a torn record."""
    root = tmp_path_factory.mktemp("sweep")
    runs = root / records.RUNS_DIR
    completed = train(plain_config(), records.run_dir(root, plain_config()))
    diverged_config = plain_config(optimizer={"name": "sgd", "lr": 100.0})
    diverged = train(diverged_config, records.run_dir(root, diverged_config))
    assert completed["status"] == "completed" and diverged["status"] == "diverged"
    partial = runs / "partial" / records.RECORD_FILE
    records.write_record(partial, {**completed, "status": records.RUNNING})
    torn = runs / "torn" / records.RECORD_FILE
    torn.parent.mkdir(parents=True)
    text = json.dumps(completed)
    torn.write_text(text[: len(text) // 2])
    return root, completed, diverged, partial, torn


def test_load_sweep_rows_only_for_finished_records(sweep):
    root, completed, diverged, partial, torn = sweep
    with pytest.warns(UserWarning) as warned:
        frame = records.load_sweep(root)
    assert set(frame["status"]) == {"completed", "diverged"}
    assert len(frame) == 4  # two runs x two goals
    assert set(frame["run_id"]) == {completed["run_id"], diverged["run_id"]}
    problems = frame.attrs["problems"]
    assert sorted(p["path"] for p in problems) == sorted([str(partial), str(torn)])
    by_path = {p["path"]: p["problem"] for p in problems}
    assert "partial" in by_path[str(partial)] and "unreadable" in by_path[str(torn)]
    warned_text = " ".join(str(w.message) for w in warned)
    assert str(partial) in warned_text and str(torn) in warned_text


def test_load_sweep_columns_and_values(sweep):
    root, completed, diverged, _, _ = sweep
    with pytest.warns(UserWarning):
        frame = records.load_sweep(root)
    for column in ("run_id", "run_name", "run_dir", "task", "optimizer", "batch_size", "lr", "seed", "status",
                   "goal_metric", "goal_threshold", "goal", "reached", "steps", "examples", "wall_time",
                   "b_simple", "grad_sq_norm", "trace_sigma", "total_steps", "total_examples"):
        assert column in frame.columns
    done = frame[frame["status"] == "completed"].set_index("goal_threshold")
    for goal in completed["goals"]:
        row = done.loc[goal["threshold"]]
        assert row["reached"] and row["goal"] == f"train_error<={goal['threshold']:g}"
        assert row["steps"] == pytest.approx(goal["step"])
        assert row["examples"] == pytest.approx(goal["step"] * 32)
        assert row["b_simple"] == pytest.approx(goal["b_simple"])
        assert row["total_steps"] == completed["summary"]["steps"]
        assert (row["task"], row["optimizer"], row["batch_size"], row["lr"]) == ("digits", "sgd", 32, 0.1)
    bad = frame[frame["status"] == "diverged"]
    assert not bad["reached"].any() and bad["steps"].isna().all() and bad["b_simple"].isna().all()
    assert bad["lr"].eq(100.0).all()


def test_load_curves(sweep):
    root, completed, diverged, _, _ = sweep
    with pytest.warns(UserWarning):
        curves = records.load_curves(root)
    assert len(curves.attrs["problems"]) == 2
    assert len(curves) == len(completed["curve"]["step"]) + len(diverged["curve"]["step"])
    mine = curves[curves["run_id"] == completed["run_id"]]
    assert list(mine["step"]) == completed["curve"]["step"]
    assert {"train_loss", "b_simple", "batch_size", "lr", "status"} <= set(curves.columns)


def test_load_sweep_empty_and_missing(tmp_path):
    frame = records.load_sweep(tmp_path)
    assert isinstance(frame, pd.DataFrame) and frame.empty and frame.attrs["problems"] == []
    assert "batch_size" in frame.columns
    with pytest.raises(FileNotFoundError):
        records.load_sweep(tmp_path / "nowhere")


def test_moving_the_data_does_not_change_a_runs_identity():
    config = {"task": {"name": "mnist", "data_dir": "/a"}, "optimizer": {"name": "sgd", "lr": 0.1},
              "batch_size": 8, "seed": 0}
    moved = {**config, "task": {"name": "mnist", "data_dir": "/b"}}
    other = {**config, "task": {"name": "mnist", "data_dir": "/a", "dropout": 0.1}}
    assert records.run_id(config) == records.run_id(moved) != records.run_id(other)


# ---------------------------------------------------------------------------------------------
# records are checked against their schema on read (issue #12, part 3)
# ---------------------------------------------------------------------------------------------

def _corrupt(record: dict, change: str) -> str:
    """The text of `record` with one kind of corruption, and the field the error must name."""
    if change == "goals_not_a_list":
        record["goals"] = "oops"
    elif change == "string_batch_size":
        record["config"]["batch_size"] = "64"
    elif change == "missing_key":
        del record["summary"]
    elif change == "missing_goal_key":
        del record["goals"][0]["threshold"]
    elif change == "curve_column_not_a_list":
        record["curve"]["train_loss"] = 1.5
    elif change == "curve_columns_of_unequal_length":
        record["curve"]["b_simple"] = [1.0]
    elif change == "string_threshold":
        record["goals"][0]["threshold"] = "0.5"
    elif change == "reached_not_bool":
        record["goals"][0]["reached"] = "yes"
    elif change == "string_step":
        record["goals"][0]["step"] = "12"
    elif change == "lr_not_a_number":
        record["config"]["optimizer"]["lr"] = None
    elif change == "task_name_missing":
        record["config"]["task"] = {"hidden": 32}
    elif change == "run_id_not_a_string":
        record["run_id"] = 12
    elif change == "summary_not_a_dict":
        record["summary"] = [1, 2]
    elif change == "bool_seed":
        record["config"]["seed"] = True
    text = json.dumps(record)
    if change == "truncated_json":
        text = text[: len(text) - 40]
    return text


CORRUPTIONS = {  # kind of corruption -> the field the error names
    "goals_not_a_list": "goals", "string_batch_size": "config.batch_size", "missing_key": "summary",
    "missing_goal_key": "goals[0].threshold", "curve_column_not_a_list": "curve.train_loss",
    "curve_columns_of_unequal_length": "curve.b_simple", "string_threshold": "goals[0].threshold",
    "reached_not_bool": "goals[0].reached", "string_step": "goals[0].step",
    "lr_not_a_number": "config.optimizer.lr", "task_name_missing": "config.task.name",
    "run_id_not_a_string": "run_id", "summary_not_a_dict": "summary", "bool_seed": "config.seed",
    "truncated_json": "unreadable",
}


@pytest.mark.parametrize("change", list(CORRUPTIONS))
def test_corrupt_record_names_file_and_field_and_is_not_used(tmp_path, change):
    import re
    import warnings

    good = tmp_path / records.RUNS_DIR / "good" / records.RECORD_FILE
    records.write_record(good, minimal_record())
    path = tmp_path / records.RUNS_DIR / "bad" / records.RECORD_FILE
    path.parent.mkdir(parents=True)
    path.write_text(_corrupt(minimal_record(), change))
    with pytest.raises(records.RecordError) as raised:
        records.read_record(path)
    message = str(raised.value)
    assert str(path) in message and re.search(rf"(^|\W){re.escape(CORRUPTIONS[change])}(\W|$)", message), message
    assert not records.is_complete(path)  # a relaunch reruns it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = records.load_sweep(tmp_path)  # the analysis goes on with the rest
        curves = records.load_curves(tmp_path)
    assert set(frame["run_dir"]) == {str(good.parent)} and set(curves["run_dir"]) == {str(good.parent)}
    assert [p["path"] for p in frame.attrs["problems"]] == [str(path)]
    assert CORRUPTIONS[change] in frame.attrs["problems"][0]["problem"]


def test_a_valid_record_of_every_kind_reads(tmp_path, sweep):
    """Real records (trained), the synthetic ones of the analysis and the minimal one all validate."""
    from analysis.synthetic import Truth, make_record

    root, completed, diverged, _, _ = sweep
    for record in (completed, diverged, minimal_record(), make_record(Truth(), 64, 0.1, 0),
                   make_record(Truth(), 64, 100.0, 0)):
        records.write_record(tmp_path / records.RECORD_FILE, record)
        records.read_record(tmp_path / records.RECORD_FILE)


def test_a_partial_record_is_checked_for_its_layout_only(tmp_path):
    """A running record is never analysed and always rerun: only its top-level layout must hold."""
    path = tmp_path / records.RECORD_FILE
    records.write_record(path, {"schema_version": records.SCHEMA_VERSION, "run_id": "x", "status": "running",
                                "config": {}, "goals": [], "summary": {}, "curve": {"blob": "abc"}})
    assert records.read_record(path)["status"] == records.RUNNING
    records.write_record(path, {**minimal_record(status="running"), "goals": "oops"})
    with pytest.raises(records.RecordError, match="goals"):
        records.read_record(path)


# ---------------------------------------------------------------------------------------------
# one sweep definition per directory (issue #12, part 4)
# ---------------------------------------------------------------------------------------------

def test_sweep_variant_ignores_the_grid_axes_only():
    base = plain_config()
    variant = records.sweep_variant(base)
    assert records.sweep_variant(plain_config(batch_size=64, seed=3,
                                              optimizer={"name": "sgd", "lr": 0.7})) == variant
    assert records.sweep_variant({**base, "task": {**base["task"], "data_dir": "/elsewhere"}}) == variant
    for other in (plain_config(budget={"max_steps": 500}), plain_config(task={"name": "digits", "hidden": 64}),
                  plain_config(optimizer={"name": "momentum", "lr": 0.1}),
                  plain_config(goals={"metric": "train_error", "thresholds": [0.5, 0.1]})):
        assert records.sweep_variant(other) != variant


def test_load_sweep_counts_only_the_current_variant(tmp_path):
    """A directory that holds records of two variants (allowed explicitly) never double-counts:
    the analysis reads the variant sweep.json names, and names the others as problems."""
    current, other = plain_config(), plain_config(budget={"max_steps": 50})
    for config in (current, other):
        record = {**minimal_record(), "config": config, "run_id": records.run_id(config),
                  "run_name": records.run_name(config)}
        records.write_record(records.run_dir(tmp_path, config) / records.RECORD_FILE, record)
    records.write_record(tmp_path / "sweep.json", {"variant": records.sweep_variant(current), "runs": []})
    with pytest.warns(UserWarning, match="variant"):
        frame = records.load_sweep(tmp_path)
    assert set(frame["run_id"]) == {records.run_id(current)}
    assert [p["path"] for p in frame.attrs["problems"]] == [str(records.run_dir(tmp_path, other) / records.RECORD_FILE)]
    (tmp_path / "sweep.json").unlink()  # no manifest: every record counts, as before
    assert records.load_sweep(tmp_path)["run_id"].nunique() == 2


def test_docs_records_md_holds_the_schema_tables():
    """docs/records.md shows the record's fields as the schema defines them (python -m critbatch.records)."""
    from tests.helpers import REPO

    assert records.schema_markdown() in (REPO / "docs" / "records.md").read_text()


def test_a_goal_field_of_the_wrong_type_is_named(tmp_path):
    record = records.new_record(RunConfig.from_dict({"device": "cpu"}).to_dict())
    record["status"] = "completed"
    record["goals"][0]["b_simple_path"] = "large"
    path = tmp_path / records.RECORD_FILE
    records.write_record(path, record)
    with pytest.raises(records.RecordError, match=r"goals\[0\]\.b_simple_path: expected a number or null"):
        records.read_record(path)
