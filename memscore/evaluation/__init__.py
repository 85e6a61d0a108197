"""The evaluation job (``memscore evaluate``): join, metrics, figures, report."""
