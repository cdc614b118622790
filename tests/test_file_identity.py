"""An output is one file whatever its path, an input is the bytes the checks read, a full disk is one line: the
file-identity, input-change and full-disk faults of issue 27, with real files (links, renames, a small tmpfs where
the test can mount one) and the shipped command line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import copy_finished, predict_args, write_requests
from star_lightning.cli import main
from star_lightning.data.output_lock import OutputLock


def _predict(model: Path, requests: Path, output: Path, *extra: str) -> int:
    return main(predict_args(model, requests, output, "--trainer.devices", "1", "--trainer.logger", "false", *extra))


def _one_line(capsys: pytest.CaptureFixture[str], prefix: str, *words: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(prefix), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _indices(path: Path) -> list[int]:
    return [json.loads(line)["index"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root can mount one); skipped where the test cannot mount it."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to its last byte."""
    with (folder / "filler").open("wb", buffering=0) as handle:
        for size in (1024, 1):
            try:
                while handle.write(b"x" * size) == size:
                    pass
            except OSError:
                pass


def _stderr(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr, less the logging module's complaints about a handler left on an earlier test's closed capture."""
    return re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", capsys.readouterr().err, flags=re.DOTALL)


def _ends_with_one_line(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """A failure mid-run: after the start line (and the loading bars), one line, no traceback."""
    err = _stderr(capsys)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("star-lightning predict: ")]
    assert len(lines) == 2 and "requests to run" in lines[0], lines
    for word in words:
        assert word in lines[1], (word, lines[1])
    return lines[1]


# Bug 1: an output is identified by its file, not by its path text.


def test_a_link_to_an_output_being_written_finds_its_lock(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, output = copy_finished(finished, tmp_path)
    link = tmp_path / "link.jsonl"
    link.symlink_to(output)
    linked_folder = tmp_path / "same_folder"
    linked_folder.symlink_to(tmp_path)
    before = output.read_bytes()
    with OutputLock(output):  # another run writes out.jsonl
        for name in (link, linked_folder / "out.jsonl"):
            assert _predict(tiny_model_dir, requests, name, "--overwrite", "true") == 2
            _one_line(capsys, "star-lightning predict: error: ", "is being written by another star-lightning run")
    assert output.read_bytes() == before


def test_a_link_to_an_output_resumes_under_its_run_record(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, output = copy_finished(finished, tmp_path)
    link = tmp_path / "link.jsonl"
    link.symlink_to(output)
    before = output.read_bytes()
    assert _predict(tiny_model_dir, requests, link, "--model.max_new_tokens", "4") == 2
    _one_line(capsys, "star-lightning predict: error: ", "of another run", "max_new_tokens 8 -> 4")
    assert output.read_bytes() == before
    assert not (tmp_path / "link.jsonl.run.json").exists()


def test_an_output_with_a_second_hard_link_is_refused(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, output = copy_finished(finished, tmp_path)
    os.link(output, tmp_path / "other_name.jsonl")
    assert _predict(tiny_model_dir, requests, output) == 2
    _one_line(capsys, "star-lightning predict: error: ", "2 names (hard links)", "choose another --output")


# Bug 5: the output may not be the contexts file.


def test_the_output_may_not_be_the_contexts_file_by_any_name(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contexts = tmp_path / "contexts.jsonl"
    contexts.write_text(json.dumps({"context_id": "c", "input_context": "The sky is blue. " * 5}) + "\n")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"context_id": "c", "input_query": "What colour is the sky?"}) + "\n")
    (tmp_path / "contexts_link.jsonl").symlink_to(contexts)
    before = contexts.read_bytes()
    for output in (contexts, tmp_path / "contexts_link.jsonl"):
        assert _predict(tiny_model_dir, requests, output, "--data.contexts", str(contexts)) == 2
        _one_line(capsys, "star-lightning predict: error: ", "the contexts file --data.contexts", "another --output")
    assert contexts.read_bytes() == before


# Bug 4: generate does not destroy predictions; predict counts only predictions as done.


def _generate(model: Path, output: Path, *extra: str) -> int:
    argv = ["generate", "--benchmark", "ruler", "--task", "niah_single_1", "--tokenizer", str(model)]
    return main([*argv, "--length", "400", "--num_samples", "2", "--output", str(output), *extra])


def test_generate_refuses_to_replace_predictions_unless_told(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, output = copy_finished(finished, tmp_path)
    before = output.read_bytes()
    assert _generate(tiny_model_dir, output) == 2
    _one_line(capsys, "star-lightning generate: error: ", "run record beside it", "--overwrite")
    assert output.read_bytes() == before
    (tmp_path / "out.jsonl.run.json").unlink()
    assert _generate(tiny_model_dir, output) == 2
    _one_line(capsys, "star-lightning generate: error: ", "holds predictions", "--overwrite")
    assert output.read_bytes() == before
    assert _generate(tiny_model_dir, output, "--overwrite") == 0
    assert all("pred" not in json.loads(line) for line in output.read_text().splitlines())


def test_generate_onto_a_folder_is_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert _generate(tiny_model_dir, tmp_path) == 2
    _one_line(capsys, "star-lightning generate: error: ", f"--output {tmp_path} is a folder")


def test_predict_counts_only_predictions_as_done(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, output = copy_finished(finished, tmp_path)
    shutil.copy(requests, output)  # the request lines (no 'pred') where the predictions were, under the run record
    before = output.read_bytes()
    assert _predict(tiny_model_dir, requests, output) == 2
    _one_line(capsys, "star-lightning predict: error: ", "3 line(s) with no 'pred'", "--overwrite true")
    assert output.read_bytes() == before


# Bug 3 (resume): a file that holds an index twice is refused.


def test_resume_refuses_an_output_holding_an_index_twice(
    tiny_model_dir: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests, output = copy_finished(finished, tmp_path)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text(lines[0] + lines[1] + lines[1])
    before = output.read_bytes()
    assert _predict(tiny_model_dir, requests, output) == 2
    _one_line(capsys, "star-lightning predict: error: ", "holds index 1 twice (lines 2 and 3", "--overwrite true")
    assert output.read_bytes() == before


# Bugs 3 and 12: the output replaced or its folder deleted mid-run; bug 6: full disks.


def _after_first_write(monkeypatch: pytest.MonkeyPatch, action: object) -> None:
    """Run ``action`` (as another process would act on the files) once the run has written its first prediction."""
    import star_lightning.callbacks.prediction_writer as writer

    real = writer.append_prediction
    calls = []

    def append(path: Path, record: dict, expected: object = None) -> None:
        if calls:
            action()  # type: ignore[operator]
        calls.append(record)
        real(path, record, expected)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "append_prediction", append)


def test_an_output_replaced_mid_run_stops_the_run_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", 3, filler=2)
    output, moved = tmp_path / "out.jsonl", tmp_path / "moved.jsonl"

    def replace() -> None:
        output.rename(moved)
        output.write_text(json.dumps({"index": 7, "pred": "someone else's"}) + "\n")

    _after_first_write(monkeypatch, replace)
    with pytest.raises(SystemExit) as stop:
        _predict(tiny_model_dir, requests, output)
    assert stop.value.code == 1
    _ends_with_one_line(capsys, "was replaced by another file", "what was written before stays")
    assert _indices(moved) == [0]
    assert _indices(output) == [7]


def test_the_output_folder_deleted_mid_run_stops_the_run_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", 3, filler=2)
    output = tmp_path / "results" / "out.jsonl"
    _after_first_write(monkeypatch, lambda: shutil.rmtree(output.parent))
    with pytest.raises(SystemExit) as stop:
        _predict(tiny_model_dir, requests, output)
    assert stop.value.code == 1
    _ends_with_one_line(capsys, f"{output} was deleted", "the job stops")


def _big_requests(path: Path, count: int) -> Path:
    """Requests whose predictions are ~3 KB each (an extra field is copied into the prediction)."""
    write_requests(path, count, filler=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**row, "notes": "n" * 3000}) + "\n" for row in rows))
    return path


def test_a_full_disk_mid_run_is_one_line_and_leaves_no_torn_line(
    tiny_model_dir: Path,
    tmp_path: Path,
    tiny_tmpfs: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    requests = _big_requests(tmp_path / "requests.jsonl", 3)
    output = tiny_tmpfs / "out.jsonl"
    _after_first_write(monkeypatch, lambda: _fill(tiny_tmpfs))
    with pytest.raises(SystemExit) as stop:
        _predict(tiny_model_dir, requests, output)
    assert stop.value.code == 1
    _ends_with_one_line(capsys, f"cannot write to {output} (no space left on device")
    assert output.read_bytes().endswith(b"\n")
    assert _indices(output) == [0]


def test_a_full_disk_at_the_start_is_one_line_and_leaves_no_lock(
    tiny_model_dir: Path, tmp_path: Path, tiny_tmpfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", 2, filler=2)
    _fill(tiny_tmpfs)
    assert _predict(tiny_model_dir, requests, tiny_tmpfs / "out.jsonl") == 2
    _one_line(capsys, "star-lightning predict: error: ", "No space left on device", "free space there")
    assert sorted(path.name for path in tiny_tmpfs.iterdir()) == ["filler"]
    assert _generate(tiny_model_dir, tiny_tmpfs / "requests.jsonl") == 2
    _one_line(capsys, "star-lightning generate: error: ", f"{tiny_tmpfs / 'requests.jsonl'}", "No space left on device")
    assert sorted(path.name for path in tiny_tmpfs.iterdir()) == ["filler"]


# Bug 2: an input that changes between the checks and the ranks' read.


def _change_after_the_checks(monkeypatch: pytest.MonkeyPatch, path: Path, text: str) -> None:
    """Replace ``path`` (a rename over it, as an editor saves) right after the checks, before the ranks read it."""
    import star_lightning.preflight as preflight

    real = preflight.check_run

    def check_then_change(**kwargs: object) -> object:
        plan = real(**kwargs)  # type: ignore[arg-type]
        (path.parent / "new.tmp").write_text(text)
        (path.parent / "new.tmp").rename(path)
        return plan

    monkeypatch.setattr(preflight, "check_run", check_then_change)  # predict imports it when its checks run


@pytest.mark.parametrize("changed", ["requests", "contexts"])
def test_an_input_replaced_after_the_checks_is_refused_and_a_rerun_runs_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], changed
) -> None:
    contexts = tmp_path / "contexts.jsonl"
    contexts.write_text(json.dumps({"context_id": "c", "input_context": "The magic number is 4. " * 5}) + "\n")
    requests = tmp_path / "requests.jsonl"
    rows = [{"context_id": "c", "input_query": f"Question {i}?", "outputs": ["4"]} for i in range(3)]
    requests.write_text("".join(json.dumps(row) + "\n" for row in rows))
    original = (requests if changed == "requests" else contexts).read_text()
    if changed == "requests":
        _change_after_the_checks(monkeypatch, requests, original.replace("Question", "Other question"))
    else:
        _change_after_the_checks(monkeypatch, contexts, original.replace("4", "5"))
    output = tmp_path / "out.jsonl"
    assert _predict(tiny_model_dir, requests, output, "--data.contexts", str(contexts)) == 2
    option = "--data.path" if changed == "requests" else "--data.contexts"
    _ends_with_error(capsys, f"{option} ", "changed after the checks read it", "nothing was run")
    assert not output.exists() or _indices(output) == []
    monkeypatch.undo()
    (requests if changed == "requests" else contexts).write_text(original)
    assert _predict(tiny_model_dir, requests, output, "--data.contexts", str(contexts)) == 0
    assert "3 of 3 requests to run" in capsys.readouterr().err
    assert _indices(output) == [0, 1, 2]


def _ends_with_error(capsys: pytest.CaptureFixture[str], *words: str) -> None:
    err = _stderr(capsys)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("star-lightning predict: error: ")]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], (word, errors[0])


def test_a_changed_contexts_file_is_named_on_resume(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contexts = tmp_path / "contexts.jsonl"
    contexts.write_text(json.dumps({"context_id": "c", "input_context": "The magic number is 4. " * 5}) + "\n")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"context_id": "c", "input_query": "Which number?", "outputs": ["4"]}) + "\n")
    output = tmp_path / "out.jsonl"
    assert _predict(tiny_model_dir, requests, output, "--data.contexts", str(contexts)) == 0
    capsys.readouterr()
    contexts.write_text(contexts.read_text().replace("4", "5"))
    assert _predict(tiny_model_dir, requests, output, "--data.contexts", str(contexts)) == 2
    line = _one_line(capsys, "star-lightning predict: error: ", f"contexts file (--data.contexts) {contexts} (")
    assert "request file" not in line, line


# score: a damaged record (bug 12, and its advice), two runs of one request file, a pipe.

SCORE = ("--task", "niah_single_1")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"skipped_too_long": 5}, "'skipped_too_long' is not a list of objects"),
        ({"request_indices": [0, 2]}, "'request_indices' is not a list of [first, last] index pairs"),
        (None, "Expecting property name"),
    ],
)
def test_score_beside_a_damaged_run_record_is_one_line_with_scores_way_out(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict | None, why: str
) -> None:
    _, output = copy_finished(finished, tmp_path)
    record = tmp_path / "out.jsonl.run.json"
    if change is None:
        record.write_text("{ not json")
    else:
        record.write_text(json.dumps({**json.loads(record.read_text()), **change}))
    assert main(["score", str(output), *SCORE]) == 2
    line = _one_line(capsys, "star-lightning score: error: ", f"{record} beside {output} is damaged ({why}")
    assert "move the record away" in line and "--output" not in line, line


def test_score_refuses_two_runs_of_one_request_file(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, output = copy_finished(finished, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    copy_finished(finished, other)
    assert main(["score", str(output), str(other / "out.jsonl"), *SCORE]) == 2
    _one_line(capsys, "star-lightning score: error: ", "two runs over the same requests", "both hold index 0")


def test_score_reads_a_pipe(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reader, writer = os.pipe()
    data = (finished / "out.jsonl").read_bytes()
    pid = os.fork()
    if pid == 0:  # a real writer process, as a shell's <(cat file) would be
        os.close(reader)
        os.write(writer, data)
        os._exit(0)
    os.close(writer)
    try:
        assert main(["score", f"/dev/fd/{reader}", *SCORE]) == 0
    finally:
        os.close(reader)
        os.waitpid(pid, 0)
    assert json.loads(capsys.readouterr().out)["counts"] == {"niah_single_1": 3}


# Bug 10: a ring with fewer context tokens than its chunks is refused by the checks, naming the request.


def test_a_ring_too_short_for_its_chunks_is_refused_before_any_rank_starts(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", 2, filler=2)
    with requests.open("a") as handle:
        handle.write(json.dumps({"input_context": "Hi", "input_query": "Who?", "outputs": ["x"]}) + "\n")
    output = tmp_path / "out.jsonl"
    args = predict_args(tiny_model_dir, requests, output, "--model.attention", "ring", "--trainer.devices", "2")
    assert main([*args, "--trainer.logger", "false"]) == 2
    _one_line(capsys, "star-lightning predict: error: ", "request 2 (", "line 3)", "too short for a zigzag ring")
    assert not output.exists()


# Poor answers: simulated hosts beyond the blocks; a context_id defined as "1" and used as 1.


def test_simulated_hosts_beyond_the_blocks_name_simulate_hosts(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = write_requests(tmp_path / "requests.jsonl", 1, filler=2)
    assert _predict(tiny_model_dir, requests, tmp_path / "out.jsonl", "--model.simulate_hosts", "64") == 2
    line = _one_line(
        capsys,
        "star-lightning predict: error: ",
        "hosts --model.simulate_hosts plays",
        "Lower --model.simulate_hosts to at most",
    )
    assert "--trainer.devices" not in line, line


def test_a_context_id_defined_as_a_string_and_used_as_a_number_says_so(tmp_path: Path) -> None:
    from star_lightning.data.jsonl import read_requests
    from star_lightning.errors import ConfigurationError

    path = tmp_path / "requests.jsonl"
    rows = [{"context_id": "1", "input_context": "Text.", "input_query": "Q?"}, {"context_id": 1, "input_query": "Q?"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(
        ConfigurationError, match=r"'context_id' 1 is no string, but the context is defined as the string '1'"
    ):
        read_requests(path)
