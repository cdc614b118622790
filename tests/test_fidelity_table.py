"""``scripts/fidelity_table.py`` and :mod:`star_lightning.bench.fidelity`: per-request scores through the project's
scorer, intervals and the paired share of dense, the hardest tasks dense can do, and stale work over the same
``--work`` (another ``--tasks`` / ``--num-samples``: other files; a file made from other inputs: refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from script_loader import load_script
from star_lightning.bench.fidelity import (
    WorkManifest,
    hardest_tasks,
    per_request_scores,
    share,
    spec_digest,
    table_paths,
    task_intervals,
)
from star_lightning.bench.intervals import wilson
from star_lightning.errors import ConfigurationError

fidelity_table = load_script("fidelity_table")


def _predictions(path: Path, rows: list[tuple[str, int, list[str], str]]) -> Path:
    path.write_text("".join(json.dumps({"task": t, "index": n, "source_index": i, "outputs": o, "pred": p}) + "\n"
                            for n, (t, i, o, p) in enumerate(rows)))  # fmt: skip
    return path


def test_scores_intervals_and_share_are_paired_by_request(tmp_path: Path) -> None:
    dense = per_request_scores(_predictions(tmp_path / "d.jsonl", [
        ("niah_single_1", 0, ["11"], "11"), ("niah_single_1", 1, ["22"], "22"), ("niah_single_1", 2, ["33"], "x"),
        ("niah_multivalue", 0, ["1", "2"], "1 2"), ("niah_multivalue", 1, ["3", "4"], "3")]))  # fmt: skip
    assert dense == {"niah_single_1": {"0": 1.0, "1": 1.0, "2": 0.0}, "niah_multivalue": {"0": 1.0, "1": 0.5}}
    star = per_request_scores(_predictions(tmp_path / "s.jsonl", [
        ("niah_single_1", 2, ["33"], "x"), ("niah_single_1", 0, ["11"], "11"), ("niah_single_1", 1, ["22"], "no"),
        ("niah_multivalue", 1, ["3", "4"], "3"), ("niah_multivalue", 0, ["1", "2"], "1 2")]))  # fmt: skip
    intervals = task_intervals(dense)
    expected = wilson(2, 3)
    assert intervals["niah_single_1"]["low"] == pytest.approx(100 * expected.low, abs=0.01)
    assert intervals["niah_single_1"]["per_request"] == {"0": 1.0, "1": 1.0, "2": 0.0}
    assert intervals["niah_multivalue"]["method"] == "bootstrap"
    result = share(star, dense, ["niah_single_1", "niah_multivalue"])
    assert result is not None and result["value"] == pytest.approx(100 * 2.5 / 3.5, abs=0.01)
    assert result["low"] <= result["value"] <= result["high"] and result["method"] == "paired bootstrap"
    with pytest.raises(ConfigurationError, match="must be the same requests"):
        share({"niah_single_1": {"0": 1.0}}, dense, ["niah_single_1"])
    # Scored against dense's own answers (a request file without references).
    answers = {"niah_single_1": {"0": "11", "1": "22", "2": "x"}, "niah_multivalue": {"0": "1 2", "1": "3"}}
    agree = per_request_scores(tmp_path / "s.jsonl", references=answers)
    assert agree["niah_single_1"] == {"0": 1.0, "1": 0.0, "2": 1.0}


def test_hardest_tasks_dense_can_do() -> None:
    dense = {"a": 100.0, "b": 83.3, "c": 66.7, "d": 40.0, "e": 50.0, "f": 95.0}
    chosen, others = hardest_tasks(dense, 50.0, 3)
    assert chosen == ["e", "c", "b"] and others == {"a": 100.0, "d": 40.0, "f": 95.0}


def test_stale_work_is_refused_in_one_line(tmp_path: Path) -> None:
    manifest = WorkManifest(tmp_path)
    spec_a = {"task": "niah_single_1", "num_samples": 3}
    path = tmp_path / f"x_{spec_digest(spec_a)}.jsonl"
    assert manifest.check(path, spec_a) is False  # not made yet
    path.write_text("{}\n")
    manifest.record(path, spec_a)
    assert WorkManifest(tmp_path).check(path, spec_a) is True  # read back from manifest.json
    with pytest.raises(ConfigurationError, match=r"stale work file .*num_samples 3 -> 5"):
        WorkManifest(tmp_path).check(path, {**spec_a, "num_samples": 5})
    orphan = tmp_path / "requests_1024_all.jsonl"  # what the older script left
    orphan.write_text("{}\n")
    with pytest.raises(ConfigurationError, match="no record of what made it"):
        manifest.check(orphan, spec_a)


ARGS = ["--lengths", "1024", "--configs", "dense", "aq-old_L/8", "--dense-floor", "0", "--hardest", "1"]


@pytest.mark.slow
def test_rerun_with_other_tasks_or_samples_over_the_same_work(tmp_path: Path, capsys) -> None:
    """The run that died with ``KeyError: 'niah_multikey_2'``: two tasks, then one task and fewer samples, same
    --work: each run scores its own requests; a stale file under a work name is refused with exit 2."""
    work, out = tmp_path / "work", tmp_path / "fid"
    common = [*ARGS, "--work", str(work), "--out", str(out)]
    assert fidelity_table.main([*common, "--tasks", "niah_single_1", "niah_multikey_2", "--num-samples", "2"]) == 0
    first = json.loads(out.with_suffix(".json").read_text())["lengths"]["1024"]
    assert set(first["cells"]["dense"]["tasks"]) == {"niah_single_1", "niah_multikey_2"}
    (chosen,) = first["hardest"]
    entry = first["cells"]["aq-old_L/8"]
    assert set(entry["tasks"]) == {chosen} and entry["tasks"][chosen]["n"] == 2
    assert len(entry["tasks"][chosen]["per_request"]) == 2
    assert entry["share"] is None or entry["share"]["method"] == "paired bootstrap"
    old_form = [json.loads(line) for f in work.glob("requests_1024_*_old_form.jsonl") for line in f.open()]
    assert old_form and all(r["question"] == r["input_query"] for r in old_form)

    assert fidelity_table.main([*common, "--tasks", "niah_multikey_2", "--num-samples", "1"]) == 0
    second = json.loads(out.with_suffix(".json").read_text())["lengths"]["1024"]
    assert set(second["cells"]["dense"]["tasks"]) == {"niah_multikey_2"}
    assert second["cells"]["aq-old_L/8"]["tasks"]["niah_multikey_2"]["n"] == 1
    assert "KeyError" not in capsys.readouterr().err

    manifest = json.loads((work / "manifest.json").read_text())
    stale = next(n for n, s in manifest.items() if n.startswith("niah_multikey_2_") and s["num_samples"] == 1)
    manifest[stale]["num_samples"] = 7  # as if made by another run under this name
    (work / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert fidelity_table.main([*common, "--tasks", "niah_multikey_2", "--num-samples", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stale work file" in err[0] and stale in err[0], err


def test_an_output_prefix_with_dots_keeps_its_name() -> None:
    """``--out .../qwen2.5-coder-0.5b_16384`` writes ``..._16384.json``, not ``qwen2.5-coder-0.json``."""
    prefix = Path("benchmarks/frontier/qwen2.5-coder-0.5b_16384")
    assert table_paths(prefix) == (prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md"))
    assert table_paths(Path("out/table.json")) == (Path("out/table.json"), Path("out/table.md"))
