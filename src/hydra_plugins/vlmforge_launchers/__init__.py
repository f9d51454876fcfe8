"""vlmforge's Hydra launchers (Hydra discovers launcher plugins only under the `hydra_plugins` namespace).

Imports nothing heavy: Hydra imports every plugin module when it scans for plugins.
"""
