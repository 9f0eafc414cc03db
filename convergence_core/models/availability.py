"""Are a model's weights on this machine, or downloadable now? Checked without loading the model,
and without waiting on a network that is not there.

How the libraries decide (huggingface_hub 1.x, timm 1.0, transformers 5, as installed here):

* huggingface_hub reads ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) **once, at import**, into
  ``huggingface_hub.constants.HF_HUB_OFFLINE``; ``huggingface_hub.is_offline_mode()`` returns it,
  and transformers asks the same function. Offline, every HTTP request raises
  ``OfflineModeIsEnabled`` at once and downloads are served from the cache only
  (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``; ``HF_HOME`` moves it).
* Online, ``hf_hub_download`` first sends a HEAD request (timeout ``HF_HUB_ETAG_TIMEOUT``, 10 s)
  without retries; when that fails with a network error and the file is not cached, it retries
  with back-off, 5 times (1 + 2 + 4 + 8 + 8 = 23 s measured here where DNS fails at once; up to
  minutes where connections hang until their timeouts). timm's ``create_model(pretrained=True)``
  downloads through ``hf_hub_download`` (``model.safetensors`` first, then the ``.bin``: twice
  that), or through ``torch.hub`` (urllib, no timeout) for weights that only have a URL.

So this module probes the hub **once per process** (:func:`hub_reachable`: one HEAD request to
``huggingface_hub.constants.ENDPOINT`` with urllib, which honours ``HTTPS_PROXY``, in a thread
joined after :data:`HUB_PROBE_SECONDS`, so
that even a DNS lookup that hangs cannot hold us). When the hub cannot be reached, huggingface_hub
is switched to offline mode for the rest of the process (``constants.HF_HUB_OFFLINE = True`` and
``HF_HUB_OFFLINE=1`` in the environment for libraries imported later): every later lookup is
answered from the cache at once instead of retrying for half a minute.

Each model family has a cheap check returning why its weights are not available (or None):
an installed package, a local weights path, or the files in the Hugging Face / torch hub cache;
when files are not cached, a reachable hub counts as available (they will be downloaded).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "HUB_PROBE_SECONDS",
    "folder_weights_problem",
    "hub_reachable",
    "hub_weights_problem",
    "package_problem",
    "timm_weights_problem",
    "url_reachable",
]

#: How long the one reachability probe of the hub may take before the hub counts as unreachable.
HUB_PROBE_SECONDS = 5.0
#: Files that make a transformers model folder or hub snapshot loadable (any one of them).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

#: what to do when a model's tokenizer files are missing (transformers then silently builds a
#: tokenizer of a few special tokens that reads every word as [UNK]: ``LanguageEncoder`` refuses
#: a tokenizer far smaller than the model's vocabulary)
TOKENIZER_FIX = (
    "save the model's tokenizer into its folder: AutoTokenizer.from_pretrained(<hub id>)"
    ".save_pretrained(folder)"
)

_probe_lock = threading.Lock()
_probed: dict[str, bool] = {}  # scheme://host -> reachable, once per process


def _offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Switch huggingface_hub (and transformers, which asks it) to offline mode in this process."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def url_reachable(url: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the server of ``url`` answers a HEAD request within ``timeout`` seconds (any HTTP
    status counts). Asked once per server and process; the request runs in a daemon thread, so a
    hanging DNS lookup or connection costs at most ``timeout``."""
    origin = _origin(url)
    with _probe_lock:
        if origin in _probed:
            return _probed[origin]
        answer: list[bool] = []

        def probe() -> None:
            request = urllib.request.Request(origin, method="HEAD")
            try:
                with urllib.request.urlopen(request, timeout=timeout):  # honours *_PROXY
                    answer.append(True)
            except urllib.error.HTTPError:  # the server answered (with an error status)
                answer.append(True)
            except Exception:  # DNS failure, refused, TLS, timeout: all mean "not usable now"
                answer.append(False)

        thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
        thread.start()
        thread.join(timeout)
        _probed[origin] = bool(answer and answer[0])
        return _probed[origin]


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face hub can be used now; switches to offline mode when it cannot.

    False at once in offline mode (``HF_HUB_OFFLINE``); otherwise one probe per process of
    ``huggingface_hub.constants.ENDPOINT`` (see the module docstring).
    """
    if _offline_mode():
        return False
    from huggingface_hub import constants

    reachable = url_reachable(constants.ENDPOINT, timeout)
    if not reachable:
        go_offline()
    return reachable


def _hub_unreachable_cause() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE") == "1" and _origin(constants.ENDPOINT) in _probed:
        return f"the hub {constants.ENDPOINT} cannot be reached from here"
    return "offline mode is on (HF_HUB_OFFLINE)"


def _hub_cached(repo_id: str, filenames: Sequence[str], revision: str | None = None) -> bool:
    """Whether any of ``filenames`` of the hub repo is in the Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
        except Exception:  # not a valid repo id / file name: not cached
            return False
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False


def hub_weights_problem(
    repo_id: str, filenames: Sequence[str], revision: str | None = None, *, also: Sequence[str] = ()
) -> str | None:
    """Why the hub files are not available: None when one of ``filenames`` (and every file of
    ``also``) is cached, or when the hub can be reached (they will be downloaded)."""
    from huggingface_hub import constants

    if _hub_cached(repo_id, filenames, revision) and all(
        _hub_cached(repo_id, [name], revision) for name in also
    ):
        return None
    if hub_reachable():
        return None
    return (
        f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"{_hub_unreachable_cause()}"
    )


def folder_weights_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why ``folder`` is not a transformers model folder (config.json + weight files), or None."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return f"{path} is not a folder (pass a model folder written by save_pretrained)"
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not (path / "config.json").is_file() or not has_weights:
        return (
            f"folder {path} lacks config.json or weight files (*.safetensors / *.bin); it must be "
            "a model folder written by save_pretrained, tokenizer files included"
        )
    return None


def package_problem(module: str, pip_name: str) -> str | None:
    """Why the weights package ``module`` cannot be used (not installed), or None."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return f"package {pip_name} is not installed (pip install {pip_name})"


def timm_weights_problem(timm_name: str, weights: str | None = None) -> str | None:
    """Why timm cannot get pretrained weights for ``timm_name`` now, or None.

    Mirrors timm's choice of source (``_resolve_pretrained_source``): a local file, else the hub
    (``hf_hub_id``, safetensors or .bin), else the URL through torch hub's checkpoint folder.
    """
    if weights is not None:
        return None if os.path.isfile(weights) else f"weights file {weights} does not exist"
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(timm_name):
        return f"timm does not know the model {timm_name!r} (list names with timm.list_models())"
    cfg = get_pretrained_cfg(timm_name)
    if cfg is None:
        return f"timm has no pretrained weights for {timm_name!r}"
    if getattr(cfg, "file", None):
        return None if os.path.isfile(cfg.file) else f"weights file {cfg.file} does not exist"
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from .timm_vit import _hub_filenames

        repo_id, _, revision = hub_id.partition("@")
        return hub_weights_problem(
            repo_id, _hub_filenames(getattr(cfg, "hf_hub_filename", None)), revision or None
        )
    url = getattr(cfg, "url", None)
    if url:
        from timm.models._hub import get_cache_dir

        cached = Path(get_cache_dir()) / Path(urllib.parse.urlsplit(url).path).name
        if cached.is_file() or url_reachable(url):
            return None
        return f"{cached} is not cached and {_origin(url)} cannot be reached from here"
    return f"timm has no pretrained weights for {timm_name!r}"
