from libkd.cli import main

raise SystemExit(main())
