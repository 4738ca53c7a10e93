"""Per-layer spectra and their controls (null, holdout, lineage, compare)."""

from jsubspace.spectra._analyze import ControlConfig
from jsubspace.spectra._analyze import analyze_layer
from jsubspace.spectra._groups import Grouping
from jsubspace.spectra._groups import group_control
from jsubspace.spectra._holdout import fold_assignment
from jsubspace.spectra._holdout import holdout_control
from jsubspace.spectra._layer import LayerSpectra
from jsubspace.spectra._layer import ModeResult
from jsubspace.spectra._layer import SpectraConfig
from jsubspace.spectra._layer import layer_spectra
from jsubspace.spectra._layer import lora_randomized_modes
from jsubspace.spectra._layer import lora_side_space
from jsubspace.spectra._lineage import lineage_record
from jsubspace.spectra._null import gaussian_stack
from jsubspace.spectra._null import marchenko_pastur_eigenvalues
from jsubspace.spectra._null import null_control
from jsubspace.spectra._plan import MATERIALISE_LIMIT
from jsubspace.spectra._plan import LayerPlan
from jsubspace.spectra._plan import MachineRates
from jsubspace.spectra._plan import basis_solvers
from jsubspace.spectra._plan import default_memory_budget
from jsubspace.spectra._plan import dense_chunk
from jsubspace.spectra._plan import exact_sides
from jsubspace.spectra._plan import layer_models
from jsubspace.spectra._plan import measure_rates
from jsubspace.spectra._plan import plan_layer
from jsubspace.spectra._plan import plan_total
from jsubspace.spectra._record import LayerRecord
from jsubspace.spectra._record import ModeRecord
from jsubspace.spectra._summary import TAUS
from jsubspace.spectra._summary import cev
from jsubspace.spectra._summary import effective_rank
from jsubspace.spectra._summary import k_at
from jsubspace.spectra._summary import summarize
from jsubspace.spectra._verdict import MEANINGS
from jsubspace.spectra._verdict import MIN_MODELS
from jsubspace.spectra._verdict import Criterion
from jsubspace.spectra._verdict import Label
from jsubspace.spectra._verdict import Verdict
from jsubspace.spectra._verdict import conclusion
from jsubspace.spectra._verdict import verdict

__all__ = [
    "MATERIALISE_LIMIT",
    "MEANINGS",
    "MIN_MODELS",
    "TAUS",
    "ControlConfig",
    "Criterion",
    "Grouping",
    "Label",
    "LayerPlan",
    "LayerRecord",
    "LayerSpectra",
    "MachineRates",
    "ModeRecord",
    "ModeResult",
    "SpectraConfig",
    "Verdict",
    "analyze_layer",
    "basis_solvers",
    "cev",
    "conclusion",
    "default_memory_budget",
    "dense_chunk",
    "exact_sides",
    "effective_rank",
    "fold_assignment",
    "gaussian_stack",
    "group_control",
    "holdout_control",
    "k_at",
    "layer_models",
    "layer_spectra",
    "lineage_record",
    "lora_randomized_modes",
    "lora_side_space",
    "marchenko_pastur_eigenvalues",
    "measure_rates",
    "null_control",
    "plan_layer",
    "plan_total",
    "summarize",
    "verdict",
]
