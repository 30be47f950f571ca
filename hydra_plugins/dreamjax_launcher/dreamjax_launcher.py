"""Registers dreamjax's Hydra launchers. Hydra only instantiates launchers that live in the
``hydra_plugins`` package, so the classes here are thin subclasses of dreamjax.launcher's."""
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from dreamjax import launcher as _impl


class DreamjaxLauncher(_impl.DreamjaxLauncher):
    """Batched multirun launcher (see dreamjax.launcher)."""


@dataclass
class DreamjaxLauncherConf:
    _target_: str = "hydra_plugins.dreamjax_launcher.dreamjax_launcher.DreamjaxLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="dreamjax", node=DreamjaxLauncherConf,
                             provider="dreamjax")


# --- SLURM through submitit (dreamjax.slurm) ------------------------------------------------------
from typing import Any, Dict, List, Optional  # noqa: E402

from dreamjax import slurm as _slurm  # noqa: E402


class DreamjaxSlurmLauncher(_slurm.DreamjaxSlurmLauncher):
    """Array tasks of batched cells on SLURM (or submitit's local executor), see dreamjax.slurm."""


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


ConfigStore.instance().store(group="hydra/launcher", name="dreamjax_slurm", node=DreamjaxSlurmLauncherConf,
                             provider="dreamjax")
ConfigStore.instance().store(group="hydra/launcher", name="dreamjax_slurm_local",
                             node=DreamjaxSlurmLocalLauncherConf, provider="dreamjax")
