"""The steps of ``python -m training.evaluate``, one module each.

- :mod:`~training.evaluation.settings`: the options of a run and the data sources;
- :mod:`~training.evaluation.heldout`: the training run's held-out data, rebuilt with its own code;
- :mod:`~training.evaluation.detect_cases`: every model on every case through ``detect``, boxes scored;
- :mod:`~training.evaluation.summary`: classification and localisation metrics, timing, targets;
- :mod:`~training.evaluation.report` and :mod:`~training.evaluation.markdown`: the report and
  its two files.
"""
