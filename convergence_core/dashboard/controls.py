"""A row of a page's controls (one-of and any-of choices, a text filter, a switch, a whole number
in a box or on a slider) drawn by the browser as one element.

Streamlit draws each kind of widget with its own code, which the browser loads, runs and lays out
the first time a page shows that kind: the Stimuli page's row of two radios, a text box and a
toggle, with the page-number box below, made its first visit 0.18 s slower than the same page
without them (1.78x a bare Streamlit page against 1.39x, 11 rounds in one run,
``benchmarks/bench_dashboard.py --beside``). Drawn here as native HTML controls inside one
``st.components.v2`` component (the gallery's cards are one too), the page took 1.29x against
1.68x (``docs/PERFORMANCE.md``). The Alignment lab's models, sets, metric and k are rows too.

The row is *controlled*: Python holds every value in the session (under each field's ``key``,
and in the URL's view for the fields bound to it), the row shows those values, and a change in
the browser sets the component's ``change`` trigger to ``{field: new value}`` (with any earlier
change no rerun has shown yet: Streamlit keeps one value per trigger). The callback
(:func:`store_change`) checks each value against its field (one of the options, a whole
number in range, text, a switch that is not disabled) and stores it; anything else is ignored.
So a page reads its values from the session, before or after drawing the row, and another page
(or the URL) may change them.

Safety: labels, options, help and placeholders are written with ``textContent`` and attributes
(never as HTML); a typed text is only ever compared with captions and ids.

What the browser receives (the component's ``data``)::

    {"row": "stimuli-controls", "fields": [
        {"kind": "choice", "name": "score", "label": "Rank by", "help": "...",
         "key": "w_score", "view": "score",  # where the value is kept (not used by the browser)
         "options": ["mean", "pc1"], "labels": ["mean residual", "PC1 score"], "value": "mean",
         "disabled": false, "width": 1.0},
        {"kind": "text", ..., "value": "", "placeholder": "e.g. dog"},
        {"kind": "switch", ..., "value": false},
        {"kind": "number", ..., "value": 1, "low": 1, "high": 40},  # also "slider"
        {"kind": "many", ..., "options": ["a", "b"], "value": ["a"]}]}
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import streamlit as st

from . import dom, state

#: Name of the component (unique in the app)
COMPONENT = "convergence_controls"
#: The trigger a change in the browser sets: ``{field name: new value}`` for every change whose
#: rerun the browser has not yet shown (two changes before a rerun would otherwise lose one)
TRIGGER = "change"
#: Longest text a text field stores (a filter; longer input is cut there)
TEXT_LIMIT = 1_000

Kind = Literal["choice", "many", "text", "switch", "number", "slider"]


@dataclass(frozen=True)
class Field:
    """One control of a row.

    ``kind``: ``choice`` (one of ``options``, shown as ``labels``: a radio group), ``many`` (any
    of ``options``: a row of chips, the value a list in the options' order), ``text`` (a text
    box, committed on Enter or when it loses focus), ``switch`` (on/off), ``number`` (a whole
    number from ``low`` to ``high`` in a box) or ``slider`` (the same on a slider). ``key``: the
    session key holding the value; ``view``: the :class:`state.View` field (so the URL) that
    holds it too, or "". ``width``: the field's share of the row (as ``st.columns``' widths).
    """

    kind: Kind
    name: str
    label: str
    value: Any
    key: str
    view: str = ""
    help: str = ""
    options: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    placeholder: str = ""
    low: int = 0
    high: int = 0
    disabled: bool = False
    width: float = 1.0

    def checked(self, value: object) -> tuple[bool, Any]:
        """``(ok, value)``: ``value`` as this field stores it, or ``(False, None)`` when the field
        cannot take it (not an option, not a whole number, a disabled field...)."""
        if self.disabled:
            return False, None
        if self.kind == "choice":
            return (True, value) if isinstance(value, str) and value in self.options else (
                False, None)
        if self.kind == "many":
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                return False, None
            if not set(value) <= set(self.options):
                return False, None
            return True, [option for option in self.options if option in set(value)]
        if self.kind == "text":
            return (True, value[:TEXT_LIMIT]) if isinstance(value, str) else (False, None)
        if self.kind == "switch":
            return (True, value) if isinstance(value, bool) else (False, None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False, None
        if value != value or value in (float("inf"), float("-inf")):  # NaN, ±inf
            return False, None
        return True, min(max(int(round(value)), self.low), self.high)


def choice(
    name: str, label: str, options: Sequence[str], value: str, *, key: str,
    labels: Callable[[str], str] = str, **extra: Any,
) -> Field:
    """A one-of choice (a radio group): ``options`` shown as ``labels(option)``."""
    return Field("choice", name, label, value, key, options=tuple(options),
                 labels=tuple(labels(o) for o in options), **extra)


def many(
    name: str, label: str, options: Sequence[str], value: Sequence[str], *, key: str,
    labels: Callable[[str], str] = str, **extra: Any,
) -> Field:
    """Any of ``options`` (a row of chips): ``value`` those chosen, shown as ``labels(option)``."""
    chosen = set(value)
    return Field("many", name, label, tuple(o for o in options if o in chosen), key,
                 options=tuple(options), labels=tuple(labels(o) for o in options), **extra)


def text(name: str, label: str, value: str, *, key: str, **extra: Any) -> Field:
    """A text box (committed on Enter or when it loses focus)."""
    return Field("text", name, label, value, key, **extra)


def switch(name: str, label: str, value: bool, *, key: str, **extra: Any) -> Field:
    """An on/off switch."""
    return Field("switch", name, label, bool(value), key, **extra)


def number(name: str, label: str, value: int, low: int, high: int, *, key: str,
           **extra: Any) -> Field:
    """A whole number from ``low`` to ``high`` (a number box with steps of 1)."""
    return Field("number", name, label, int(value), key, low=int(low), high=int(high), **extra)


def slider(name: str, label: str, value: int, low: int, high: int, *, key: str,
           **extra: Any) -> Field:
    """A whole number from ``low`` to ``high`` on a slider (its value shown beside it)."""
    return Field("slider", name, label, int(value), key, low=int(low), high=int(high), **extra)


def bound_value(
    session_state: MutableMapping[str, Any], view: state.View, name: str,
    coerce: Callable[[Any], Any] = lambda value: value,
) -> Any:
    """The value of the view's field ``name`` for a row's field bound to it (``coerce``: e.g.
    clamped into the field's range), stored back in the view and under ``w_<name>``, where the
    other pages' widgets of the same view field (:func:`state.bind_widget`) read it."""
    value = coerce(getattr(view, name))
    setattr(view, name, value)
    session_state[state.WIDGET_PREFIX + name] = value
    return value


def bounded_value(
    session_state: MutableMapping[str, Any], view: state.View, name: str, low: int, high: int
) -> tuple[int, int | None]:
    """:func:`bound_value` for a whole number whose range ``[low, high]`` depends on other
    choices (k must stay below the smallest set). A value above ``high`` is used as ``high`` for
    now but not forgotten: the view (so the URL) keeps it until the user changes the field, and it
    comes back once the range allows (as :func:`state.bind_bounded_int` does for a widget).

    Returns ``(value, requested)``: the value to use, and the view's value when it was lowered
    (else None)."""
    key = state.WIDGET_PREFIX + name
    # the view holds the number asked for: another page's widget of it (state.bind_bounded_int,
    # the Paper page's k) reads it under w_<name> and lowers it for its own range; a note that
    # widget left of a number it lowered is the view's business now
    session_state.pop(state.CLAMPED_PREFIX + key, None)
    requested = int(getattr(view, name))
    value = min(max(low, requested), high)
    session_state[key] = max(low, requested)
    if requested > high:
        return value, requested
    setattr(view, name, value)
    return value, None


def store_change(
    session_state: MutableMapping[str, Any], component_key: str, fields: Sequence[Field]
) -> None:
    """The callback of a change in the row keyed ``component_key``: each field the trigger names
    (``{name: value}``, every change the browser has not yet seen a rerun of) takes its new value
    if it can (:meth:`Field.checked`), under its ``key`` and in the view for a field bound to
    it; anything else is ignored."""
    changes = (session_state.get(component_key) or {}).get(TRIGGER)
    if not isinstance(changes, dict):
        return
    named = {f.name: f for f in fields}
    for name, sent in changes.items():
        target = named.get(name) if isinstance(name, str) else None
        if target is None:
            continue
        ok, value = target.checked(sent)
        if not ok:
            continue
        session_state[target.key] = value
        if target.view:
            view = session_state.get(state.VIEW_KEY)
            if isinstance(view, state.View):
                setattr(view, target.view, value)


#: The row's code: builds the controls once per set of fields (names, kinds, options, labels),
#: then on every rerun sets their values from ``data``; a committed change sets the ``change``
#: trigger (with the changes no rerun has shown yet). Text only ever goes in through
#: ``textContent`` and attributes. While a control the user is still on (focused) waits for the
#: rerun of its last change, the rerun of an earlier one does not set it back (keys pressed or
#: − / + clicked faster than the page reruns).
CONTROLS_JS = """
export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
""" + dom.MAKE_JS + """
  const layout = JSON.stringify(data.fields.map((f) => [
    f.kind, f.name, f.label, f.help, f.options, f.labels, f.placeholder]));
  let row = parentElement.querySelector('.controls');
  if (!row || row.dataset.layout !== layout) {
    const old = row;
    row = make('div', 'controls');
    row.dataset.layout = layout;
    row.pending = old ? old.pending : new Map();  // field name -> value sent, not yet shown
    row.sentAt = old ? old.sentAt : new Map();  // field name -> reruns drawn when it was sent
    row.renders = old ? old.renders : 0;
    if (old) old.replaceWith(row);
    else parentElement.appendChild(row);
    data.fields.forEach((field, index) => {
      const id = `control-${index}`;
      const box = make('div', `field ${field.kind}`);
      box.dataset.name = field.name;
      // every change no rerun has shown yet goes with each trigger: Streamlit keeps only a
      // trigger's last value when two are set before the page hears of the first
      const send = (value) => {
        row.pending.set(field.name, value);
        row.sentAt.set(field.name, row.renders);
        setTriggerValue('change', Object.fromEntries(row.pending));
      };
      // leaving a control whose change a rerun has answered since (with another value: the
      // server kept it in range, or the range moved) shows the server's value: Streamlit
      // does not redraw a row whose data did not change, so nothing else would
      box.addEventListener('focusout', (event) => {
        if (box.contains(event.relatedTarget) || !row.pending.has(field.name)) return;
        if (row.renders > row.sentAt.get(field.name)) {
          row.pending.delete(field.name);
          row.show(box, row.last.fields[index]);
        }
      });
      // a whole number typed or slid: rounded and kept in the latest rerun's range
      const whole = (input) => {
        const typed = Number(input.value);
        if (input.value === '' || !Number.isFinite(typed)) return null;
        return Math.min(Number(input.max), Math.max(Number(input.min), Math.round(typed)));
      };
      // the label, then its help as a "?" whose tooltip and accessible name are the help text
      const head = make('div', 'head');
      const title = make(['choice', 'many'].includes(field.kind) ? 'span' : 'label', 'label',
        field.label);
      title.id = `${id}-label`;
      if (title.tagName === 'LABEL') title.htmlFor = id;
      head.appendChild(title);
      if (field.help) {
        const help = make('span', 'help', '?');
        help.title = field.help;
        help.tabIndex = 0;
        help.setAttribute('role', 'img');
        help.setAttribute('aria-label', field.help);
        help.id = `${id}-help`;
        head.appendChild(help);
      }
      if (field.kind === 'switch') {
        const input = make('input');
        input.type = 'checkbox';
        input.id = id;
        input.setAttribute('role', 'switch');
        input.onchange = () => send(input.checked);
        const line = make('div', 'line');
        line.appendChild(input);
        line.appendChild(head);
        box.appendChild(line);
      } else if (field.kind === 'choice' || field.kind === 'many') {
        box.appendChild(head);
        const options = make('div', 'options');
        options.setAttribute('role', field.kind === 'choice' ? 'radiogroup' : 'group');
        options.setAttribute('aria-labelledby', title.id);
        field.options.forEach((option, i) => {
          const line = make('label', field.kind === 'choice' ? 'line' : 'line chip');
          const input = make('input');
          input.type = field.kind === 'choice' ? 'radio' : 'checkbox';
          input.name = `${field.name}-${index}`;
          input.value = option;
          input.onchange = () => {
            if (field.kind === 'choice') {
              if (input.checked) send(option);
              return;
            }
            send([...options.querySelectorAll('input')].filter((o) => o.checked)
              .map((o) => o.value));
          };
          line.appendChild(input);
          line.appendChild(make('span', '', field.labels[i]));
          options.appendChild(line);
        });
        box.appendChild(options);
      } else {
        box.appendChild(head);
        const line = make('div', 'line');
        const input = make('input');
        input.id = id;
        line.appendChild(input);
        if (field.kind === 'text') {
          input.type = 'text';
          input.placeholder = field.placeholder;
          input.onchange = () => send(input.value);
        } else {
          input.type = field.kind === 'slider' ? 'range' : 'number';
          input.step = 1;
          if (field.kind === 'slider') {  // its ends either side, its value after them
            line.prepend(make('span', 'end low'));
            line.appendChild(make('span', 'end high'));
            const shown = make('output', 'value');
            shown.htmlFor = id;
            input.oninput = () => { shown.textContent = input.value; };
            line.appendChild(shown);
          }
          // the value last sent (its rerun not yet shown), else the last rerun's
          const latest = () => (row.pending.has(field.name)
            ? String(row.pending.get(field.name)) : input.dataset.value);
          input.onchange = () => {
            const value = whole(input);
            if (value === null) {  // not a number: the latest value comes back
              input.value = latest();
              return;
            }
            input.value = String(value);
            if (String(value) !== latest()) send(value);
          };
          if (field.kind === 'number') {  // − and + beside the box, as Streamlit's number box
            [['−', -1, 'Decrease'], ['+', 1, 'Increase']].forEach(([text, step, verb]) => {
              const button = make('button', 'step', text);
              button.type = 'button';
              button.dataset.step = step;
              button.setAttribute('aria-label', `${verb} ${field.label}`);
              button.onclick = () => {
                input.value = String(Number(latest()) + step);
                input.onchange();
              };
              line.appendChild(button);
            });
          }
        }
        box.appendChild(line);
      }
      if (field.help) {  // the help describes the control (screen readers read it after it)
        box.querySelectorAll('input, [role=radiogroup], [role=group]').forEach(
          (node) => node.setAttribute('aria-describedby', `${id}-help`));
      }
      row.appendChild(box);
    });
  }
  // a box shows its field of the last rerun: range, state and value, except the value of a
  // control the user is still on while it waits for the rerun of their last change
  row.show = (box, field) => {
    let keep = false;
    if (row.pending.has(field.name)) {
      const same = JSON.stringify(row.pending.get(field.name)) === JSON.stringify(field.value);
      keep = !same && box.contains(box.getRootNode().activeElement);
      if (!keep) row.pending.delete(field.name);
    }
    box.style.flexGrow = field.width;
    box.classList.toggle('disabled', field.disabled);
    box.querySelectorAll('input').forEach((input) => {
      input.disabled = field.disabled;
      if (field.kind === 'number' || field.kind === 'slider') {
        input.min = field.low;
        input.max = field.high;
      }
      if (['text', 'number', 'slider'].includes(field.kind)) {
        input.dataset.value = String(field.value);
      }
      if (keep) return;
      if (field.kind === 'choice') input.checked = input.value === field.value;
      else if (field.kind === 'many') input.checked = field.value.includes(input.value);
      else if (field.kind === 'switch') input.checked = field.value;
      else if (input.value !== String(field.value)) input.value = String(field.value);
    });
    const shown = box.querySelector('output');
    const input = box.querySelector('input');
    if (shown) shown.textContent = input.value;
    const [low, high] = [box.querySelector('.end.low'), box.querySelector('.end.high')];
    if (low) low.textContent = String(field.low);
    if (high) high.textContent = String(field.high);
    box.querySelectorAll('button.step').forEach((button) => {  // none past either end
      const value = Number(input.value);
      const past = Number(button.dataset.step) < 0 ? value <= field.low : value >= field.high;
      button.disabled = field.disabled || past;
    });
  };
  row.renders = (row.renders || 0) + 1;
  row.last = data;
  data.fields.forEach((field, index) => row.show(row.children[index], field));
  row.dataset.drawn = '1';  // the browser test and benchmark wait for this
}
"""

#: The controls' look, from Streamlit's theme variables (light and dark themes alike)
CONTROLS_CSS = """
.controls { display: flex; flex-wrap: wrap; gap: 0.75rem 1rem; font-family: var(--st-font);
  color: var(--st-text-color); font-size: var(--st-base-font-size, 1rem); }
.field { flex: 1 1 12rem; min-width: 0; margin: 0; padding: 0; border: none;
  display: flex; flex-direction: column; gap: 0.25rem; }
.head { display: flex; align-items: center; gap: 0.3rem; font-size: 0.875rem; }
.switch .head { gap: 0.3rem; }
.help { display: inline-flex; width: 1rem; height: 1rem; border-radius: 50%; font-size: 0.7rem;
  align-items: center; justify-content: center; cursor: help; border: 1px solid currentColor;
  color: color-mix(in srgb, var(--st-text-color) 60%, transparent); }
.head { position: relative; }
.help:focus-visible::after { content: attr(aria-label); position: absolute; top: 1.4rem;
  left: 0; z-index: 10; width: max-content; max-width: 100%; white-space: normal;
  padding: 0.4rem 0.6rem; border-radius: 0.4rem; font-size: 0.8rem; line-height: 1.4;
  background: var(--st-text-color); color: var(--st-background-color); }
.step { flex: none; width: 2.5rem; font: inherit; cursor: pointer; color: var(--st-text-color);
  background: var(--st-secondary-background-color); border: 1px solid transparent;
  border-radius: var(--st-base-radius, 0.5rem); }
.step:hover:not(:disabled), .step:focus-visible { border-color: var(--st-primary-color); }
.step:disabled { opacity: 0.4; cursor: not-allowed; }
.number .line { gap: 0.25rem; }
.options { display: flex; flex-wrap: wrap; gap: 0.25rem 1rem; min-height: 2.5rem;
  align-items: center; }
.line { display: inline-flex; align-items: center; gap: 0.4rem; cursor: pointer;
  font-size: 0.875rem; }
.switch .line { min-height: 2.5rem; margin-top: 1.3rem; }
input[type=radio] { accent-color: var(--st-primary-color); margin: 0; width: 1rem;
  height: 1rem; cursor: pointer; }
input[role=switch] { appearance: none; position: relative; flex: none; margin: 0;
  width: 2rem; height: 1.125rem; border-radius: 1rem; cursor: pointer; transition: 0.15s;
  background: color-mix(in srgb, var(--st-text-color) 25%, transparent); }
input[role=switch]::before { content: ""; position: absolute; top: 0.125rem; left: 0.125rem;
  width: 0.875rem; height: 0.875rem; border-radius: 50%; background: #fff; transition: 0.15s; }
input[role=switch]:checked { background: var(--st-primary-color); }
input[role=switch]:checked::before { left: 1rem; }
input[type=text], input[type=number] { font: inherit; font-size: 0.875rem; height: 2.5rem;
  box-sizing: border-box; width: 100%; padding: 0 0.75rem; color: var(--st-text-color);
  background: var(--st-secondary-background-color); border: 1px solid transparent;
  border-radius: var(--st-base-radius, 0.5rem); }
input[type=text]:focus, input[type=number]:focus { outline: none;
  border-color: var(--st-primary-color); }
.number { max-width: 20rem; }
.chip { border: 1px solid var(--st-border-color); border-radius: 1rem; padding: 0.2rem 0.7rem; }
.chip:has(input:checked) { border-color: var(--st-primary-color);
  color: var(--st-primary-color);
  background: color-mix(in srgb, var(--st-primary-color) 12%, transparent); }
.chip:has(input:checked) span::before { content: "✓ "; }
.chip input { position: absolute; opacity: 0; width: 0; height: 0; }
.chip:has(input:focus-visible) { outline: 2px solid var(--st-text-color); outline-offset: 2px; }
.text .line, .number .line, .slider .line { display: flex; width: 100%; min-height: 2.5rem; }
input[type=range] { flex: 1; min-width: 0; accent-color: var(--st-primary-color); }
.value { min-width: 2.5rem; text-align: right; font-variant-numeric: tabular-nums;
  font-weight: 600; }
.end { font-size: 0.75rem; opacity: 0.7; font-variant-numeric: tabular-nums; }
.disabled { opacity: 0.55; }
.disabled .line, .disabled input { cursor: not-allowed; }
"""

_component = st.components.v2.component(COMPONENT, js=CONTROLS_JS, css=CONTROLS_CSS)


def row(fields: Sequence[Field], *, key: str) -> None:
    """Draw ``fields`` as one row (one element) keyed ``key``; a change in the browser is stored
    by :func:`store_change` before the page reruns."""
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"a row's fields need distinct names; got {names}")
    _component(
        key=key,
        data={"row": key, "fields": [asdict(f) for f in fields]},
        on_change_change=lambda: store_change(st.session_state, key, fields),
    )
