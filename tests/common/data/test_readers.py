"""Every reader on good, malformed and empty files: errors name the file and the line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from common.data.datasets import load_dataset
from common.data.readers import ColumnNames, detect_format, read_interactions
from common.errors import DataError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = {
    "u.data": "1\t10\t5\t300\n1\t11\t3\t100\n2\t10\t4\t200\n",
    "ratings.dat": "1::10::5::300\n1::11::3::100\n2::10::4::200\n",
    "ratings.csv": "userId,movieId,rating,timestamp\n1,10,5.0,300\n1,11,3.0,100\n2,10,4.0,200\n",
    "log.csv": "user_id,item_id,timestamp\nalice,a,300\nalice,b,100\nbob,a,200\n",
    "log.tsv": "user\titem\ttime\nalice\ta\t2024-01-03\nalice\tb\t2024-01-01\nbob\ta\t2024-01-02\n",
    "seq.txt": "alice b a\nbob a c\n",
    "pairs.txt": "alice b\nalice a\nbob a\n",
}
FORMATS = {
    "u.data": "movielens-raw",
    "ratings.dat": "movielens-dat",
    "ratings.csv": "movielens-csv",
    "log.csv": "csv",
    "log.tsv": "tsv",
    "seq.txt": "sequences",
    "pairs.txt": "pairs",
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_each_format_is_detected_and_read_in_time_order(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, GOOD[name])
    assert detect_format(path) == FORMATS[name]
    dataset = load_dataset(str(path))
    frame = dataset.frame
    first_user = frame[frame["user"] == frame["user"].iloc[0]]
    assert len(frame) == (4 if name == "seq.txt" else 3)
    assert frame["user"].nunique() == 2
    # The first user's items come out oldest first: 11 (t=100) before 10 (t=300), or b before a.
    assert first_user["item"].tolist()[:2] in (["11", "10"], ["b", "a"])


@pytest.mark.parametrize("name", sorted(GOOD))
def test_explicit_format_prefix_gives_the_same_data(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, GOOD[name])
    detected = load_dataset(str(path)).frame
    named = load_dataset(f"{FORMATS[name]}:{path}").frame
    pd.testing.assert_frame_equal(detected, named)


BAD_LINE = {
    "u.data": ("1\t10\t5\t300\n2\t11\t4\n", 2, "expected 4 fields"),
    "ratings.dat": ("1::10::5::300\n1::x::5::300\n", 2, "item id 'x' is not a non-negative integer"),
    "ratings.csv": ("userId,movieId,rating,timestamp\n1,10,5,300\n1,10.5,5,300\n", 3, "not a non-negative integer"),
    "log.csv": ("user,item,timestamp\na,b,1\na,c\n", 3, "expected 3 fields"),
    "log.tsv": ("user\titem\ttimestamp\na\tb\t1\na\tc\tyesterday\n", 3, "timestamp 'yesterday'"),
    "seq.txt": ("alice a b\nbob\n", 2, "no items"),
    "pairs.txt": ("alice a\nbob a b\n", 2, "expected 'user item'"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINE))
def test_malformed_line_is_reported_with_file_and_line(tmp_path: Path, name: str) -> None:
    text, line, message = BAD_LINE[name]
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as error:
        read_interactions(path, FORMATS[name])
    assert str(path) in str(error.value)
    assert f"line {line}" in str(error.value)
    assert message in str(error.value)
    assert error.value.line == line


@pytest.mark.parametrize("name", sorted(GOOD))
def test_empty_file_is_a_clear_error(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "")
    with pytest.raises(DataError, match="empty"):
        load_dataset(f"{FORMATS[name]}:{path}")


def test_header_only_file_holds_no_interactions(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "user,item,timestamp\n")
    with pytest.raises(DataError, match="no interactions"):
        read_interactions(path)


def test_one_user_is_not_a_dataset(tmp_path: Path) -> None:
    path = write(tmp_path, "pairs.txt", "alice a\nalice b\n")
    with pytest.raises(DataError, match="only one user"):
        load_dataset(str(path))


def test_undetectable_and_unknown_formats_say_what_to_do(tmp_path: Path) -> None:
    path = write(tmp_path, "mystery.bin", "justonetoken\n")
    with pytest.raises(DataError, match="FORMAT:PATH"):
        load_dataset(str(path))
    with pytest.raises(DataError, match="unknown format 'xml'"):
        load_dataset(f"xml:{path}")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "missing.csv"))


def test_binary_garbage_is_reported_not_decoded(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_bytes(b"alice a\n\xff\xfe bob\n")
    with pytest.raises(DataError, match="line 2.*UTF-8"):
        read_interactions(path, "pairs")


def test_missing_user_column_names_the_header(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "customer,product\na,b\n")
    with pytest.raises(DataError, match="no user column"):
        read_interactions(path)
    frame = read_interactions(path, "csv", ColumnNames(user="customer", item="product"))
    assert frame["item"].tolist() == ["b"]


def test_duplicate_user_item_time_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "u.data", "1\t10\t5\t300\n1\t10\t5\t300\n1\t11\t5\t301\n2\t10\t3\t5\n2\t10\t3\t6\n")
    dataset = load_dataset(str(path))
    assert dataset.report.duplicates_dropped == 1
    assert len(dataset.frame) == 4, "same item at another time is a real second interaction"


def test_kcore_keeps_only_users_and_items_with_k_interactions(tmp_path: Path) -> None:
    lines = ["u1 a", "u1 b", "u2 a", "u2 b", "u3 a", "u3 c"]
    path = write(tmp_path, "pairs.txt", "\n".join(lines) + "\n")
    dataset = load_dataset(str(path), kcore=2)
    # c has one interaction -> dropped; then u3 has one -> dropped; a and b keep 2 each.
    assert sorted(dataset.frame["user"].unique()) == ["u1", "u2"]
    assert dataset.report.kcore_removed_interactions == 2


def test_site_column_is_kept_when_the_data_names_sites(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "user,item,timestamp,site\na,x,1,north\nb,y,2,south\n")
    assert load_dataset(str(path)).frame["site"].tolist() == ["north", "south"]


def test_parquet_is_read_and_bad_rows_are_located(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    good = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"], "timestamp": [2, 1, 3]}).to_parquet(good)
    frame = load_dataset(str(good)).frame
    assert frame[frame["user"] == "a"]["item"].tolist() == ["y", "x"]
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"user_id": ["a", None], "item_id": ["x", "y"]}).to_parquet(bad)
    with pytest.raises(DataError, match="row 2"):
        load_dataset(str(bad))
    corrupt = write(tmp_path, "corrupt.parquet", "not parquet at all")
    with pytest.raises(DataError, match="Parquet"):
        load_dataset(str(corrupt))


def test_movielens_folder_is_resolved_to_its_ratings_file(tmp_path: Path) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    write(folder, "u.data", GOOD["u.data"])
    assert len(load_dataset(str(folder)).frame) == 3
    with pytest.raises(DataError, match="directory"):
        load_dataset(str(tmp_path))
