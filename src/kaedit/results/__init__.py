"""Results and command-line tools: what saved runs become (tables, figures, W&B views).

* :mod:`kaedit.results.plots` -- shared by the others: a saved run (``Run``,
  ``load_run``), its labels, ``pyplot`` and ``save_figure``, the comparison, metric and
  retention figures and the retention tables;
* :mod:`kaedit.results.sweep` -- the table every ``-m`` sweep ends with (``results.csv``)
  and its Hydra callback;
* :mod:`kaedit.results.analyze`, :mod:`kaedit.results.ka_study`,
  :mod:`kaedit.results.reproduce`, :mod:`kaedit.results.dashboard` -- the command lines
  (``python -m kaedit.results.analyze`` etc.).

A tool imports :mod:`~kaedit.results.plots` and :mod:`~kaedit.results.sweep`, never another
tool; nothing outside this package imports it (``tests/test_structure.py``).
"""
