"""NAS-Bench-201 (NATS-Bench topology) search space.

* :mod:`~fastntk.spaces.nb201.grammar`: parsing, formatting and validation of arch
  strings (:func:`parse_arch`, :func:`format_arch`, :func:`validate_arch`) and the
  isomorphism classes of the benchmark (:func:`unique_str`, :func:`canonical`):
  15,625 archs fall into 6,466 classes;
* :mod:`~fastntk.spaces.nb201.table`: the bundled ground truth (200-epoch test
  accuracies on CIFAR-10, CIFAR-100 and ImageNet16-120; :func:`load_table`,
  :func:`accuracy`, :func:`accuracies`, :func:`rank`, :func:`percentile`, :func:`percentiles`, :func:`all_archs`);
* :mod:`~fastntk.spaces.nb201.model`: :func:`build_model`, a network whose
  ``state_dict`` matches the official NAS-Bench-201 ``TinyNetwork`` key for key,
  shape for shape;
* :mod:`~fastntk.spaces.nb201.supernet`: TE-NAS's pruning supernets
  (:func:`build_supernet`, :func:`format_supernet`, :func:`parse_supernet`);
* :mod:`~fastntk.spaces.nb201.space`: :class:`NB201Space`, the
  :class:`fastntk.spaces.base.SearchSpace` implementation.

The table is read lazily (first call of a function that needs it), so importing
this package costs nothing beyond torch and numpy.
"""

from fastntk.spaces.nb201.grammar import (
    BENCH_ARCH,
    EDGES,
    NUM_ARCHS,
    NUM_NODES,
    NUM_UNIQUE,
    OPS,
    ArchLike,
    as_arch,
    canonical,
    format_arch,
    parse_arch,
    unique_str,
    validate_arch,
)
from fastntk.spaces.nb201.model import (
    AvgPool3x3,
    Identity,
    InferCell,
    Pooling,
    ReLUConvBN,
    ResNetBasicblock,
    TinyNetwork,
    Zero,
    build_model,
    make_op,
)
from fastntk.spaces.nb201.space import NB201Space
from fastntk.spaces.nb201.supernet import (
    SUPER_SEP,
    MixedOp,
    SuperCell,
    build_supernet,
    format_supernet,
    parse_supernet,
)
from fastntk.spaces.nb201.table import (
    DATASETS,
    NB201Table,
    accuracies,
    accuracy,
    all_archs,
    load_table,
    percentile,
    percentiles,
    rank,
)

__all__ = [
    "BENCH_ARCH",
    "DATASETS",
    "EDGES",
    "NUM_ARCHS",
    "NUM_NODES",
    "NUM_UNIQUE",
    "OPS",
    "SUPER_SEP",
    "ArchLike",
    "AvgPool3x3",
    "Identity",
    "InferCell",
    "MixedOp",
    "NB201Space",
    "NB201Table",
    "Pooling",
    "ReLUConvBN",
    "ResNetBasicblock",
    "SuperCell",
    "TinyNetwork",
    "Zero",
    "accuracy",
    "all_archs",
    "as_arch",
    "build_model",
    "accuracies",
    "build_supernet",
    "canonical",
    "format_arch",
    "format_supernet",
    "load_table",
    "make_op",
    "parse_arch",
    "parse_supernet",
    "percentile",
    "percentiles",
    "rank",
    "unique_str",
    "validate_arch",
]
