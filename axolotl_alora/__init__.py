"""axolotl-alora: ALoRA (arXiv 2501.13669) as an Axolotl plugin. Enable with `plugins: [axolotl_alora.AloraPlugin]`."""

__version__ = "0.2.0"
__all__ = ["AloraPlugin", "__version__"]


def __getattr__(name):
    # lazy: importing the plugin imports Axolotl, which the math modules and the CLI do not need
    if name == "AloraPlugin":
        from .plugin import AloraPlugin

        return AloraPlugin
    raise AttributeError(name)
