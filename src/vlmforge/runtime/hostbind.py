"""Binding host (numpy) memory to an onnxruntime IOBinding with as little per-call cost as possible.

A decode step of the decoder rebinds every layer's past and present (their shapes grow by one token
per step), i.e. ``4 x layers`` bind calls plus ``2 x layers`` new OrtValues. Through onnxruntime's
public Python wrappers each of those costs 1.5-2 us (argument checks, device objects built per call,
bookkeeping dictionaries); on the tiny fixture that was ~30 us of a ~190 us step. The pybind layer
underneath (`onnxruntime.capi._pybind_state`, the object the wrappers hold) does the same work in
0.3-0.6 us a call. `HostBinding` uses it when the installed onnxruntime exposes it, and the public
wrappers otherwise; both bind the same memory, so results are identical (tested).

Only host memory goes through here: the numpy arrays must outlive their binding (the caller keeps
them: the KV buffers, the reused logits buffer).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

try:  # the pybind layer onnxruntime's own wrappers call; present in every onnxruntime >= 1.10
    from onnxruntime.capi import _pybind_state as _C

    _CPU = _C.OrtDevice(_C.OrtDevice.cpu(), _C.OrtDevice.default_memory(), 0)
except (ImportError, AttributeError, TypeError):  # pragma: no cover - depends on the installed wheel
    _C = None
    _CPU = None


class HostBinding:
    """An IOBinding of one session whose inputs and outputs are numpy arrays (CPU provider)."""

    def __init__(self, session: ort.InferenceSession, *, fast: bool = True) -> None:
        """`fast=False` forces the public wrappers (the fallback; tests compare the two)."""
        self.session = session
        self.io = session.io_binding()
        c_io, c_sess = getattr(self.io, "_iobinding", None), getattr(session, "_sess", None)
        self.fast = bool(fast and _C is not None and c_io is not None and c_sess is not None
                         and hasattr(c_io, "bind_ortvalue_input") and hasattr(c_sess, "run_with_iobinding"))
        if self.fast:
            self._c_io, self._c_sess = c_io, c_sess
            self.value = self._c_value
            self.bind_input = c_io.bind_ortvalue_input
            self.bind_output = c_io.bind_ortvalue_output
        else:
            self.value = ort.OrtValue.ortvalue_from_numpy
            self.bind_input = self.io.bind_ortvalue_input
            self.bind_output = self.io.bind_ortvalue_output

    @staticmethod
    def _c_value(array: np.ndarray):
        """An OrtValue over `array`'s memory (no copy); the caller keeps `array` alive."""
        return _C.OrtValue.ortvalue_from_numpy(array, _CPU)

    def run(self) -> None:
        if self.fast:
            self._c_sess.run_with_iobinding(self._c_io, None)
        else:
            self.session.run_with_iobinding(self.io)
