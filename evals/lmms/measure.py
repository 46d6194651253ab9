"""Per-sample measurements around ``model.generate`` and per-run peak memory.

:class:`GenerationProbe` sits on one loaded model instance:
- it replaces ``generate`` on the instance (not the class) with a timed call that also keeps
  the exception a caller might swallow (lmms-eval's wrappers turn it into an empty answer);
- a forward hook on the model marks the end of the first forward of each ``generate`` call:
  the logits of the first new token, so time to first token = vision encoder + LLM prefill;
- ``close()`` removes both, leaving the instance as it was.

Peak memory: the CUDA allocator's peak where a GPU is used, else the process's peak resident
set size (Linux ``VmHWM``, which ``reset_peak_memory`` rewinds through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass, field

import torch


@dataclass
class GenerateCall:
    """Timings and shapes of one ``generate`` call (batch of the call, usually 1)."""

    start: float
    prompt_tokens: list[int] = field(default_factory=list)  # real (unpadded) prompt length per sample
    visual_tokens: list[int] = field(default_factory=list)  # image tokens in each prompt
    first_token: float | None = None
    end: float | None = None
    new_tokens: int = 0  # generated tokens per sample (including an EOS)
    pixel_values: torch.Tensor | None = None  # kept only while the probe's keep_pixels is set

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first one, per second of decoding (None with fewer than 2 tokens)."""
        if self.end is None or self.first_token is None or self.new_tokens < 2:
            return None
        elapsed = self.end - self.first_token
        return (self.new_tokens - 1) / elapsed if elapsed > 0 else None


def _synchronize(tensor) -> None:
    if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


class GenerationProbe:
    """Time ``generate`` calls of ``model`` and remember the last exception it raised."""

    def __init__(self, model: torch.nn.Module, image_token_id: int | None):
        self.model = model
        self.image_token_id = image_token_id
        self.calls: list[GenerateCall] = []
        self.error: BaseException | None = None
        self.keep_pixels = False  # keep each call's pixel_values (to draw kept patches)
        self._current: GenerateCall | None = None
        self._hook = model.register_forward_hook(self._on_forward)
        self._wrapper = self._generate  # one bound method, so that detach() finds its own
        self._found = None  # the instance's own ``generate`` that attach() replaced (None: the class's)
        self.attach()

    def attach(self) -> None:
        """Time ``model.generate`` as it is now (with vtprune's wrapper of it while the model is patched)."""
        self._found = vars(self.model).get("generate")
        self._original = self.model.generate
        self.model.generate = self._wrapper

    def detach(self) -> None:
        """Give back the ``generate`` that attach() found: vtprune patches and unpatches the instance without it."""
        if vars(self.model).get("generate") is not self._wrapper:
            return
        if self._found is None:
            del self.model.generate
        else:
            self.model.generate = self._found

    def _generate(self, *args, **kwargs):
        call = GenerateCall(start=time.perf_counter())
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor):
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                call.prompt_tokens = mask.sum(dim=1).tolist()
            else:
                call.prompt_tokens = [input_ids.shape[1]] * input_ids.shape[0]
            if self.image_token_id is not None:
                call.visual_tokens = (input_ids == self.image_token_id).sum(dim=1).tolist()
        if self.keep_pixels:
            call.pixel_values = kwargs.get("pixel_values")
        self._current = call
        try:
            output = self._original(*args, **kwargs)
        except BaseException as error:
            self.error = error
            raise
        finally:
            self._current = None
        sequences = getattr(output, "sequences", output)
        _synchronize(sequences)
        call.end = time.perf_counter()
        if isinstance(sequences, torch.Tensor) and isinstance(input_ids, torch.Tensor):
            call.new_tokens = int(sequences.shape[-1] - input_ids.shape[-1])
        self.calls.append(call)
        return output

    def _on_forward(self, module, args, output):
        call = self._current
        if call is not None and call.first_token is None:
            _synchronize(getattr(output, "logits", None))
            call.first_token = time.perf_counter()

    def take(self) -> tuple[list[GenerateCall], BaseException | None]:
        """The calls and error since the last ``take()``; clears both."""
        calls, error = self.calls, self.error
        self.calls, self.error = [], None
        return calls, error

    def close(self) -> None:
        self._hook.remove()
        self.detach()


# -- peak memory -------------------------------------------------------------------------------
def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", status.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_peak_memory(device) -> bool:
    """Start a new peak-memory window; False where only the process-lifetime peak can be read."""
    if _is_cuda(device):
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # rewinds VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory(device, windowed: bool = True) -> tuple[int, str]:
    """(bytes, kind): the CUDA allocator's peak (all devices), or the process's peak RSS.

    ``windowed``: whether :func:`reset_peak_memory` succeeded; the kind says "since_start" when not.
    """
    if _is_cuda(device):
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())), "cuda_peak_allocated"
    hwm = _vm_hwm_bytes()
    if hwm is None:
        hwm = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        windowed = False
    return hwm, "cpu_peak_rss" if windowed else "cpu_peak_rss_since_start"
