"""Model facts every process shares without torch: finding or converting a model directory, its config."""
