"""``python -m pxsgate``. The guard matters: decode worker processes are spawned, and a
spawned child imports the parent's main module."""

from pxsgate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
