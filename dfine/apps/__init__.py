"""The command lines of ``python -m dfine``: predict, export, visualize, info, report (layer `apps`, the top)."""
