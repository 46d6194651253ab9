"""lmms-eval model ``vtprune``: an lmms-eval model class with its visual tokens pruned.

    python -m lmms_eval --model vtprune \\
        --model_args base=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf,method=fastervlm,keep_tokens=58 \\
        --tasks gqa

Registered through the ``lmms_eval.models`` entry-point group (see setup.cfg), so no fork or
edit of lmms-eval is needed. How it works:

- ``base`` names the lmms-eval model to wrap (``llava_hf``; any lmms-eval model whose ``.model``
  is a transformers model vtprune has an adapter for). The base builds the prompts exactly as
  it would unwrapped; its own keys (``pretrained``, ``device``, ``dtype``...) go to it.
- ``method=NAME`` / ``preset=NAME`` pick the pruning; every other key is an option of that
  method, coerced and validated by its config (lists as ``layers=8;16;24``). An unknown key is
  an error that lists the valid ones. ``method=none`` runs the unpruned model with the same
  measurements.
- Requests reach the base one at a time, so each sample's kept tokens, FLOPs and timings are
  its own, and a failure names its sample.
- Failures are loud: the base models catch exceptions inside ``generate`` and return an empty
  answer, and lmms-eval's CLI exits 0 after logging an exception. The wrapper keeps the error
  that ``generate`` raised, prints it, and raises :class:`EvalAbort` (a ``SystemExit`` with a
  message, which ``except Exception`` does not catch): the process exits 1.
- ``stats_path=FILE`` writes per-sample statistics (visual tokens in/kept, LLM prefill FLOPs,
  time to first token, decode tokens/s) and their summary as JSON after every request batch.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import inspect
import io
import json
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm

from vtprune.config import build_methods, parse_spec
from vtprune.evals.lmms.measure import GenerationProbe
from vtprune.evals.lmms.stats import sample_record, summarize
from vtprune.presets import get_preset, is_preset
from vtprune.registry import get_method

MODEL_ID = "vtprune"
NO_PRUNING = ("none", "baseline")

# keys the wrapper itself reads; everything else goes to the base model or the method
WRAPPER_OPTIONS = {
    "base": "lmms-eval model id to wrap (default llava_hf)",
    "method": "method name, preset name or spec string (none: no pruning)",
    "preset": "preset name (see `vtprune presets`)",
    "stats_path": "write per-sample statistics as JSON to this file",
    "examples": "keep the kept-token indices of this many samples (default 0)",
}
# keys lmms-eval adds on its own (--batch_size, --device, --max_batch_size): dropped if the base lacks them
LMMS_EVAL_INJECTED = ("batch_size", "max_batch_size", "device")


def manifests():
    """The ``lmms_eval.models`` entry point: chat and simple variants of the ``vtprune`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_ID,
            chat_class_path=f"{__name__}.VTPruneLMM",
            simple_class_path=f"{__name__}.VTPruneSimpleLMM",
        )
    ]


class EvalAbort(SystemExit):
    """Stops an evaluation with a message and exit status 1.

    A ``SystemExit`` so that it passes through lmms-eval's ``except Exception`` handlers, which
    would otherwise log the error and let the CLI exit 0.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# -- model_args -------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """``--model_args`` split into the base model's keys and the vtprune method."""

    base: str
    base_kwargs: dict
    method: str | None  # a registered method name, or None for no pruning
    options: dict = field(default_factory=dict)
    stats_path: str | None = None
    examples: int = 0

    @property
    def label(self) -> str:
        """A short name for this configuration, e.g. ``fastervlm:keep_tokens=58``."""
        if self.method is None:
            return "none"
        parts = [f"{k}={';'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in self.options.items()]
        return f"{self.method}:{','.join(parts)}" if parts else self.method


def init_params(cls) -> set[str]:
    """Keyword parameters of ``cls.__init__`` (without self, *args, **kwargs)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name for p in parameters if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _method_and_options(method: str | None, preset: str | None) -> tuple[str | None, dict]:
    """The registered method and the options fixed by ``method``/``preset`` before other keys."""
    if method is not None and preset is not None:
        raise ValueError(f"give method=... or preset=..., not both (got method={method!r}, preset={preset!r})")
    if method is None and preset is None:
        raise ValueError(
            "model_args need method=NAME or preset=NAME (method=none evaluates the unpruned model); "
            "e.g. method=fastervlm,keep_tokens=58 or preset=fastervlm-58"
        )
    if preset is not None:
        found = get_preset(str(preset))
        return found.method, dict(found.options)
    if str(method).lower() in NO_PRUNING:
        return None, {}
    stages = parse_spec(str(method))
    if len(stages) > 1:
        raise ValueError(
            f"the vtprune lmms-eval model takes one method; got the multi-stage spec {method!r}. "
            "Give one method (its options as separate keys) or a preset"
        )
    name, options = stages[0]
    if is_preset(name):
        found = get_preset(name)
        return found.method, {**found.options, **options}
    get_method(name)  # unknown method: an error that lists the known ones
    return name, options


_BASE_PROCESSOR = object()  # validation stand-in for the processor the wrapped model brings


def _scores_with_the_model(method: str, options: dict) -> bool:
    """A one-stage method that can score with the patched model (quota) and got neither processor nor scorer."""
    stages = parse_spec(method)
    if len(stages) != 1:
        return False
    name, spec_options = stages[0]
    fields = get_method(name).config_class.__dataclass_fields__
    return "processor" in fields and not {"processor", "scorer"} & {*spec_options, *options}


def parse_model_args(kwargs: dict, base: str, base_params: set[str]) -> ModelArgs:
    """Route ``--model_args`` keys to the wrapper, the base model and the method; validate them.

    Values arrive as lmms-eval parsed them (int, float, bool or str); the method's config coerces
    them to its field types. An unknown key raises ``ValueError`` naming every valid key. A key
    that both the base and the method take goes to the base (with a warning); the method's value
    then goes in the spec, ``method=NAME:key=VALUE``.
    """
    kwargs = dict(kwargs)
    method, options = _method_and_options(kwargs.pop("method", None), kwargs.pop("preset", None))
    stats_path = kwargs.pop("stats_path", None)
    examples = kwargs.pop("examples", 0)
    method_params = set(get_method(method).options()) if method is not None else set()
    shared = sorted(method_params & base_params & set(kwargs))
    if shared:  # the base's keys win; the method's value can still be given inside its spec
        warnings.warn(
            f"model_args key(s) {shared} go to base {base!r}; to set the method's option of the same name, "
            f"write it in the spec: method={method}:{shared[0]}=VALUE",
            stacklevel=2,
        )
    base_kwargs = {key: value for key, value in kwargs.items() if key in base_params}
    options.update({key: value for key, value in kwargs.items() if key in method_params and key not in base_params})
    unknown = sorted(set(kwargs) - base_params - method_params - set(LMMS_EVAL_INJECTED))
    if unknown:
        method_keys = ", ".join(sorted(method_params)) if method is not None else "(none: no method)"
        raise ValueError(
            f"unknown model_args key(s) {unknown}. Valid keys: vtprune: {', '.join(WRAPPER_OPTIONS)}; "
            f"method {method!r}: {method_keys}; base {base!r}: {', '.join(sorted(base_params))}"
        )
    if method is not None:
        brought = {"processor": _BASE_PROCESSOR} if _scores_with_the_model(method, options) else {}
        config = build_methods(method, {**options, **brought})[0].config  # coerces and validates now
        options = {key: getattr(config, key) for key in options}
    try:
        examples = int(examples)
    except (TypeError, ValueError):
        raise ValueError(f"examples must be an integer, got {examples!r}") from None
    return ModelArgs(base, base_kwargs, method, options, None if stats_path is None else str(stats_path), examples)


# -- output hygiene ---------------------------------------------------------------------------
_PROGRESS_LINE = re.compile(r"\d+%\|.*\|\s*\d+/\d+")


@contextlib.contextmanager
def _without_progress_bars():
    """Hide the base's one-request progress bars; pass everything else written to stderr through."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        for line in re.split(r"[\r\n]+", buffer.getvalue()):
            if line.strip() and not _PROGRESS_LINE.search(line):
                sys.stderr.write(line + "\n")


# -- the model --------------------------------------------------------------------------------
class VTPruneLMM(lmms):
    """lmms-eval model ``vtprune`` (chat variant; the instance follows its base's variant)."""

    is_simple = False

    def __init__(self, base: str = "llava_hf", **kwargs) -> None:
        super().__init__()
        self.handle = None
        self.probe = None
        self._runtime: list = []  # what the unpatched model needs to run (the adapter's runtime_patches)
        self.records: list[dict] = []
        self.examples: list[dict] = []
        try:
            self._setup(str(base), kwargs)
        except Exception as error:
            raise _abort(f"vtprune: cannot set up base={base!r}: {error}", error) from error

    def _setup(self, base: str, kwargs: dict) -> None:
        from lmms_eval.models import get_model, list_available_models

        known = list_available_models(include_aliases=True)
        if base not in known:  # lmms-eval's own error lists every model it has (~150 lines)
            close = difflib.get_close_matches(base, [name for name in known if name != MODEL_ID], n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise EvalAbort(
                f"vtprune: unknown base={base!r} (the lmms-eval model to wrap); {hint}"
                "`python -m lmms_eval models` lists them all"
            )
        base_cls = get_model(base, force_simple=type(self).is_simple)
        try:
            self.args = parse_model_args(kwargs, base, init_params(base_cls))
        except ValueError as error:  # a flag error: the message says it all, no traceback
            raise EvalAbort(f"vtprune: bad --model_args: {error}") from error
        base_kwargs = _with_device_map(base_cls, self.args.base_kwargs)
        try:
            self._base = base_cls(**base_kwargs)
        except OSError as error:  # transformers' "not a folder, not a Hub id": one line, no traceback
            pretrained = base_kwargs.get("pretrained")
            if pretrained is None or Path(str(pretrained)).expanduser().exists():
                raise
            offline = " (HF_HUB_OFFLINE is set: only cached Hub models load)" if _hub_offline() else ""
            raise EvalAbort(
                f"vtprune: pretrained={pretrained!r} is neither a folder nor a model id on the Hub{offline}: "
                "give the folder a model was saved to (save_pretrained) or a Hub id such as llava-hf/llava-1.5-7b-hf"
            ) from error
        self.is_simple = getattr(self._base, "is_simple", True)  # the requests the base understands
        self.task_dict = self._base.task_dict  # lmms-eval fills ours; the base reads its own
        self._rank, self._world_size = self._base.rank, self._base.world_size
        self.hf_model = self._base.model
        self.probe = _generation_probe(self.hf_model)
        self.keep_examples = self.args.examples
        try:
            self.configure(self.args.method, self.args.options)
        except (ValueError, TypeError) as error:  # vtprune's patch-time checks name the fix
            raise EvalAbort(
                f"vtprune: cannot apply {self.args.label} to {type(self.hf_model).__name__}: {error}"
            ) from error

    # -- configuration ----------------------------------------------------------------------------
    def configure(self, method: str | None, options: dict | None = None) -> None:
        """Switch pruning: remove the current patch, apply ``method`` (None: no pruning).

        The probe steps aside meanwhile (vtprune wraps ``generate`` on the instance too) and then
        times ``generate`` from outside the patch.
        """
        self.probe.detach()
        try:
            if self.handle is not None:
                self.handle.remove()
                self.handle = None
            self._remove_runtime_patches()
            self.records, self.examples = [], []
            self.method, self.options = method, dict(options or {})
            if method is not None:
                import vtprune

                self.handle = vtprune.patch(self.hf_model, method, **self._model_defaults(method, self.options))
            else:
                self._runtime = _runtime_patches(self.hf_model)
            self.label = ModelArgs(self.args.base, {}, method, self.options).label
        finally:
            self.probe.attach()

    def _model_defaults(self, method: str, options: dict) -> dict:
        """A query-aware method (quota) scores with the wrapped model: give it the base's processor."""
        if _scores_with_the_model(method, options):
            processor = getattr(self._base, "_image_processor", None) or getattr(self._base, "processor", None)
            if processor is not None:
                return {**options, "processor": processor}
        return options

    def _set_query(self, request) -> None:
        """Query-aware methods get each request's prompt as the question, unless query= was given."""
        if self.handle is None or "query" in self.options:
            return
        if any(hasattr(stage.config, "query") for stage in self.handle.methods):
            self.handle.set_query(str(request.args[0]))

    def _remove_runtime_patches(self) -> None:
        for patch in reversed(self._runtime):
            patch.remove()
        self._runtime = []

    def close(self) -> None:
        """Remove the measurement hooks and the patch; the base model is as loaded."""
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self._remove_runtime_patches()

    def __getattr__(self, name):
        # everything else (tokenizer, model, device, accelerator, chat_template...) is the base's
        if name.startswith("__") or "_base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_base"], name)

    def set_cache_hook(self, cache_hook) -> None:
        super().set_cache_hook(cache_hook)
        self._base.set_cache_hook(cache_hook)

    def clean(self) -> None:
        """Free cached memory but keep the model loaded (a sweep reuses it)."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- requests -------------------------------------------------------------------------------
    def generate_until(self, requests):
        return self._run("generate_until", requests)

    def generate_until_multi_round(self, requests):
        return self._run("generate_until_multi_round", requests)

    def loglikelihood(self, requests):
        return self._run("loglikelihood", requests)

    def _run(self, kind: str, requests) -> list:
        outputs = []
        bar = tqdm(total=len(requests), desc=f"vtprune [{self.label}]", disable=self.rank != 0)
        for request in requests:
            outputs.extend(self._one(kind, request))
            bar.update(1)
        bar.close()
        self.write_stats()
        return outputs

    def _one(self, kind: str, request) -> list:
        where = _describe(request)
        before = self.handle.last if self.handle is not None else None
        self.probe.take()
        self.probe.keep_pixels = len(self.examples) < self.keep_examples
        self._set_query(request)
        failure = None
        try:
            with _without_progress_bars():
                output = getattr(self._base, kind)([request])
        except Exception as error:
            failure = error
        calls, swallowed = self.probe.take()
        root = swallowed or failure  # an error inside generate is the cause even if the base then failed
        if root is not None:
            hint = " (raised inside generate(); the base model would have answered '')" if swallowed else ""
            raise _abort(f"vtprune [{self.label}]: {kind} failed on {where}: {_name(root)}{hint}", root) from root
        last = self.handle.last if self.handle is not None else None
        prune = last if last is not None and last is not before else None
        record = sample_record(request, calls, prune, self.hf_model.config)
        self.records.append(record)
        if prune is not None and len(self.examples) < self.keep_examples:
            example = self._example(record, prune, calls)
            if example is not None:
                self.examples.append(example)
        return output

    def _example(self, record: dict, prune, calls) -> dict | None:
        """Kept indices of one sample and its image as the model saw it (single-image samples)."""
        from vtprune.evals.lmms.stats import model_view_image, visual_layout

        layout = visual_layout(self.hf_model)
        pixels = calls[0].pixel_values if calls else None
        if layout is None or pixels is None or pixels.shape[0] != 1 or pixels.dim() != 4:
            return None
        image = model_view_image(pixels[0], self._base)
        stages = [
            {"name": s.name, "layer": s.layer, "kept": s.kept[0].tolist()}
            | ({"merged": s.merged[0].tolist()} if s.merged is not None else {})  # merge methods: the groups
            for s in prune.stages
        ]
        return {
            "task": record["task"],
            "doc_id": record["doc_id"],
            "method": self.label,
            "grid": list(layout.grid),
            "num_prefix": layout.num_prefix,
            "num_tokens": layout.num_tokens,
            "stages": stages,
            "image": image,
        }

    # -- statistics -----------------------------------------------------------------------------
    def summary(self) -> dict:
        return summarize(self.records)

    def write_stats(self) -> None:
        if not self.args.stats_path:
            return
        path = Path(self.args.stats_path)
        if self.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "base": self.args.base,
            "method": self.label,
            "options": self.options,
            "summary": self.summary(),
            "samples": self.records,
            "examples": [{k: v for k, v in e.items() if k != "image"} for e in self.examples],
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)


class VTPruneSimpleLMM(VTPruneLMM):
    """The ``--force_simple`` variant: wraps the base's simple (doc_to_visual) class."""

    is_simple = True


# -- helpers ----------------------------------------------------------------------------------
def _with_device_map(base_cls, kwargs: dict) -> dict:
    """A ``device_map`` the base can load with in a single process.

    - ``device_map=""`` (lmms-eval's llava_hf default), which transformers 5 rejects: the device.
    - ``device_map="auto"`` (lmms-eval's ``qwen2_5_vl`` and ``qwen3_vl``), under which those bases move
      every input to ``"cuda"``: on a device that is not CUDA (``device=cpu``), that device.
    - ``device_map="cuda:0"`` (lmms-eval's ``llava``, the original LLaVA package), which puts the
      model on ``cuda:<rank>`` whatever ``device`` says unless ``device_map="auto"``: on a device
      that is not CUDA (``device=cpu``, or no ``device`` and no CUDA here) pass ``device_map=auto``
      and that device; with no CUDA visible "auto" loads on the CPU.

    Only for a single process: under ``accelerate launch`` the bases pick ``cuda:<rank>`` themselves.
    """
    import os

    parameters = inspect.signature(base_cls.__init__).parameters
    parameter = parameters.get("device_map")
    if parameter is None or "device_map" in kwargs or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return kwargs
    default_device = parameters["device"].default if "device" in parameters else None
    if parameter.default == "":
        return {**kwargs, "device_map": str(kwargs.get("device", default_device))}
    if parameter.default == "auto" and not str(kwargs.get("device", default_device)).startswith("cuda"):
        return {**kwargs, "device_map": str(kwargs.get("device", default_device))}
    if isinstance(parameter.default, str) and parameter.default.startswith("cuda"):
        device = kwargs.get("device")
        if device is None:
            device = default_device if torch.cuda.is_available() else "cpu"
        device = str(device)
        if device.startswith("cuda"):
            return kwargs
        if torch.cuda.is_available():
            raise ValueError(
                f"{base_cls.__name__} on device={device} loads with device_map=auto, which would place the model "
                "on the visible GPUs; hide them (CUDA_VISIBLE_DEVICES=) or use a CUDA device"
            )
        return {**kwargs, "device": device, "device_map": "auto"}
    return kwargs


def _adapter(model):
    from vtprune.patches import get_adapter

    try:
        return get_adapter(model)
    except TypeError:  # a model vtprune has no adapter for: method=none still runs
        return None


def _runtime_patches(model) -> list:
    """Instance patches the unpatched model needs to run here (the original LLaVA package on transformers 5)."""
    runtime = getattr(_adapter(model), "runtime_patches", None)
    return list(runtime(model)) if runtime is not None else []


def _generation_probe(model) -> GenerationProbe:
    """A probe that counts the prompt's visual tokens the way this model's prompts hold them.

    Most models repeat an image token id once per visual token (``config.image_token_id``). An
    adapter with ``image_placeholder_id`` (the original LLaVA package: -200) has one placeholder
    per image in ``input_ids``, which the model expands into the image's features; its
    ``generate`` runs from ``inputs_embeds`` and returns only the new tokens.
    """
    config = model.config
    placeholder = getattr(_adapter(model), "image_placeholder_id", None)
    if placeholder is None:
        return GenerationProbe(model, getattr(config, "image_token_id", getattr(config, "image_token_index", None)))
    return PlaceholderProbe(model, placeholder)


class PlaceholderProbe(GenerationProbe):
    """:class:`GenerationProbe` for prompts with one placeholder id per image (see :func:`_generation_probe`).

    Visual tokens per image come from the adapter's fixed layout (None where images have no fixed
    size, e.g. AnyRes); prompt tokens count each placeholder as that many tokens.
    """

    def __init__(self, model, placeholder_id: int):
        from vtprune.evals.lmms.stats import visual_layout

        super().__init__(model, placeholder_id)
        adapter = _adapter(model)
        packs_crops = adapter is not None and getattr(adapter(model), "packs_crops", False)  # AnyRes: sizes vary
        layout = None if packs_crops else visual_layout(model)
        self.tokens_per_image = layout.num_tokens if layout is not None else None

    def _generate(self, *args, **kwargs):
        output = super()._generate(*args, **kwargs)
        call = self.calls[-1]
        sequences = getattr(output, "sequences", output)
        if isinstance(sequences, torch.Tensor):
            call.new_tokens = int(sequences.shape[-1])  # generate() from inputs_embeds: no prompt in the output
        if call.visual_tokens is not None:
            images = call.visual_tokens
            per_image = self.tokens_per_image
            call.visual_tokens = [n * per_image for n in images] if per_image is not None else None
            if call.prompt_tokens is not None and per_image is not None:
                call.prompt_tokens = [p + n * (per_image - 1) for p, n in zip(call.prompt_tokens, images)]
        return output


def _describe(request) -> str:
    metadata = getattr(request, "metadata", None) or {}
    return f"task {request.task_name!r} split {metadata.get('split')!r} doc_id {request.doc_id}"


def _name(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _abort(message: str, error: BaseException) -> EvalAbort:
    """Print the root cause's traceback (an uncaught SystemExit shows only its message); build the abort."""
    if isinstance(error, EvalAbort):
        return error
    traceback.print_exception(error, file=sys.stderr)
    return EvalAbort(message)  # uncaught, Python prints the message and exits with status 1
