"""``vp2o launch``: the per-node torchrun command lines and the resolved parallel layout.

    vp2o launch --dry-run examples/vp2o/configs/qwen3_30b_a3b_vp2o_8k.yaml --nodes 8 \\
        --gpus-per-node 8 [key=value ...]

Loads the config with the overrides, checked against world = nodes x GPUs per node
(``load_config(..., world_size=world)``, so a layout that does not divide fails here, before any
node starts), and prints one torchrun line per node (static rendezvous: node i hosts global
ranks i*G .. i*G+G-1) and every rank's coordinates. The sbatch scripts in examples/vp2o/slurm/
run the same line on each node with ``--node_rank=$SLURM_NODEID``.

Rank order is megatron-core's default ``tp-cp-ep-dp-pp``: dense ranks are
``tp + TP*(cp + CP*(dp + DP*pp))``; expert ranks within a pipeline stage are
``etp + ETP*(ep + EP*edp)``.

Without ``--dry-run`` a single-node launch runs its torchrun line here; multi-node jobs go
through a scheduler (the sbatch scripts).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from vp2o.config import Config, ConfigError, load_config


@dataclass(frozen=True)
class Layout:
    """A resolved layout: sizes of every parallel dimension for ``world`` ranks."""

    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    expert_dp: int
    sequences_per_rank: int
    micro_batch_size: int
    micro_batches: int

    def coordinates(self, rank: int) -> dict[str, int]:
        """Megatron's (tp, cp, dp, pp) and expert (etp, ep, edp) ranks of global ``rank``."""
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        dp, pp = rest % self.dp, rest // self.dp
        in_stage = rank % (self.world // self.pp)
        etp, rest = in_stage % self.etp, in_stage // self.etp
        ep, edp = rest % self.ep, rest // self.ep
        return {"tp": tp, "cp": cp, "dp": dp, "pp": pp, "etp": etp, "ep": ep, "edp": edp}


def resolve_layout(cfg: Config, world: int) -> Layout:
    """The layout of ``cfg`` (a loaded, checked config) on ``world`` ranks.

    Raises:
        ConfigError: the layout does not divide ``world``.
    """
    p = cfg.parallel
    dp, expert_dp = p.data_parallel(world), p.expert_data_parallel(world)
    sequences = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    mbs = cfg.rollout.micro_batch_size
    return Layout(
        world=world, tp=p.tensor_parallel, pp=p.pipeline_parallel, cp=p.context_parallel,
        ep=p.expert_parallel, etp=p.etp, dp=dp, expert_dp=expert_dp,
        sequences_per_rank=sequences, micro_batch_size=mbs,
        micro_batches=math.ceil(sequences / mbs),
    )


def torchrun_command(
    *, nodes: int, gpus_per_node: int, node_rank: int | str, head: str, port: int,
    verb: str, config: str, overrides: list[str],
) -> list[str]:
    """One node's argv: torchrun (static rendezvous at ``head:port``) through
    ``python -m vp2o.launch``, which forwards SIGUSR1 to the workers (:func:`run_torchrun`)."""
    return [
        "python", "-m", "vp2o.launch", f"--nnodes={nodes}", f"--nproc_per_node={gpus_per_node}",
        f"--node_rank={node_rank}", "--rdzv_backend=static", f"--rdzv_endpoint={head}:{port}",
        "-m", "vp2o.cli", verb, "--config", config, *overrides,
    ]


def node_hosts(nodes: int, hosts: str | None) -> list[str]:
    """Host names: ``--hosts``, else the SLURM allocation (``scontrol show hostnames``), else
    placeholders ``node0 .. node{N-1}``."""
    names: list[str] = []
    if hosts is not None:
        names = [h.strip() for h in hosts.split(",") if h.strip()]
        if not names:
            raise ConfigError(f"--hosts {hosts!r}: expected comma-separated host names")
    elif os.environ.get("SLURM_JOB_NODELIST"):
        try:
            names = subprocess.run(
                ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                check=True, capture_output=True, text=True, timeout=30,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            names = []
    if not names:
        names = [f"node{i}" for i in range(nodes)]
    if len(names) < nodes:
        raise ConfigError(f"--hosts = {hosts!r}: expected at least {nodes} host names")
    return names[:nodes]


def describe(args: argparse.Namespace
             ) -> tuple[Layout, list[str], list[list[str]], ConfigError | None]:
    """Layout, hosts, per-node argv for the parsed ``vp2o launch`` arguments, and the error with
    which the verb would refuse the config when it starts (None when it accepts it)."""
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{flag} = {value}: expected an integer >= 1")
    world = args.nodes * args.gpus_per_node
    # Fail here, not on every node: the layout against the world, and the rules every loop shares
    # (those of sft). A verb's own rules (train's TP = PP = 1, say) do not stop --dry-run, so
    # that any layout megatron accepts can be planned (docs/scaling.md); a launch refuses them.
    cfg = load_config(args.config, args.overrides, world_size=world, loop="sft")
    refusal = None
    try:
        cfg.require_loop(args.verb)
        if args.verb == "sft":  # the one rule of a verb that needs the world
            cfg.sft.check_data_parallel(cfg.parallel.data_parallel(world))
    except ConfigError as e:
        refusal = e
    layout = resolve_layout(cfg, world)
    hosts = node_hosts(args.nodes, args.hosts)
    commands = [
        torchrun_command(nodes=args.nodes, gpus_per_node=args.gpus_per_node, node_rank=i,
                         head=hosts[0], port=args.port, verb=args.verb, config=args.config,
                         overrides=args.overrides)
        for i in range(args.nodes)
    ]
    return layout, hosts, commands, refusal


def format_plan(layout: Layout, hosts: list[str], commands: list[list[str]],
                gpus_per_node: int) -> str:
    """The text ``--dry-run`` prints."""
    L = layout
    lines = [
        f"layout: world={L.world} TP={L.tp} PP={L.pp} CP={L.cp} EP={L.ep} ETP={L.etp} "
        f"DP={L.dp} expert-DP={L.expert_dp}",
        f"batch: sequences/rank/step={L.sequences_per_rank} micro_batch_size={L.micro_batch_size} "
        f"micro-batches={L.micro_batches} global sequences/step={L.sequences_per_rank * L.dp}",
    ]
    for node, (host, cmd) in enumerate(zip(hosts, commands, strict=True)):
        lines.append(f"node {node} ({host}): {shlex.join(cmd)}")
    for node, host in enumerate(hosts):
        for local in range(gpus_per_node):
            rank = node * gpus_per_node + local
            c = L.coordinates(rank)
            lines.append(
                f"rank {rank}: host={host} local_rank={local} tp={c['tp']} cp={c['cp']} "
                f"dp={c['dp']} pp={c['pp']} ep={c['ep']} etp={c['etp']} edp={c['edp']}"
            )
    return "\n".join(lines)


def _launch(args: argparse.Namespace) -> int:
    layout, hosts, commands, refusal = describe(args)
    if args.dry_run:
        print(format_plan(layout, hosts, commands, args.gpus_per_node))
        if refusal is not None:
            print(f"note: vp2o {args.verb} refuses this config when it starts: {refusal}")
        return 0
    if refusal is not None:
        raise refusal
    if args.nodes != 1:
        print("vp2o launch: multi-node jobs start through the scheduler (examples/vp2o/slurm/); "
              "use --dry-run to print each node's command", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, *commands[0][1:]])


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="print the plan, start nothing")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (default 8)")
    p.add_argument("--hosts", default=None,
                   help="comma-separated host names (default: the SLURM allocation, or node0..)")
    p.add_argument("--port", type=_port, default=29500,
                   help="rendezvous port on the head node (1-65535)")
    p.add_argument("--verb", default="train", choices=["train", "sft", "eval"],
                   help="vp2o verb each rank runs (default train)")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a TCP port, an integer in 1-65535")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``vp2o launch`` on the CLI's sub-command parsers."""
    p = subparsers.add_parser(
        "launch", help="print (--dry-run) or run the torchrun command lines of a layout",
        usage="vp2o launch [--dry-run] CONFIG [--nodes N] [--gpus-per-node G] [--hosts H,..] "
        "[--port P] [--verb train|sft|eval] [key=value ...]",
        description="Resolve the parallel layout of CONFIG on nodes x GPUs per node, reject it "
        "if it does not divide, and print each node's torchrun command and every rank's "
        "coordinates (--dry-run); without --dry-run a single-node job is started here.",
    )
    _options(p)
    p.add_argument("config", help="YAML config")
    # vp2o.cli.main takes overrides that follow an option too (`CONFIG a=1 --nodes 2 b=2`)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides (e.g. rollout.micro_batch_size=4)")
    p.set_defaults(func=_launch)
    return p


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def run_torchrun(argv: list[str]) -> None:
    """torchrun with SIGUSR1 forwarded to its worker processes.

    SLURM's ``--signal=USR1@120`` may reach only the task srun started (this process); torchrun
    itself would die of it (default action) and does not forward it. Here the signal is passed
    on to the workers, whose trainer checkpoints and exits 0 (``vp2o.train.StopRequest``);
    torchrun then sees clean exits. A worker that also received it directly sees it twice, which
    is the same as once.
    """
    import signal

    from torch.distributed.run import main as torchrun_main

    def forward(signum, frame) -> None:
        for child in _children(os.getpid()):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGUSR1, forward)
    torchrun_main(argv)


if __name__ == "__main__":
    run_torchrun(sys.argv[1:])
