"""memadapt.profiler: measuring variants on the target device.

Public API: :func:`profile` (measure a store's variants: memory, latency,
load time, accuracy, fidelity; results go to ``STORE/catalog.sqlite``),
:func:`load_profiles` (frozen :class:`VariantProfile` objects for
``adaptive/``), :func:`pareto`, and :mod:`profiler.report` (rows, rich table,
plot) for the CLI. Importing this package imports neither torch nor
onnxruntime.
"""

from profiler._run import Measurement, Progress, profile
from profiler.accuracy import AccuracyResult, Evaluator, resolve_eval
from profiler.catalog import Catalog, schema_version
from profiler.device import DeviceInfo, device_info
from profiler.errors import ProfilerError
from profiler.groups import GroupProfile, check_group_data, load_group_profiles
from profiler.latency import LatencyStats
from profiler.memory import MemoryFit, fit_memory
from profiler.profiles import BatchProfile, VariantProfile, load_profiles, pareto

__all__ = [
    "AccuracyResult", "BatchProfile", "Catalog", "DeviceInfo", "Evaluator", "GroupProfile",
    "LatencyStats", "Measurement", "MemoryFit", "ProfilerError", "Progress", "VariantProfile",
    "check_group_data", "device_info", "fit_memory", "load_group_profiles", "load_profiles",
    "pareto", "profile", "resolve_eval", "schema_version",
]
