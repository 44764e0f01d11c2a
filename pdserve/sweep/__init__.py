"""`pdserve sweep`: worker layouts x load points -> goodput under SLOs (the disaggregation experiments)."""
