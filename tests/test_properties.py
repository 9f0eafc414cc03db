"""Stimulus properties (convergence_core/properties.py): each measure against an independent slow
reference, invariances, planted answers, storage round trip and bad input."""

from __future__ import annotations

import io
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from convergence_core import properties as props
from convergence_core.cache import RunLayout
from convergence_core.run_writer import write_properties


def _rgb(seed: int, h: int = 40, w: int = 60) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# image statistics


def _slow_statistics(rgb: np.ndarray) -> dict[str, float]:
    """The definitions written out pixel by pixel (lists, math), independently of numpy tricks."""
    import math

    h, w, _ = rgb.shape
    luma = [
        [
            (0.2126 * int(rgb[i, j, 0]) + 0.7152 * int(rgb[i, j, 1]) + 0.0722 * int(rgb[i, j, 2]))
            / 255
            for j in range(w)
        ]
        for i in range(h)
    ]
    flat = [v for row in luma for v in row]
    mean = sum(flat) / len(flat)
    sd = math.sqrt(sum((v - mean) ** 2 for v in flat) / len(flat))
    rg = [int(rgb[i, j, 0]) - int(rgb[i, j, 1]) for i in range(h) for j in range(w)]
    yb = [
        0.5 * (int(rgb[i, j, 0]) + int(rgb[i, j, 1])) - int(rgb[i, j, 2])
        for i in range(h)
        for j in range(w)
    ]

    def var(values):
        m = sum(values) / len(values)
        return sum((v - m) ** 2 for v in values) / len(values)

    colour = math.sqrt(var(rg) + var(yb)) + 0.3 * math.sqrt(
        (sum(rg) / len(rg)) ** 2 + (sum(yb) / len(yb)) ** 2
    )
    kx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    edges = 0
    for i in range(1, h - 1):
        for j in range(1, w - 1):
            gx = sum(kx[a][b] * luma[i + a - 1][j + b - 1] for a in range(3) for b in range(3))
            gy = sum(kx[b][a] * luma[i + a - 1][j + b - 1] for a in range(3) for b in range(3))
            edges += math.hypot(gx, gy) / 4 > props.EDGE_THRESHOLD
    counts: dict[int, int] = {}
    for v in flat:
        level = min(255, max(0, round(v * 255)))
        counts[level] = counts.get(level, 0) + 1
    entropy = -sum(c / len(flat) * math.log2(c / len(flat)) for c in counts.values())
    return {
        "luminance_mean": mean,
        "luminance_contrast": sd,
        "colourfulness": colour,
        "edge_density": edges / ((h - 2) * (w - 2)),
        "entropy": entropy,
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_image_statistics_match_a_slow_transcription(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # smooth + noisy halves so edge density is neither 0 nor 1
    rgb = _rgb(seed, 17, 23)
    rgb[:, :11] = rng.integers(100, 110, size=(17, 11, 3))
    fast = props.image_statistics(rgb)
    slow = _slow_statistics(rgb)
    for name, value in slow.items():
        assert fast[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert 0.0 < fast["edge_density"] < 1.0


def test_sobel_agrees_with_scipy() -> None:
    from scipy import ndimage

    luma = np.random.default_rng(3).random((12, 15))
    gx = ndimage.sobel(luma, axis=1)[1:-1, 1:-1]
    gy = ndimage.sobel(luma, axis=0)[1:-1, 1:-1]
    np.testing.assert_allclose(props._sobel_magnitude(luma), np.hypot(gx, gy) / 4, rtol=1e-12)


def test_image_statistics_planted_answers() -> None:
    flat_grey = np.full((20, 30, 3), 128, dtype=np.uint8)
    stats = props.image_statistics(flat_grey)
    assert stats["colourfulness"] == 0.0
    assert stats["edge_density"] == 0.0
    assert stats["entropy"] == 0.0
    assert stats["luminance_contrast"] == pytest.approx(0.0, abs=1e-15)
    assert stats["luminance_mean"] == pytest.approx(128 / 255)
    # half black, half white: 1 bit of entropy, contrast 0.5, edges only along the seam
    split = np.zeros((20, 30, 3), dtype=np.uint8)
    split[:, 15:] = 255
    stats = props.image_statistics(split)
    assert stats["entropy"] == pytest.approx(1.0)
    assert stats["luminance_contrast"] == pytest.approx(0.5)
    assert stats["edge_density"] == pytest.approx(2 / 28)  # two interior columns touch the seam
    # a pure red image: rg = 255, yb = 127.5, no spread -> M = 0.3 * sqrt(255² + 127.5²)
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert props.image_statistics(red)["colourfulness"] == pytest.approx(0.3 * np.hypot(255, 127.5))
    # a busy image compresses worse than a flat one (large enough that the header is small)
    busy = props.image_statistics(_rgb(5, 128, 192))["jpeg_bytes_per_pixel"]
    plain = props.image_statistics(np.full((128, 192, 3), 90, np.uint8))["jpeg_bytes_per_pixel"]
    assert busy > 10 * plain


def test_image_statistics_invariances() -> None:
    rgb = _rgb(7)
    base = props.image_statistics(rgb)
    flipped = props.image_statistics(rgb[:, ::-1].copy())
    transposed = props.image_statistics(rgb.transpose(1, 0, 2).copy())
    for name in ("luminance_mean", "luminance_contrast", "colourfulness", "entropy"):
        assert flipped[name] == pytest.approx(base[name], rel=1e-12)
        assert transposed[name] == pytest.approx(base[name], rel=1e-12)
    # Sobel magnitude is symmetric under mirroring and transposition
    assert flipped["edge_density"] == pytest.approx(base["edge_density"])
    assert transposed["edge_density"] == pytest.approx(base["edge_density"])
    grey = np.repeat(rgb[..., :1], 3, axis=2)
    assert props.image_statistics(grey)["colourfulness"] == 0.0


def test_image_statistics_refuses_bad_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        props.image_statistics(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match=r"\(h, w, 3\)"):
        props.image_statistics(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        props.image_statistics(np.zeros((0, 4, 3), dtype=np.uint8))
    tiny = props.image_statistics(np.zeros((2, 2, 3), dtype=np.uint8))
    assert np.isnan(tiny["edge_density"])


def test_image_properties_read_files_at_working_size(tmp_path) -> None:
    small = _rgb(1, 30, 50)
    Image.fromarray(small).save(tmp_path / "small.png")
    big = np.kron(_rgb(2, 30, 40), np.ones((40, 40, 1), dtype=np.uint8))  # 1200 x 1600
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(small).convert("L").save(tmp_path / "grey.jpg")
    calls = []
    frame = props.image_properties(
        [tmp_path / "small.png", tmp_path / "big.png", tmp_path / "grey.jpg"],
        progress=lambda done, total: calls.append((done, total)),
    )
    assert list(frame.columns) == [info.name for info in props.IMAGE_PROPERTIES]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert frame.loc[0, ["width_px", "height_px"]].tolist() == [50.0, 30.0]
    assert frame.loc[1, ["width_px", "height_px"]].tolist() == [1600.0, 1200.0]
    assert frame.loc[1, "megapixels"] == pytest.approx(1.92)
    assert frame.loc[0, "aspect_ratio"] == pytest.approx(50 / 30)
    # a small lossless file is measured as it is
    stats = props.image_statistics(small)
    for name, value in stats.items():
        assert frame.loc[0, name] == pytest.approx(value), name
    assert frame.loc[2, "colourfulness"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="does not exist"):
        props.image_properties([tmp_path / "missing.png"])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot be decoded"):
        props.image_properties([tmp_path / "broken.jpg"])


def test_image_properties_read_images_with_the_guards_of_every_image_read(
    tmp_path, monkeypatch
) -> None:
    """Containment in the data set's root and the pixel limit, checked before decoding, as for
    thumbnails and extraction (the properties step once opened files directly)."""
    from convergence_core.images import ImageTooLargeError

    root = tmp_path / "root"
    root.mkdir()
    Image.fromarray(_rgb(1, 30, 50)).save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ValueError, match="leads outside the dataset root"):
        props.image_properties([root / "link.png"], root=root)
    Image.fromarray(_rgb(2, 100, 100)).save(root / "big.png")
    monkeypatch.setenv("CONVERGENCE_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(ImageTooLargeError, match="10,000 pixels, more than the limit of 5,000"):
        props.image_properties([root / "big.png"], root=root)
    monkeypatch.delenv("CONVERGENCE_MAX_IMAGE_PIXELS")
    frame = props.image_properties([root / "big.png"], root=root)
    assert frame.loc[0, ["width_px", "height_px"]].tolist() == [100.0, 100.0]


def test_working_copy_makes_measures_resolution_independent(tmp_path) -> None:
    """An image and its 4x enlargement (nearest neighbour) give the same luminance and colour
    statistics once both are brought to the working size (area averaging undoes the enlargement)."""
    base = np.kron(_rgb(4, 96, 128), np.ones((4, 4, 1), dtype=np.uint8))  # 384 x 512
    Image.fromarray(base).save(tmp_path / "base.png")
    Image.fromarray(np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))).save(tmp_path / "x4.png")
    frame = props.image_properties([tmp_path / "base.png", tmp_path / "x4.png"])
    for name in ("luminance_mean", "luminance_contrast", "colourfulness", "entropy"):
        assert frame.loc[1, name] == pytest.approx(frame.loc[0, name], rel=1e-9), name
    assert frame.loc[1, "edge_density"] == pytest.approx(frame.loc[0, "edge_density"])


# ---------------------------------------------------------------------------------------------
# captions


def test_caption_statistics() -> None:
    frame = props.caption_statistics([["a b c", "a b"], ["one"], []])
    assert frame["n_captions"].tolist() == [2.0, 1.0, 0.0]
    assert frame["caption_words"].iloc[:2].tolist() == [2.5, 1.0]
    assert np.isnan(frame["caption_words"].iloc[2])


def test_caption_agreement_matches_pairwise_cosines() -> None:
    rng = np.random.default_rng(0)
    counts = [5, 1, 3, 2, 0, 4]
    owners = np.repeat(np.arange(len(counts)), counts)
    embeddings = rng.standard_normal((owners.size, 7)) * rng.uniform(0.5, 3, size=(owners.size, 1))
    fast = props.caption_agreement(embeddings.astype(np.float32), owners, len(counts))
    for row, count in enumerate(counts):
        own = embeddings.astype(np.float32).astype(np.float64)[owners == row]
        if count < 2:
            assert np.isnan(fast[row])
            continue
        cosines = [
            own[a] @ own[b] / np.linalg.norm(own[a]) / np.linalg.norm(own[b])
            for a, b in combinations(range(count), 2)
        ]
        assert fast[row] == pytest.approx(np.mean(cosines), rel=1e-10)
    # identical captions agree perfectly; scaling an embedding changes nothing
    same = np.tile(rng.standard_normal(4), (3, 1)) * np.array([[1.0], [2.0], [0.5]])
    assert props.caption_agreement(same, np.zeros(3, dtype=int), 1)[0] == pytest.approx(1.0)
    # owners in any order
    order = rng.permutation(owners.size)
    np.testing.assert_allclose(
        props.caption_agreement(embeddings[order], owners[order], len(counts)),
        props.caption_agreement(embeddings, owners, len(counts)),
        rtol=1e-12,
    )


def test_caption_agreement_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="owner"):
        props.caption_agreement(np.ones((3, 2)), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="0..1"):
        props.caption_agreement(np.ones((2, 2)), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="zero or not finite"):
        props.caption_agreement(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([0, 0]), 1)


# ---------------------------------------------------------------------------------------------
# typicality


def test_nearest_similarities_match_a_dense_reference() -> None:
    from convergence_core.alignment import prepare_features

    x = np.random.default_rng(1).standard_normal((37, 6))
    features = prepare_features(x)
    dense = features @ features.T
    np.fill_diagonal(dense, -np.inf)
    reference = -np.sort(-dense, axis=1)[:, :5]
    np.testing.assert_allclose(
        props.nearest_similarities(x, 5), reference, rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="k must be"):
        props.nearest_similarities(x, 37)


def test_nearest_similarities_name_the_rows_that_are_not_finite() -> None:
    """A NaN row failed with "the clip threshold must be a positive number, got nan"."""
    x = np.random.default_rng(3).standard_normal((20, 4))
    x[[4, 9], 1] = np.nan
    for prepare in (True, False):
        with pytest.raises(ValueError, match=r"NaN/inf in 2 rows \(first: row 4\)"):
            props.nearest_similarities(x, 3, prepare=prepare)


def test_neighbour_distance_planted_outlier_and_invariances() -> None:
    rng = np.random.default_rng(2)
    cluster = rng.standard_normal((1, 8)) + 0.05 * rng.standard_normal((30, 8))
    outlier = -cluster[:1] + 0.05 * rng.standard_normal((1, 8))
    x = np.vstack([cluster, outlier])
    distance = props.neighbour_distance(props.nearest_similarities(x, 10, prepare=False), 10)
    assert int(np.argmax(distance)) == 30
    # unit rows: scale and rotation of the feature space change nothing
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(
        props.neighbour_distance(props.nearest_similarities(unit @ q, 10, prepare=False)),
        props.neighbour_distance(props.nearest_similarities(unit, 10, prepare=False)),
        atol=1e-12,
    )
    duplicates = np.tile(unit[:1], (12, 1))
    np.testing.assert_allclose(
        props.neighbour_distance(props.nearest_similarities(duplicates, 10, prepare=False)),
        0.0,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="k must be"):
        props.neighbour_distance(np.ones((4, 3)), 4)
    with pytest.raises(ValueError, match="NaN"):
        props.neighbour_distance(np.full((4, 3), np.nan), 2)


def test_centroid_distance_is_the_row_norm_of_the_gpa_input_and_invariant() -> None:
    from convergence_core.procrustes import preprocess_embeddings

    rng = np.random.default_rng(4)
    x = rng.standard_normal((25, 7)) * rng.uniform(0.2, 3.0, size=(25, 1))
    distance = props.centroid_distance(x)
    padded = preprocess_embeddings([x, rng.standard_normal((25, 11))])[0]  # padded to 11 columns
    np.testing.assert_allclose(distance, np.linalg.norm(padded, axis=1), rtol=1e-12)
    assert np.sum(distance**2) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.standard_normal((7, 7)))
    np.testing.assert_allclose(props.centroid_distance(3.5 * x @ q + 10.0), distance, rtol=1e-10)
    outlier = np.vstack([np.zeros((9, 3)), [[5.0, 0.0, 0.0]]])
    assert int(np.argmax(props.centroid_distance(outlier))) == 9
    with pytest.raises(ValueError, match="same features"):
        props.centroid_distance(np.ones((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        props.centroid_distance(np.full((4, 3), np.nan))


# ---------------------------------------------------------------------------------------------
# assembly and storage


def _stimuli(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(n)],
            "image": [f"{i}.png" for i in range(n)],
            "captions": [["a cat", "a small cat"]] * (n - 1) + [["dog"]],
            "label": ["cat"] * (n - 1) + [None],
            "score_in_table": np.arange(n, dtype=np.int64),
            "flag": [True, False] * (n // 2),
            "tags": [["x"]] * n,  # lists are not properties
            "entropy": np.linspace(0, 1, n),  # clashes with an image property
        }
    )


def test_assemble_properties_orders_types_and_describes_every_column() -> None:
    stimuli = _stimuli()
    n = len(stimuli)
    image = pd.DataFrame({info.name: np.arange(n, dtype=float) for info in props.IMAGE_PROPERTIES})
    table = props.assemble_properties(
        stimuli,
        image=image,
        agreement={"lm": np.linspace(0, 1, n)},
        distances={"vm": np.linspace(1, 2, n)},
        agreement_layers={"lm": "layer_06"},
    )
    names = table.names
    assert names[: len(props.IMAGE_PROPERTIES)] == [i.name for i in props.IMAGE_PROPERTIES]
    assert names[len(props.IMAGE_PROPERTIES) :] == [
        "n_captions",
        "caption_words",
        "caption_agreement:lm",
        "neighbour_distance:vm",
        "label",
        "score_in_table",
        "flag",
        "dataset:entropy",
    ]
    assert table.info_for("label").kind == "categorical"
    assert table.info_for("flag").kind == "categorical"
    assert table.info_for("score_in_table").kind == "numeric"
    assert "layer_06" in table.info_for("caption_agreement:lm").description
    assert table.values["label"].iloc[-1] is None
    assert table.values["flag"].tolist()[:2] == ["True", "False"]
    assert table.values["n_captions"].tolist() == [2.0] * (n - 1) + [1.0]
    with pytest.raises(ValueError, match="no property"):
        table.info_for("nope")
    with pytest.raises(ValueError, match=r"\(6,\)"):
        props.assemble_properties(stimuli, agreement={"lm": np.ones(3)})


def test_write_properties_round_trip_through_the_run_layout(tmp_path) -> None:
    stimuli = _stimuli()
    table = props.assemble_properties(stimuli, distances={"vm": np.linspace(1, 2, len(stimuli))})
    layout = RunLayout(tmp_path)
    write_properties(layout, table.values, table.info)
    stored = pd.read_parquet(layout.properties)
    import json

    records = json.loads(layout.properties_info.read_text())["properties"]
    again = props.PropertyTable.from_records(stored, records)
    assert again.info == table.info
    pd.testing.assert_frame_equal(again.values, table.values)
    with pytest.raises(ValueError, match="do not match"):
        write_properties(layout, table.values, table.info[:-1])


def test_property_info_refuses_bad_kinds() -> None:
    with pytest.raises(ValueError, match="kind"):
        props.PropertyInfo("x", "ordinal", "", "", "")
    with pytest.raises(ValueError, match="name"):
        props.PropertyInfo("id", "numeric", "", "", "")


def test_jpeg_bytes_use_the_documented_quality() -> None:
    rgb = _rgb(9)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=props.JPEG_QUALITY)
    assert props.image_statistics(rgb)["jpeg_bytes_per_pixel"] == buffer.tell() / (40 * 60)


def test_run_properties_reads_back_and_refuses_damaged_tables(tmp_path) -> None:
    import json

    from convergence_core.cache import CacheFormatError
    from convergence_core.run import load_run
    from tests.fixtures_runs import add_properties, make_synthetic_run

    run = make_synthetic_run(tmp_path, n=12, images=False, thumbnails=False)
    # runs from arrays go through the same pipeline: they have a table (no image properties)
    assert run.properties is not None and "neighbour_distance:vision-a" in run.properties.names
    assert "luminance_mean" not in run.properties.names
    run = add_properties(run, extra={"tag": ["a", "b"] * 6})
    table = run.properties
    assert table.values["id"].tolist() == run.stimuli["id"].tolist()
    assert table.info_for("tag").kind == "categorical"
    assert "neighbour_distance:vision-a" in table.names
    info_path = run.layout.properties_info
    good = info_path.read_text()
    for damage in ({"properties": "nope"}, {"no": []}, ["x"]):
        info_path.write_text(json.dumps(damage))
        with pytest.raises(CacheFormatError, match="rerun precompute"):
            load_run(run.path).properties  # noqa: B018
    info_path.write_text(good)
    frame = pd.read_parquet(run.layout.properties)
    frame["id"] = frame["id"].iloc[::-1].to_numpy()
    frame.to_parquet(run.layout.properties)
    with pytest.raises(CacheFormatError, match="other stimuli"):
        load_run(run.path).properties  # noqa: B018


def test_missing_values_of_every_kind_are_missing_not_a_level() -> None:
    """NaT of a date column and a NumPy NaN in a text column became the levels "NaT" and "nan"
    (from a review): categories of their own in the property tests."""
    stimuli = pd.DataFrame({
        "id": list("abcde"), "image": ["x"] * 5, "captions": [["c"]] * 5,
        "taken": pd.to_datetime(["2020-01-01", None, "2021-05-02", None, "2020-01-01"]),
        "kind": pd.Series([np.float32("nan"), "x", "y", None, pd.NA], dtype=object),
    })
    frame, _ = props.dataset_columns(stimuli)
    assert frame["taken"].tolist() == [
        "2020-01-01 00:00:00", None, "2021-05-02 00:00:00", None, "2020-01-01 00:00:00"
    ]
    assert frame["kind"].tolist() == [None, "x", "y", None, None]
