"""The run folder's formats: one reader and writer per file, shared by the server, the audit and the benchmarks."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError, DataError
from common.federation import RunSettings
from common.run_files import (
    ROUNDS_FILE,
    RoundRecord,
    append_round,
    check_same_settings,
    read_rounds,
    site_order,
    truncate_rounds,
)
from server.app import privacy_summary


def _record(number: int) -> RoundRecord:
    return RoundRecord(
        round=number, run_id="r", valid={"ndcg@10": 0.1 * number}, sites_trained=["0", "north"],
        sites_declined={"2": "declined: budget"}, failures=["node 7: refused"], site_epsilon={"0": 1.0, "north": 2.0},
        site_ledger_head={"0": {"lines": number, "hash": "ab"}}, epsilon=2.0, seconds=3.0, evaluation_seconds=1.0,
    )


def test_round_records_round_trip_and_truncate(tmp_path: Path) -> None:
    for number in (1, 2, 3):
        append_round(tmp_path, _record(number))
    assert read_rounds(tmp_path) == [_record(1), _record(2), _record(3)]
    assert read_rounds(tmp_path, up_to=2) == [_record(1), _record(2)]
    truncate_rounds(tmp_path, 1)
    assert read_rounds(tmp_path) == [_record(1)]


def test_a_line_from_before_a_field_existed_reads_with_its_default(tmp_path: Path) -> None:
    (tmp_path / ROUNDS_FILE).write_text(
        '{"round": 1, "valid": null, "sites_trained": [0, 1], "sites_declined": {}, "sites_failed": 0, '
        '"site_epsilon": {"0": 1.5}, "epsilon": 1.5, "seconds": 2.0}\n'
    )
    [record] = read_rounds(tmp_path)
    assert record.sites_trained == ["0", "1"] and record.failures == [] and record.site_ledger_head == {}
    assert record.run_id is None and record.evaluation_seconds == 0.0


@pytest.mark.parametrize(
    ("line", "problem"),
    [("not json", "not JSON"), ('{"valid": null}', "no 'round'"), ('{"round": 1, "site_epsilon": [1]}', "wrong type")],
)
def test_a_malformed_round_line_is_an_error_naming_its_line(tmp_path: Path, line: str, problem: str) -> None:
    (tmp_path / ROUNDS_FILE).write_text(_record(1).to_json() + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"rounds.jsonl, line 2: .*{problem}"):
        read_rounds(tmp_path)


def test_numbered_and_named_sites_sort_together() -> None:
    """The server's summary sorted site ids with int() on digits only: mixing named and numbered ids raised."""
    assert sorted(["north", "10", "2", "east"], key=site_order) == ["2", "10", "east", "north"]
    summary = privacy_summary(RunSettings(), {"north": 1.0, "10": 2.0, "2": 3.0})
    assert list(summary["per_site"]) == ["2", "10", "north"]


def test_a_run_saved_with_a_removed_setting_off_resumes_and_one_with_it_on_is_refused(tmp_path: Path) -> None:
    now = RunSettings().to_run_config()
    check_same_settings(tmp_path, {**now, "iterate-average-decay": 0.0}, now)
    with pytest.raises(ConfigError, match="iterate-average-decay 0.9 \\(saved\\) vs None"):
        check_same_settings(tmp_path, {**now, "iterate-average-decay": 0.9}, now)
