"""Many-to-many alignment: averaging helpers against loops, planted averaging gains with intervals
that exclude 0, and no gain where averaging cannot help."""

from __future__ import annotations

import numpy as np
import pytest

from convergence_core.many_to_many import (
    caption_averaging_effect,
    caption_count_curve,
    caption_mean,
    class_averaging_effect,
    single_caption,
)
from convergence_core.metrics import measure


def coco_like(rng, n=80, per_image=5, noise=1.5):
    """Images carry a latent Z; each caption is Z plus its own noise (captions interleaved)."""
    Z = rng.standard_normal((n, 6))
    images = Z @ rng.standard_normal((6, 10)) + 0.3 * rng.standard_normal((n, 10))
    owners = np.tile(np.arange(n), per_image)  # caption c belongs to image c % n
    rng.shuffle(owners)
    W = rng.standard_normal((6, 8))
    captions = Z[owners] @ W + noise * rng.standard_normal((owners.size, 8))
    unit = lambda F: F / np.linalg.norm(F, axis=1, keepdims=True)  # noqa: E731  (as prepare_features)
    return unit(images), unit(captions), owners


def test_caption_helpers_match_loops() -> None:
    rng = np.random.default_rng(0)
    _, captions, owners = coco_like(rng, n=10)
    mean = caption_mean(captions, owners)
    first = single_caption(captions, owners)
    drawn = single_caption(captions, owners, choice="random", seed=3)
    for i in range(10):
        mine = np.flatnonzero(owners == i)
        np.testing.assert_allclose(mean[i], captions[mine].mean(axis=0))
        np.testing.assert_array_equal(first[i], captions[mine[0]])
        assert any(np.array_equal(drawn[i], captions[c]) for c in mine)
    assert not np.array_equal(drawn, first)


@pytest.mark.parametrize("name", ["cka", "mutual_knn"])
def test_averaging_noisy_captions_improves_alignment(name: str) -> None:
    rng = np.random.default_rng(1)
    images, captions, owners = coco_like(rng, n=200)
    options = {"k": 5} if name == "mutual_knn" else {}
    effect = caption_averaging_effect(
        name, images, captions, owners, n_resamples=200, seed=2, **options
    )
    assert effect.one == pytest.approx(
        measure(name, images, single_caption(captions, owners), **options)
    )
    assert effect.averaged == pytest.approx(
        measure(name, images, caption_mean(captions, owners), **options)
    )
    assert effect.difference == pytest.approx(effect.averaged - effect.one)
    assert 0 < effect.lower < effect.difference < effect.upper
    assert effect.comparison == "captions" and effect.n_units == 200


def test_identical_captions_give_no_gain() -> None:
    rng = np.random.default_rng(3)
    images, captions, owners = coco_like(rng)
    captions = caption_mean(captions, owners)[owners]  # every caption of an image the same
    effect = caption_averaging_effect("cknna", images, captions, owners, n_resamples=50, k=5)
    assert effect.difference == 0.0 and effect.lower == 0.0 and effect.upper == 0.0


def test_caption_effect_on_a_subset_and_with_a_callable() -> None:
    rng = np.random.default_rng(4)
    images, captions, owners = coco_like(rng)
    rows = np.arange(0, 80, 2)
    effect = caption_averaging_effect(
        lambda X, Y: measure("cka", X, Y), images, captions, owners, rows, n_resamples=20
    )
    assert effect.averaged == pytest.approx(
        measure("cka", images[rows], caption_mean(captions, owners)[rows])
    )
    assert effect.n_units == 40
    with pytest.raises(ValueError, match="go with a metric name"):
        caption_averaging_effect(lambda X, Y: 0.0, images, captions, owners, k=5)


def test_a_k_too_large_for_a_half_sample_is_refused_before_any_score(monkeypatch) -> None:
    """16 images and k = 10: the full-set scores were computed first, and the first half-sample
    then failed with "k=10 is too large for the set of 8 stimuli" (from a review)."""
    from convergence_core import many_to_many

    rng = np.random.default_rng(5)
    images, captions, owners = coco_like(rng, n=16)

    def no_score(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a score was computed before k was checked")

    monkeypatch.setattr(many_to_many, "measure", no_score)
    for metric in ("mutual_knn", "cknna"):
        with pytest.raises(ValueError, match=(
            r"k=10 neighbours need more than 10 images in each half-sample of the interval, "
            r"which holds 8 of the 16: pass k at most 7, or at least 22 images"
        )):
            caption_averaging_effect(metric, images, captions, owners, k=10)
    monkeypatch.undo()
    effect = caption_averaging_effect("mutual_knn", images, captions, owners, k=7, n_resamples=5)
    assert np.isfinite(effect.one)


def test_class_averaging_planted_gain() -> None:
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((150, 6))
    labels = np.repeat(np.arange(150), 4)
    images = centres[labels] @ rng.standard_normal((6, 9)) + 2.0 * rng.standard_normal((600, 9))
    texts = centres[labels] @ rng.standard_normal((6, 7)) + 2.0 * rng.standard_normal((600, 7))
    effect = class_averaging_effect("cka", images, texts, labels, n_resamples=200)
    # each class's mean, class by class (classes sorted)
    image_means = np.stack([images[labels == c].mean(axis=0) for c in np.unique(labels)])
    text_means = np.stack([texts[labels == c].mean(axis=0) for c in np.unique(labels)])
    first = np.searchsorted(labels, np.arange(150))
    assert effect.one == pytest.approx(measure("cka", images[first], texts[first]))
    assert effect.averaged == pytest.approx(measure("cka", image_means, text_means))
    assert effect.lower > 0 and effect.n_units == 150 and effect.comparison == "classes"
    with pytest.raises(ValueError, match="single member"):
        class_averaging_effect("cka", images, texts, np.arange(600))
    # an ImageNet sample: 998 names for 1,000 classes of one image each ('crane' the bird and the
    # machine): two merged classes are not class averaging
    with pytest.raises(ValueError, match="596 of 598 classes have a single member"):
        class_averaging_effect("cka", images, texts, np.r_[0, 0, 1, 1, np.arange(2, 598)])
    # two classes: no interval over classes can be drawn (a table's x/y label column)
    with pytest.raises(ValueError, match="compares 2 classes; it needs at least 8"):
        class_averaging_effect("cka", images, texts, np.arange(600) % 2)


def test_stimuli_without_a_label_take_no_part_in_class_averaging() -> None:
    """A label column with a missing value (None or NaN beside strings) raised TypeError in
    np.unique; those stimuli are left out, the rest averaged as before."""
    rng = np.random.default_rng(6)
    labels = np.array([f"c{i % 12}" for i in range(96)], dtype=object)
    images, texts = rng.standard_normal((96, 9)), rng.standard_normal((96, 7))
    missing = np.array([3, 40, 77])
    expected = class_averaging_effect(
        "cka", np.delete(images, missing, 0), np.delete(texts, missing, 0),
        np.delete(labels, missing), n_resamples=20,
    )
    for gap in (None, np.nan):
        with_gaps = labels.copy()
        with_gaps[missing] = gap
        effect = class_averaging_effect("cka", images, texts, with_gaps, n_resamples=20)
        assert effect == expected and effect.n_units == 12  # no class of the missing ones
    with pytest.raises(ValueError, match="no stimulus has a label"):
        class_averaging_effect("cka", images, texts, np.full(96, None))


def test_caption_count_curve_rises_and_ends_at_the_mean() -> None:
    rng = np.random.default_rng(6)
    images, captions, owners = coco_like(rng)
    curve = caption_count_curve("cka", images, captions, owners, n_draws=3, seed=1)
    assert sorted(curve.n_captions.unique()) == [1, 2, 3, 4, 5]
    means = curve.groupby("n_captions").value.mean()
    assert means.is_monotonic_increasing
    np.testing.assert_allclose(
        curve[curve.n_captions == 5].value,
        measure("cka", images, caption_mean(captions, owners)),
        rtol=1e-10,
    )
    with pytest.raises(ValueError, match="counts must lie in 1..5"):
        caption_count_curve("cka", images, captions, owners, counts=[6])


def test_owner_checks() -> None:
    captions = np.ones((4, 2))
    with pytest.raises(ValueError, match="1 images have no caption"):
        caption_mean(captions, np.array([0, 0, 2, 2]))
    with pytest.raises(ValueError, match="integer array"):
        caption_mean(captions, np.array([0.0, 1, 1, 0]))
    with pytest.raises(ValueError, match="choice must be"):
        single_caption(captions, np.array([0, 1, 1, 0]), choice="last")


def test_an_empty_label_is_no_label() -> None:
    """A data set's CSV gives a missing label as "" (datasets), a parquet column as None or NaN:
    all three are "no label", and "" formed a class of its own (a mean over unrelated stimuli)."""
    rng = np.random.default_rng(7)
    labels = np.array([f"c{i % 12}" for i in range(96)], dtype=object)
    images, texts = rng.standard_normal((96, 9)), rng.standard_normal((96, 7))
    missing = np.array([0, 12, 24, 36, 48, 60, 72, 84, 5])  # every c0, and one c5
    expected = class_averaging_effect(
        "cka", np.delete(images, missing, 0), np.delete(texts, missing, 0),
        np.delete(labels, missing), n_resamples=20,
    )
    assert expected.n_units == 11
    for gaps in (["", " ", None, np.nan, "", "", "", "", ""], [""] * 9):
        with_gaps = labels.copy()
        with_gaps[missing] = np.array(gaps, dtype=object)
        effect = class_averaging_effect("cka", images, texts, with_gaps, n_resamples=20)
        assert effect == expected and effect.sampled_from is None


def test_above_max_classes_a_seeded_sample_of_classes_is_compared() -> None:
    """Thousands of small classes: each score is exact k-NN over every class, ~2 × n_resamples
    scores per pair and metric. Above ``max_classes`` a sample of that many classes (seeded; every
    member of each) is compared, the same as comparing those classes' stimuli alone."""
    rng = np.random.default_rng(8)
    n_classes, members = 40, 3
    labels = np.repeat([f"k{i:02d}" for i in range(n_classes)], members).astype(object)
    centres = rng.standard_normal((n_classes, 6)).repeat(members, axis=0)
    images = (centres @ rng.standard_normal((6, 9)) + rng.standard_normal((120, 9))).astype(
        np.float32
    )
    texts = centres @ rng.standard_normal((6, 7)) + rng.standard_normal((120, 7))
    labels[[1, 50]] = None  # still left out
    effect = class_averaging_effect(
        "cknna", images, texts, labels, n_resamples=20, seed=4, max_classes=16, k=3
    )
    kept = np.sort(np.random.default_rng(4).choice(n_classes, 16, replace=False))
    classes = np.array([f"k{i:02d}" for i in range(n_classes)])[kept]
    rows = np.flatnonzero(np.isin(labels.astype(str), classes))
    expected = class_averaging_effect(
        "cknna", images[rows], texts[rows], labels[rows], n_resamples=20, seed=4, k=3
    )
    assert effect.n_units == 16 and effect.sampled_from == n_classes
    assert (effect.one, effect.averaged, effect.lower, effect.upper) == (
        expected.one, expected.averaged, expected.lower, expected.upper
    )
    # at or under the cap: every class, as before
    full = class_averaging_effect("cknna", images, texts, labels, n_resamples=20, seed=4, k=3)
    assert class_averaging_effect(
        "cknna", images, texts, labels, n_resamples=20, seed=4, max_classes=40, k=3
    ) == full and full.n_units == 40 and full.sampled_from is None
    with pytest.raises(ValueError, match="max_classes must be at least 8"):
        class_averaging_effect("cka", images, texts, labels, max_classes=4)


def test_progress_hears_every_resample_and_changes_no_number() -> None:
    """The report's progress lines: ``progress(done, n_resamples)`` after each resample of the
    interval, in order; the effect is the same as without it (same seed, same numbers)."""
    rng = np.random.default_rng(7)
    images, captions, owners = coco_like(rng, n=40)
    heard: list[tuple[int, int]] = []
    quiet = caption_averaging_effect("cka", images, captions, owners, n_resamples=25, seed=3)
    told = caption_averaging_effect(
        "cka", images, captions, owners, n_resamples=25, seed=3,
        progress=lambda done, total: heard.append((done, total)),
    )
    assert told == quiet
    assert heard == [(done, 25) for done in range(1, 26)]
    labels = np.repeat(np.arange(10), 4)
    texts = images @ rng.standard_normal((10, 7)) + rng.standard_normal((40, 7))
    heard.clear()
    quiet = class_averaging_effect("cka", images, texts, labels, n_resamples=12, seed=1)
    told = class_averaging_effect(
        "cka", images, texts, labels, n_resamples=12, seed=1,
        progress=lambda done, total: heard.append((done, total)),
    )
    assert told == quiet
    assert heard == [(done, 12) for done in range(1, 13)]


def test_caption_mean_divides_each_image_by_its_own_caption_count() -> None:
    """Unequal caption counts: each image's mean is over its own captions (catches dividing every
    image by the largest count)."""
    captions = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    owners = np.array([0, 0, 1])  # image 0: two captions, image 1: one
    np.testing.assert_array_equal(caption_mean(captions, owners), [[2.0, 0.0], [0.0, 5.0]])
