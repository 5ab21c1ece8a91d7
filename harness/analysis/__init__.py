"""Analyses beyond one cell, as numbers: best-known robust accuracy (``best_known``), the flags that need
several cells (``flags``), and the fixed-randomness study (distances, spread, compression, fixed-vs-fresh
gains and their correlation). :mod:`harness.report` renders them."""

from harness.analysis.fixed_randomness import (CompressionStats, DistanceStats, SpreadStats, analyse,
                                               compression_rates, distances_to_clean, randomness_spread)
from harness.analysis.gains import (ScatterPoint, gain_table, load_records, pearson_r, save_record,
                                    scatter_points, worst_of_n_accuracy)

__all__ = ["CompressionStats", "DistanceStats", "SpreadStats", "analyse", "compression_rates",
           "distances_to_clean", "randomness_spread", "ScatterPoint", "gain_table", "load_records",
           "pearson_r", "save_record", "scatter_points", "worst_of_n_accuracy"]
