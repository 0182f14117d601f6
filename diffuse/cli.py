"""argv → job name + Hydra overrides. The only place that knows about command-line flags.

    diffuse JOB [overrides…] [--flag[=value]…] [Hydra flags: -m, --cfg job, --help, …]

`--name[=value]` flags that are not Hydra's own become overrides (`--checkpoint P` → `checkpoint=P`,
`--animation` → `animation.enabled=true`). Hydra's flags pass through untouched.
"""

from __future__ import annotations

import sys

JOBS = {
    "train": "train a diffusion model (default: shapes, 2-D, unet, linear DDPM)",
    "sample": "draw samples from a checkpoint (default: newest under outputs/): samples.npz, grid.png",
    "animate": "sample plus an animation of the denoising (= sample --animation)",
    "edit": "use a run on your items: mode=inpaint | img2img | invert | interpolate: edits.npz, grid.png",
    "evaluate": "sample quality of a checkpoint against real data (FD, label agreement): metrics.json",
    "train-vae": "train the autoencoder of latent diffusion (then: diffuse train latent.vae=PATH)",
    "export": "a checkpoint's weights as model.safetensors + config.json (sample takes the folder too)",
}
ALIASES = {"animate": ("sample", ["animation.enabled=true"]), "train-vae": ("train_vae", [])}

# Hydra's own flags; those marked True take a value as the next argument.
HYDRA_FLAGS = {"--multirun": False, "-m": False, "--cfg": True, "-c": True, "--package": True, "-p": True,
               "--help": False, "-h": False, "--hydra-help": False, "--info": True, "-i": False,
               "--resolve": False, "--run": False, "-r": False, "--shell-completion": False, "-sc": True,
               "--config-path": True, "-cp": True, "--config-name": True, "-cn": True,
               "--config-dir": True, "-cd": True, "--experimental-rerun": True, "--version": False}
# Boolean flags that mean something other than `name=true`.
FLAG_TARGETS = {"animation": "animation.enabled"}


def usage() -> str:
    lines = ["usage: diffuse JOB [key=value …] [--flag[=value] …] [-m] [--cfg job] [--help]", "", "jobs:"]
    lines += [f"  {name:<11}{text}" for name, text in JOBS.items()]
    lines += ["", "`diffuse JOB --help` lists the config groups and their choices.",
              "Examples: diffuse train model=msnat dim=3 · diffuse sample --animation · "
              "diffuse train -m trainer.lr=1e-4,3e-4"]
    return "\n".join(lines)


def translate(args: list[str]) -> list[str]:
    """Turn `--name[=value]` flags into `name=value` overrides; leave Hydra's flags and overrides alone."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in HYDRA_FLAGS:
            out.append(arg)
            if HYDRA_FLAGS[name] and not eq and i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
        elif arg.startswith("--") and len(arg) > 2:
            key = name[2:].replace("-", "_")
            if not eq:
                nxt = args[i + 1] if i + 1 < len(args) else None
                if nxt is not None and not nxt.startswith("-") and "=" not in nxt:
                    value, i = nxt, i + 1
                else:
                    value = "true"
            out.append(f"{FLAG_TARGETS.get(key, key)}={value}")
        else:
            out.append(arg)
        i += 1
    return out


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's flags (with their values) from overrides: Hydra's parser wants the overrides in one
    run, so `experiment=x --cfg job` must reach it as `experiment=x … --cfg job`."""
    overrides, flags = [], []
    i = 0
    while i < len(args):
        name, eq, _ = args[i].partition("=")
        if name in HYDRA_FLAGS:
            flags.append(args[i])
            if HYDRA_FLAGS[name] and not eq and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(args[i])
        i += 1
    return overrides, flags


# Jobs whose `sampler` is optional (null: the run's own sampler, read from its checkpoint).
OWN_SAMPLER_JOBS = ("sample", "evaluate", "edit")


def own_sampler_overrides(config_name: str, overrides: list[str]) -> list[str]:
    """`diffuse sample sampler.steps=50` with no `sampler=X`: the run's own sampler with steps=50. The config
    has no sampler node then (sampler: null), and Hydra adds keys to a missing node only with `+` (and in a
    sweep such as `-m sampler=ddim,heun sampler.steps=50` composes the base config before any choice), so
    such overrides become `++sampler.steps=50` (add or override): the composed config then holds a sampler
    node of bare values, which the job lays over the run's own sampler, or the chosen sampler's own node."""
    if config_name not in OWN_SAMPLER_JOBS:
        return overrides
    return [f"++{o}" if o.startswith("sampler.") else o for o in overrides]


TRAINERS = ("train", "train_vae")
DATA_LOCATIONS = ("dataset.root=", "dataset.path=", "dataset.cache_dir=", "dataset.download=")


def resume_overrides(config_name: str, overrides: list[str]) -> list[str]:
    """`diffuse train resume=R dataset.path=/data/faces`: a resumed run takes where its data lies from the command
    line (never from its checkpoint), but the composed config's dataset is the default one, which may lack
    the key; `++dataset.path=…` adds it (the job copies it onto the run's own dataset)."""
    if config_name not in TRAINERS or not any(o.startswith("resume=") for o in overrides):
        return overrides
    return [f"++{o}" if o.startswith(DATA_LOCATIONS) else o for o in overrides]


def _distributed_overrides() -> list[str]:
    """Under torchrun (or several Slurm tasks) only rank 0 writes a Hydra run dir; the others write nothing."""
    from diffuse.training.distributed import launched_rank_world

    rank, world = launched_rank_world()
    if world > 1 and rank > 0:
        return ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]
    return []


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"diffuse: unknown job {job!r}; choose one of: {', '.join(JOBS)}", file=sys.stderr)
        sys.exit(2)
    config_name, extra = ALIASES.get(job, (job, []))
    overrides, flags = split_flags(translate(rest))
    overrides = resume_overrides(config_name, own_sampler_overrides(config_name, overrides))
    overrides = extra + overrides + [f"hydra.job.name={config_name}"] + _distributed_overrides() + flags
    from diffuse.app import launch  # Hydra is imported only once we know there is a job to run

    launch(config_name, overrides)


if __name__ == "__main__":
    main()
