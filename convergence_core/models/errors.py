"""Errors raised while resolving or loading a model."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["UnknownModelError", "WeightsUnavailableError", "cause_lines"]


class UnknownModelError(ValueError):
    """A model name is neither registered nor a recognisable timm / Hugging Face id."""


class WeightsUnavailableError(ValueError):
    """A model's weights are not on this machine and cannot be downloaded (e.g. offline).

    Attributes: ``model`` (the first model concerned), ``cause``, ``models`` (every model
    concerned: several when :meth:`combine` joined the errors of one check).
    """

    def __init__(self, model: str, cause: str, *, kind: str, installed: str | None = None) -> None:
        self.model = model
        self.cause = cause
        self.models: tuple[str, ...] = (model,)
        if kind == "timm":
            local = (
                f"load_encoder({model!r}, weights='/path/to/checkpoint.safetensors') (timm's "
                "pretrained_cfg_overlay=dict(file=...)); in precompute: --weights "
                f"{model}=/path/to/checkpoint.safetensors"
            )
        elif kind == "hf":
            local = (
                f"load_encoder({model!r}, weights='/path/to/model-folder') or the folder path as "
                "the model name (a folder written by save_pretrained); in precompute: --weights "
                f"{model}=/path/to/model-folder"
            )
        else:
            local = (
                f"load_encoder({model!r}, weights='/path/to/weights-file'); in precompute: "
                f"--weights {model}=/path/to/weights-file"
            )
        hint = (
            ""
            if installed is None
            else f" Did you mean {installed!r}? That model's weights are installed here."
        )
        super().__init__(
            f"weights for model {model!r} are not available here ({cause}).{hint} Supply them in "
            f"one of three ways: (1) hub access: run once with network so they are downloaded and "
            f"cached (unset HF_HUB_OFFLINE); (2) a local path: {local}; (3) an existing Hugging "
            "Face cache: set HF_HOME (or HF_HUB_CACHE) to a cache folder that already holds them"
        )

    @classmethod
    def combine(cls, errors: Sequence[WeightsUnavailableError]) -> WeightsUnavailableError:
        """One error for several models (the first one itself when there is only one)."""
        if not errors:
            raise ValueError("combine() needs at least one WeightsUnavailableError")
        if len(errors) == 1:
            return errors[0]
        combined = cls.__new__(cls)
        ValueError.__init__(
            combined,
            f"weights for {len(errors)} models are not available here:\n"
            + "\n".join(f"- {error}" for error in errors),
        )
        combined.model, combined.cause = errors[0].model, errors[0].cause
        combined.models = tuple(model for error in errors for model in error.models)
        return combined


def short_cause(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), with its type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def cause_lines(exc: BaseException, lines: int = 2) -> str:
    """The first ``lines`` non-empty lines of an exception's message, joined, with its type: a
    load error's heading and its first detail (torch's "Error(s) in loading state_dict for
    VisionTransformer:" says nothing without "size mismatch for head.weight: ...")."""
    text = [line.strip() for line in str(exc).splitlines() if line.strip()][:lines]
    joined = " ".join(text)
    return f"{type(exc).__name__}: {joined[:400]}" if joined else type(exc).__name__
