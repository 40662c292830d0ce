"""Running a session: plainly on the CPU, through ONNX Runtime's I/O binding on a GPU.

``session.run`` places a NumPy input on the device inside the run, into memory it allocates for that run.
On a GPU the worker instead keeps, per executor thread and input shape, one input buffer on the session's
device, copies each frame's tensor into it before the run (``OrtValue.update_inplace``) and binds it, so a run
starts with its input already there; the outputs are bound to the host, where they are decoded. Example::

    run = runner(session, "input", ["scores"])   # plain on the CPU, bound on CUDA or TensorRT
    [scores] = run(tensor)

Pinned (page-locked) host buffers would let the copy overlap the device's work, but ONNX Runtime's Python API
places an OrtValue only in the default memory of a device ("cpu", "cuda", ...), so the copy is from pageable
memory: one synchronous copy per run, on the executor's own thread, while the other executor's run keeps the
device busy (two executors per GPU partition: see ``partitions.GPU_EXECUTORS``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # NumPy is imported with the first model, not when an idle worker starts
    import numpy.typing as npt

__all__ = ["DEVICE_OF_PROVIDER", "BoundRun", "Run", "plain_run", "runner", "session_device"]

Run = Callable[["npt.NDArray[Any]"], "list[npt.NDArray[Any]]"]

# the execution providers whose inputs the worker places on their device itself, with ONNX Runtime's name for it
DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def session_device(session: Any) -> tuple[str, int] | None:
    """(ONNX Runtime's device name, device id) of a session whose first provider runs on a device; None on the
    CPU."""
    providers = session.get_providers()
    device = DEVICE_OF_PROVIDER.get(providers[0]) if providers else None
    if device is None:
        return None
    options = session.get_provider_options().get(providers[0], {})
    return device, int(options.get("device_id") or 0)


def plain_run(session: Any, input_name: str, output_names: Sequence[str]) -> Run:
    names = list(output_names)
    return lambda feed: list(session.run(names, {input_name: feed}))


class BoundRun:
    """Runs ``session`` with its input in a buffer on ``device`` that each thread keeps for the input's shape."""

    def __init__(self, session: Any, input_name: str, output_names: Sequence[str], device: str,
                 device_id: int) -> None:
        self._session, self._input, self._outputs = session, input_name, list(output_names)
        self.device, self.device_id = device, device_id
        self._local = threading.local()  # executors run the same session at once: a buffer each

    def _buffer(self, feed: npt.NDArray[Any]) -> Any:
        import onnxruntime as ort

        buffer = getattr(self._local, "buffer", None)
        if buffer is None or tuple(buffer.shape()) != feed.shape or self._local.dtype != feed.dtype:
            # a new shape (a batch of another size) replaces the old buffer: one per thread, at most
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(feed.shape, feed.dtype.type, self.device,
                                                               self.device_id)
            self._local.buffer, self._local.dtype = buffer, feed.dtype
        return buffer

    def __call__(self, feed: npt.NDArray[Any]) -> list[npt.NDArray[Any]]:
        import numpy as np

        buffer = self._buffer(feed)
        buffer.update_inplace(np.ascontiguousarray(feed))
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self._input, buffer)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        outputs: list[npt.NDArray[Any]] = binding.copy_outputs_to_cpu()
        return outputs


def runner(session: Any, input_name: str, output_names: Sequence[str]) -> Run:
    """How the worker runs ``session``: bound on a device (see the module's docstring), plain on the CPU."""
    device = session_device(session)
    if device is None:
        return plain_run(session, input_name, output_names)
    return BoundRun(session, input_name, output_names, *device)
