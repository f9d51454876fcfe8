"""Running matrix cells on a cluster engine (Ray, Slurm): what each cell needs, the checks made before any
cell starts, and the submitting process's view of the cells while it waits.

The Hydra launcher classes themselves live in `hydra_plugins.vlmforge_launchers` (Hydra finds launchers only
in that namespace); they are thin and call into this package, which takes plain arguments.
"""
