"""The offline end-to-end demo (``python -m axf_pipeline.demo``): see :mod:`axf_pipeline.demo.run`."""
