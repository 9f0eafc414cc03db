"""Representations from files (issue 13, item 1): reading, matching by id, clear errors, runs that
mix file models of any modality, the CLI and [[models]] config tables, and a brain example with
synthetic voxel responses."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from convergence_core.cli import main
from convergence_core.datasets import load_dataset
from convergence_core.manifest import StimulusSubset
from convergence_core.precompute import PrecomputeConfig, precompute
from convergence_core.sources import (
    FeatureFileError,
    FileSource,
    check_feature_file,
    check_modality,
    feature_file_ids,
    read_feature_file,
)
from tests.page_reading import gallery_cards, gallery_texts

N = 30


@pytest.fixture
def coco(make_coco_folder) -> Path:
    return make_coco_folder([[f"caption number {i}", f"another {i}"] for i in range(N)])


@pytest.fixture
def ids(coco) -> list[str]:
    return list(load_dataset(coco).stimuli["id"])


def _save_npy(path: Path, array: np.ndarray, ids: list[str]) -> Path:
    np.save(path, array)
    Path(str(path) + ".ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    return path


def _save_parquet(path: Path, array: np.ndarray, ids: list[str]) -> Path:
    frame = pd.DataFrame(array, columns=[f"f{i}" for i in range(array.shape[1])])
    frame.insert(0, "id", ids)
    frame.to_parquet(path)
    return path


# -- reading and matching ------------------------------------------------------------------------


def test_rows_are_matched_to_the_data_set_by_id(tmp_path, ids):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((N, 7))
    order = rng.permutation(N)
    shuffled_ids = [ids[i] for i in order]
    npy = _save_npy(tmp_path / "f.npy", features[order], shuffled_ids)
    parquet = _save_parquet(tmp_path / "f.parquet", features[order], shuffled_ids)
    for path in (npy, parquet):
        out = read_feature_file(path, ids, model="m", layer="l")
        assert out.dtype == np.float32 and out.shape == (N, 7)
        np.testing.assert_allclose(out, features.astype(np.float32))


def test_a_parquet_file_may_hold_the_ids_as_its_index(tmp_path, ids):
    """df.set_index("id").to_parquet(path): pandas stores the ids as the index, which was read
    as "no 'id' column"."""
    features = np.random.default_rng(4).standard_normal((N, 3))
    frame = pd.DataFrame(features, columns=["a", "b", "c"]).assign(id=list(ids))
    frame.set_index("id").to_parquet(tmp_path / "indexed.parquet")
    check_feature_file(tmp_path / "indexed.parquet", ids, model="m", layer="l")
    out = read_feature_file(tmp_path / "indexed.parquet", ids, model="m", layer="l")
    np.testing.assert_allclose(out, features.astype(np.float32))


def test_a_float32_npy_in_order_is_not_copied(tmp_path, ids):
    features = np.random.default_rng(1).standard_normal((N, 5)).astype(np.float32)
    out = read_feature_file(_save_npy(tmp_path / "f.npy", features, ids), ids, model="m", layer="l")
    assert not out.flags.owndata and not out.flags.writeable  # a view of the read-only map


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda p, a, ids: _save_npy(p, a, ids[:-1] + ids[:1]), "twice"),
        (lambda p, a, ids: _save_npy(p, a[:-1], ids[:-1]), "no row for 1"),
        (lambda p, a, ids: _save_npy(p, a, [f"{i}.jpg" for i in ids]),
         r"lists none of the data set's 30 stimuli: its ids look like \['\d+\.jpg'"),
        (lambda p, a, ids: _save_npy(p, np.vstack([a, a[:1]]), ids + ["ghost"]), "does not have"),
        (lambda p, a, ids: _save_npy(p, a, ids[:-2]), "ids; give exactly one id per row"),
        (lambda p, a, ids: _save_npy(p, a.ravel(), ids), "2-D"),
        (lambda p, a, ids: _save_npy(p, np.where(np.arange(N)[:, None] == 4, np.nan, a), ids),
         r"NaN/Inf in 1 of 30 row.*fix those rows, or leave those stimuli out of the run "
         r"\(--stimuli IDS\.txt"),
        (lambda p, a, ids: _save_npy(p, np.where(np.arange(4) == 2, np.nan, a), ids),
         r"NaN/Inf in 30 of 30 row.*within 1 of 4 column\(s\), e.g. columns \[2\].*voxels outside "
         r"a mask, say\): remove those columns"),
        (lambda p, a, ids: _save_npy(p, np.where(np.arange(N)[:, None] == 10, 0.0, a), ids),
         r"1 of 30 row\(s\) that are all zeros, e.g. stimuli \['\d+'\].*--stimuli IDS\.txt"),
        (lambda p, a, ids: _save_npy(p, np.where(np.arange(N)[:, None] == 7, 1e39, a), ids),
         r"values beyond float32's range \(±3\.4e38; e\.g\. stimulus '\d+'\).*rescale"),
        (lambda p, a, ids: (np.save(p, a), p)[1], "no id list"),
        (lambda p, a, ids: _save_npy(p, np.array([{"x": 1}] * N, dtype=object), ids),
         r"refusing to load feature file .*Python objects.*np\.save\(path, features\.astype"),
        (lambda p, a, ids: (_save_npy(p, a, ids), p.write_bytes(pickle.dumps(a)), p)[-1],
         r"feature file .* is a pickle.*np\.save\(path"),
        (lambda p, a, ids: (_save_npy(p, a, ids), p.write_bytes(p.read_bytes()[:100]), p)[-1],
         r"cannot read feature file .*np\.save\(path"),
    ],
)
def test_bad_feature_files_name_the_file_and_the_fix(tmp_path, ids, break_it, message):
    array = np.random.default_rng(2).standard_normal((N, 4))
    path = break_it(tmp_path / "bad.npy", array, list(ids))
    if "float32" in message:  # the same values in a parquet file say the same
        parquet = _save_parquet(tmp_path / "bad.parquet", np.load(path), list(ids))
        with pytest.raises(FeatureFileError, match=message):
            read_feature_file(parquet, ids, model="m", layer="l")
    with pytest.raises(FeatureFileError, match=message) as info:
        read_feature_file(path, ids, model="m", layer="l")
    assert "bad.npy" in str(info.value)
    assert "delete" not in str(info.value)  # the user's own file: never "delete it and rerun"
    if "NaN" in message or "zeros" in message or "float32" in message:  # found on reading
        check_feature_file(path, ids, model="m", layer="l")
    else:  # the check before a run's work finds the same fault, with the same message
        with pytest.raises(FeatureFileError, match=message):
            check_feature_file(path, ids, model="m", layer="l")


def test_an_id_list_saved_with_a_byte_order_mark_is_read(tmp_path, ids):
    """Notepad and Excel may start a text file with a BOM: it is not part of the first id (which
    then went missing: a run on the common stimuli dropped it without a word)."""
    features = np.random.default_rng(5).standard_normal((N, 3))
    path = _save_npy(tmp_path / "bom.npy", features, ids)
    ids_file = Path(str(path) + ".ids.txt")
    ids_file.write_text("\ufeff" + ids_file.read_text(encoding="utf-8"), encoding="utf-8")
    assert feature_file_ids(path, model="m", layer="l") == list(ids)
    np.testing.assert_allclose(read_feature_file(path, ids, model="m", layer="l"),
                               features.astype(np.float32))


def test_ids_holding_unicode_line_separators_are_one_id_each(tmp_path):
    """str.splitlines split an id at U+2028, U+0085 or \\x1c-\\x1e: the list then had more ids
    than the file rows. Lines end at \\n, \\r\\n or \\r only."""
    odd = ["a\u2028b", "c\x85d", "e\x1cf", "g\x1dh", "i\x1ej", "k\u2029l"]
    features = np.random.default_rng(2).standard_normal((len(odd), 3))
    path = tmp_path / "odd.npy"
    np.save(path, features)
    Path(str(path) + ".ids.txt").write_text("\r\n".join(odd[:3]) + "\r" + "\n".join(odd[3:]) +
                                            "\n\n", encoding="utf-8")
    assert feature_file_ids(path, model="m", layer="l") == odd
    np.testing.assert_allclose(read_feature_file(path, odd[::-1], model="m", layer="l"),
                               features[::-1].astype(np.float32))
    from convergence_core.sources import id_lines  # the rule, for other id lists

    assert id_lines(" x \r\n\n y") == ["x", "y"]


@pytest.mark.parametrize("some", [False, True])
def test_ids_that_differ_only_in_unicode_normalisation_are_named(tmp_path, some):
    """From the audit: ids written as NFD (e + combining accent, as macOS writes file names)
    against NFC ids (é as one character) printed the same on both sides of "lists none of the
    data set's stimuli: its ids look like ['café_0', …], the stimuli's like ['café_0', …]". The
    message now says what differs, shows both with ascii() and names the fix; the ids are not
    matched silently (they are keys into the user's data)."""
    import unicodedata

    nfc = [unicodedata.normalize("NFC", f"café_{i}") for i in range(N)]
    written = [unicodedata.normalize("NFD", sid) if not some or i % 3 == 0 else sid
               for i, sid in enumerate(nfc)]  # some=True: a third of the ids only
    assert written != nfc and [unicodedata.normalize("NFC", w) for w in written] == nfc
    path = _save_npy(tmp_path / "nfd.npy", np.random.default_rng(1).standard_normal((N, 3)),
                     written)
    message = (r"nfd\.npy \(model 'm', layer 'l'\) writes %d of the data set's ids in another "
               r"Unicode normal form.*the file's ids in NFD, the stimuli's in NFC; e\.g\. the "
               r"file's 'cafe\\u0301_0' for 'caf\\xe9_0'.*unicodedata\.normalize\('NFC', i\)"
               % (N // 3 if some else N))
    for read in (read_feature_file, check_feature_file):
        with pytest.raises(FeatureFileError, match=message):
            read(path, nfc, model="m", layer="l")
    # a data set holding both forms as two stimuli: the file's NFC id is that stimulus, and the
    # NFD one is a stimulus the file lacks (it was refused as a spelling of it; final review)
    both = [*nfc, unicodedata.normalize("NFD", nfc[0])]
    with pytest.raises(FeatureFileError, match="has no row for 1 of the data set's") as info:
        check_feature_file(_save_npy(tmp_path / "nfc.npy", np.ones((N, 3)) + np.eye(N, 3), nfc),
                           both, model="m", layer="l")
    assert "Unicode" not in str(info.value)
    # ids that differ in more than their form keep the message about other ids
    other = [f"cafe_{i}" for i in range(N)]
    with pytest.raises(FeatureFileError, match="lists none of the data set's") as info:
        check_feature_file(path, other, model="m", layer="l")
    assert "Unicode" not in str(info.value)


def test_a_feature_file_that_is_a_symbolic_link_has_its_ids_beside_the_link(tmp_path, ids):
    """git-annex, DataLad and DVC keep a file's bytes in a store and link to them: the id list
    was looked for beside the store's object, and the error asked to write it into the store."""
    features = np.random.default_rng(4).standard_normal((N, 5))
    store = tmp_path / ".git" / "annex" / "objects" / "SHA256E-s1--f.npy"
    store.parent.mkdir(parents=True)
    np.save(store, features)
    (tmp_path / "data").mkdir()
    link = tmp_path / "data" / "f.npy"
    link.symlink_to(store)
    Path(str(link) + ".ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    source = FileSource("m", "brain", {"l": tmp_path / "data" / ".." / "data" / "f.npy"})
    source.check(pd.DataFrame({"id": ids}), None)
    assert source.files["l"] == link  # absolute and normalised, the link kept
    assert source.width("l") == 5
    np.testing.assert_allclose(read_feature_file(source.files["l"], ids, model="m", layer="l"),
                               features.astype(np.float32))
    Path(str(link) + ".ids.txt").unlink()
    with pytest.raises(FeatureFileError, match="data/f.npy.ids.txt"):
        source.check(pd.DataFrame({"id": ids}), None)


def test_a_feature_file_linked_into_a_project_finds_its_ids_beside_the_target(tmp_path, ids):
    """ln -s /data/f.npy proj/, f.npy.ids.txt left in /data, worked until ids were looked for
    only beside the link. Beside the link first, then beside the file it leads to."""
    features = np.random.default_rng(5).standard_normal((N, 3))
    (tmp_path / "data").mkdir()
    (tmp_path / "proj").mkdir()
    np.save(tmp_path / "data" / "f.npy", features)
    (tmp_path / "data" / "f.npy.ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    link = tmp_path / "proj" / "f.npy"
    link.symlink_to(tmp_path / "data" / "f.npy")
    source = FileSource("m", "brain", {"l": link})
    source.check(pd.DataFrame({"id": ids}), None)
    np.testing.assert_allclose(read_feature_file(link, ids, model="m", layer="l"),
                               features.astype(np.float32))
    before = source.inputs(None)  # the id list read is the one fingerprinted
    Path(str(link) + ".ids.txt").write_text("\n".join(ids[::-1]) + "\n", encoding="utf-8")
    assert feature_file_ids(link, model="m", layer="l") == list(ids[::-1])  # beside the link
    assert source.inputs(None) != before


def test_the_gpa_layer_enters_an_encoders_fingerprint_only_where_it_adds_a_layer():
    """With every layer stored (--layers all), another --gpa-layer re-extracted the model (hours
    for a large one) although nothing stored changes. Commands that did not change keep the
    fingerprint the runs already hold, so those stay cached."""
    from types import SimpleNamespace

    from convergence_core.models import get_spec
    from convergence_core.run_writer import fingerprint
    from convergence_core.sources import EncoderSource

    def before(layers, gpa):  # the fingerprint as runs of this loader's version hold it
        return fingerprint("extract", "data", "efficientnet-lite0",
                           get_spec("efficientnet-lite0").source, "vision", layers, gpa, None,
                           "cpu", None, "extraction:2")

    recorded: set[str] = set()

    def inputs(layers, gpa=None):
        config = PrecomputeConfig(
            dataset="x", vision_models=("efficientnet-lite0", "efficientnet-lite1"),
            layers={"efficientnet-lite0": layers} if isinstance(layers, list) else layers,
            gpa_layers={"efficientnet-lite0": gpa} if gpa else None,
        )
        manifest = SimpleNamespace(step_done=lambda step, value: value in recorded)
        context = SimpleNamespace(config=config, data_fingerprint="data", fingerprint=fingerprint,
                                  manifest=manifest)
        return EncoderSource("efficientnet-lite0", "vision").inputs(context)

    chosen = ["stage_6", "pre_logits"]
    assert inputs("all") == inputs("all", "stage_6") == inputs("all", "stage_5")
    assert inputs(chosen) == inputs(chosen, "stage_6") == inputs(chosen, "pre_logits")
    assert inputs("default", "stage_6") != inputs("default")  # stage_6 is stored only for GPA
    assert inputs(["pre_logits"], "stage_6") != inputs(["pre_logits"])
    # unchanged commands keep the fingerprints their runs hold
    for layers, gpa in (("all", None), ("default", "stage_6"), (chosen, None)):
        assert inputs(layers, gpa) == before(layers, gpa)
    recorded.add(before("all", "stage_6"))  # a run extracted with --gpa-layer before this rule
    assert inputs("all", "stage_6") == before("all", "stage_6")


def test_the_check_of_a_parquet_file_reads_only_its_ids(tmp_path, ids, monkeypatch):
    features = np.random.default_rng(3).standard_normal((N, 6))
    path = _save_parquet(tmp_path / "f.parquet", features, list(ids))
    read = []
    original = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: read.append(k.get("columns"))
                        or original(*a, **k))
    check_feature_file(path, ids, model="m", layer="l")
    assert read == [["id"]]
    _save_parquet(tmp_path / "extra.parquet", np.vstack([features, features[:1]]),
                  [*ids, "ghost"])
    with pytest.raises(FeatureFileError, match="does not have"):
        check_feature_file(tmp_path / "extra.parquet", ids, model="m", layer="l")
    pd.DataFrame({"x": np.arange(N, dtype=float)}).to_parquet(tmp_path / "noid.parquet")
    with pytest.raises(FeatureFileError, match="no 'id' column"):
        check_feature_file(tmp_path / "noid.parquet", ids, model="m", layer="l")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(FeatureFileError, match="not a readable parquet file"):
        check_feature_file(tmp_path / "junk.parquet", ids, model="m", layer="l")


def test_a_parquet_file_with_rows_without_an_id_or_a_column_named_twice_is_refused(
    tmp_path, ids
):
    """A null id became the stimulus "<NA>" (NaN "nan") and a blank one "", which no id list can
    name; a column named twice gave pyarrow's schema dump (from a review)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for label, missing in (("null", None), ("nan", np.nan), ("blank", "  ")):
        frame = pd.DataFrame(
            {"id": pd.Series(list(ids), dtype=object), "x": np.arange(N, dtype=float)}
        )
        frame.loc[2, "id"] = missing
        path = tmp_path / f"{label}.parquet"
        frame.to_parquet(path)
        for check in (read_feature_file, check_feature_file):
            with pytest.raises(FeatureFileError, match=r"has 1 rows without an id \(missing or "
                               r"blank; first at row 2\); give every row its stimulus id"):
                check(path, ids, model="m", layer="l")
    columns = [pa.array(list(ids)), pa.array(list(ids)), pa.array(np.arange(N, dtype=float))]
    table = pa.table(columns, names=["id", "id", "x"])
    pq.write_table(table, tmp_path / "twice.parquet")
    for check in (read_feature_file, check_feature_file):
        with pytest.raises(FeatureFileError, match=r"column\(s\) named twice: \['id'\]; give each"):
            check(tmp_path / "twice.parquet", ids, model="m", layer="l")


def test_bad_parquet_and_suffix(tmp_path, ids):
    frame = pd.DataFrame({"id": ids, "x": np.arange(N, dtype=float), "word": ["a"] * N})
    frame.to_parquet(tmp_path / "words.parquet")
    for check in (read_feature_file, check_feature_file):  # the check before any work too
        with pytest.raises(FeatureFileError, match=r"non-numeric feature column\(s\) \['word'\]"):
            check(tmp_path / "words.parquet", ids, model="m", layer="l")
    frame.drop(columns=["word"]).set_index("id").to_parquet(tmp_path / "indexed.parquet")
    check_feature_file(tmp_path / "indexed.parquet", ids, model="m", layer="l")
    frame.drop(columns=["word"]).iloc[::-1].to_parquet(tmp_path / "reversed.parquet")
    check_feature_file(tmp_path / "reversed.parquet", ids, model="m", layer="l")  # a stored index
    # a named index beside the ids is an index, for the check as for the read
    named = frame.drop(columns=["word"]).assign(x=np.arange(1.0, N + 1)).set_index(
        pd.Index([f"t{i}" for i in range(N)], name="trial")
    )
    named.to_parquet(tmp_path / "named.parquet")
    check_feature_file(tmp_path / "named.parquet", ids, model="m", layer="l")
    assert read_feature_file(tmp_path / "named.parquet", ids, model="m", layer="l").shape == (N, 1)
    # pandas' nullable columns (Float64, Int64) read as numbers
    nullable = frame.drop(columns=["word"]).assign(x=np.arange(1.0, N + 1)).astype(
        {"x": "Float64"}
    ).assign(n=pd.array(range(1, N + 1), dtype="Int64"))
    nullable.to_parquet(tmp_path / "nullable.parquet")
    out = read_feature_file(tmp_path / "nullable.parquet", ids, model="m", layer="l")
    assert out.dtype == np.float32 and out[:, 1].tolist() == list(range(1, N + 1))
    # ids and no feature: said before any work, with the fix (it said "reshape" after some)
    frame[["id"]].to_parquet(tmp_path / "only_ids.parquet")
    for check in (read_feature_file, check_feature_file):
        with pytest.raises(FeatureFileError, match="holds ids but no feature column"):
            check(tmp_path / "only_ids.parquet", ids, model="m", layer="l")
    frame.drop(columns=["id", "word"]).to_parquet(tmp_path / "noid.parquet")
    with pytest.raises(FeatureFileError, match="no 'id' column"):
        read_feature_file(tmp_path / "noid.parquet", ids, model="m", layer="l")
    (tmp_path / "f.csv").write_text("id,x\n")
    with pytest.raises(FeatureFileError, match=r"use \.npy \(its rows' ids one per line in "
                       r"'f\.npy\.ids\.txt'\) or \.parquet"):
        read_feature_file(tmp_path / "f.csv", ids, model="m", layer="l")
    np.savez(tmp_path / "several.npz", features=np.zeros((N, 3)), labels=np.zeros(N))
    with pytest.raises(FeatureFileError, match=r"np\.save\('several\.npy', np\.load\("
                       r"'several\.npz'\)\['NAME'\]\), with its ids in 'several\.npy\.ids\.txt'"):
        read_feature_file(tmp_path / "several.npz", ids, model="m", layer="l")
    with pytest.raises(FeatureFileError, match="does not exist"):
        FileSource("m", "vision", {"l": tmp_path / "absent.npy"})
    with pytest.raises(ValueError, match="modality"):
        FileSource("m", "not a name!", {"l": tmp_path / "f.csv"})


@pytest.mark.parametrize(
    ("modality", "meant"),
    [("visoin", "vision"), ("Vision", "vision"), ("visions", "vision"), ("langauge", "language")],
)
def test_a_misspelt_vision_or_language_modality_is_refused(modality: str, meant: str) -> None:
    """A near-miss of vision or language would silently keep a model out of GPA or off the
    language side of every alignment; other free names stay free."""
    with pytest.raises(ValueError, match=f"looks like a misspelt '{meant}'; write '{meant}'"):
        check_modality(modality, "m")
    for free in ("brain", "ecog", "eeg", "visual", "text", "language_model"):
        assert check_modality(free, "m") == free


# -- runs from files ----------------------------------------------------------------------------


def _latent_features(ids: list[str], seed: int = 0) -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((len(ids), 6)), rng


def test_a_run_from_files_of_several_modalities(tmp_path, coco, ids):
    """Vision, language and brain models all from files (no encoder at all)."""
    latent, rng = _latent_features(ids)
    files = {}
    for name, d in (("vis-a", 12), ("vis-b", 9), ("lang", 10), ("subj01", 40)):
        array = latent @ rng.standard_normal((6, d)) + 0.3 * rng.standard_normal((N, d))
        files[name] = _save_npy(tmp_path / f"{name}.npy", array, ids)
    run = precompute(
        dataset=str(coco),
        features={"vis-a": str(files["vis-a"]), "vis-b": str(files["vis-b"]),
                  "lang": {"layer_05": str(files["lang"])}, "subj01": {"V1": str(files["subj01"])}},
        modalities={"vis-a": "vision", "vis-b": "vision", "lang": "language", "subj01": "brain"},
        run_name="files",
        cache_root=str(tmp_path / "cache"),
    )
    assert run.vision_models == ["vis-a", "vis-b"] and run.language_models == ["lang"]
    assert run.models == ["vis-a", "vis-b", "lang", "subj01"]
    assert run.modality("subj01") == "brain" and run.layers("lang") == ["layer_05"]
    assert run.gpa.models == ("vis-a", "vis-b")
    assert run.manifest.models["subj01"].source == "file"
    np.testing.assert_allclose(
        run.embeddings["subj01"]["V1"], np.load(files["subj01"]).astype(np.float32)
    )
    # brain and language models are aligned like any other
    assert run.alignment("vis-a", "features", "subj01", "V1", k=5) > 0.2
    assert run.thumbnail_path(0) is not None
    # a rerun reads nothing again; a changed file is noticed
    events = []
    precompute(run.manifest.settings | {"cache_root": str(tmp_path / "cache")},
               progress=events.append)
    assert all(e.skipped for e in events if e.step in ("extract", "neighbours", "gpa"))
    flipped = np.load(files["subj01"])[:, ::-1].copy()
    _save_npy(files["subj01"], flipped, ids)
    changed = precompute(run.manifest.settings | {"cache_root": str(tmp_path / "cache")})
    before = run.manifest.steps["extract:subj01"].inputs
    assert changed.manifest.steps["extract:subj01"].inputs != before
    np.testing.assert_allclose(changed.embeddings["subj01"]["V1"], flipped.astype(np.float32))


def test_drop_bad_drops_a_stimulus_from_the_feature_files_too(tmp_path, make_coco_folder):
    """--drop-bad drops a bad item from every model alike; a feature file's row for it stopped
    the run ("rows for ids the data set does not have") although the data set had that id."""
    captions = [[f"caption number {i}"] for i in range(N)]
    captions[7] = [""]  # an empty caption: a bad item
    coco = make_coco_folder(captions)
    every_id = list(load_dataset(coco).stimuli["id"])
    latent, rng = _latent_features(every_id)
    files = {
        name: _save_npy(tmp_path / f"{name}.npy",
                        latent @ rng.standard_normal((6, d)) + 0.3 * rng.standard_normal((N, d)),
                        every_id)
        for name, d in (("vis-a", 12), ("vis-b", 9))
    }
    options = dict(
        dataset=str(coco), features={name: str(path) for name, path in files.items()},
        modalities={"vis-a": "vision", "vis-b": "vision"}, gpa_starts=0,
        cache_root=str(tmp_path / "cache"), thumbnails=False,
    )
    with pytest.raises(ValueError, match="caption"):
        precompute(**options)
    run = precompute(drop_bad=True, **options)
    kept = [i for i in every_id if i != every_id[7]]
    assert list(run.stimuli["id"]) == kept
    assert [item["id"] for item in run.manifest.dataset.dropped] == [every_id[7]]
    np.testing.assert_allclose(
        run.embeddings["vis-b"]["features"], np.delete(np.load(files["vis-b"]), 7, axis=0)
    )
    # a row for an id the data set never had is still an error
    _save_npy(files["vis-a"], np.vstack([np.load(files["vis-a"]), np.ones((1, 12))]),
              [*every_id, "stranger"])
    with pytest.raises(FeatureFileError, match="stranger"):
        precompute(drop_bad=True, **options)


def test_features_that_are_mostly_zeros_are_refused_naming_the_model(tmp_path, coco, ids):
    """The paper's clipping at the 0.95-quantile of |x| erases features whose rows are ≥ 95 %
    zeros; the error said "pass q=1" (no such option) and named no model."""
    sparse = np.zeros((N, 40))
    sparse[np.arange(N), np.arange(N) % 40] = 1.0 + np.arange(N)
    dense = np.random.default_rng(0).standard_normal((N, 5))
    files = {"sparse": _save_npy(tmp_path / "sparse.npy", sparse, ids),
             "dense": _save_npy(tmp_path / "dense.npy", dense, ids)}
    with pytest.raises(ValueError, match=r"model 'sparse', layer 'features': the features are "
                                         r"mostly zeros.*remove them"):
        precompute(dataset=str(coco), features={k: str(v) for k, v in files.items()},
                   modalities={"sparse": "vision", "dense": "vision"}, gpa_starts=0,
                   thumbnails=False, cache_root=str(tmp_path / "cache"))


def test_gpa_across_files_that_cannot_fit_stops_before_any_work(tmp_path, coco, ids,
                                                               monkeypatch):
    """GPA across brain subjects given as files: their widths are in the files' headers, so a GPA
    that would not fit in memory is refused before any model is extracted or any folder written
    (an encoder's width is known only once it is loaded: GPA checks again then)."""
    import convergence_core.procrustes as procrustes
    from convergence_core.sources import FileSource

    rng = np.random.default_rng(8)
    npy = _save_npy(tmp_path / "s1.npy", rng.standard_normal((N, 7)), ids)
    parquet = _save_parquet(tmp_path / "s2.parquet", rng.standard_normal((N, 5)), ids)
    frame = pd.read_parquet(parquet).set_index("id")
    frame.to_parquet(tmp_path / "s3.parquet")  # the ids as pandas' index: not a feature
    source = FileSource("s", "brain", {"a": npy, "b": parquet, "c": tmp_path / "s3.parquet"})
    assert [source.width(layer) for layer in "abc"] == [7, 5, 5]
    monkeypatch.setattr(procrustes, "_available_memory", lambda: 1000)
    options = dict(
        dataset=str(coco), vision_models=["efficientnet-lite0"],
        features={"s1": str(npy), "s2": str(parquet)}, modalities={"s1": "brain", "s2": "brain"},
        gpa_models=["s1", "s2"], run_name="toobig", cache_root=str(tmp_path / "cache"),
    )
    monkeypatch.setattr("convergence_core.models.load_encoder",
                        lambda *a, **k: pytest.fail("an encoder was loaded"))
    with pytest.raises(ValueError, match=r"GPA across model 0 \('s1'\), model 1 \('s2'\) needs"):
        precompute(**options)
    assert not (tmp_path / "cache" / "runs" / "toobig").exists()


def test_config_needs_a_modality_for_each_file_and_two_gpa_models(tmp_path, coco, ids):
    path = _save_npy(tmp_path / "f.npy", np.ones((N, 3)) + np.eye(N, 3), ids)
    with pytest.raises(ValueError, match="say which modality"):
        PrecomputeConfig(dataset=str(coco), features={"m": str(path)})
    with pytest.raises(ValueError, match="at least 2 vision models"):
        precompute(dataset=str(coco), features={"m": str(path)}, modalities={"m": "vision"},
                   cache_root=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"name the models GPA aligns with --gpa-models A,B"):
        precompute(dataset=str(coco), features={"m": str(path)}, modalities={"m": "brain"},
                   cache_root=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="both as an encoder and with a feature file"):
        PrecomputeConfig(dataset=str(coco), vision_models=["m"], features={"m": str(path)},
                         modalities={"m": "vision"})
    with pytest.raises(ValueError, match="has no feature file"):
        PrecomputeConfig(dataset=str(coco), vision_models=["a", "b"], modalities={"x": "brain"})
    # layers of a file's model: its files are its layers (the error listed no model at all)
    with pytest.raises(ValueError, match="'m', a model read from feature files"):
        PrecomputeConfig(dataset=str(coco), features={"m": str(path)},
                         modalities={"m": "vision"}, layers={"m": ["zz"]})
    # a GPA layer a file model does not have is refused before any file is read (it was found
    # only after every file was read and every neighbour list built)
    two = {"early": str(path), "late": str(path)}
    with pytest.raises(ValueError, match=r"gpa_layers\['m'\] = 'middle' is not a layer of 'm'"):
        PrecomputeConfig(dataset=str(coco), features={"m": two, "m2": str(path)},
                         modalities={"m": "vision", "m2": "vision"}, gpa_layers={"m": "middle"})
    chosen = PrecomputeConfig(dataset=str(coco), features={"m": two, "m2": str(path)},
                              modalities={"m": "vision", "m2": "vision"}, gpa_layers={"m": "late"})
    assert chosen.gpa_layers == {"m": "late"}


def test_cli_features_and_toml_models_table(tmp_path, coco, ids):
    latent, rng = _latent_features(ids, seed=3)
    paths = {}
    for name in ("va", "vb", "lang"):
        paths[name] = _save_parquet(
            tmp_path / f"{name}.parquet", latent @ rng.standard_normal((6, 8)), ids
        )
    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["precompute", "--dataset", str(coco), "--features", f"va={paths['va']}",
         "--features", f"vb:late={paths['vb']}", "--features", f"lang={paths['lang']}",
         "--modality", "va=vision", "--modality", "vb=vision", "--modality", "lang=language",
         "--run-name", "cli", "--cache", str(tmp_path / "cache"), "--quiet"],
        out=out, err=err,
    )
    assert code == 0, err.getvalue()
    assert "vision va, vb" in out.getvalue()
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'dataset = "{coco}"\nrun_name = "toml"\ncache_root = "{tmp_path / "cache"}"\n'
        f'[[models]]\nname = "va"\nmodality = "vision"\npath = "{paths["va"]}"\n'
        f'[[models]]\nname = "vb"\nmodality = "vision"\npath = "{paths["vb"]}"\nlayer = "late"\n'
        f'[[models]]\nname = "lang"\nmodality = "language"\npath = "{paths["lang"]}"\n',
        encoding="utf-8",
    )
    run = precompute(toml)
    assert run.layers("vb") == ["late"] and run.language_models == ["lang"]
    bad = io.StringIO()
    assert main(["precompute", "--dataset", str(coco), "--features", "nopath"], out=out,
                err=bad) == 2
    assert "NAME=PATH" in bad.getvalue()


# -- a run from feature files alone (no data set) ------------------------------------------------


def _files_alone(tmp_path: Path, seed: int = 5) -> tuple[dict[str, Path], dict[str, np.ndarray],
                                                         list[str]]:
    """Two vision models and one brain subject as files with ids that no data set lists: the
    first (va) in id order, the others with their rows in other orders."""
    ids = [f"img{i:03d}" for i in range(N)]
    latent, rng = _latent_features(ids, seed=seed)
    arrays = {name: latent @ rng.standard_normal((6, d)) + 0.3 * rng.standard_normal((N, d))
              for name, d in (("va", 12), ("vb", 9), ("V1", 20))}
    order = rng.permutation(N)
    paths = {
        "va": _save_npy(tmp_path / "va.npy", arrays["va"], ids),
        "vb": _save_parquet(tmp_path / "vb.parquet", arrays["vb"][order],
                            [ids[i] for i in order]),
        "V1": _save_npy(tmp_path / "V1.npy", arrays["V1"][order[::-1]],
                        [ids[i] for i in order[::-1]]),
    }
    return paths, arrays, ids


def test_a_run_from_feature_files_alone_takes_the_first_files_ids(tmp_path):
    """No data set: the stimuli are the first file's ids in its order (no images, no captions),
    the other files' rows are matched to them by id, a rerun reads nothing again, and the CLI
    takes --features without --dataset."""
    paths, arrays, ids = _files_alone(tmp_path)
    options = dict(features={"va": str(paths["va"]), "vb": str(paths["vb"]),
                             "subj01": {"V1": str(paths["V1"])}},
                   modalities={"va": "vision", "vb": "vision", "subj01": "brain"},
                   cache_root=str(tmp_path / "cache"))
    run = precompute(**options)
    assert run.name.startswith("feature-ids-") and run.n_stimuli == N
    assert list(run.stimuli["id"]) == ids
    assert run.images_root is None and run.thumbnail_path(0) is None
    assert all(len(captions) == 0 for captions in run.stimuli["captions"])
    assert run.manifest.dataset.source["path"] == str(paths["va"].resolve())
    np.testing.assert_allclose(run.embeddings["vb"]["features"], arrays["vb"].astype(np.float32))
    np.testing.assert_allclose(run.embeddings["subj01"]["V1"], arrays["V1"].astype(np.float32))
    assert run.gpa.models == ("va", "vb")
    assert run.alignment("va", "features", "subj01", "V1", k=5) > 0.2
    columns = set(run.properties.values.columns)
    assert "n_captions" not in columns and "caption_words" not in columns
    assert "centroid_distance:va" in columns
    events = []
    precompute(**options, progress=events.append)
    assert all(e.skipped for e in events if e.step in ("extract", "neighbours", "gpa"))

    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["precompute", "--features", f"va={paths['va']}", "--features", f"vb={paths['vb']}",
         "--features", f"subj01:V1={paths['V1']}", "--modality", "va=vision",
         "--modality", "vb=vision", "--modality", "subj01=brain", "--run-name", "cli",
         "--cache", str(tmp_path / "cache"), "--quiet"],
        out=out, err=err,
    )
    assert code == 0, err.getvalue()
    assert f"{N} stimuli; vision va, vb; language -; brain subj01" in out.getvalue()


def test_feature_files_alone_must_agree_on_the_ids(tmp_path):
    """Without a data set every file must list the first file's ids (the error says so, and
    nothing is written); encoders need a data set; duplicated ids in the first file are named."""
    paths, arrays, ids = _files_alone(tmp_path)
    short = _save_npy(tmp_path / "short.npy", arrays["vb"][:-1], ids[:-1])
    cache = tmp_path / "cache"
    options = dict(modalities={"va": "vision", "vb": "vision"}, cache_root=str(cache))
    with pytest.raises(FeatureFileError, match=r"has no row for 1 of .*\(no dataset was given, so "
                       r"the stimuli are the ids of .*va\.npy: every feature file must list"):
        precompute(features={"va": str(paths["va"]), "vb": str(short)}, **options)
    with pytest.raises(FeatureFileError, match=r"has 1 row\(s\) for ids the data set does not"):
        precompute(features={"vb": str(short), "va": str(paths["va"])}, **options)
    assert not (cache / "runs").exists() or not any((cache / "runs").iterdir())
    twice = _save_npy(tmp_path / "twice.npy", arrays["va"], ids[:-1] + ids[:1])
    with pytest.raises(FeatureFileError, match=r"twice\.npy .* lists 1 id\(s\) more than once \(twice;"):
        precompute(features={"va": str(twice), "vb": str(paths["vb"])}, **options)
    with pytest.raises(ValueError, match=r"no dataset given, but encoder models "
                       r"\['efficientnet-lite0'\] embed its images"):
        PrecomputeConfig(vision_models=["efficientnet-lite0"], features={"va": str(paths["va"])},
                         modalities={"va": "vision"})
    with pytest.raises(ValueError, match="no dataset given; pass dataset="):
        PrecomputeConfig()
    with pytest.raises(ValueError, match="needs at least 'dataset' and some models"):
        PrecomputeConfig.from_mapping({"run_name": "x"})
    err = io.StringIO()
    assert main(["precompute", "--vision", "efficientnet-lite0,efficientnet-lite1"],
                out=io.StringIO(), err=err) == 2
    assert "no dataset given, but encoder models" in err.getvalue()
    assert "give the data set (--dataset" in err.getvalue()
    assert main(["precompute"], out=io.StringIO(), err=err) == 2
    assert "nothing to precompute" in err.getvalue()


def test_a_run_restricted_to_the_stimuli_every_file_covers(tmp_path, coco, ids):
    """stimuli="common": brain recordings of 20 of the data set's 30 images (rows shuffled, and
    rows for 3 images the data set does not have) and two vision models of all 30: the run
    holds the 20, in the data set's order, every model's rows matched by id; the manifest and
    Home say how many of how many; a rerun reuses everything; the default ("all") refuses the
    files and names the option; the CLI takes --stimuli."""
    latent, rng = _latent_features(ids)
    arrays = {name: latent @ rng.standard_normal((6, d)) + 0.3 * rng.standard_normal((N, d))
              for name, d in (("vis-a", 12), ("vis-b", 9), ("V1", 25))}
    seen = rng.permutation(N)[:20]
    brain_ids = [ids[i] for i in seen] + ["elsewhere-1", "elsewhere-2", "elsewhere-3"]
    brain = np.vstack([arrays["V1"][seen], rng.standard_normal((3, 25))])
    files = {"vis-a": _save_npy(tmp_path / "vis-a.npy", arrays["vis-a"], ids),
             "vis-b": _save_parquet(tmp_path / "vis-b.parquet", arrays["vis-b"], ids),
             "subj01": {"V1": str(_save_npy(tmp_path / "subj01.npy", brain, brain_ids))}}
    options = dict(dataset=str(coco), features={k: str(v) if isinstance(v, Path) else v
                                                for k, v in files.items()},
                   modalities={"vis-a": "vision", "vis-b": "vision", "subj01": "brain"},
                   cache_root=str(tmp_path / "cache"))
    with pytest.raises(FeatureFileError, match=r"subj01\.npy .* has no row for 10 of the data "
                       r"set's 30 stimuli .*--stimuli common"):
        precompute(**options)
    run = precompute(**options, stimuli="common", run_name="common")
    kept = sorted(seen)  # the data set's order
    assert list(run.stimuli["id"]) == [ids[i] for i in kept]
    np.testing.assert_allclose(run.embeddings["vis-a"]["features"],
                               arrays["vis-a"][kept].astype(np.float32))
    np.testing.assert_allclose(run.embeddings["vis-b"]["features"],
                               arrays["vis-b"][kept].astype(np.float32))
    np.testing.assert_allclose(run.embeddings["subj01"]["V1"],
                               arrays["V1"][kept].astype(np.float32))
    assert all(run.thumbnail_path(row) is not None for row in range(run.n_stimuli))
    assert run.manifest.dataset.subset == StimulusSubset(
        rule="common", kept=20, of=N,
        lacking={"vis-a:features": 0, "vis-b:features": 0, "subj01:V1": 10},
    )
    stored = json.loads((run.path / "manifest.json").read_text())["dataset"]["subset"]
    assert stored == {"rule": "common", "kept": 20, "of": N,
                      "lacking": {"vis-a:features": 0, "vis-b:features": 0, "subj01:V1": 10}}
    assert run.manifest.dataset.describe().endswith(
        "; 20 of its 30 stimuli: those every feature file covers (subj01:V1 lacks 10)")
    events = []
    precompute(**options, stimuli="common", run_name="common", progress=events.append)
    assert all(e.skipped for e in events if e.step in ("extract", "neighbours", "gpa"))
    # vis-b loses two stimuli the brain file lacks anyway: the same stimuli, counts anew
    unseen = [i for i in range(N) if i not in seen][:2]
    rows = [i for i in range(N) if i not in unseen]
    _save_parquet(files["vis-b"], arrays["vis-b"][rows], [ids[i] for i in rows])
    again = precompute(**options, stimuli="common", run_name="common")
    assert again.manifest.steps["stimuli"].inputs == run.manifest.steps["stimuli"].inputs
    assert again.manifest.dataset.subset.lacking["vis-b:features"] == 2
    _save_parquet(files["vis-b"], arrays["vis-b"], ids)

    # an id list: those ids (in the data set's order), a new fingerprint (another data set)
    listed = [ids[i] for i in kept[:12]][::-1]
    # (saved with a byte-order mark, as Notepad and Excel may: not part of the first id)
    lines = ["\ufeff" + listed[0], "", *listed[1:], "  "]
    (tmp_path / "keep.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    some = precompute(**options, stimuli=str(tmp_path / "keep.txt"), run_name="listed")
    assert list(some.stimuli["id"]) == [ids[i] for i in kept[:12]]
    np.testing.assert_allclose(some.embeddings["subj01"]["V1"],
                               arrays["V1"][kept[:12]].astype(np.float32))
    assert some.manifest.dataset.fingerprint != run.manifest.dataset.fingerprint
    assert some.manifest.dataset.describe().endswith("; 12 of its 30 stimuli: those listed in "
                                                     "keep.txt")

    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["precompute", "--dataset", str(coco), "--features", f"vis-a={files['vis-a']}",
         "--features", f"vis-b={files['vis-b']}", "--features",
         f"subj01:V1={files['subj01']['V1']}", "--modality", "vis-a=vision", "--modality",
         "vis-b=vision", "--modality", "subj01=brain", "--stimuli", "common", "--run-name", "cli",
         "--cache", str(tmp_path / "cache"), "--quiet"],
        out=out, err=err,
    )
    assert code == 0, err.getvalue()
    assert "20 stimuli (of 30: --stimuli common); vision vis-a, vis-b" in out.getvalue()


def test_restricting_the_stimuli_names_what_is_wrong(tmp_path, coco, ids):
    """Bad id lists and files that share no stimulus: errors that name the problem and the
    fix, before anything is written; feature files alone restrict as a data set does."""
    arrays = {name: np.random.default_rng(1).standard_normal((N, 5)) for name in ("a", "b")}
    paths = {name: _save_npy(tmp_path / f"{name}.npy", array, ids)
             for name, array in arrays.items()}
    cache = tmp_path / "cache"
    options = dict(dataset=str(coco), features={k: str(v) for k, v in paths.items()},
                   modalities={"a": "vision", "b": "vision"}, cache_root=str(cache))
    cases = {
        "missing.txt": (None, r"missing\.txt is not a file; give 'all', 'common' or the path"),
        "empty.txt": ("\n  \n", r"empty\.txt lists no id"),
        "twice.txt": (f"{ids[0]}\n{ids[1]}\n{ids[0]}\n", r"lists 1 id\(s\) twice .*list each once"),
        "unknown.txt": (f"{ids[0]}\nnot-an-id\n", r"names 1 id\(s\) that the data set .* does "
                        r"not have \(e\.g\. \['not-an-id'\]\)"),
    }
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    cases["binary.txt"] = (None, r"binary\.txt cannot be read as UTF-8 text")
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            precompute(**options, stimuli=str(tmp_path / name))
    strangers = _save_npy(tmp_path / "strangers.npy", arrays["b"], [f"x{i}" for i in range(N)])
    with pytest.raises(ValueError, match=r"no stimulus of the data set .* is listed by every "
                       r"feature file .*strangers\.npy .*its ids look like "
                       r"\['x0', 'x1', 'x2'\], the stimuli's like .*write the files with the "
                       r"data set's ids"):
        precompute(**{**options, "features": {"a": str(paths["a"]), "b": str(strangers)}},
                   stimuli="common")
    # the same ids in another Unicode form (NFD, as macOS file names): said, with the fix
    import unicodedata

    nfd = _save_npy(tmp_path / "nfd.npy", arrays["b"],
                    [unicodedata.normalize("NFD", f"é{sid}") for sid in ids])
    nfc_ids = tmp_path / "nfc_a.npy"
    _save_npy(nfc_ids, arrays["a"], [unicodedata.normalize("NFC", f"é{sid}") for sid in ids])
    with pytest.raises(FeatureFileError, match=r"nfd\.npy \(model 'b', layer 'features'\) "
                       r"writes 30 of the data set's ids in another Unicode normal form"):
        precompute(features={"a": str(nfc_ids), "b": str(nfd)},
                   modalities={"a": "vision", "b": "vision"}, cache_root=str(cache),
                   stimuli="common")
    # a few such ids among ids that match: not left out in silence (the review's case)
    mixed = _save_npy(tmp_path / "mixed.npy", arrays["b"], [
        unicodedata.normalize("NFD", f"é{sid}") if i < 3 else f"é{sid}"
        for i, sid in enumerate(ids)
    ])
    with pytest.raises(FeatureFileError, match=r"mixed\.npy .*writes 3 of the data set's ids in "
                       r"another Unicode normal form"):
        precompute(features={"a": str(nfc_ids), "b": str(mixed)},
                   modalities={"a": "vision", "b": "vision"}, cache_root=str(cache),
                   stimuli="common")
    with pytest.raises(ValueError, match=r"stimuli = 'common' keeps the stimuli every feature "
                       r"file covers, but the run has no feature file"):
        precompute(dataset=str(coco), vision_models=["efficientnet-lite0", "efficientnet-lite1"],
                   language_models=[], stimuli="common", cache_root=str(cache))
    with pytest.raises(ValueError, match=r"config value 'stimuli' = '' is not accepted"):
        PrecomputeConfig(dataset=str(coco), features={k: str(v) for k, v in paths.items()},
                         modalities={"a": "vision", "b": "vision"}, stimuli="")
    assert not (cache / "runs").exists() or not any((cache / "runs").iterdir())

    # no data set: the first file's ids, restricted to those the second file covers too
    short = _save_npy(tmp_path / "short.npy", arrays["b"][:20], ids[:20])
    run = precompute(features={"a": str(paths["a"]), "b": str(short)},
                     modalities={"a": "vision", "b": "vision"}, cache_root=str(cache),
                     stimuli="common")
    assert list(run.stimuli["id"]) == ids[:20]
    assert run.manifest.dataset.describe() == (
        "none (the stimuli are the ids of a.npy; no images, no captions); 20 of its 30 stimuli: "
        "those every feature file covers (b:features lacks 10)")

    # a NaN row: the error offers an id list (and says nothing of ids, which agree); with one
    # that leaves the row out, the run is made
    broken = arrays["b"].copy()
    broken[4] = np.nan
    nan = _save_npy(tmp_path / "nan.npy", broken, ids)
    alone = dict(features={"a": str(paths["a"]), "b": str(nan)},
                 modalities={"a": "vision", "b": "vision"}, cache_root=str(cache))
    with pytest.raises(FeatureFileError) as caught:
        precompute(**alone)
    assert "NaN/Inf in 1 of 30 row(s)" in str(caught.value)
    assert "--stimuli IDS.txt" in str(caught.value)
    assert "no dataset was given" not in str(caught.value)
    (tmp_path / "without-4.txt").write_text("\n".join(ids[:4] + ids[5:]), encoding="utf-8")
    assert precompute(**alone, stimuli=str(tmp_path / "without-4.txt")).n_stimuli == N - 1


def test_every_page_draws_a_run_from_feature_files_alone(tmp_path, monkeypatch):
    """A run without images or captions (feature files alone): every page draws it, and the
    gallery shows the stimulus ids."""
    from streamlit.testing.v1 import AppTest

    from convergence_core.dashboard import page

    paths, _, ids = _files_alone(tmp_path)
    precompute(features={"va": str(paths["va"]), "vb": str(paths["vb"]),
                         "subj01": {"V1": str(paths["V1"])}},
               modalities={"va": "vision", "vb": "vision", "subj01": "brain"},
               run_name="demo", cache_root=str(tmp_path / "cache"))
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "cache"))
    app = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"),
                            default_timeout=60)
    app.run()
    assert not app.exception and not app.error
    assert any(t.value.startswith("Dataset: none (the stimuli are the ids of va.npy; no images, "
                                  "no captions) · run demo") for t in app.text)
    assert app.text[0].value.endswith("across vision models (dispersion) and how they modulate "
                                      "their alignment with the other models (CKNNA).")
    for target in (entry.file for entry in page.PAGES):
        app.switch_page(target).run()
        assert not app.exception and not app.error, (target, app.exception, app.error)
        if target == "pages/1_Stimuli.py":
            shown = gallery_cards(app)
            texts = " ".join(card["text"] for card in shown)
            assert sum(f"id {i}" in texts for i in ids) == 12  # 6 low and 6 high
            assert "(no caption)" not in texts and "thumbnail" not in texts
            assert not any(card["image"] or card["note"] or card["captions"] for card in shown)
            notes = [c.value for c in app.caption]
            assert "This run has no thumbnails and no captions: the cards show ids and scores." \
                in notes
            from tests.page_reading import controls_shown

            assert controls_shown(app)["filter"]["label"] == "Filter by id"


def test_vision_files_with_a_caption_table_and_a_language_model_extracted_here(tmp_path):
    """A data set without images (ids and captions) with vision models from files and MiniLM
    (offline) embedding the captions here: the whole vision-language run, no image needed; a
    vision encoder on that data set is refused before any work."""
    paths, _, ids = _files_alone(tmp_path)
    table = tmp_path / "captions.csv"
    pd.DataFrame({"id": ids, "caption": [f"a photo of thing {i}" for i in range(N)]}).to_csv(
        table, index=False)
    run = precompute(
        dataset=str(table), features={"va": str(paths["va"]), "vb": str(paths["vb"])},
        modalities={"va": "vision", "vb": "vision"}, language_models=["minilm"],
        layers="default", cache_root=str(tmp_path / "cache"), run_name="captions",
    )
    assert run.images_root is None and run.has_captions and not run.has_thumbnails
    assert run.stimuli["captions"].tolist()[:2] == [["a photo of thing 0"], ["a photo of thing 1"]]
    layer = run.default_layer("minilm")
    assert run.embeddings["minilm"][layer].shape == (N, 384)
    assert np.isfinite(run.alignment("va", "features", "minilm", layer, k=5))
    assert "n_captions" in run.properties.values.columns
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"),
                            default_timeout=60)
    app.query_params["run"] = "captions"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVERGENCE_CACHE", str(tmp_path / "cache"))
        app.run()
        app.switch_page("pages/1_Stimuli.py").run()
    assert not app.exception and not app.error
    assert "This run has no thumbnails." in [c.value for c in app.caption]
    assert "“a photo of thing" in " ".join(gallery_texts(app))
    with pytest.raises(ValueError, match="'efficientnet-lite0' needs images, but the data set has"):
        precompute(dataset=str(table), vision_models=["efficientnet-lite0", "efficientnet-lite1"],
                   cache_root=str(tmp_path / "cache"), run_name="refused")
    assert not (tmp_path / "cache" / "runs" / "refused").exists()


# -- the brain example: synthetic voxel responses -----------------------------------------------


def test_brain_subjects_as_models_recover_planted_stimulus_noise(
    tmp_path, make_coco_folder, monkeypatch
):
    """fMRI-like responses (stimuli × voxels) per subject and region, made as noisy mixtures of one
    model's features with a per-stimulus noise level: GPA across the subjects' V1 (gpa_models)
    ranks stimuli by that noise, and each subject aligns better with the source model than with an
    unrelated one."""
    n = 80
    coco = make_coco_folder([[f"stimulus {i}"] for i in range(n)], name="nsd-like")
    ids = list(load_dataset(coco).stimuli["id"])
    rng = np.random.default_rng(11)
    source = rng.standard_normal((n, 16))
    unrelated = rng.standard_normal((n, 16))
    noise_level = np.linspace(0.05, 1.5, n)[rng.permutation(n)]
    features = {"source": {"features": _save_npy(tmp_path / "source.npy", source, ids)},
                "unrelated": {"features": _save_npy(tmp_path / "unrel.npy", unrelated, ids)}}
    modalities = {"source": "vision", "unrelated": "vision"}
    subjects = []
    for s in range(4):
        for region, voxels in (("V1", 30), ("IT", 45)):
            mixing = rng.standard_normal((16, voxels))
            response = source @ mixing + noise_level[:, None] * rng.standard_normal((n, voxels)) * 4
            path = _save_npy(tmp_path / f"subj{s}_{region}.npy", response, ids)
            features.setdefault(f"subj{s}", {})[region] = path
        modalities[f"subj{s}"] = "brain"
        subjects.append(f"subj{s}")
    run = precompute(
        dataset=str(coco),
        features={m: {layer: str(p) for layer, p in f.items()} for m, f in features.items()},
        modalities=modalities,
        gpa_models=subjects,
        gpa_layers={s: "V1" for s in subjects},
        run_name="brain",
        cache_root=str(tmp_path / "cache"),
    )
    assert run.gpa.models == tuple(subjects) and set(run.gpa.layers) == {"V1"}
    # the dashboard aligns the subjects with the models outside GPA
    assert run.other_models == subjects and run.partner_models == ["source", "unrelated"]
    rho = stats.spearmanr(run.dispersion["mean"], noise_level).statistic
    assert rho > 0.8  # 0.90-0.93 over seeds for this planting
    for subject in subjects:
        with_source = run.alignment("source", "features", subject, "V1", k=5, metric="mutual_knn")
        with_other = run.alignment("unrelated", "features", subject, "V1", k=5, metric="mutual_knn")
        assert with_source > with_other
    summary = json.loads(json.dumps(run.manifest.to_dict()))
    assert summary["models"]["subj0"]["modality"] == "brain"
    # the Alignment lab: the subjects (GPA) on one side, the vision models outside GPA on the other
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path / "cache"))
    app = Path(__file__).resolve().parent.parent / "app.py"
    at = AppTest.from_file(str(app), default_timeout=60)
    at.query_params["run"] = "brain"
    at.run(timeout=60)
    at.session_state["w_lab_tables"] = True
    at.switch_page("pages/3_Alignment_lab.py").run(timeout=60)
    assert not at.exception and not at.error, [e.value for e in at.error]
    from tests.page_reading import controls_shown

    assert controls_shown(at)["vision"]["label"] == "GPA models"
    assert controls_shown(at)["language"]["label"] == "Language and other models"
    table = at.dataframe[-1].value
    assert set(table["vision_model"]) == set(subjects)
    assert set(table["language_model"]) == {"source", "unrelated"}


def test_a_neuroscientists_unaveraged_recordings_get_the_averaging_fix(tmp_path: Path) -> None:
    """Stimuli × voxels × repeats was told to reshape (each repeat would become voxels of its
    own); every id listed 3 times was counted as '2n ids twice'. Both now say what they are."""
    ids = [f"s{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    three_d = tmp_path / "threed.npy"
    _save_npy(three_d, rng.normal(size=(6, 4, 3)), ids)
    with pytest.raises(FeatureFileError, match=r"shape \(6, 4, 3\).*averaged first \(e\.g\. "
                       r"features\.mean\(axis=2\)\)"):
        read_feature_file(three_d, ids, model="m", layer="l")
    repeats = _save_npy(tmp_path / "repeats.npy", rng.normal(size=(18, 4)), ids * 3)
    with pytest.raises(FeatureFileError, match=r"lists 6 id\(s\) more than once \(up to 3 "
                       r"times; e\.g\. \['s0', 's1'"):
        read_feature_file(repeats, ids, model="m", layer="l")


def test_an_ids_file_with_a_header_line_is_asked_about_it(tmp_path: Path) -> None:
    """One id more than rows is most often a header line (a neuroscientist's 'stimulus_id'):
    the message says so, besides the count (from the brain-data review)."""
    ids = [f"s{i}" for i in range(5)]
    path = _save_npy(tmp_path / "h.npy", np.random.default_rng(0).normal(size=(5, 3)), ids)
    Path(str(path) + ".ids.txt").write_text("stimulus_id\n" + "\n".join(ids) + "\n")
    with pytest.raises(FeatureFileError, match=r"5 rows but 6 ids.*is the first line, "
                       r"'stimulus_id', a header\?"):
        read_feature_file(path, ids, model="m", layer="l")


def test_the_first_layer_notes_rerun_reuses_the_run_that_was_given_no_name(tmp_path, coco, ids):
    """The note of a run whose GPA took each file model's first layer advises a rerun with
    --gpa-layer and the run's own name, and that rerun reuses the run: same folder, every layer
    read once. (It said "rerun precompute; the stored layers are reused", but a run given no
    name is named by its settings, the GPA layer among them: a rerun without the name made a
    second run and read every file again.)"""
    latent, rng = _latent_features(ids, seed=5)
    features = {
        model: {
            layer: str(_save_npy(tmp_path / f"{model}_{layer}.npy",
                                 latent @ rng.standard_normal((6, 8)), ids))
            for layer in ("early", "late")
        }
        for model in ("va", "vb", "vc")
    }
    settings = dict(dataset=str(coco), features=features,
                    modalities={m: "vision" for m in features}, cache_root=str(tmp_path / "c"),
                    thumbnails=False)
    first = precompute(**settings)
    note = first.first_layer_note()
    assert note is not None and f"--run-name {first.name}:" in note
    folder = tmp_path / "c" / "runs" / first.name
    stored = [*(folder / "embeddings").rglob("*.npy"), *(folder / "neighbours").rglob("*.npy")]
    stamps = {path: path.stat().st_mtime_ns for path in stored}
    assert len(stamps) >= 6
    again = precompute(**settings, run_name=first.name, gpa_layers={m: "late" for m in features})
    assert again.name == first.name and list(again.gpa.layers) == ["late"] * 3
    assert [path.name for path in (tmp_path / "c" / "runs").iterdir()] == [first.name]
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps  # not written again
    assert again.first_layer_note() is None
