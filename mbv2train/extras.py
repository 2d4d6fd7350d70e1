"""Optional packages: a format that needs one that is missing stops with one line saying how to install it."""

from __future__ import annotations

import contextlib
import importlib.util
import logging

from mbv2train.errors import ConfigError

EXTRAS = {
    # extra: (modules it provides, what it is for)
    "export": (("onnx", "onnxscript", "onnxruntime"), "ONNX export and its check in onnxruntime"),
    "executorch": (("executorch",), "ExecuTorch (.pte) export and the XNNPACK quantizer"),
    "quantize": (("torchao",), "int8 quantization (PT2E) and loading int8 models"),
}


def require(extra: str, wanted_by: str) -> None:
    """ConfigError naming the missing modules and the pip line that installs them."""
    modules, purpose = EXTRAS[extra]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{wanted_by} needs {', '.join(missing)} ({purpose}); install them with: "
                          f"pip install 'mbv2train[{extra}]'")


@contextlib.contextmanager
def torchao_notices_muted():
    """For a block that may import torchao first (directly, or through executorch): torchao registers an Enum
    that torch now handles itself, and torch logs a deprecation warning about it on stderr, once per process.
    It is harmless and none of the user's business, and it would sit between a command's own lines."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pytree_log.setLevel(level)


def import_pt2e_quantization():
    """torchao's PT2E module (prepare_pt2e, convert_pt2e): importing it also registers the quantized
    operators that int8 programs call."""
    with torchao_notices_muted():  # torchao: the optional quantize extra
        import torchao.quantization.pt2e.quantize_pt2e as quantize_pt2e
    return quantize_pt2e


def available(extra: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in EXTRAS[extra][0])
