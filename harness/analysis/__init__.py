"""Analyses beyond accuracy tables: the fixed-randomness study (distances, spread, compression,
fixed-vs-fresh gains and their correlation)."""

from harness.analysis.fixed_randomness import (CompressionStats, DistanceStats, SpreadStats, analyse,
                                               compression_rates, distances_to_clean, randomness_spread)
from harness.analysis.gains import (ScatterPoint, compression_scatter, gain_table, load_records,
                                    report_sections, save_record, scatter_points, worst_of_n_accuracy)

__all__ = ["CompressionStats", "DistanceStats", "SpreadStats", "analyse", "compression_rates",
           "distances_to_clean", "randomness_spread", "ScatterPoint", "compression_scatter", "gain_table",
           "load_records", "report_sections", "save_record", "scatter_points", "worst_of_n_accuracy"]
