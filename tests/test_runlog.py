"""Run folder: checkpoints are whole or absent; resume truncates an interrupted round."""
import json

import numpy as np

from fedfm.runlog import RunLog, read_jsonl


def test_checkpoint_round_trip_and_last_complete(tmp_path):
    log = RunLog(tmp_path)
    adapter = {"lora.A": np.arange(6, dtype=np.float32).reshape(2, 3)}
    log.save_checkpoint(0, adapter, {}, {"python_random": [3, [1, 2], None]})
    log.save_checkpoint(1, {"lora.A": adapter["lora.A"] + 1}, {"m_t/lora.A": np.ones((2, 3), np.float32)}, {})
    (log.dir / "checkpoints" / "round-002.tmp").mkdir()  # a crash while writing round 2
    assert log.last_complete_round() == 1
    a, s, state = log.load_checkpoint(1)
    np.testing.assert_array_equal(a["lora.A"], adapter["lora.A"] + 1)
    assert set(s) == {"m_t/lora.A"} and state["round"] == 1


def test_truncate_after_drops_an_interrupted_round(tmp_path):
    log = RunLog(tmp_path)
    log.append_metrics([{"round": r, "site": "s", "task": "CE"} for r in (0, 1, 2)])
    log.append_ledger([{"round": 2, "site": "s"}])
    log.append_event(2, "s", "error", "boom")
    for r in (0, 1, 2):
        log.save_checkpoint(r, {"x": np.zeros(1, np.float32)}, {}, {})
    log.truncate_after(1)
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]
    assert read_jsonl(tmp_path / "ledger.jsonl") == [] and read_jsonl(tmp_path / "events.jsonl") == []
    assert log.complete_rounds() == [0, 1]


def test_json_has_no_nan(tmp_path):
    log = RunLog(tmp_path)
    log.append_metrics([{"round": 0, "nmse": float("nan"), "x": np.float32(1.5)}])
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"round": 0, "nmse": None, "x": 1.5}


def test_corrupt_json_lines_named_by_file_and_line(tmp_path):
    import pytest

    from fedfm.runlog import read_json

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 0}\n{"round": \n{"round": 1}\n')
    with pytest.raises(ValueError, match=rf"^{p}: line 2 is not valid JSON"):
        read_jsonl(p)
    p.write_text('{"round": 0}\n[1]\n')
    with pytest.raises(ValueError, match=rf"^{p}: line 2 is not a JSON object"):
        read_jsonl(p)
    (tmp_path / "b.json").write_text("{oops")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'b.json'}: not valid JSON"):
        read_json(tmp_path / "b.json")
    assert read_json(tmp_path / "absent.json", {}) == {}


def test_resume_drops_a_torn_last_line(tmp_path):
    log = RunLog(tmp_path)
    log.append_metrics([{"round": 0, "site": "s"}, {"round": 1, "site": "s"}])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 2, "si')  # killed in the middle of an append
    log.truncate_after(1)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"round": 0, "site": "s"}, {"round": 1, "site": "s"}]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
