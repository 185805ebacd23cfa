from hintpipe.cli import main

raise SystemExit(main())
