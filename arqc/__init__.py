"""arqc: certifiably robust mixed-precision quantization, lowered to QDQ ONNX.

The public API (``arqc.analyze``, ``arqc.compile``, ``arqc.certify``, ``arqc.report`` and their settings and
results) lives in :mod:`arqc.api`; it is loaded on first use, so that importing a part of arqc (say
``arqc.runtime.smoothing``) does not load the whole driver.
"""

from arqc.base import ArqcError, __version__

_API = ("analyze", "compile", "certify", "report", "CertifySettings", "SearchSettings", "CompileResult",
        "CertifyResult")

__all__ = ["ArqcError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from arqc import api

        return getattr(api, name)
    raise AttributeError(f"module 'arqc' has no attribute {name!r}")
