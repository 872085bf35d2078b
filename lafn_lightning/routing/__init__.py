"""Edit routing beyond string matching: which cached edit applies to a query, and at which token,
from the backbone's own hidden states (keys per group, a vector index, calibrated thresholds)."""
