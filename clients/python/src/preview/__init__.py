"""Client for previewd's PreviewService.

The generated messages and stubs are in ``preview.v1``; ``preview.client``
adds ``connect`` and ``watch``.
"""
