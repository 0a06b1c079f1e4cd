from qemupatch.cli import main

raise SystemExit(main())
