"""The smallest TPU slice of a generation on which a config's train step fits, found by compiling.

    python tools/tpu_fit.py --generation v5e [CONFIG.yaml] [key=value ...] [--slices v5e:2x2 v5e:2x4 ...]

Compiles the train and eval steps (`jaxlm.aot.compile_for`, as `jaxlm compile` does) on each
slice in turn, smallest first, with `mesh.fsdp` over every chip (mesh.data=1) unless the
overrides set the mesh, and prints one line per slice: the compiler's memory per chip, jaxlm's
plan, and whether it fits. Stops at the first slice that fits. Needs libtpu (the `tpu` extra).
"""

from __future__ import annotations

import argparse
import sys
import time

SLICES = {"v5e": ["v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16"],
          "v5p": ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4"],
          "v4": ["v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v4:2x4x4", "v4:4x4x4"],
          "v6e": ["v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16", "v6e:16x16"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--generation", choices=sorted(SLICES), default="v5e")
    p.add_argument("--slices", nargs="+", help="slices to try, smallest first (default: the generation's list)")
    args = p.parse_args(argv)
    if args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None

    from jaxlm import aot
    from jaxlm.config import load_config

    mesh = [] if any(o.startswith("mesh.") for o in args.overrides) else ["mesh.data=1", "mesh.fsdp=-1"]
    cfg = load_config(args.config, mesh + args.overrides)
    for name in args.slices or SLICES[args.generation]:
        t0 = time.perf_counter()
        try:
            r = aot.compile_for(cfg, aot.topology_devices(name), name)
        except Exception as e:  # a mesh the slice cannot hold, a batch it cannot divide: say so, try the next
            print(f"{name}: not compiled: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        print(f"{name}: {r.chips} chips; compiler {r.total / 2**30:.2f} GiB per chip of {r.hbm / 2**30:.0f} "
              f"({100 * r.total / r.hbm:.0f}%); plan {r.planned.total / 2**30:.2f} GiB "
              f"(plan / compiler {r.planned.total / r.total:.2f}); {'FITS' if r.fits else 'does not fit'}; "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        if r.fits:
            print("\n".join(aot.describe(r)))
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
