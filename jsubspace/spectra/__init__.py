"""Per-layer spectra and their controls (null, holdout, lineage, compare)."""

from jsubspace.spectra._analyze import VERDICTS, ControlConfig, analyze_layer, verdict
from jsubspace.spectra._holdout import fold_assignment, holdout_control
from jsubspace.spectra._layer import LayerSpectra, ModeResult, SpectraConfig, layer_spectra
from jsubspace.spectra._lineage import lineage_record
from jsubspace.spectra._null import gaussian_stack, marchenko_pastur_eigenvalues, null_control
from jsubspace.spectra._summary import TAUS, cev, effective_rank, k_at, summarize

__all__ = [
    "TAUS",
    "VERDICTS",
    "ControlConfig",
    "LayerSpectra",
    "ModeResult",
    "SpectraConfig",
    "analyze_layer",
    "cev",
    "effective_rank",
    "fold_assignment",
    "gaussian_stack",
    "holdout_control",
    "k_at",
    "layer_spectra",
    "lineage_record",
    "marchenko_pastur_eigenvalues",
    "null_control",
    "summarize",
    "verdict",
]
