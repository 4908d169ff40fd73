"""Paper protocols: AT Table 1, NST kernels, Hinton's omitted class, the limited-data regime — and their tables.

Each table protocol is a list of student configurations (``Member``s of a :mod:`featkd.sweep`) per
teacher/student pair, run at one of three budgets:

* ``full``  — the papers' schedule (200 epochs, batch 128, SGD 0.1, ×0.2 at 60/120/160); for a GPU;
* ``short`` — the same protocol with fewer epochs (minutes on a GPU);
* ``cpu``   — small enough for a 2-core CPU: a class-balanced subset, a few epochs, 2 seeds,
  the smaller pairs.

The dataset is CIFAR-10 when a path is given, Fashion-MNIST otherwise; every table says which,
and the published (CIFAR-10) column is compared through deltas against the student baseline,
never as absolute numbers.

Modules: :mod:`~featkd.repro.protocols` (budgets, pairs, recipes and their builders, AT_TABLE1,
NST_KERNELS, the paper's schedule), :mod:`~featkd.repro.tables` (result tables),
:mod:`~featkd.repro.cache` (the locked run cache), :mod:`~featkd.repro.students` (cached teachers,
student sweeps), :mod:`~featkd.repro.report` (a table's run and report), :mod:`~featkd.repro.omitted_class`
(Hinton et al. 2015) and :mod:`~featkd.repro.limited_data` (students on a small share of the data).
"""

from featkd.repro.cache import check_cached_config, fit_or_resume, write_new
from featkd.repro.omitted_class import (OMITTED_BUDGETS, OmittedBudget, OmittedResult, apply_bias_shift,
                                        choose_bias_shift, class_errors, predict, run_omitted_class, shift_logit,
                                        split_heldout)
from featkd.repro.protocols import (AT_TABLE1, CPU_BUDGET, NST_KERNELS, PROTOCOLS, Budget, Pair, Recipe,
                                    TableProtocol, at_terms, fact_terms, nst_layers, nst_terms, paper_schedule,
                                    pretty_model, protocol_train_loader, recipe)
from featkd.repro.report import DataSpec, TableResult, hardware, run_protocol
from featkd.repro.students import compact_summary, run_students
from featkd.repro.tables import Cell, results_table

__all__ = ["AT_TABLE1", "CPU_BUDGET", "NST_KERNELS", "OMITTED_BUDGETS", "PROTOCOLS", "Budget", "Cell", "DataSpec",
           "OmittedBudget", "OmittedResult", "Pair", "Recipe", "TableProtocol", "TableResult", "apply_bias_shift",
           "at_terms", "check_cached_config", "choose_bias_shift", "class_errors", "compact_summary", "fact_terms",
           "fit_or_resume", "hardware", "nst_layers", "nst_terms", "paper_schedule", "predict", "pretty_model",
           "protocol_train_loader", "recipe", "results_table", "run_omitted_class", "run_protocol", "run_students",
           "shift_logit", "split_heldout", "write_new"]
