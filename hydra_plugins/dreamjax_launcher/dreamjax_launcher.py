"""Registers dreamjax's Hydra launchers, with no side effects at discovery.

Hydra imports every module in the ``hydra_plugins`` namespace when *any* Hydra application starts,
and only instantiates launchers that live here. So this module imports nothing but Hydra and the
standard library: the config dataclasses below, and launcher classes that load dreamjax (and with
it jax and submitit) inside ``setup()``/``launch()``, when a dreamjax launcher is really used.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher


class _Lazy:
    """Mixin: a Hydra launcher whose implementation is imported on first use (not itself a Launcher,
    so Hydra's discovery lists only the two real launchers)."""

    _impl_path = ("", "")

    def __init__(self, **params: Any) -> None:
        self._params = params
        self._impl = None

    def _load(self):
        if self._impl is None:
            import importlib  # only here: discovery must not import dreamjax

            import dreamjax

            dreamjax.configure_cpu()  # before dreamjax's modules start a JAX backend
            module, cls = self._impl_path
            self._impl = getattr(importlib.import_module(module), cls)(**self._params)
        return self._impl

    def setup(self, *, hydra_context, task_function, config) -> None:
        self._load().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides, initial_job_idx):
        return self._load().launch(job_overrides, initial_job_idx)


class DreamjaxLauncher(_Lazy, Launcher):
    """Batched multirun launcher (see dreamjax.sweep.launcher)."""

    _impl_path = ("dreamjax.sweep.launcher", "DreamjaxLauncher")


class DreamjaxSlurmLauncher(_Lazy, Launcher):
    """Array tasks of batched cells on SLURM (or submitit's local executor), see dreamjax.sweep.slurm."""

    _impl_path = ("dreamjax.sweep.slurm", "DreamjaxSlurmLauncher")


@dataclass
class DreamjaxLauncherConf:
    _target_: str = "hydra_plugins.dreamjax_launcher.dreamjax_launcher.DreamjaxLauncher"


@dataclass
class DreamjaxSlurmLauncherConf:
    _target_: str = "hydra_plugins.dreamjax_launcher.dreamjax_launcher.DreamjaxSlurmLauncher"
    submitit_executor: str = "slurm"  # slurm | local (same code on this machine, for tests)
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    cells_per_task: Optional[int] = None  # cells per array task (rounded up to whole batches)
    tasks: Optional[int] = None  # or: about this many array tasks (when cells_per_task is null)
    wait: bool = True  # wait for the tasks, then collect the sweep (else: dreamjax-collect SWEEP_DIR)
    max_num_timeout: int = 3  # requeues after a timeout (preemptions do not count)
    # submitit / SLURM parameters (null = SLURM's default)
    name: str = "dreamjax"
    timeout_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: Optional[int] = None
    gpus_per_node: Optional[int] = None
    mem_gb: Optional[int] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    account: Optional[str] = None
    comment: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    gres: Optional[str] = None
    cpus_per_gpu: Optional[int] = None
    gpus_per_task: Optional[int] = None
    mem_per_gpu: Optional[str] = None
    mem_per_cpu: Optional[str] = None
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint() + requeue
    array_parallelism: int = 256
    setup: Optional[List[str]] = None  # shell lines run before each task (module load, venv...)
    srun_args: Optional[List[str]] = None
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # any other sbatch option


@dataclass
class DreamjaxSlurmLocalLauncherConf(DreamjaxSlurmLauncherConf):
    submitit_executor: str = "local"
    timeout_min: int = 30
    signal_delay_s: int = 30


_cs = ConfigStore.instance()
_cs.store(group="hydra/launcher", name="dreamjax", node=DreamjaxLauncherConf, provider="dreamjax")
_cs.store(group="hydra/launcher", name="dreamjax_slurm", node=DreamjaxSlurmLauncherConf, provider="dreamjax")
_cs.store(group="hydra/launcher", name="dreamjax_slurm_local", node=DreamjaxSlurmLocalLauncherConf,
          provider="dreamjax")
