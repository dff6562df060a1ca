"""Result and metrics files: markdown tables and figures from them (`write_report`), and the pieces
every stage shares to write and read them. No torch, and no stage is imported (tests check both).

tables (the report: the paper's table forms from results.json / diagnostics.json / metrics.jsonl),
paper (the paper's published numbers), stats (Wilson intervals), plots (matplotlib figures),
curves (reading metrics records, drawing training curves), runlog (where a run's metrics records
go: jsonl, csv, tensorboard). The names of `tables` (`tables.__all__` the public ones) are this
package's face, imported on first use so that `enspipe.report.runlog` (which the train config reads) stays cheap.
"""
import importlib as _importlib

__all__ = ["ATTACK_NAMES", "PAPER", "diagnostics_markdown", "headline", "markdown_tables", "plot_transfer_heatmap",
           "resolve_paper", "summary_table", "tied_best", "transfer_matrix", "transfer_table",
           "whitebox_table", "write_report"]


def __getattr__(name: str):
    # Every name of tables (its helpers too, as `enspipe.report.X` before the regrouping); dunders
    # and submodules (`from enspipe.report import runlog`) fall through to the import system.
    if not name.startswith("__"):
        tables = _importlib.import_module("enspipe.report.tables")
        if hasattr(tables, name) and name != "tables":
            return getattr(tables, name)
    raise AttributeError(f"module 'enspipe.report' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
