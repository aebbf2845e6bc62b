"""Process entry points: `python -m infra.entrypoints.<process>`.

The composition root's side of a platform process whose code lives in a lower layer: read the
settings (the only place they are read), build the small frozen config that process takes,
and run it. `fleet up`'s services (infra/services/) start these modules.
"""
