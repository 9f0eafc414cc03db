"""Stimulus ids are read alike wherever they come from (``sources.stimulus_id``): an .npy's
``.ids.txt``, a parquet feature file's ``id`` column, a data set table's ``id`` cells, COCO and
Hugging Face ids, a ``--stimuli`` id list. Surrounding whitespace (a trailing space, the "\\r" a
spreadsheet's export leaves, a tab) is no part of an id; a blank id is refused naming the file.

Planted answers: the same features written as .npy + .ids.txt and as parquet with padded ids
give the same run ids and the same rows; the stimuli a padded file covers are the ones kept."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convergence_core.datasets import load_coco, load_dataset, load_table
from convergence_core.precompute import precompute
from convergence_core.sources import (
    FeatureFileError,
    feature_file_ids,
    id_lines,
    read_feature_file,
)

N = 12
IDS = [f"img{i:03d}" for i in range(N)]
#: what a spreadsheet or a careless script leaves around ids: each id padded one way
PADS = ("{} ", "{}\r", "\t{}", " {} ", "{}\xa0", "{}")


def _padded(ids: list[str]) -> list[str]:
    return [PADS[k % len(PADS)].format(sid) for k, sid in enumerate(ids)]


def _features(seed: int = 0, width: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((N, 4))
    return (latent @ rng.standard_normal((4, width)) + 0.1 * rng.standard_normal((N, width))
            ).astype(np.float32)


def _npy(path: Path, array: np.ndarray, ids: list[str], newline: str = "\n") -> Path:
    np.save(path, array)
    Path(str(path) + ".ids.txt").write_bytes(
        "".join(sid + newline for sid in ids).encode("utf-8"))
    return path


def _parquet(path: Path, array: np.ndarray, ids: list) -> Path:
    frame = pd.DataFrame(array, columns=[f"f{j}" for j in range(array.shape[1])])
    frame.insert(0, "id", ids)
    frame.to_parquet(path)
    return path


def _table(path: Path, ids: list[str]) -> Path:
    pd.DataFrame({"id": ids, "caption": [f"a photo of thing {i}" for i in range(len(ids))]}
                 ).to_csv(path, index=False)
    return path


# -- feature files ---------------------------------------------------------------------------------


def test_a_parquet_file_with_padded_ids_reads_as_the_same_npy_with_its_id_list(tmp_path):
    """The same features, rows shuffled, as .npy + .ids.txt (padded lines, "\\r\\n" ends) and as
    parquet with the same padded ids: both list the clean ids and give the planted rows in the
    data set's order. An integer id column reads as its digits (7 → "7")."""
    planted = _features()
    order = np.random.default_rng(1).permutation(N)
    shuffled, listed = planted[order], _padded([IDS[i] for i in order])
    npy = _npy(tmp_path / "a.npy", shuffled, listed, newline="\r\n")
    parquet = _parquet(tmp_path / "a.parquet", shuffled, listed)
    clean = [IDS[i] for i in order]
    assert feature_file_ids(npy, model="a", layer="x") == clean
    assert feature_file_ids(parquet, model="a", layer="x") == clean
    from_npy = read_feature_file(npy, IDS, model="a", layer="x")
    from_parquet = read_feature_file(parquet, IDS, model="a", layer="x")
    np.testing.assert_array_equal(from_npy, planted)
    np.testing.assert_array_equal(from_parquet, planted)
    # numbers: an integer column's 7 is the id "7" (not "007"), as a table's cell "7" is
    numbers = _parquet(tmp_path / "n.parquet", planted, list(range(100, 100 + N)))
    assert feature_file_ids(numbers, model="n", layer="x") == [str(100 + i) for i in range(N)]


def test_padded_parquet_ids_make_the_same_run_as_the_npy(tmp_path):
    """Runs against a data set of clean ids, and without a data set (the first file's ids are
    the stimuli): the padded parquet gives the run ids and embeddings the .npy gives."""
    planted, other = _features(0), _features(2, width=5)
    table = _table(tmp_path / "t.csv", IDS)
    files = {
        "npy": _npy(tmp_path / "v.npy", planted, IDS),
        "parquet": _parquet(tmp_path / "v.parquet", planted, _padded(IDS)),
        "other": _npy(tmp_path / "o.npy", other, _padded(IDS), newline="\r\n"),
    }
    runs = {}
    for kind in ("npy", "parquet"):
        for with_table in (True, False):
            options = dict(features={"v": str(files[kind]), "o": str(files["other"])},
                           modalities={"v": "vision", "o": "vision"},
                           cache_root=str(tmp_path / "cache"),
                           run_name=f"{kind}-{with_table}")
            run = precompute(dataset=str(table), **options) if with_table else precompute(**options)
            runs[kind, with_table] = run
            assert list(run.stimuli["id"]) == IDS, (kind, with_table)
            np.testing.assert_array_equal(run.embeddings["v"]["features"], planted)
            np.testing.assert_array_equal(run.embeddings["o"]["features"], other)
    for with_table in (True, False):
        np.testing.assert_array_equal(runs["npy", with_table].gpa.residuals,
                                      runs["parquet", with_table].gpa.residuals)
        pd.testing.assert_frame_equal(runs["npy", with_table].dispersion,
                                      runs["parquet", with_table].dispersion)


def test_the_stimuli_a_padded_file_covers_are_the_ones_kept(tmp_path):
    """--stimuli common with a parquet file (brain recordings, say) of 9 of the 12 stimuli, its
    ids padded: the run keeps those 9 (they were left out in silence when "img000 " was another
    id than "img000"), and an id list (--stimuli keep.txt) with padded lines keeps its ids."""
    planted, brain = _features(0), _features(3, width=9)
    seen = [0, 1, 2, 4, 5, 7, 8, 10, 11]
    table = _table(tmp_path / "t.csv", IDS)
    options = dict(
        dataset=str(table),
        features={"v": str(_npy(tmp_path / "v.npy", planted, IDS)),
                  "w": str(_npy(tmp_path / "w.npy", _features(4), IDS)),
                  "subj01": str(_parquet(tmp_path / "s.parquet", brain[seen],
                                         _padded([IDS[i] for i in seen])))},
        modalities={"v": "vision", "w": "vision", "subj01": "brain"},
        cache_root=str(tmp_path / "cache"),
    )
    run = precompute(**options, stimuli="common", run_name="common")
    assert list(run.stimuli["id"]) == [IDS[i] for i in seen]
    np.testing.assert_array_equal(run.embeddings["subj01"]["features"], brain[seen])
    np.testing.assert_array_equal(run.embeddings["v"]["features"], planted[seen])
    keep = tmp_path / "keep.txt"
    keep.write_bytes("".join(f"{sid} \r\n" for sid in IDS[:6] if sid != "img003").encode())
    some = precompute(**options, stimuli=str(keep), run_name="listed")
    assert list(some.stimuli["id"]) == ["img000", "img001", "img002", "img004", "img005"]


def test_ids_that_differ_only_in_surrounding_whitespace_are_one_id_named_as_such(tmp_path):
    """Two rows whose ids differ only in padding are one stimulus listed twice: refused naming
    the file, both spellings (repr shows the spaces and "\\r") and the fix — in a parquet file
    and in an id list alike."""
    ids = IDS[:-1] + ["img000\r"]
    parquet = _parquet(tmp_path / "twice.parquet", _features(), ids)
    with pytest.raises(FeatureFileError, match=r"twice\.parquet lists 1 id\(s\) twice, written "
                       r"with and without surrounding whitespace \(e\.g\. 'img000' and "
                       r"'img000\\r'\).*keep one row per stimulus"):
        read_feature_file(parquet, IDS, model="a", layer="x")
    npy = _npy(tmp_path / "twice.npy", _features(), IDS[:-1] + ["img000 "])
    with pytest.raises(FeatureFileError, match=r"twice\.npy\.ids\.txt of feature file .*twice\.npy "
                       r"lists 1 id\(s\) twice, written with and without surrounding "
                       r"whitespace \(e\.g\. 'img000' and 'img000 '\)"):
        feature_file_ids(npy, model="a", layer="x")


def test_a_blank_line_in_an_id_list_of_too_few_ids_is_pointed_at(tmp_path):
    """Blank lines of an id list are skipped (a list's syntax: a final newline, a gap); where the
    list then has fewer ids than the array rows, the message says at which line a blank one
    sits, where a row's id was likely lost."""
    lines = IDS[:5] + [" "] + IDS[6:]
    path = _npy(tmp_path / "gap.npy", _features(), lines)
    with pytest.raises(FeatureFileError, match=r"has 12 rows but 11 ids; .* \(its id list has 1 "
                       r"blank line\(s\) between ids, e\.g\. line 6, which are skipped: write "
                       r"the id of that row there\)"):
        read_feature_file(path, IDS, model="a", layer="x")
    Path(str(path) + ".ids.txt").write_text("\n\n".join(IDS) + "\n\n\n")  # gaps, no row lost
    np.testing.assert_array_equal(read_feature_file(path, IDS, model="a", layer="x"), _features())


def test_one_rule_for_what_an_id_is():
    """``stimulus_id``: text without surrounding whitespace; numbers as str writes them; None
    (refused by each reader) for no id; inner spaces and Unicode forms are left as they are."""
    from convergence_core.sources import stimulus_id

    assert stimulus_id(" img1\r") == "img1"
    assert stimulus_id("img 1\t") == "img 1"
    assert stimulus_id("\xa0img1\u3000") == "img1"
    assert stimulus_id(7) == "7" and stimulus_id(np.int64(7)) == "7"
    assert stimulus_id("007") == "007" and stimulus_id(7.0) == "7.0"
    for blank in ("", "  ", "\r\n", None, float("nan"), pd.NA, np.nan):
        assert stimulus_id(blank) is None, blank
    assert stimulus_id("cafe\u0301") == "cafe\u0301"  # NFD stays NFD (check_id_normalisation)
    assert id_lines("a \r\n\n b\r c\n") == ["a", "b", "c"]


# -- data sets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_data_set_table_with_padded_ids_matches_clean_feature_files(tmp_path, suffix):
    """A table whose id cells carry a trailing space, "\\r" or a tab: its stimuli are the clean
    ids, and an .npy with a clean id list matches them (it never could: the id list was read
    stripped, the table not)."""
    padded = _padded(IDS)
    frame = pd.DataFrame({"id": padded, "caption": [f"a photo {i}" for i in range(N)]})
    table = tmp_path / f"t{suffix}"
    if suffix == ".csv":  # quoted where a cell holds "\r", as the csv module writes it
        with open(table, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([list(frame.columns), *frame.values.tolist()])
    elif suffix == ".jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    else:
        frame.to_parquet(table)
    assert list(load_dataset(str(table)).stimuli["id"]) == IDS
    planted = _features()
    run = precompute(dataset=str(table),
                     features={"v": str(_npy(tmp_path / "v.npy", planted, IDS)),
                               "w": str(_npy(tmp_path / "w.npy", _features(5), IDS))},
                     modalities={"v": "vision", "w": "vision"},
                     cache_root=str(tmp_path / "cache"), run_name="t")
    assert list(run.stimuli["id"]) == IDS
    np.testing.assert_array_equal(run.embeddings["v"]["features"], planted)


def test_a_table_listing_one_id_with_and_without_padding_names_both(tmp_path):
    """Two rows "img001" and "img001 " of a table of one row per stimulus: one id twice, refused
    naming the table, both spellings and why; a blank id cell is refused naming the row."""
    table = tmp_path / "t.csv"
    pd.DataFrame({"id": ["img000", "img001", "img001 "], "captions": ["a", "b", "c"]}
                 ).to_csv(table, index=False)
    with pytest.raises(ValueError, match=r"t\.csv has id 'img001' on more than one row \(written "
                       r"'img001' and 'img001 ': ids are read without surrounding whitespace, "
                       r"so these are one id\); ids must be unique"):
        load_table(tmp_path, table)
    table.write_bytes(b'id,captions\nimg000,a\n" \t",b\n')
    with pytest.raises(ValueError, match=r"t\.csv: row 2 has no id; give every row an id"):
        load_table(tmp_path, table)


def test_coco_string_ids_are_read_as_every_id(make_coco_folder):
    """COCO ids are integers; string ids are accepted and read like any id: " 7" is "7", a blank
    one is refused among the file's problems, and two that differ only in padding are named."""
    root = make_coco_folder([["a cat"], ["a dog"], ["a bird"]])
    path = root / "captions.json"
    data = json.loads(path.read_text())
    for entry in data["images"]:
        entry["id"] = f" {entry['id']}\r"
    for entry in data["annotations"]:
        entry["image_id"] = f" {entry['image_id']}\r"
    path.write_text(json.dumps(data))
    loaded = load_coco(root)
    assert list(loaded.stimuli["id"]) == ["1", "2", "3"]
    assert loaded.stimuli["captions"].tolist() == [["a cat"], ["a dog"], ["a bird"]]
    data["images"][0]["id"] = "  "
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[0\] has a blank id '  '"):
        load_coco(root)
    data["images"][0]["id"] = "2"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"captions\.json has 1 malformed entry: image ids '2' "
                       r"and ' 2\\r' are one id once surrounding whitespace is removed"):
        load_coco(root)


def test_hugging_face_id_column_is_read_as_every_id(tmp_path, hub_offline):
    """A Hugging Face data set's id column (id_column=...): padded ids read clean; a row without
    an id is refused naming the row, the column and the fix."""
    import datasets as hf
    from PIL import Image

    from convergence_core.datasets import load_hf

    images = [Image.new("RGB", (8, 6), (i * 40, 10, 200)) for i in range(3)]
    features = hf.Features({"image": hf.Image(), "text": hf.Value("string"),
                            "key": hf.Value("string")})
    hf.Dataset.from_dict({"image": images, "text": ["a", "b", "c"],
                          "key": ["img000 ", "img001\r", "\timg002"]},
                         features=features).save_to_disk(str(tmp_path / "saved"))
    loaded = load_hf(str(tmp_path / "saved"), id_column="key", cache_dir=tmp_path / "cache")
    assert list(loaded.stimuli["id"]) == ["img000", "img001", "img002"]
    hf.Dataset.from_dict({"image": images, "text": ["a", "b", "c"],
                          "key": ["img000", None, "img002"]},
                         features=features).save_to_disk(str(tmp_path / "holes"))
    with pytest.raises(ValueError, match=r"row 1 has no id in column 'key' \(missing or blank\); "
                       r"give every row an id, or leave id_column out"):
        load_hf(str(tmp_path / "holes"), id_column="key", cache_dir=tmp_path / "cache")


def test_a_float_id_column_is_told_to_store_its_ids_as_integers(tmp_path):
    """Integer ids written as floats (pandas turns an id column with a missing value into floats):
    7.0 reads "7.0", which names no stimulus "7". The message says so and how to store them, where
    it spoke of zero-padding, prefixes and file suffixes."""
    table = _table(tmp_path / "t.csv", [str(i) for i in range(N)])
    floats = _parquet(tmp_path / "f.parquet", _features(), [float(i) for i in range(N)])
    with pytest.raises(FeatureFileError, match=r"its ids look like \['0\.0', '1\.0', '2\.0'\], the "
                       r"stimuli's like \['0', '1', '2'\]; its ids are whole numbers written as "
                       r"floats .* store the ids as integers or text"):
        precompute(dataset=str(table),
                   features={"v": str(floats), "w": str(_npy(tmp_path / "w.npy", _features(5),
                                                               [str(i) for i in range(N)]))},
                   modalities={"v": "vision", "w": "vision"},
                   cache_root=str(tmp_path / "cache"), run_name="t")
