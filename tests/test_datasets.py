"""Dataset loaders (COCO, table, labelled, HF), path safety, checks and fingerprints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from convergence_core.datasets import (
    Dataset,
    DatasetUnavailableError,
    check_dataset,
    dataset_fingerprint,
    load_coco,
    load_dataset,
    load_hf,
    load_labelled,
    load_table,
    safe_relative_path,
)
from convergence_core.images import ImageFileError, make_thumbnail, open_rgb

# --------------------------------------------------------------------------- real files


def test_coco_mini_real(coco_mini_root: Path) -> None:
    ds = load_dataset(coco_mini_root)
    assert ds.source["kind"] == "coco"
    raw = json.loads((coco_mini_root / "captions.json").read_text(encoding="utf-8"))
    assert len(ds) == len(raw["images"]) == 239
    # independent reference: ids sorted numerically, captions grouped per image
    expected_ids = sorted(im["id"] for im in raw["images"])
    assert ds.stimuli["id"].tolist() == [str(i) for i in expected_ids]
    n_captions = sum(len(c) for c in ds.stimuli["captions"])
    assert n_captions == len(raw["annotations"]) == 1195
    first = expected_ids[0]
    expected_first = [
        a["caption"].strip()
        for a in sorted(
            (a for a in raw["annotations"] if a["image_id"] == first), key=lambda a: a["id"]
        )
    ]
    assert ds.stimuli["captions"].iat[0] == expected_first
    assert all(ds.image_path(i).is_file() for i in range(len(ds)))
    checked, dropped = check_dataset(ds)
    assert dropped == [] and checked is ds


def test_imagenet_labelled_real(imagenet_root: Path) -> None:
    ds = load_dataset(imagenet_root)
    table = pd.read_csv(imagenet_root / "labels.csv")
    assert ds.source["kind"] == "labelled"
    assert len(ds) == len(table) == 1000
    assert ds.stimuli["label"].tolist() == table["label"].tolist()
    assert ds.stimuli["captions"].iat[0] == [f"a photo of a {table['label'].iat[0]}"]
    assert ds.stimuli["id"].is_unique
    custom = load_labelled(imagenet_root, template="an image of {label}.")
    assert custom.stimuli["captions"].iat[1] == [f"an image of {table['label'].iat[1]}."]


def test_fingerprint_stable_and_sensitive(coco_mini_root: Path) -> None:
    ds = load_dataset(coco_mini_root)
    head = ds.with_stimuli(ds.stimuli.iloc[:10])
    fp = dataset_fingerprint(head)
    assert fp == dataset_fingerprint(
        load_dataset(coco_mini_root).with_stimuli(ds.stimuli.iloc[:10])
    )
    assert len(fp) == 64
    reordered = head.with_stimuli(head.stimuli.iloc[::-1])
    assert dataset_fingerprint(reordered) != fp
    edited = head.stimuli.copy()
    edited.at[0, "captions"] = ["something else"]
    assert dataset_fingerprint(head.with_stimuli(edited)) != fp


def test_fingerprint_sees_image_bytes(make_coco_folder, write_image) -> None:
    root = make_coco_folder([["a"], ["b"]])
    before = dataset_fingerprint(load_coco(root))
    write_image(root / "images" / f"{0:012d}.png", seed=999)
    assert dataset_fingerprint(load_coco(root)) != before


# --------------------------------------------------------------------------- tmp files


def test_coco_tmp_sorted_and_grouped(make_coco_folder) -> None:
    root = make_coco_folder([["one a", " one b "], ["two"], ["three", "  "]])
    ds = load_dataset(root)
    assert ds.stimuli["id"].tolist() == ["1", "2", "3"]
    assert ds.stimuli["captions"].tolist() == [["one a", "one b"], ["two"], ["three"]]
    assert ds.stimuli["image"].iat[0] == f"images/{0:012d}.png"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_table_formats(tmp_path: Path, make_images, fmt: str) -> None:
    paths = make_images(3)
    rels = [p.relative_to(tmp_path).as_posix() for p in paths]
    caps = [["a red ball", "a toy"], ["a cat"], ["x | y"]]
    if fmt == "csv":
        frame = pd.DataFrame(
            {
                "image": rels,
                "captions": ["|".join(c) for c in caps[:2]] + ["x"],
                "label": ["l0", "l1", "l2"],
            }
        )
        frame.to_csv(tmp_path / "t.csv", index=False)
        expected = [["a red ball", "a toy"], ["a cat"], ["x"]]
    else:
        frame = pd.DataFrame(
            {"id": ["s0", "s1", "s2"], "image": rels, "captions": caps, "label": ["l0", "l1", "l2"]}
        )
        if fmt == "jsonl":
            frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
        else:
            frame.to_parquet(tmp_path / "t.parquet", index=False)
        expected = [["a red ball", "a toy"], ["a cat"], ["x | y"]]
    ds = load_dataset(tmp_path / f"t.{fmt}")
    assert ds.source["kind"] == "table"
    assert ds.stimuli["image"].tolist() == rels
    assert [list(c) for c in ds.stimuli["captions"]] == expected
    assert ds.stimuli["label"].tolist() == ["l0", "l1", "l2"]
    assert ds.stimuli["id"].tolist() == (rels if fmt == "csv" else ["s0", "s1", "s2"])
    assert check_dataset(ds)[1] == []


def test_table_relative_spec_and_explicit_root(tmp_path: Path, make_images, monkeypatch) -> None:
    paths = make_images(2)
    (tmp_path / "meta").mkdir()
    pd.DataFrame(
        {"image": [p.relative_to(tmp_path).as_posix() for p in paths], "caption": ["a", "b"]}
    ).to_csv(tmp_path / "meta" / "t.csv", index=False)
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("meta/t.csv", root=".")
    assert ds.root == tmp_path.resolve() and check_dataset(ds)[1] == []
    with pytest.raises(ValueError, match="unusable"):  # images are not under meta/
        check_dataset(load_dataset("meta/t.csv"))


def test_a_table_that_is_a_symbolic_link_has_its_images_beside_the_link(
    tmp_path: Path, make_images
) -> None:
    """git-annex and DataLad keep a table's bytes in a store and link to them: the store's folder
    became the image root (every image "missing") and the object's name the data set's name. An
    image linked out of the root is still refused."""
    root = tmp_path / "ds"
    paths = make_images(2, folder="ds/images")
    store = tmp_path / ".git" / "annex" / "objects" / "SHA256E-s99--t.csv"
    store.parent.mkdir(parents=True)
    rels = [p.relative_to(root).as_posix() for p in paths]
    pd.DataFrame({"image": rels, "caption": ["a", "b"]}).to_csv(store, index=False)
    (root / "t.csv").symlink_to(store)
    ds = load_dataset(root / "images" / ".." / "t.csv")
    assert ds.root == root.resolve() and ds.name == "t"
    assert ds.source["options"]["table"] == str(root / "t.csv")
    assert check_dataset(ds)[1] == []
    (tmp_path / "outside.png").write_bytes(paths[0].read_bytes())
    (root / "images" / "out.png").symlink_to(tmp_path / "outside.png")
    pd.DataFrame({"image": ["images/out.png"], "caption": ["a"]}).to_csv(store, index=False)
    with pytest.raises(ValueError, match="outside the dataset root .* through a symbolic link"):
        load_dataset(root / "t.csv")


def test_a_table_linked_into_a_project_keeps_its_images_beside_the_target(
    tmp_path: Path, make_images
) -> None:
    """proj/t.csv -> data/ds/t.csv with the images in data/ds worked until images were looked for
    only beside the link: its first image decides (beside the link first, then the target's
    folder); an image leading out of that root is still refused."""
    paths = make_images(2, folder="data/ds/images")
    rels = [p.relative_to(tmp_path / "data" / "ds").as_posix() for p in paths]
    table = tmp_path / "data" / "ds" / "t.csv"
    pd.DataFrame({"image": rels, "caption": ["a", "b"]}).to_csv(table, index=False)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "t.csv").symlink_to(table)
    ds = load_dataset(tmp_path / "proj" / "t.csv")
    assert ds.root == (tmp_path / "data" / "ds").resolve() and ds.name == "t"
    assert check_dataset(ds)[1] == []
    (tmp_path / "outside.png").write_bytes(paths[0].read_bytes())
    (tmp_path / "data" / "ds" / "images" / "out.png").symlink_to(tmp_path / "outside.png")
    pd.DataFrame({"image": [rels[0], "images/out.png"], "caption": "a"}).to_csv(table, index=False)
    with pytest.raises(ValueError, match="outside the dataset root .* through a symbolic link"):
        load_dataset(tmp_path / "proj" / "t.csv")


def test_an_empty_image_cell_is_refused_naming_the_row(tmp_path: Path, make_images) -> None:
    """A JSONL row without "image", or a null image in JSONL/parquet, became the image path 'nan'
    or 'None' (and, without an id column, the stimulus id too): the error blamed a file of that
    name. Every format names the row, as for a missing id."""
    rels = [p.relative_to(tmp_path).as_posix() for p in make_images(2)]
    rows = [{"id": "a", "image": rels[0], "caption": "x"}, {"id": "b", "caption": "y"}]
    (tmp_path / "key.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    rows[1]["image"] = None
    (tmp_path / "null.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    pd.DataFrame({"image": [rels[0], None], "caption": ["x", "y"]}).to_parquet(
        tmp_path / "n.parquet"
    )
    pd.DataFrame({"image": [rels[0], float("nan")], "caption": ["x", "y"]}).to_parquet(
        tmp_path / "nan.parquet"
    )
    pd.DataFrame({"image": [rels[0], " "], "caption": ["x", "y"]}).to_csv(tmp_path / "b.csv",
                                                                         index=False)
    for name in ("key.jsonl", "null.jsonl", "n.parquet", "nan.parquet", "b.csv"):
        with pytest.raises(ValueError, match=rf"{name}: row 2 has no image; give every row"):
            load_dataset(tmp_path / name)
    pd.DataFrame({"id": ["a", None], "image": rels, "caption": ["x", "y"]}).to_parquet(
        tmp_path / "id.parquet"
    )
    with pytest.raises(ValueError, match=r"id\.parquet: row 2 has no id"):
        load_dataset(tmp_path / "id.parquet")


def test_table_caption_rows_merge(tmp_path: Path, make_images) -> None:
    paths = make_images(2)
    rels = [p.relative_to(tmp_path).as_posix() for p in paths]
    pd.DataFrame({"image": [rels[1], rels[0], rels[1]], "caption": ["b1", "a1|x", "b2"]}).to_csv(
        tmp_path / "long.csv", index=False
    )
    ds = load_table(tmp_path, "long.csv")
    assert ds.stimuli["image"].tolist() == [rels[1], rels[0]]
    assert ds.stimuli["captions"].tolist() == [["b1", "b2"], ["a1|x"]]


def test_table_missing_columns(tmp_path: Path) -> None:
    pd.DataFrame({"img": ["a.png"], "caption": ["x"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ValueError, match=r"'image' column .* \(or, for a data set without images"):
        load_dataset(tmp_path / "t.csv")
    pd.DataFrame({"image": ["a.png"], "text": ["x"]}).to_csv(tmp_path / "u.csv", index=False)
    with pytest.raises(ValueError, match="'captions' nor a 'caption'"):
        load_dataset(tmp_path / "u.csv")


def test_a_jsonl_row_without_an_id_is_refused_naming_the_row(tmp_path: Path) -> None:
    """A JSONL row without "id" made pandas read the ids as floats: every id was rewritten
    ('1.0', '2.0', 'nan') and the check found nothing. A row without a label has none."""
    rows = [{"id": 1, "caption": "a", "label": "x"}, {"id": 2, "caption": "b"},
            {"caption": "c", "label": "y"}]
    (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl: row 3 has no id; give every row an id"):
        load_dataset(tmp_path / "t.jsonl")
    (tmp_path / "u.jsonl").write_text("\n".join(map(json.dumps, rows[:2])) + "\n")
    ds = load_dataset(tmp_path / "u.jsonl")
    assert ds.stimuli["id"].tolist() == ["1", "2"] and ds.stimuli["label"].tolist() == ["x", ""]
    # numbers as written even where one is missing (labels 1, 2 read as '1.0', '2.0'), with a
    # byte-order mark (it failed: "Expected object or value")
    numbered = [{"id": 1, "caption": "a", "label": 1}, {"id": 2, "caption": "b"},
                {"id": 3, "caption": "c", "label": 2}]
    text = "\ufeff" + "\n".join(map(json.dumps, numbered)) + "\n"
    (tmp_path / "v.jsonl").write_text(text, encoding="utf-8")
    ds = load_dataset(tmp_path / "v.jsonl")
    assert ds.stimuli["label"].tolist() == ["1", "", "2"]
    (tmp_path / "w.jsonl").write_text('{"id": 1, "caption": "a"}\n{"id": 2, caption}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_dataset(tmp_path / "w.jsonl")
    # a caption holding a line separator or NEL, as json.dumps(ensure_ascii=False) writes it
    rows = [{"id": "a", "caption": "first\u2028line"}, {"id": "b", "caption": "x\x85y"}]
    text = "\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    (tmp_path / "sep.jsonl").write_text(text, encoding="utf-8")
    ds = load_dataset(tmp_path / "sep.jsonl")
    assert ds.stimuli["captions"].tolist() == [["first\u2028line"], ["x\x85y"]]
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.jsonl.*holds no rows"):
        load_dataset(tmp_path / "empty.jsonl")
    # an empty id cell of a CSV table names its row too
    pd.DataFrame({"id": ["a", " ", "c"], "caption": ["x", "y", "z"]}).to_csv(
        tmp_path / "blank.csv", index=False
    )
    with pytest.raises(ValueError, match=r"blank\.csv: row 2 has no id"):
        load_dataset(tmp_path / "blank.csv")


def test_a_table_of_ids_and_captions_is_a_data_set_without_images(tmp_path: Path) -> None:
    """No 'image' column but an 'id' one: captions (merged by id, in row order) and labels, no
    images; the check needs no image, an empty caption is still reported, the fingerprint covers
    the captions, and asking for an image path says there is none."""
    pd.DataFrame({"id": ["s2", "s1", "s2", "s3"], "caption": ["b one", "a", "b two", ""],
                  "label": ["x", "y", "x", "z"]}).to_csv(tmp_path / "caps.csv", index=False)
    ds = load_dataset(tmp_path / "caps.csv")
    assert not ds.images and ds.stimuli["id"].tolist() == ["s2", "s1", "s3"]
    assert ds.stimuli["captions"].tolist() == [["b one", "b two"], ["a"], []]
    assert ds.stimuli["image"].tolist() == ["", "", ""]
    with pytest.raises(ValueError, match="has no images .* give vision models as feature files"):
        ds.image_paths()
    unusable = r"1 of 3 stimuli in dataset 'caps' are unusable:\n  s3: empty caption\n"
    with pytest.raises(ValueError, match=unusable):
        check_dataset(ds)
    kept, dropped = check_dataset(ds, drop_bad=True)
    assert kept.stimuli["id"].tolist() == ["s2", "s1"] and not kept.images
    assert [d["reason"] for d in dropped] == ["empty caption"]
    before = dataset_fingerprint(kept)
    assert dataset_fingerprint(load_dataset(tmp_path / "caps.csv").with_stimuli(
        kept.stimuli)) == before
    changed = kept.stimuli.copy()
    changed.at[0, "captions"] = ["b one", "b 2"]
    assert dataset_fingerprint(kept.with_stimuli(changed)) != before
    with pytest.raises(ValueError, match="leave every image empty"):
        Dataset("bad", tmp_path, kept.stimuli.assign(image=["a.png", ""]), images=False)


def test_duplicate_ids_rejected(tmp_path: Path, make_images) -> None:
    paths = make_images(2)
    rels = [p.relative_to(tmp_path).as_posix() for p in paths]
    pd.DataFrame({"id": ["same", "same"], "image": rels, "captions": ["a", "b"]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    with pytest.raises(ValueError, match="more than one row"):
        load_dataset(tmp_path / "t.csv")


# --------------------------------------------------------------------------- path safety


@pytest.mark.parametrize(
    "bad", ["../outside.png", "images/../../outside.png", "/etc/passwd", "images\\..\\..\\x.png"]
)
def test_paths_escaping_root_rejected(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(ValueError, match="outside the dataset root"):
        safe_relative_path(root, bad)
    pd.DataFrame({"image": [bad], "caption": ["x"]}).to_csv(root / "t.csv", index=False)
    with pytest.raises(ValueError, match="outside the dataset root"):
        load_dataset(root / "t.csv")


def test_paths_inside_root_normalised(tmp_path: Path) -> None:
    assert safe_relative_path(tmp_path, "a/./b/../c.png") == "a/c.png"
    assert safe_relative_path(tmp_path, tmp_path / "x" / "y.png") == "x/y.png"
    assert safe_relative_path(tmp_path, "images\\sub\\0001.jpg") == "images/sub/0001.jpg"
    with pytest.raises(ValueError, match="empty image path"):
        safe_relative_path(tmp_path, "  ")


def test_a_table_written_on_windows_loads(tmp_path: Path, make_images) -> None:
    """Image paths with backslash separators (a CSV made on Windows) name the same files."""
    paths = make_images(2, folder="images/sub")
    rows = [str(Path(p).relative_to(tmp_path)).replace("/", "\\") for p in paths]
    assert all("\\" in row for row in rows)
    pd.DataFrame({"image": rows, "caption": ["one", "two"]}).to_csv(tmp_path / "win.csv",
                                                                      index=False)
    ds = load_dataset(tmp_path / "win.csv")
    assert list(ds.stimuli["image"]) == [str(Path(p).relative_to(tmp_path)) for p in paths]
    check_dataset(ds)  # the files are found


def test_dataset_rejects_unnormalised_table(tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": ["a"], "image": ["../x.png"], "captions": [["c"]]})
    with pytest.raises(ValueError, match="outside the dataset root"):
        Dataset("d", tmp_path, frame)


def test_coco_escaping_file_name(make_coco_folder) -> None:
    root = make_coco_folder([["a"]])
    data = json.loads((root / "captions.json").read_text())
    data["images"][0]["file_name"] = "../../secret.png"
    (root / "captions.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="outside the dataset root"):
        load_coco(root)


# --------------------------------------------------------------------------- bad stimuli


def _bad_folder(make_coco_folder) -> Path:
    root = make_coco_folder([["fine"], ["corrupt image"], ["missing image"], [], ["fine too"]])
    (root / "images" / f"{1:012d}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "images" / f"{2:012d}.png").unlink()
    return root


def test_check_dataset_raises_with_list(make_coco_folder) -> None:
    ds = load_coco(_bad_folder(make_coco_folder))
    with pytest.raises(ValueError) as info:
        check_dataset(ds)
    message = str(info.value)
    assert "3 of 5 stimuli" in message
    assert "2 (" in message and "corrupt" in message
    assert "3 (" in message and "missing" in message
    assert "4 (" in message and "empty caption" in message
    assert "drop_bad=True" in message


def test_check_dataset_drop_bad(make_coco_folder) -> None:
    ds = load_coco(_bad_folder(make_coco_folder))
    kept, dropped = check_dataset(ds, drop_bad=True)
    assert kept.stimuli["id"].tolist() == ["1", "5"]
    assert kept.stimuli.index.tolist() == [0, 1]
    assert [d["id"] for d in dropped] == ["2", "3", "4"]
    assert dropped[1]["reason"] == "image missing"
    assert dropped[2]["reason"] == "empty caption"
    assert dropped[0]["image"] == f"images/{1:012d}.png"


def test_truncated_image_caught(make_coco_folder, write_image) -> None:
    root = make_coco_folder([["a"], ["b"]])
    path = root / "images" / f"{0:012d}.png"
    write_image(path.with_suffix(".jpg"), seed=3, size=(200, 200))
    data = path.with_suffix(".jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])  # valid header, truncated pixel data
    with pytest.raises(ValueError, match="corrupt"):
        check_dataset(load_coco(root))


def test_check_many_bad_lists_twenty(tmp_path: Path) -> None:
    pd.DataFrame({"image": [f"m{i}.png" for i in range(25)], "caption": ["x"] * 25}).to_csv(
        tmp_path / "t.csv", index=False
    )
    with pytest.raises(ValueError) as info:
        check_dataset(load_dataset(tmp_path / "t.csv"))
    assert "and 5 more" in str(info.value)
    with pytest.raises(ValueError, match="every stimulus"):
        check_dataset(load_dataset(tmp_path / "t.csv"), drop_bad=True)


# --------------------------------------------------------------------------- dispatch


def test_detect_kind_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot tell the kind"):
        load_dataset(tmp_path)
    (tmp_path / "notes.txt").write_text("not a data set")
    with pytest.raises(ValueError, match="neither a folder"):
        load_dataset(tmp_path / "notes.txt")


def test_a_data_set_path_that_does_not_exist_says_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's commands name ../shared/data/coco-mini, read from the working folder: run
    elsewhere they were told "neither a folder, a table file ... nor 'hf:<name>'; check the path"
    (from the docs review). The message says it does not exist, where a relative path was read
    from, and a folder of that name in the data folder ($CONVERGENCE_DATA) where there is one."""
    data = tmp_path / "data"
    (data / "coco-mini").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("CONVERGENCE_DATA", str(data))
    monkeypatch.chdir(work)
    with pytest.raises(ValueError) as caught:
        load_dataset("../shared/data/coco-mini")
    assert str(caught.value) == (
        f"dataset '../shared/data/coco-mini' does not exist (a relative path is read from the "
        f"working folder {work}: {tmp_path / 'shared' / 'data' / 'coco-mini'}); the data folder "
        f"has {data / 'coco-mini'}: give that path"
    )
    with pytest.raises(ValueError, match=r"^dataset '/nowhere/t\.csv' does not exist; check the "
                       r"path$"):
        load_dataset("/nowhere/t.csv")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_dataset(tmp_path, kind="zip")


def test_mapping_spec_and_bad_option(imagenet_root: Path) -> None:
    ds = load_dataset({"kind": "labelled", "path": str(imagenet_root), "template": "{label}"})
    assert ds.stimuli["captions"].iat[0] == [ds.stimuli["label"].iat[0]]
    with pytest.raises(ValueError, match="bad option"):
        load_dataset(imagenet_root, kind="labelled", colour="red")
    with pytest.raises(ValueError, match="placeholder"):
        load_labelled(imagenet_root, template="a photo")


# --------------------------------------------------------------------------- Hugging Face


def test_hf_local_copy_materialises_images(tmp_path: Path, hub_offline) -> None:
    import datasets as hf

    images = [Image.new("RGB", (8 + i, 6), (i * 40, 10, 200)) for i in range(3)]
    local = hf.Dataset.from_dict(
        {"image": images, "text": ["first", "second", "third"]},
        features=hf.Features({"image": hf.Image(), "text": hf.Value("string")}),
    )
    local.save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset(f"hf:{tmp_path / 'saved'}", cache_dir=tmp_path / "cache")
    assert ds.source["kind"] == "hf"
    assert ds.stimuli["captions"].tolist() == [["first"], ["second"], ["third"]]
    assert ds.root == (tmp_path / "cache" / "datasets").resolve() / ds.root.name
    for i in range(3):
        assert open_rgb(ds.image_path(i)).size == (8 + i, 6)
        assert ds.stimuli["image"].iat[i].endswith(".png")  # PIL images are stored as PNG
    # loading again with other images under the same name replaces the files
    hf.Dataset.from_dict(
        {"image": images[::-1], "text": ["first", "second", "third"]},
        features=hf.Features({"image": hf.Image(), "text": hf.Value("string")}),
    ).save_to_disk(str(tmp_path / "saved2"))
    (tmp_path / "saved").rename(tmp_path / "old")
    (tmp_path / "saved2").rename(tmp_path / "saved")
    again = load_dataset(f"hf:{tmp_path / 'saved'}", cache_dir=tmp_path / "cache")
    assert again.root == ds.root and open_rgb(again.image_path(0)).size == (10, 6)
    assert check_dataset(ds)[1] == []
    # parquet data files through datasets.load_dataset, list-valued captions
    (tmp_path / "pq").mkdir()
    hf.Dataset.from_dict(
        {"image": images[:2], "caps": [["a", "b"], ["c"]]},
        features=hf.Features({"image": hf.Image(), "caps": hf.Sequence(hf.Value("string"))}),
    ).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    ds2 = load_hf(str(tmp_path / "pq"), caption_column="caps", cache_dir=tmp_path / "cache2")
    assert ds2.stimuli["captions"].tolist() == [["a", "b"], ["c"]]
    with pytest.raises(ValueError, match="caption_column"):
        load_hf(str(tmp_path / "pq"), caption_column="text", cache_dir=tmp_path / "cache3")


def test_hf_offline_message(tmp_path: Path, hub_offline) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("hf:minhuh/prh", revision="wit_1024", cache_dir=tmp_path / "c")
    message = str(info.value)
    assert "minhuh/prh" in message and "hf:/path/to/folder" in message
    assert "save_to_disk" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hf_local_folder_that_holds_no_data_set_is_named_as_such(tmp_path: Path, hub_offline):
    """A folder here that ``datasets`` cannot read is about the folder: the hub, its cache and
    network access are beside the point (the message used to send the user to them)."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("")
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(f"hf:{tmp_path / 'notes'}", cache_dir=tmp_path / "c")
    message = str(info.value)
    assert f"cannot load the folder {tmp_path / 'notes'} as a Hugging Face data set" in message
    assert "save_to_disk" in message and "without 'hf:'" in message
    assert "network" not in message and "datasets cache" not in message


def test_hf_missing_column_says_how_to_name_it_on_the_command_line(tmp_path: Path, hub_offline):
    import datasets as hf

    (tmp_path / "pq").mkdir()
    hf.Dataset.from_dict(
        {"image": [Image.new("RGB", (4, 4))], "caption": ["a"]},
        features=hf.Features({"image": hf.Image(), "caption": hf.Value("string")}),
    ).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    with pytest.raises(ValueError, match=r"no column 'text'.*caption_column=.*\[dataset\] table"):
        load_dataset(f"hf:{tmp_path / 'pq'}", cache_dir=tmp_path / "c")


# --------------------------------------------------------------------------- images


def test_open_rgb_and_thumbnail(tmp_path: Path, write_image) -> None:
    src = write_image(tmp_path / "grey.png", seed=1, size=(600, 300), mode="L")
    image = open_rgb(src)
    assert image.mode == "RGB" and image.size == (600, 300)
    out = make_thumbnail(src, tmp_path / "thumbs" / "0.jpg", max_side=256)
    with Image.open(out) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (256, 128)
    assert not [p for p in (tmp_path / "thumbs").iterdir() if ".tmp-" in p.name]
    small = write_image(tmp_path / "small.png", seed=2, size=(20, 10))
    with Image.open(make_thumbnail(small, tmp_path / "s.jpg")) as thumb:
        assert thumb.size == (20, 10)


def test_open_rgb_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match="does not exist"):
        open_rgb(tmp_path / "none.png")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageFileError, match="cannot be decoded"):
        open_rgb(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="max_side"):
        make_thumbnail(tmp_path / "bad.jpg", tmp_path / "t.jpg", max_side=0)
    assert not os.path.exists(tmp_path / "t.jpg")


def test_high_bit_depth_grey_images_keep_their_contrast(tmp_path: Path) -> None:
    """Pillow's convert('RGB') clips 16-bit grey at 255: a 16-bit PNG stimulus came out 99.6 %
    white. open_rgb (extraction, thumbnails, properties, the gallery) scales it to 8 bits."""
    import numpy as np

    from convergence_core.images import to_rgb

    ramp16 = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as raw:
        assert raw.mode.startswith("I")  # what Pillow makes of a 16-bit grey PNG
        assert (np.asarray(raw.convert("RGB")) == 255).mean() > 0.99  # the clipping fixed here
    image = open_rgb(tmp_path / "ramp16.png")
    assert image.mode == "RGB"
    got = np.asarray(image)
    expected = np.rint(ramp16 * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], expected)
    assert (got[..., 0] == got[..., 2]).all()
    out = make_thumbnail(tmp_path / "ramp16.png", tmp_path / "t.jpg", max_side=32)
    with Image.open(out) as thumb:  # the thumbnail is the ramp too, not a white square
        assert 100 < np.asarray(thumb).mean() < 155
    # 32-bit integer grey is read as 16-bit values; [0, 1] floats scaled, others refused
    ramp8 = np.arange(256, dtype=np.int32).reshape(16, 16)
    wide16 = Image.fromarray(ramp8 * 257, mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(wide16))[..., 1], ramp8)
    unit = Image.fromarray((ramp8 / 255.0).astype(np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(unit))[..., 1], ramp8)
    wide = Image.fromarray(np.full((4, 4), -3.0, dtype=np.float32), mode="F")
    with pytest.raises(ImageFileError, match="'F' image with values from -3 to -3.*save it as"):
        to_rgb(wide)
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb
    # the dataset check finds the refused range before any extraction
    from convergence_core.images import image_problem

    wide.save(tmp_path / "wide.tiff")
    assert "'F' image with values from -3 to -3" in image_problem(tmp_path / "wide.tiff")
    assert image_problem(tmp_path / "ramp16.png") is None


def test_32_bit_grey_is_scaled_by_its_mode_not_by_its_brightest_pixel(tmp_path: Path) -> None:
    """Two 32-bit integer grey TIFFs one pixel apart (255 vs 256) decoded 200 vs 1 in the rest
    of the image: the scale came from the pixel maximum. Now mode "I" is read as 16-bit values
    (8-bit where the file says 8 bits), and values outside that range are refused."""
    import numpy as np

    from convergence_core.images import to_rgb

    a = np.full((8, 8), 200, dtype=np.int32)
    a[0, 0] = 255
    b = a.copy()
    b[0, 0] = 256
    for name, arr in (("a", a), ("b", b)):
        Image.fromarray(arr, mode="I").save(tmp_path / f"{name}.tif")
    got_a, got_b = (np.asarray(open_rgb(tmp_path / f"{n}.tif")) for n in ("a", "b"))
    assert got_a[5, 5, 0] == got_b[5, 5, 0] == round(200 * 255 / 65535)  # was 200 vs 1
    assert abs(int(got_a[0, 0, 0]) - int(got_b[0, 0, 0])) <= 1
    with pytest.raises(ImageFileError, match="values from -1 to .*read as 0..65535.*save it as"):
        to_rgb(Image.fromarray(np.full((2, 2), -1, dtype=np.int32), mode="I"))


def test_a_pixel_limit_above_twice_pillows_own_is_honoured(tmp_path: Path, monkeypatch) -> None:
    """CONVERGENCE_MAX_IMAGE_PIXELS above 2 × Image.MAX_IMAGE_PIXELS (178,956,970 by default):
    Pillow's own DecompressionBombError refused the image anyway, in a message contradicting the
    limit. Pillow's limit is made small here so that a small image stands for a huge one."""
    from convergence_core.images import ImageTooLargeError, image_problem

    Image.new("RGB", (50, 40), "red").save(tmp_path / "big.png")  # 2,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses above 1,000
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "4000")
    assert image_problem(tmp_path / "big.png") is None
    assert open_rgb(tmp_path / "big.png").size == (50, 40)
    make_thumbnail(tmp_path / "big.png", tmp_path / "t.jpg", max_side=16)
    assert Image.MAX_IMAGE_PIXELS == 500  # Pillow's own limit is back once the reads are done
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "1999")  # our limit still refuses
    with pytest.raises(ImageTooLargeError, match="50 × 40 = 2,000 pixels, more than the limit"):
        open_rgb(tmp_path / "big.png")
    assert image_problem(tmp_path / "big.png").startswith("too large: 50 × 40 pixels")
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "100")  # below Pillow's: Pillow's error
    refused = r"claims more than 1,000 pixels \(the limit is 100\)"
    with pytest.raises(ImageTooLargeError, match=refused):
        open_rgb(tmp_path / "big.png")
    assert Image.MAX_IMAGE_PIXELS == 500


def test_an_image_over_the_pixel_limit_names_the_variable_and_the_fix(
    tmp_path: Path, monkeypatch
) -> None:
    """README walkthrough: an image over the pixel limit stopped the run with "image too large:
    ... over the limit of N (not decoded)", never naming $CONVERGENCE_MAX_IMAGE_PIXELS, the
    variable that sets the limit (README: Data sets), nor what to do."""
    from convergence_core.images import ImageTooLargeError, image_problem

    for i, size in enumerate([(20, 10), (33, 20)]):
        Image.new("RGB", size, (i * 90, 20, 20)).save(tmp_path / f"{i}.png")
    (tmp_path / "t.csv").write_text("image,caption\n0.png,small\n1.png,large\n", encoding="utf-8")
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "650")
    fix = ("$CONVERGENCE_MAX_IMAGE_PIXELS: raise it", "if the image is trusted", "resize the image")
    with pytest.raises(ValueError) as info:
        check_dataset(load_dataset(tmp_path / "t.csv"))
    message = str(info.value)
    assert "(1.png): image too large: 33 × 20 pixels, over the limit of 650" in message
    assert all(part in message for part in fix), message
    assert "0.png" not in message
    # every image bad: the other message says it too
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ValueError, match="every stimulus") as info:
        check_dataset(load_dataset(tmp_path / "t.csv"), drop_bad=True)
    assert all(part in str(info.value) for part in fix)
    assert "$CONVERGENCE_MAX_IMAGE_PIXELS" in image_problem(tmp_path / "1.png")
    # reading the image (extraction, thumbnails): the same variable and fix
    with pytest.raises(ImageTooLargeError) as info:
        open_rgb(tmp_path / "1.png")
    assert all(part in str(info.value) for part in fix)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # raised to ours (100) while read: > 200
    with pytest.raises(ImageTooLargeError, match="claims more than 200 pixels") as info:
        open_rgb(tmp_path / "1.png")
    assert all(part in str(info.value) for part in fix)
