from pxsgate.cli import main

raise SystemExit(main())
