"""Hostile text: a shared run's manifest, a model's name or a URL quoted on a page renders as
text, never as a link, a picture fetched from elsewhere, emphasis or bold.

* a model's ``modality`` read from ``manifest.json`` must be a name by the run writers' rule
  (``sources.check_modality``): pages quote it in captions, labels, radio options and axis titles;
* the "Best language layers unavailable" warning of the Stimuli page and the Alignment lab quotes
  the analysis's error, which names a language model as written;
* ``state.shown`` (a URL's value or a typed id quoted in a warning) escapes ``_``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from convergence_core.dashboard import state, widgets
from convergence_core.manifest import ManifestError
from convergence_core.run import list_runs, load_run
from tests.fixtures_runs import make_brain_run, make_synthetic_run
from tests.page_reading import shown
from tests.test_hostile_datasets import (  # noqa: F401 (hostile_names_cache: a fixture)
    HOSTILE_LANGUAGE,
    PAGES,
    _markdown_texts,
    _open,
    hostile_names_cache,
)

#: A modality written into a shared run's manifest by hand: a link and an outside picture
HOSTILE_MODALITY = "vis[clickV](http://example.com/v)"
#: A run name (or typed id) with Markdown bold and emphasis made of underscores
UNDERSCORES = "__pwned__ _x_"
#: An underscore that no backslash escapes (Markdown emphasis or bold)
BARE_UNDERSCORE = re.compile(r"(?<!\\)_")


def _set_modality(run_path: Path, model: str, modality: str) -> None:
    manifest_path = run_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["models"][model]["modality"] = modality
    manifest_path.write_text(json.dumps(manifest))


# -- 1: a model's modality in the manifest -----------------------------------------------------


def test_a_manifest_modality_with_markdown_is_refused_naming_model_field_and_fix(tmp_path):
    run = make_synthetic_run(tmp_path / "runs", n=12, name="shared")
    _set_modality(run.path, "vision-b", HOSTILE_MODALITY)
    with pytest.raises(ManifestError) as refused:
        load_run(run.path)
    message = str(refused.value)
    assert "models['vision-b']" in message  # the model
    assert "field 'modality'" in message and repr(HOSTILE_MODALITY) in message  # the field
    assert "e.g. 'ecog'" in message  # the names accepted
    assert "rerun the precompute that made it, or delete the run folder" in message  # the fix
    (info,) = list_runs(tmp_path / "runs")  # `runs` lists it as damaged, with the same reason
    assert info.damaged is not None and "field 'modality'" in info.damaged


@pytest.mark.parametrize("modality", ["ecog", "brain_v1", "brain", "fMRI-7T", "visoin"])
def test_a_manifest_modality_that_is_a_name_still_opens(tmp_path, modality):
    """Names by the writers' rule open; a near-miss of vision ('visoin'), which the writers now
    refuse, still opens, so a run written before that check keeps working."""
    run = make_brain_run(tmp_path / "runs" / "brain", n=16)
    _set_modality(run.path, "subj01", modality)
    assert load_run(run.path).modality("subj01") == modality
    assert [info.damaged for info in list_runs(tmp_path / "runs")] == [None]


@pytest.mark.parametrize("page", ["Home", "Alignment lab", "Universal space"])
def test_a_page_shows_a_refused_modality_as_text(tmp_path, monkeypatch, page):
    """The manifest altered between the page's listing of the runs and its opening of the run
    (a listed run's folder replaced meanwhile): the page says the run cannot be opened, naming
    the model, the field and the fix, as text: the modality's link is neither a link nor a
    picture. From the next rerun on the run is listed as damaged, so no page offers it."""
    from convergence_core.dashboard import data

    make_synthetic_run(tmp_path / "cache" / "runs", n=24, name="demo")
    at = _open(tmp_path / "cache", None, monkeypatch)  # Home, the run listed and opened
    really_open = data.open_run

    def open_altered(path):  # noqa: ANN001, ANN202
        _set_modality(Path(path), "vision-b", HOSTILE_MODALITY)
        return really_open(path)

    monkeypatch.setattr(data, "open_run", open_altered)
    if PAGES[page] is None:
        at.run(timeout=90)
    else:
        at.switch_page(PAGES[page]).run(timeout=90)
    assert not at.exception, at.exception
    errors = " ".join(shown(at.error))
    assert "Run 'demo' cannot be opened" in errors, errors
    assert f"models['vision-b']: field 'modality' is {HOSTILE_MODALITY!r}" in errors, errors
    assert "rerun the precompute that made it, or delete the run folder" in errors, errors
    rendered = _markdown_texts(at)
    assert not [text for text in rendered if "](http" in text or "[clickV]" in text], rendered
    at.run(timeout=90)  # the listing read again: the run is damaged, offered nowhere
    assert not at.exception, at.exception
    assert any("'demo' is no longer in the cache" in text for text in shown(at.warning))
    rendered = _markdown_texts(at)
    assert not [text for text in rendered if "](http" in text or "[clickV]" in text], rendered


def test_universal_space_names_the_chosen_modalities_as_text(tmp_path, monkeypatch):
    """Universal space with one modality chosen quotes the chosen modalities in its error: a
    name by the writers' rule with underscores at a word's edge ('x-_y_') is not emphasis."""
    run = make_brain_run(tmp_path / "cache" / "runs" / "brain", n=24)
    _set_modality(run.path, "subj01", "x-_y_")
    at = _open(tmp_path / "cache", None, monkeypatch)
    at.session_state["w_universal_models"] = ["subj01"]
    at.switch_page(PAGES["Universal space"]).run(timeout=90)
    assert not at.exception, at.exception
    (error,) = [e.value for e in at.error if "Pick at least two models" in e.value]
    assert "1 model(s) of x\\-\\_y\\_ modality" in error, error


# -- 2: the best language layers' error names a language model ----------------------------------


@pytest.mark.parametrize("page", ["Stimuli gallery", "Alignment lab"])
def test_the_best_language_layers_warning_shows_a_model_name_as_text(
    hostile_names_cache, monkeypatch, page  # noqa: F811
):
    """analyses.best_language_layers refuses a model without a defined CKNNA, naming it; the
    page's warning quotes that error as text."""
    from convergence_core.dashboard import data

    refusal = (
        f"language model {HOSTILE_LANGUAGE!r} has no defined CKNNA with the vision models at any "
        "of its layers (NaN: its features or theirs do not vary over the stimuli?); check its "
        "features, or leave it out of the run"
    )

    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ValueError(refusal)

    monkeypatch.setattr(data, "best_language_layer_table", refuse)
    at = _open(hostile_names_cache, PAGES[page], monkeypatch)
    assert not at.exception, at.exception
    warnings = [w.value for w in at.warning if "Best language layers unavailable" in w.value]
    assert warnings, [w.value for w in at.warning]
    assert not [w for w in warnings if "](http" in w], warnings
    assert any(f"Best language layers unavailable ({refusal})" in text
               for text in shown(at.warning)), shown(at.warning)


# -- 3: state.shown escapes underscores ---------------------------------------------------------


@pytest.mark.parametrize("text", [UNDERSCORES, "_" * 100, "a" * 38 + "_b_", "x" * 39 + "_"])
def test_shown_escapes_every_underscore_and_never_ends_in_a_backslash(text):
    quoted = state.shown(text)
    assert not BARE_UNDERSCORE.search(quoted), quoted
    assert not quoted.endswith("\\"), quoted
    assert "\\" not in quoted.replace("\\_", "")  # no escape but those of underscores
    visible = quoted.replace("\\_", "_")
    if len(text) <= 40:  # within the limit: the value as it is
        assert visible == text
    else:  # truncated to the limit (the last character "…"), then escaped
        assert len(visible) == 40 and visible == text[:39] + "…"


def test_shown_keeps_its_other_rules():
    assert state.shown("a*b*[c](http://x)") == "a?b??c??http???x?"
    assert state.shown("run-1.2 ok") == "run-1.2 ok"


def test_a_url_run_name_with_underscores_is_shown_as_text(
    hostile_names_cache, monkeypatch  # noqa: F811
):
    at = _open(hostile_names_cache, None, monkeypatch, {"run": UNDERSCORES})
    assert not at.exception, at.exception
    warnings = [w.value for w in at.warning if "is not a cached run" in w.value]
    assert warnings, [w.value for w in at.warning]
    assert not [w for w in warnings if BARE_UNDERSCORE.search(w)], warnings
    assert any(f"run='{UNDERSCORES}' is not a cached run" in text
               for text in shown(at.warning)), shown(at.warning)


def test_a_typed_stimulus_id_with_underscores_is_shown_as_text(
    hostile_names_cache, monkeypatch  # noqa: F811
):
    monkeypatch.setattr(widgets, "SELECT_ALL_LIMIT", 10)  # the id is typed, not picked
    at = _open(hostile_names_cache, None, monkeypatch)
    at.session_state[widgets.STIMULI_TAB_KEY] = widgets.DETAIL_TAB
    at.switch_page(PAGES["Stimuli gallery"]).run(timeout=90)
    at.text_input(key=widgets.INSPECT_KEY).set_value(UNDERSCORES).run(timeout=90)
    assert not at.exception, at.exception
    errors = [e.value for e in at.error if "No stimulus with id" in e.value]
    assert errors, [e.value for e in at.error]
    assert not [e for e in errors if BARE_UNDERSCORE.search(e)], errors
    assert any(f"No stimulus with id '{UNDERSCORES}' in this run" in text
               for text in shown(at.error)), shown(at.error)
