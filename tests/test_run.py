"""write_run_from_embeddings -> load_run round trips, lazy loading, bad inputs, pickle refusal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from convergence_core.cache import (
    CacheFormatError,
    PickleRefusedError,
    RunLayout,
    read_json,
    write_json,
)
from convergence_core.precompute import write_run_from_embeddings
from convergence_core.run import Run, list_runs, load_run
from tests.fixtures_runs import make_synthetic_run, synthetic_embeddings


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Run:
    return make_synthetic_run(tmp_path_factory.mktemp("runs"), n=40)


def _stimuli(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(n)],
            "image": [f"img/{i}.jpg" for i in range(n)],
            "captions": [[f"caption {i}", "second"] for i in range(n)],
            "label": [f"label{i % 3}" for i in range(n)],
        }
    )


def _slow_prepare_features(x: np.ndarray, q: float = 0.95) -> np.ndarray:
    """Independent reference of the Platonic-representation recipe: clip every entry at the mean
    over rows of each row's q-quantile of |x| (linear interpolation), then L2-normalise rows."""
    per_row = []
    for row in np.abs(x):
        ordered = sorted(row)
        position = q * (len(ordered) - 1)
        low = int(np.floor(position))
        high = min(low + 1, len(ordered) - 1)
        per_row.append(ordered[low] + (position - low) * (ordered[high] - ordered[low]))
    cap = sum(per_row) / len(per_row)
    out = np.empty_like(x, dtype=np.float64)
    for i, row in enumerate(x):
        clipped = np.array([min(max(v, -cap), cap) for v in row], dtype=np.float64)
        out[i] = clipped / np.sqrt(sum(v * v for v in clipped))
    return out


def test_round_trip_keeps_every_array_and_table(tmp_path):
    n = 30
    embeddings, _ = synthetic_embeddings(n, seed=3)
    run = write_run_from_embeddings(
        tmp_path / "r",
        _stimuli(n),
        embeddings,
        vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"],
        gpa_layers={"vision-b": "stage1"},
        thumbnails=False,
        settings={"k": 10},
    )
    again = load_run(tmp_path / "r")
    for loaded in (run, again):
        assert loaded.n_stimuli == n
        assert loaded.stimuli["id"].tolist() == [f"s{i}" for i in range(n)]
        assert loaded.stimuli["captions"].iloc[4] == ["caption 4", "second"]
        assert loaded.stimuli["label"].iloc[4] == "label1"
        assert loaded.vision_models == ["vision-a", "vision-b", "vision-c"]
        assert loaded.language_models == ["language-a", "language-b"]
        assert loaded.models == [*loaded.vision_models, *loaded.language_models]
        for model, layers in embeddings.items():
            assert loaded.layers(model) == list(layers)
            assert set(loaded.embeddings[model]) == set(layers)
            for layer, array in layers.items():
                np.testing.assert_array_equal(loaded.embeddings[model][layer], array)
        assert loaded.manifest.settings == {"k": 10}
    # default layer = first given, except the GPA layer of a vision model
    assert run.default_layer("vision-a") == "stage1"
    assert run.default_layer("vision-b") == "stage1"
    assert run.default_layer("language-a") == "layer0"
    assert run.gpa.models == ("vision-a", "vision-b", "vision-c")
    assert run.gpa.layers == ("stage1", "stage1", "stage1")
    assert run.images_root is None and run.image_path(0) is None and run.thumbnail_path(0) is None


def test_neighbour_lists_match_an_independent_reference(small_run):
    """The stored lists are each row's most similar others under the prepared features,
    recomputed here with a slow transcription of prepare_features."""
    for model in ("vision-a", "language-b"):
        layer = small_run.layers(model)[-1]
        x = np.asarray(small_run.embeddings[model][layer], dtype=np.float64)
        features = _slow_prepare_features(x)
        index = small_run.neighbours(model, layer)
        np.testing.assert_allclose(index.features.all_rows(), features, atol=1e-12)
        gram = features @ features.T
        np.fill_diagonal(gram, -np.inf)
        expected = np.argsort(-gram, axis=1, kind="stable")[:, : index.k_max]
        assert index.k_max == 39  # K = min(128, n - 1)
        np.testing.assert_array_equal(index.lists.indices, expected)
        np.testing.assert_allclose(
            index.lists.values, np.take_along_axis(gram, expected, axis=1), atol=1e-12
        )
        assert index.lists.indices.dtype == np.int32 and index.lists.values.dtype == np.float64


def test_run_alignment_equals_the_dense_definition(small_run):
    from convergence_core.alignment import cknna, mutual_knn

    rows = np.array([0, 3, 5, 8, 13, 21, 22, 30, 31, 34, 39])
    vision, language = ("vision-a", "stage2"), ("language-b", "layer3")
    X = _slow_prepare_features(np.asarray(small_run.embeddings[vision[0]][vision[1]], np.float64))
    Y = _slow_prepare_features(
        np.asarray(small_run.embeddings[language[0]][language[1]], np.float64)
    )
    value = small_run.alignment(*vision, *language, subset=rows, k=4)
    assert value == pytest.approx(cknna(X[rows], Y[rows], k=4), abs=1e-9)
    # the same subset by its stimulus ids (a list, an array or a pandas column)
    ids = small_run.stimuli["id"].iloc[rows]
    assert small_run.rows_of(ids).tolist() == rows.tolist()
    for given in (ids.tolist(), ids.to_numpy(), ids.to_numpy().astype(str), ids):
        assert small_run.alignment(*vision, *language, subset=given, k=4) == value
    with pytest.raises(ValueError, match=r"2 of 13 ids are not stimuli of .*\['nope', 'gone'\]"):
        small_run.alignment(*vision, *language, subset=[*ids, "nope", "gone"], k=4)
    assert small_run.alignment(
        *vision, *language, subset=rows, k=4, metric="mutual_knn"
    ) == pytest.approx(mutual_knn(X[rows], Y[rows], k=4))
    assert small_run.alignment(*vision, *language, k=10) == pytest.approx(cknna(X, Y, k=10), abs=1e-9)
    from convergence_core.metrics import measure

    for metric in ("cycle_knn", "lcs_knn", "edit_distance_knn"):
        assert small_run.alignment(
            *vision, *language, subset=rows, k=4, metric=metric
        ) == pytest.approx(measure(metric, X[rows], Y[rows], k=4), abs=1e-12)
    for metric, options in (("cka", {}), ("unbiased_cka", {}), ("cka", {"kernel": "rbf"})):
        assert small_run.alignment(
            *vision, *language, subset=rows, metric=metric, **options
        ) == pytest.approx(measure(metric, X[rows], Y[rows], **options), abs=1e-12)
    with pytest.raises(ValueError, match="unknown metric"):
        small_run.alignment(*vision, *language, k=4, metric="nope")
    with pytest.raises(ValueError, match="kernel must be 'linear' or 'rbf'"):
        small_run.alignment(*vision, *language, subset=rows, metric="cka", kernel="bogus")
    with pytest.raises(ValueError, match="does not take 'cca'"):
        small_run.alignment(*vision, *language, subset=rows, metric="svcca", cca=3)
    with pytest.raises(ValueError, match="more than once"):
        small_run.alignment(*vision, *language, subset=[1, 1, 2, 3, 4], k=2)
    nearest_rows, similarities = small_run.nearest("vision-a", "stage2", 7, 5)
    gram = X @ X.T
    gram[7, 7] = -np.inf
    assert nearest_rows.tolist() == np.argsort(-gram[7], kind="stable")[:5].tolist()


def test_gpa_and_dispersion_are_consistent(small_run):
    from convergence_core.dispersion import dispersion_scores, residual_pca
    from convergence_core.procrustes import generalized_procrustes

    gpa = small_run.gpa
    m = small_run.n_stimuli
    assert gpa.residuals.shape == (m, 3) and gpa.residuals.dtype == np.float64
    assert len(gpa.aligned) == 3 and gpa.aligned[0].shape == gpa.consensus.shape
    # the stored residuals are the distances between aligned models and consensus
    for i, aligned in enumerate(gpa.aligned):
        distances = np.linalg.norm(np.asarray(aligned, np.float64) - gpa.consensus, axis=1)
        np.testing.assert_allclose(distances, gpa.residuals[:, i], rtol=1e-5, atol=1e-7)
    # recomputing GPA from the run's own embeddings reproduces it
    fresh = generalized_procrustes(
        [
            np.asarray(small_run.embeddings[mo][la], np.float64)
            for mo, la in zip(gpa.models, gpa.layers, strict=True)
        ]
    )
    np.testing.assert_allclose(fresh.residuals, gpa.residuals, atol=1e-9)
    table = small_run.dispersion
    assert table.columns.tolist()[:5] == ["id", "mean", "pc1", "rank_mean", "rank_pc1"]
    assert table["id"].tolist() == small_run.stimuli["id"].tolist()
    np.testing.assert_allclose(table["mean"], dispersion_scores(gpa.residuals, method="mean"))
    np.testing.assert_allclose(table["pc1"], dispersion_scores(gpa.residuals, method="pc1"))
    for score in ("mean", "pc1"):
        ranks = table[f"rank_{score}"].to_numpy()
        assert sorted(ranks) == list(range(m))
        order = table[score].to_numpy()[np.argsort(ranks)]
        assert np.all(np.diff(order) >= 0)  # rank 0 = lowest dispersion
    pca = residual_pca(gpa.residuals)
    np.testing.assert_allclose(small_run.pca.components, pca.components)
    np.testing.assert_allclose(small_run.pca.explained_variance_ratio, pca.explained_variance_ratio)


def test_dispersion_recovers_planted_noise(tmp_path):
    run = make_synthetic_run(tmp_path, n=120, thumbnails=False, seed=1)
    planted = run.stimuli["planted_noise"].to_numpy()
    for score in ("mean", "pc1"):
        rho = pd.Series(run.dispersion[score].to_numpy()).corr(
            pd.Series(planted), method="spearman"
        )
        assert rho > 0.8, (score, rho)


def test_models_whose_names_differ_only_in_case_are_refused_before_anything_is_written(
    tmp_path,
):
    """On macOS and Windows 'Vision-A' and 'vision-a' would be one folder of the run: the second
    model's files would overwrite the first's."""
    embeddings, _ = synthetic_embeddings(12, seed=3)
    embeddings["Vision-A"] = embeddings["vision-a"]
    with pytest.raises(ValueError, match=r"'vision-a' and 'Vision-A' differ only in upper and"):
        write_run_from_embeddings(
            tmp_path / "r",
            _stimuli(12),
            embeddings,
            vision_models=["vision-a", "vision-b", "vision-c", "Vision-A"],
            language_models=["language-a", "language-b"],
            thumbnails=False,
        )
    assert not (tmp_path / "r").exists()


def test_models_whose_folder_names_collide_otherwise_are_refused_naming_the_folder(tmp_path):
    """From the audit: 'org/model' is stored as 'org_model-c87c0c64', another model's name; the
    message said the two names differ only in case."""
    embeddings, _ = synthetic_embeddings(12, seed=3)
    for clash in ("org_model-c87c0c64", "ORG_MODEL-C87C0C64"):
        embeddings = {**embeddings, "org/model": embeddings["vision-a"],
                      clash: embeddings["vision-b"]}
        with pytest.raises(ValueError, match=(
            rf"^models 'org/model' and '{clash}' would share the folder 'org_model-c87c0c64' in "
            r"the run.*'org/model' as 'org_model-c87c0c64'\); rename one")) as info:
            write_run_from_embeddings(
                tmp_path / "r", _stimuli(12), {k: v for k, v in embeddings.items()
                                               if k in ("org/model", clash, "vision-c")},
                vision_models=["org/model", clash, "vision-c"], language_models=[],
                thumbnails=False,
            )
        assert "differ only" not in str(info.value)
        assert ("ignore case" in str(info.value)) == (clash != "org_model-c87c0c64")
    assert not (tmp_path / "r").exists()


def test_images_and_thumbnails(small_run):
    from PIL import Image

    for row in (0, 39):
        image = small_run.image_path(row)
        assert image.is_file() and image.is_relative_to(small_run.images_root)
        thumb = small_run.thumbnail_path(row)
        with Image.open(thumb) as im, Image.open(image) as full:
            assert max(im.size) == min(256, max(full.size))
    for bad in (-1, 40, 1.5, True):
        with pytest.raises(ValueError, match="row"):
            small_run.image_path(bad)


def test_embeddings_are_lazy_memory_maps(small_run):
    array = small_run.embeddings["vision-a"]["stage2"]
    assert isinstance(array, np.memmap)
    assert small_run.embeddings["vision-a"]["stage2"] is array  # mapped once, then kept
    lists = small_run.neighbours("vision-a", "stage2").lists
    assert isinstance(lists.indices, np.memmap) and isinstance(lists.values, np.memmap)


def test_unknown_model_and_layer_name_the_choices(small_run):
    with pytest.raises(ValueError, match="choose one of"):
        small_run.layers("nope")
    with pytest.raises(ValueError, match="vision-a"):
        small_run.embeddings["nope"]
    with pytest.raises(ValueError, match="stage2"):
        small_run.neighbours("vision-a", "layer9")


def test_list_runs_newest_first(tmp_path):
    make_synthetic_run(tmp_path, n=10, thumbnails=False, name="older")
    manifest = read_json(tmp_path / "older" / "manifest.json")
    manifest["updated"] = "2000-01-01T00:00:00+00:00"
    write_json(tmp_path / "older" / "manifest.json", manifest)
    make_synthetic_run(tmp_path, n=12, thumbnails=False, name="newer")
    (tmp_path / "not-a-run").mkdir()
    runs = list_runs(tmp_path)
    assert [r.name for r in runs] == ["newer", "older"]
    name, path, summary, damaged = runs[0]
    assert damaged is None
    assert path == tmp_path / "newer" and summary.n_stimuli == 12 and summary.complete
    assert list_runs(tmp_path / "absent") == []


def test_load_run_by_name_under_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVERGENCE_CACHE", str(tmp_path))
    make_synthetic_run(tmp_path / "runs", n=8, thumbnails=False, name="named")
    assert load_run("named").n_stimuli == 8
    with pytest.raises(FileNotFoundError, match="named") as missing:
        load_run("other")
    # it says where it looked for a run of that name (a user without CONVERGENCE_CACHE set saw
    # only "no run folder at other" and an empty list)
    assert f"no run of that name in {tmp_path / 'runs'}" in str(missing.value)
    # a name precompute stored under another folder name ("my run" -> my_run-<hash>) is found
    # by the name the user gave (`report "my run"` said "no run folder at my run")
    from convergence_core.cache import model_key

    for given in ("my run", "lab/v1"):
        make_synthetic_run(tmp_path / "runs", n=9, thumbnails=False, name=model_key(given))
        assert load_run(given).path == tmp_path / "runs" / model_key(given)
    assert model_key("my run") != "my run"
    # a folder of the run's name in the working directory that is not a run (the user's feature
    # files, say) does not hide the cached run; a run folder there is still taken first
    work = tmp_path / "work"
    (work / "named").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert load_run("named").path == tmp_path / "runs" / "named"
    make_synthetic_run(work, n=10, thumbnails=False, name="named")
    assert load_run("named").n_stimuli == 10


def test_pickled_npy_in_a_run_is_refused(tmp_path):
    run = make_synthetic_run(tmp_path, n=10, thumbnails=False)
    target = run.layout.embedding("vision-a", "stage1")
    np.save(target, np.array([{"evil": 1}] * 10, dtype=object), allow_pickle=True)
    reopened = load_run(run.path)
    with pytest.raises(PickleRefusedError, match="unpickling"):
        reopened.embeddings["vision-a"]["stage1"]
    np.save(
        RunLayout(run.path).gpa_array("residuals"),
        np.array([None], dtype=object),
        allow_pickle=True,
    )
    with pytest.raises(PickleRefusedError):
        _ = reopened.gpa


def test_incomplete_or_foreign_folders_are_refused(tmp_path):
    run = make_synthetic_run(tmp_path, n=10, thumbnails=False)
    manifest = read_json(run.layout.manifest)
    manifest["complete"] = False
    write_json(run.layout.manifest, manifest)
    with pytest.raises(CacheFormatError, match="resume"):
        load_run(run.path)
    manifest["complete"], manifest["format"] = True, 99
    write_json(run.layout.manifest, manifest)
    with pytest.raises(CacheFormatError, match="format"):
        load_run(run.path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(CacheFormatError, match="manifest"):
        load_run(tmp_path / "plain")


def test_rewrite_replaces_a_run_but_never_a_foreign_folder(tmp_path):
    make_synthetic_run(tmp_path, n=10, thumbnails=False, name="r")
    (tmp_path / "r" / "umap.npy").write_bytes(b"stale")
    make_synthetic_run(tmp_path, n=12, thumbnails=False, name="r")
    assert not (tmp_path / "r" / "umap.npy").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    embeddings, _ = synthetic_embeddings(5)
    with pytest.raises(ValueError, match="not a run"):
        write_run_from_embeddings(
            foreign,
            _stimuli(5),
            embeddings,
            vision_models=["vision-a", "vision-b", "vision-c"],
            language_models=["language-a", "language-b"],
            thumbnails=False,
        )
    assert (foreign / "thesis.tex").read_text() == "precious"


def _write(tmp_path, embeddings, stimuli=None, **kwargs):
    n = len(next(iter(next(iter(embeddings.values())).values())))
    options = dict(
        vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"],
        thumbnails=False,
    )
    options.update(kwargs)
    return write_run_from_embeddings(
        tmp_path / "bad", _stimuli(n) if stimuli is None else stimuli, embeddings, **options
    )


def test_bad_inputs_raise_with_the_fix(tmp_path):
    embeddings, _ = synthetic_embeddings(8)
    short = {m: dict(layers) for m, layers in embeddings.items()}
    short["vision-b"]["stage1"] = short["vision-b"]["stage1"][:7]
    with pytest.raises(ValueError, match="7 rows but there are 8 stimuli"):
        _write(tmp_path, short)
    nan = {m: dict(layers) for m, layers in embeddings.items()}
    nan["language-a"]["layer2"] = nan["language-a"]["layer2"].copy()
    nan["language-a"]["layer2"][3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*first rows \[3\]"):
        _write(tmp_path, nan)
    zero = {m: dict(layers) for m, layers in embeddings.items()}
    zero["vision-a"]["stage1"] = zero["vision-a"]["stage1"].copy()
    zero["vision-a"]["stage1"][5] = 0.0  # checked before writing (it failed mid-write)
    with pytest.raises(ValueError, match=r"\['vision-a'\]\['stage1'\] has 1 row\(s\) that are "
                       r"all zeros, first rows \[5\]"):
        _write(tmp_path, zero)
    # one direction for every stimulus (constant features, or rows that differ only in scale):
    # its CKNNA was a number, with a spurious low/high effect from randomly broken ties (review)
    for flat in (np.ones((8, 12)), np.arange(1, 9)[:, None] * np.linspace(-1, 1, 12)):
        same = {m: dict(layers) for m, layers in embeddings.items()}
        same["language-a"]["layer2"] = flat
        with pytest.raises(ValueError, match=r"\['language-a'\]\['layer2'\]: every one of its "
                           r"8 rows points the same way .*leave that layer \(or model\) out"):
            _write(tmp_path, same)
    varied = {m: dict(layers) for m, layers in embeddings.items()}
    varied["language-a"]["layer2"] = np.ones((8, 12))
    varied["language-a"]["layer2"][7, 0] = 1.001  # one stimulus apart is a direction that varies
    _write(tmp_path / "varied", varied)
    with pytest.raises(ValueError, match="no embeddings for listed model"):
        _write(tmp_path, embeddings, vision_models=["vision-a", "vision-b", "vision-c", "vision-z"])
    with pytest.raises(ValueError, match="neither vision_models nor language_models"):
        _write(tmp_path, embeddings, language_models=["language-a"])
    with pytest.raises(ValueError, match="at least 2 vision models"):
        _write(
            tmp_path,
            {k: embeddings[k] for k in ("vision-a", "language-a")},
            vision_models=["vision-a"],
            language_models=["language-a"],
        )
    with pytest.raises(ValueError, match="not a layer"):
        _write(tmp_path, embeddings, gpa_layers={"vision-a": "layer0"})
    with pytest.raises(ValueError, match="not a vision model"):
        _write(tmp_path, embeddings, gpa_layers={"language-a": "layer0"})
    duplicate = _stimuli(8)
    duplicate.loc[5, "id"] = "s1"
    with pytest.raises(ValueError, match="unique"):
        _write(tmp_path, embeddings, stimuli=duplicate)
    with pytest.raises(ValueError, match="captions"):
        _write(tmp_path, embeddings, stimuli=_stimuli(8).drop(columns="captions"))
    with pytest.raises(ValueError, match="images_root"):
        _write(tmp_path, embeddings, thumbnails=True)
    assert not (tmp_path / "bad").exists()  # nothing written before the inputs are checked


@pytest.mark.parametrize("damage", ["self", "out_of_range", "unsorted", "nan"])
def test_damaged_neighbour_lists_fail_the_run_check_naming_the_row(tmp_path, damage):
    from convergence_core.run_checks import check_run_files

    run = make_synthetic_run(tmp_path, n=30, thumbnails=False)
    check_run_files(run)  # intact
    model, layer = "vision-a", "stage2"
    keys = run._keys(model, layer)
    lists = run.neighbours(model, layer).lists
    indices, values = np.array(lists.indices), np.array(lists.values)
    row = 13
    if damage == "self":
        indices[row, 2] = row
    elif damage == "out_of_range":
        indices[row, 0] = run.n_stimuli
    elif damage == "unsorted":
        values[row, 3] = values[row, 2] + 1e-6
    else:
        values[row, 1] = np.nan
    np.save(run.layout.neighbour_indices(*keys), indices)
    np.save(run.layout.neighbour_values(*keys), values)
    if damage == "out_of_range":  # the run's reader refuses it first: the file and the repair
        with pytest.raises(CacheFormatError, match=r"indices\.npy lists stimuli outside 0\.\.29"
                           r".*delete the run folder .* rerun `python -m convergence_core "
                           "precompute`"):
            check_run_files(load_run(run.path))
        return
    file = "values" if damage in ("unsorted", "nan") else "indices"
    words = "unsorted similarities" if file == "values" else "its own neighbour"
    with pytest.raises(CacheFormatError, match=rf"{file}.* {words} \(row {row}\)"):
        check_run_files(load_run(run.path))


def test_partner_models_are_the_language_models_then_every_model_outside_gpa(tmp_path):
    """The dashboard's other side of the pairs: language models first (also one in GPA), then
    the models outside GPA whatever their modality; GPA models of other modalities are not."""
    embeddings, _ = synthetic_embeddings(30)
    rng = np.random.default_rng(0)
    embeddings["subj01"] = {"V1": rng.standard_normal((30, 8))}
    embeddings["subj02"] = {"V1": rng.standard_normal((30, 8))}
    stimuli = pd.DataFrame({"id": [f"s{i}" for i in range(30)],
                            "image": [f"{i}.jpg" for i in range(30)],
                            "captions": [[f"c{i}"] for i in range(30)]})
    run = write_run_from_embeddings(
        tmp_path / "run", stimuli, embeddings, vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"],
        modalities={"subj01": "brain", "subj02": "brain"},
        gpa_models=["vision-a", "language-a", "subj02"], thumbnails=False,
        gpa_layers={"vision-a": "stage2", "language-a": "layer3", "subj02": "V1"},
    )
    assert run.other_models == ["subj01", "subj02"]
    assert run.partner_models == ["language-a", "language-b", "vision-b", "vision-c", "subj01"]


def test_gpa_at_the_first_of_several_given_layers_is_said(tmp_path):
    """Models given as arrays with all their layers and no layer named enter GPA at the first
    (their input end): the run says so, by name and layer count; naming the layer, or models of
    one layer, give no note."""
    embeddings, _ = synthetic_embeddings(30, seed=2)
    stimuli = _stimuli(30)
    vision = [m for m in embeddings if m.startswith("vision")]
    language = [m for m in embeddings if m not in vision]
    run = write_run_from_embeddings(
        tmp_path / "first", stimuli, embeddings, vision_models=vision,
        language_models=language, thumbnails=False,
    )
    note = run.first_layer_note()
    counts = {m: len(embeddings[m]) for m in vision}
    assert note is not None and all(f"{m} ({counts[m]} layers)" in note for m in vision)
    assert "--gpa-layer MODEL=LAYER" in note
    # the rerun it advises names the run: a run given no name is named by its settings (the
    # GPA layer among them), so a rerun without the name made a new run and extracted again
    assert f"rerun precompute with --run-name {run.name}: the stored layers are reused" in note
    named = write_run_from_embeddings(
        tmp_path / "named", stimuli, embeddings, vision_models=vision,
        language_models=language, thumbnails=False,
        gpa_layers={m: list(embeddings[m])[-1] for m in vision},
    )
    assert named.first_layer_note() is None
    single = {m: dict(list(layers.items())[-1:]) for m, layers in embeddings.items()}
    one = write_run_from_embeddings(
        tmp_path / "one", stimuli, single, vision_models=vision, language_models=language,
        thumbnails=False,
    )
    assert one.first_layer_note() is None


def _small_run(path, n=10, stimuli=None, **kwargs):
    embeddings, _ = synthetic_embeddings(n)
    return write_run_from_embeddings(
        path, _stimuli(n) if stimuli is None else stimuli, embeddings,
        vision_models=["vision-a", "vision-b", "vision-c"],
        language_models=["language-a", "language-b"], thumbnails=False, gpa_starts=0, **kwargs,
    )


def test_an_interrupted_reset_resumes_on_rerun(tmp_path, monkeypatch):
    """A reset killed while the old folder was being deleted left a folder without manifest.json,
    which every rerun refused as 'not a run'."""
    import os

    _small_run(tmp_path / "r", n=10)
    real_unlink, seen = os.unlink, []

    def unlink(name, *args, **kwargs):  # Ctrl-C right after manifest.json went
        if seen and os.path.basename(seen[-1]) == "manifest.json":
            raise KeyboardInterrupt
        seen.append(os.fsdecode(name))
        return real_unlink(name, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        _small_run(tmp_path / "r", n=12)  # other stimuli: the folder is reset
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert [info.name for info in list_runs(tmp_path)] == []  # no half run, no leftover listed
    run = _small_run(tmp_path / "r", n=12)  # the same command resumes
    assert run.n_stimuli == 12 and sorted(os.listdir(tmp_path)) == ["r"]  # the leftover went


def test_a_reset_leftover_that_is_a_link_or_a_file_is_unlinked_not_followed(
    tmp_path, monkeypatch
):
    """A .<run>.reset that is a symbolic link or a file was left alone, and every later reset then
    failed moving the run onto it (a raw OS error); a folder there that cannot be deleted is
    named."""
    import os
    import shutil

    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    _small_run(runs / "r", n=10)
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    aside = runs / ".r.reset"
    for n, leftover in ((12, elsewhere), (10, None), (12, tmp_path / "gone")):
        aside.symlink_to(leftover) if leftover else aside.write_text("x")
        assert _small_run(runs / "r", n=n).n_stimuli == n  # other stimuli: a reset
        assert not os.path.lexists(aside)
    assert (elsewhere / "keep.txt").read_text() == "mine"
    (aside / "sub").mkdir(parents=True)
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # cannot be deleted
    with pytest.raises(ValueError, match=r"\.r\.reset, left by an interrupted reset .* delete"):
        _small_run(runs / "r", n=10)


def test_a_manifest_this_version_cannot_read_is_refused_not_reset(tmp_path):
    """A manifest of a newer format (or one hand-edited field) made the next write reset the
    whole run folder, files a user kept in it included."""
    run = _small_run(tmp_path / "r")
    (run.path / "notes.txt").write_text("mine")
    manifest = read_json(run.layout.manifest)
    for key, value in (("format", 3), ("n_stimuli", "ten")):
        write_json(run.layout.manifest, {**manifest, key: value})
        with pytest.raises(CacheFormatError, match="not overwrite a run it cannot read.*delete"):
            _small_run(tmp_path / "r")
        assert (run.path / "notes.txt").read_text() == "mine"
        assert read_json(run.layout.manifest)[key] == value
    write_json(run.layout.manifest, manifest)
    assert _small_run(tmp_path / "r").n_stimuli == 10


def test_a_changed_stimulus_column_reaches_the_table_and_properties_without_re_extraction(
    tmp_path,
):
    """A corrected label was kept out of stimuli.parquet (the stimuli step's fingerprint covers
    id, image and captions only) while properties.parquet took it: the two disagreed."""
    _small_run(tmp_path / "r")
    events = []
    stimuli = _stimuli(10).assign(label="dog")
    run = _small_run(tmp_path / "r", stimuli=stimuli, progress=events.append)
    assert run.stimuli["label"].tolist() == ["dog"] * 10
    assert run.properties.values["label"].tolist() == ["dog"] * 10
    assert all(e.skipped for e in events if e.step in ("extract", "neighbours", "gpa"))
    assert load_run(run.path).manifest.complete


def test_a_run_being_deleted_by_a_reset_is_not_listed(tmp_path):
    """A reset moves the old run to .<run>.reset before deleting it; stopped in between, the
    hidden folder still holds a manifest and was listed (and shown) as a run."""
    make_synthetic_run(tmp_path, n=10, thumbnails=False, name="kept")
    make_synthetic_run(tmp_path, n=10, thumbnails=False, name="old")
    (tmp_path / "old").rename(tmp_path / ".old.reset")
    assert [info.name for info in list_runs(tmp_path)] == ["kept"]


def test_layers_whose_names_differ_only_in_case_are_refused(tmp_path):
    """Layers 'stage1' and 'STAGE1' of one model were written as stage1.npy and STAGE1.npy: one
    file on macOS and Windows (from the review)."""
    embeddings, _ = synthetic_embeddings(12, seed=3)
    embeddings["vision-c"]["STAGE1"] = embeddings["vision-c"]["stage1"] * 2.0
    with pytest.raises(ValueError, match=r"layers 'stage1' and 'STAGE1' would be one file"):
        write_run_from_embeddings(
            tmp_path / "r", _stimuli(12), embeddings,
            vision_models=["vision-a", "vision-b", "vision-c"],
            language_models=["language-a", "language-b"], thumbnails=False,
        )


def test_gpa_json_naming_models_or_layers_the_run_lacks_is_a_damaged_run(tmp_path):
    """From the audit: a gpa.json naming a model or layer the run lacks gave user-input advice
    ("choose one of ...") instead of saying the run is damaged; one that is a list raised
    AttributeError from ``gpa_stop``."""
    import json

    from convergence_core.run_checks import check_run_files

    run = make_synthetic_run(tmp_path / "runs", n=12)
    path = run.layout.gpa_json
    info = json.loads(path.read_text())
    for field, value in (("models", "ghost"), ("layers", "nolayer")):
        path.write_text(json.dumps({**info, field: [*info[field][:-1], value]}))
        fresh = load_run(run.path)
        with pytest.raises(CacheFormatError, match="does not hold.*delete the run's GPA folder"):
            fresh.gpa
        with pytest.raises(CacheFormatError, match="does not hold"):
            check_run_files(fresh)
    path.write_text("[1, 2]")
    with pytest.raises(CacheFormatError, match="not an object.*delete the run's GPA folder"):
        load_run(run.path).gpa_stop
