"""Registers dreamjax's Hydra launchers. Hydra only instantiates launchers that live in the
``hydra_plugins`` package, so the classes here are thin subclasses of dreamjax.launcher's."""
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from dreamjax import launcher as _impl


class DreamjaxLauncher(_impl.DreamjaxLauncher):
    """Batched multirun launcher (see dreamjax.launcher)."""


@dataclass
class DreamjaxLauncherConf:
    _target_: str = "hydra_plugins.dreamjax_launcher.dreamjax_launcher.DreamjaxLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="dreamjax", node=DreamjaxLauncherConf,
                             provider="dreamjax")
