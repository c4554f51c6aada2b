"""When autoft began to load: the first module the package imports, so the command line's ``--timeout`` counts its
imports too (torch, transformers, timm, Optuna and Plotly took 9-10 s on 2 cores, more than the rest of a
search's start-up)."""

import time

IMPORT_STARTED = time.time()
