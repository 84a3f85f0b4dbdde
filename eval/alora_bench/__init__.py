"""The harness that measures axolotl-alora: data and model preparation, lm-eval tasks and evaluation, the
reproduction driver (with the main job as its preset) and the overhead benchmark.

It uses only the plugin's public API (`axolotl_alora`); the plugin never imports it. Its commands join the
`alora` console script through the `alora.commands` entry-point group (`alora prepare-model`,
`alora prepare-data`, `alora eval`).
"""
