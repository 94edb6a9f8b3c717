"""A stage is one object, and where its work runs is decided once per run: the contract every stage module keeps.

A **stage** (``Stage``) has a ``name``, says what it reads (``inputs``: the digests of its config and of the
earlier stages' outputs it uses) and runs (``run``), returning the files it wrote and a summary. The round loop
(``pipeline/rounds.py``) is a list of stages per round (``pipeline/plan.round_stages``); for each it asks for
its inputs, skips it when the round's manifest holds it done from those inputs with its files whole
(``stages.storage.artifacts.RoundManifest``), and otherwise runs it and records it. ``tune`` and the benches call
the same objects.

An **executor** (``Executor``) is where the work of a stage runs: ``map`` (one task per item, e.g. per shard),
``pool`` (items streamed through workers that each load a model once) and ``fit`` (a training run with
checkpoints). ``InProcess`` runs all of it here; ``pipeline/distributed/executor.RayExecutor`` runs the same calls
as Ray tasks, a Ray Data actor pool and Ray Train. One function (``pipeline/distributed/executor.choose_executor``)
picks one for the run from the data's size and the cluster, so no stage keeps its own "small enough" rule. An
exception raised by the work reaches the caller as itself (a ``DataError`` stays a ``DataError``), whichever
executor ran it.

A **worker** (``Worker``) is the class a pool instantiates once per process: ``__init__(**kwargs, threads,
decode_threads)`` loads the model, ``process(**item) -> dict`` does one item. The executor sets ``threads`` (torch's
threads) and ``decode_threads``: an actor's share of its node, or the whole machine in process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

from stages.storage.files import Location

if TYPE_CHECKING:
    from stages.data.labeled_scan import LabeledIndex
    from stages.storage.artifacts import RoundManifest
    from stages.storage.layout import RoundLayout, RunLayout

# The stages of a round, in order: round 0 (pretrain when the run pretrains,) train and evaluate; a student round
# pseudo_label, select, train and evaluate. Later stages are redone when one is.
ROUND_STAGES = ("pretrain", "pseudo_label", "select", "train", "evaluate")


@dataclasses.dataclass(frozen=True)
class TrainResources:
    """The workers of one training stage: Ray Train workers, or this process. ``runtime`` (Ray runs only): ``ray_train``
    starts a Ray Train worker group for each stage; ``warm`` keeps one training actor for the whole run (one worker);
    ``auto`` picks (``pipeline/distributed/executor.warm_trainer``)."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    runtime: str = "ray_train"
    gpus_per_worker: float = 1.0

    def per_worker(self) -> dict[str, float]:
        """What one worker holds, as Ray resources."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}


@dataclasses.dataclass(frozen=True)
class LabelResources:
    """The model workers of the labeling and evaluation stages. ``actors: N`` is a fixed pool; ``actors: 0`` an
    autoscaling one (``pool``) that starts with what the cluster holds now (one actor per ``gpus_per_actor`` GPUs,
    else per ``cpus_per_actor`` CPUs) and grows, as the cluster's autoscaler adds nodes, up to ``max_actors`` (0 =
    one per item). ``threads: 0`` gives each actor one torch thread and one decode thread per CPU it holds;
    ``decode``: where images are decoded: ``cpu`` in the actor's threads, ``gpu`` on the actor's GPU (nvJPEG),
    ``tasks`` by CPU tasks of ``decode_cpus`` each, on any node, ahead of the actors (``Executor.stream``)."""

    actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads: int = 0
    decode: str = "cpu"
    max_actors: int = 0
    cpu_decoder: str = "auto"  # stages/data/decoders.py backend for the CPU decode ("auto": its DEFAULT)
    decode_cpus: float = 1.0  # CPUs of one decode task (``decode: tasks``)

    def actor_count(self, cluster: dict[str, float]) -> int:
        """Actors the cluster holds room for now (at least one: an autoscaling group at zero scales up for it). With
        ``decode: tasks`` on CPUs alone, one decode task's CPUs are left free: actors holding every CPU would leave
        the tasks that feed them pending for ever."""
        if self.actors:
            return self.actors
        if self.gpus_per_actor:
            return max(1, int(cluster.get("GPU", 0) // self.gpus_per_actor))
        return max(1, int((cluster.get("CPU", 1) - self.reserved_cpus()) // self.cpus_per_actor))

    def reserved_cpus(self) -> float:
        """CPUs the actors must leave to the decode tasks (none when the actors decode)."""
        return self.decode_cpus if self.decode == "tasks" else 0.0

    def pool(self, cluster: dict[str, float], items: int) -> dict[str, int]:
        """``ActorPoolStrategy`` arguments: never more actors than items; ``min_size`` 1 when autoscaling, so the
        stage starts as soon as one actor is up and Ray Data adds actors as nodes join."""
        items = max(1, items)
        if self.actors:
            return {"size": min(self.actors, items)}
        most = min(items, self.max_actors or items)
        if self.reserved_cpus() and not self.gpus_per_actor:
            most = min(most, self.actor_count(cluster))  # a CPU actor more would take the decode tasks' CPUs
        return {"min_size": 1, "max_size": most, "initial_size": min(self.actor_count(cluster), most)}

    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_actor))

    def fits(self, nodes: Sequence[dict[str, float]]) -> bool:
        """Whether one actor fits on one of these nodes (each node's total resources, as ``ray.nodes()`` has them)."""
        return any(n.get("CPU", 0) >= self.cpus_per_actor and n.get("GPU", 0) >= self.gpus_per_actor for n in nodes)

    def describe(self) -> str:
        return f"{self.cpus_per_actor:g} CPUs" + (f" and {self.gpus_per_actor:g} GPUs" if self.gpus_per_actor else "")


class Worker(Protocol):
    """Made once per pool process (``__init__(**kwargs, threads=..., decode_threads=...)``); one call per item."""

    def process(self, **item: Any) -> dict: ...


class Executor(Protocol):
    kind: str  # "in-process" or "ray": recorded in each stage's summary as ``ran_as``

    def map(self, fn: Callable, args: Iterable[tuple], total: int, desc: str) -> Iterator:
        """``fn(*a)`` for each ``a``; results as they finish (in any order)."""
        ...

    def share(self, obj: Any) -> Any:
        """``obj`` as an argument many ``map`` calls can take without copying it once per call."""
        ...

    def pool(
        self, cls: type, kwargs: dict, items: list[dict], resources: LabelResources
    ) -> contextlib.AbstractContextManager[Iterator[dict]]:
        """``cls(**kwargs).process(**item)`` for every item, on workers made once each; yields their results."""
        ...

    def stream(
        self,
        decode: Callable[..., Iterator[dict]],
        items: list[dict],
        cls: type,
        kwargs: dict,
        resources: LabelResources,
        batch_size: int,
        decode_bytes: int,
    ) -> contextlib.AbstractContextManager[Iterator[dict]]:
        """``decode(**item, threads=...)`` for every item (column batches, on CPUs apart from the workers, holding
        about ``decode_bytes`` of memory each), streamed through ``cls(**kwargs)`` workers in batches of
        ``batch_size`` rows; yields the workers' column batches."""
        ...

    def fit(
        self, train: Callable[[Any], dict], name: str, checkpoints: Location, resources: TrainResources, out: Path
    ) -> dict:
        """Run ``train(hooks)`` (resuming from the latest checkpoint under ``checkpoints/name``); copy the final
        checkpoint's files into ``out`` as ``final-<file>``; return the final metrics."""
        ...


class InProcess:
    """Every executor call in this process: tasks one after another, one worker object for a pool (given the whole
    machine's threads), training with local checkpoints (a restart resumes from the latest one)."""

    kind = "in-process"

    def __init__(self, progress: bool = True, hooks: Callable[[Path, str], Any] | None = None) -> None:
        """``hooks(checkpoint_root, device)``: the ``TrainHooks`` ``fit`` trains with (``LocalHooks`` by default)."""
        self.progress, self.hooks = progress, hooks

    def map(self, fn: Callable, args: Iterable[tuple], total: int, desc: str) -> Iterator:
        bar = tqdm(total=total, unit="shard", desc=desc, disable=not self.progress, dynamic_ncols=True, leave=False)
        with bar:
            for a in args:
                yield fn(*a)
                bar.update(1)

    def share(self, obj: Any) -> Any:
        return obj

    @contextlib.contextmanager
    def pool(self, cls: type, kwargs: dict, items: list[dict], resources: LabelResources) -> Iterator[Iterator[dict]]:
        worker = cls(**kwargs, threads=0, decode_threads=os.cpu_count() or 1)  # torch's own threads, all cores
        yield (worker.process(**item) for item in items)

    @contextlib.contextmanager
    def stream(
        self,
        decode: Callable[..., Iterator[dict]],
        items: list[dict],
        cls: type,
        kwargs: dict,
        resources: LabelResources,
        batch_size: int,
        decode_bytes: int,
    ) -> Iterator[Iterator[dict]]:
        """Decoding and the worker take turns here, each on every core (the decode batches are the worker's)."""
        worker = cls(**kwargs, threads=0, decode_threads=0)
        threads = os.cpu_count() or 1
        yield (worker(batch) for item in items for batch in decode(**item, threads=threads))

    def fit(
        self, train: Callable[[Any], dict], name: str, checkpoints: Location, resources: TrainResources, out: Path
    ) -> dict:
        from stages.core.hooks import LocalHooks

        make = self.hooks or LocalHooks
        hooks = make(Path(str(checkpoints)) / name, "cuda" if resources.use_gpu else "cpu")
        metrics = train(hooks)
        copy_final(hooks.restore(), out)
        return metrics


def copy_final(checkpoint: Path | None, out: Path) -> None:
    """The files of the final checkpoint folder, as ``out/final-<name>``."""
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(checkpoint).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f"final-{f.name}")


@dataclasses.dataclass
class RunData:
    """What a run reads, as the driver knows it: shard lists and the labeled splits' indexes (no image)."""

    labeled_shards: list[str]
    unlabeled_shards: list[str]
    test_shards: list[str]
    labeled: LabeledIndex  # the training part (a carved validation split taken out)
    test: LabeledIndex
    num_classes: int
    channels: int
    names: list[str]
    val: LabeledIndex | None = None
    validation: dict = dataclasses.field(default_factory=dict)  # how the split was made, for run.json
    pretrain: bool = False  # round 0 pretrains its encoder (decided before round 0: stages/pretrain.py)
    unlabeled_images: int = 0  # decodable unlabeled images, as the data check counted them (0 = not counted)

    @property
    def exclude_keys(self) -> frozenset[str]:
        """Labeled keys never trained on: a validation split carved from the labeled shards."""
        return frozenset(self.validation.get("carved_keys", ()))


@dataclasses.dataclass
class StageContext:
    """What a stage of round ``layout.index`` may use: its files, the previous round's, the data, the executor."""

    run: RunLayout
    layout: RoundLayout
    data: RunData
    executor: Executor
    manifest: RoundManifest
    config_digest: str  # the run's stage config (pipeline/plan.stage_config_digest)
    progress: bool = True

    @property
    def round(self) -> int:
        return self.layout.index

    @property
    def previous(self) -> RoundLayout | None:
        return self.run.round(self.round - 1) if self.round > 0 else None


@dataclasses.dataclass
class StageOutput:
    """What a stage wrote (recorded in the manifest with each file's sha256) and its summary."""

    files: list[Location]
    result: dict


class Stage(Protocol):
    name: str

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        """Everything that decides this stage's outputs, as digests: a change makes it (and later stages) stale."""
        ...

    def run(self, ctx: StageContext) -> StageOutput: ...
