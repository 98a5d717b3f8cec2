"""One harness for every method: ShortV, FastV, VTW and their compositions, by name.

=================  ==============================================================================================
``base``           `Method`: build a config from parameters, apply / remove, the unpatched baseline on the same
                   model, prefill FLOPs, the record written in every output
``shortv``         ShortV (`ShortVConfig`: layer- or operator-level)
``pruning``        what the token-pruning methods share (`TokenPruningConfig`, `shortv.pruning`)
``fastv``          FastV (K, R, rank)
``vtw``            VTW (K)
``shortv_pruning`` ShortV + FastV and ShortV + VTW in one patch
``registry``       `METHODS` by name, `method_of(config)`, `load_config` (any config file)
``plan``           ``--method`` specs and config files -> the `MethodRun` objects of one run
=================  ==============================================================================================

See docs/evaluation.md ("Several methods in one run").
"""

from .base import Method, describe_record
from .plan import MethodRun, parse_spec, plan_runs, runs_of
from .registry import (
    METHODS,
    applied_config,
    coerce_config,
    config_from_dict,
    get_method,
    load_config,
    method_of,
    without_method,
)

__all__ = ["METHODS", "Method", "MethodRun", "applied_config", "coerce_config", "config_from_dict", "describe_record",
           "get_method", "load_config", "method_of", "parse_spec", "plan_runs", "runs_of", "without_method"]
