"""The set-prediction objective: Hungarian matching and point-sampled mask losses."""
