
from .._backends import triton_interpreting as _triton_interpreting


def _backport_interpreter_index_fix() -> None:
    """Backport of triton-lang/triton#9172 (issue #9171) for Triton 3.6's interpreter under numpy >= 2.4.

    The interpreter holds scalars as 1-element arrays and turns them into Python ints with ``int(array)``, which
    numpy 2.4 rejects, so any ``range()`` bound that is not a compile-time constant fails under TRITON_INTERPRET=1.
    Upstream's fix converts ``array.squeeze()`` instead; we install the same conversion. Compiled kernels are
    unaffected.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kvpo_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._kvpo_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


if _triton_interpreting():
    _backport_interpreter_index_fix()
