"""Model-side plumbing shared by every method; it imports nothing from the engine.

* :mod:`.validation`: the checks of a call's arguments (options, inputs, model,
  parameter selection, dtype);
* :mod:`.head`: the output head (raw output -> (N, K), backward passes, final form);
* :mod:`.copies`: the private parameter and buffer copies every forward runs with;
* :mod:`.forwards`: forwards put on instances during a call (per-sample BatchNorm,
  PReLU) and the BatchNorm gradient-layout hook;
* :mod:`.state`: locks, Ctrl-C deferral, the modes a call sets and their restore;
* :mod:`.structure`: parameter owners, BatchNorms, recurrent modules, coupling.
"""

from fastntk._model.copies import Copies, make_copies
from fastntk._model.forwards import (
    ALONE,
    ROWS,
    MergedSamplesError,
    OneValuePerChannelError,
    bn_rows_checked,
    forward_samples,
)
from fastntk._model.head import Head
from fastntk._model.state import clear_backward_hooks, locked, model_state
from fastntk._model.structure import batchnorms, is_coupled, owners, recurrent
from fastntk._model.validation import (
    BN_MODES,
    OUTPUT_MODES,
    ParamSpec,
    check_inputs,
    check_model,
    check_options,
    check_progress,
    default_dtype,
    is_index,
    plain,
    resolve_dtype,
    select_params,
    with_grad,
)

__all__ = [
    "ALONE",
    "BN_MODES",
    "OUTPUT_MODES",
    "ROWS",
    "Copies",
    "Head",
    "MergedSamplesError",
    "OneValuePerChannelError",
    "ParamSpec",
    "batchnorms",
    "bn_rows_checked",
    "check_inputs",
    "check_model",
    "check_options",
    "check_progress",
    "clear_backward_hooks",
    "default_dtype",
    "forward_samples",
    "is_coupled",
    "is_index",
    "locked",
    "make_copies",
    "model_state",
    "owners",
    "plain",
    "recurrent",
    "resolve_dtype",
    "select_params",
    "with_grad",
]
