from qmerge.cli import main

raise SystemExit(main())
