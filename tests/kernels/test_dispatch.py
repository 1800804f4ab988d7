"""What every kernel file shares (kernels/_dispatch.py): lazy jitting and the launch."""

from __future__ import annotations

from ijepa_fast.kernels import _dispatch as dsp


def test_lazy_jit_builds_on_first_call_once_per_interpreter_setting(monkeypatch):
    builds = []

    @dsp.lazy_jit
    def kernels():
        builds.append(dsp.interpret_mode())
        return object()

    assert builds == []  # decorating builds nothing
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    first = kernels()
    assert kernels() is first and builds == [True]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels() is not first and builds == [True, False]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels() is first and builds == [True, False]
